/* pg_internal.h - what the files of the PostgreSQL store share (not
 * installed): its struct, its prepared statements' numbers and the functions
 * one of its files calls in another. The files, by job:
 *   pg.c          the ops table, open (and its probe), close, stats
 *   pg_conn.c     the engine: connecting, statements, retries, errors
 *   pg_sql.c      the prepared statements; the chat, message, queue ops
 *   pg_pipe.c     appends in pipeline mode, their notifications per chunk
 *   pg_listen.c   the listener thread; LISTEN, UNLISTEN, poll, fd
 *   pg_migrate.c  the schema's migrations
 * A helper is static in its file unless another file calls it; then it is
 * declared here, with a pg_ prefix (p_x, an op of the table, becomes pg_x).
 */
#ifndef CS_PG_INTERNAL_H
#define CS_PG_INTERNAL_H

#include "../internal.h"

#include <libpq-fe.h>

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CONNECT_TIMEOUT "5" /* seconds, unless the DSN sets its own */
#define PREP_NAME_MAX 40    /* "cs_append_notify_" and 16 hex digits */

/* Statements prepared once per query connection (the hot paths). */
enum {
    PREP_APPEND,
    PREP_APPEND_NOTIFY,
    PREP_APPEND_BODY,
    PREP_AFTER,
    PREP_SNAPSHOT,
    PREP_STATE,
    PREP_AFTER_MANY,
    PREP_COUNT
};

typedef struct pg_store {
    char *dsn;
    char *password; /* scrubbed from every message, or NULL */
    bool has_timeout;
    char schema[64];
    char prefix[80];        /* channel prefix: "chat:" or "<schema>:chat:" */
    PGconn *q;              /* queries and writes */
    double connect_timeout; /* seconds */
    double query_timeout;   /* seconds for one statement */
    int64_t q_reconnects;   /* of q (the caller's thread only) */
    /* The listener. Its connection is read by a thread of its own (the
     * drainer: see "the listener thread" in pg_listen.c), so notifications
     * are taken off the socket whatever the caller does; everything from l
     * to l_reconnects is shared with it, under lmu. The caller uses l too
     * (LISTEN, UNLISTEN, a reconnect it must wait for), holding lmu. */
    pthread_mutex_t lmu;
    PGconn *l;          /* the listener (non-blocking), or NULL */
    cs_idset listening; /* chat ids (no watermark: INT64_MIN) */
    /* UNLISTENs still to send: the thread sends them (a close never waits
     * for the server); l_inflight while their results are still to read. */
    cs_idset unlisten;
    bool l_inflight;
    /* Deaf: the buffer overflowed with nobody reading it, so the thread
     * UNLISTENed everything (a listening backend costs every writer of the
     * database even when it has nothing to send); deaf_pending until that is
     * sent. The next read by the hub makes the thread LISTEN to every chat
     * again (hear_pending, then hearing until it is committed) and then
     * every subscription resyncs. */
    bool deaf, deaf_pending, hear_pending, hearing;
    int64_t deaf_count;  /* times it went deaf */
    bool resync_pending; /* the listener came back: tell the hub */
    double retry_at, backoff;
    struct lnote **notes; /* hints taken off the listener, for the hub */
    size_t nnotes, capnotes, note_bytes;
    cs_idset dropped; /* chats whose hints the bound dropped */
    bool signalled;   /* a byte waits in ready[] */
    bool lstop;       /* the thread ends */
    int64_t l_reconnects;
    int64_t warnings; /* see note_warning */
    char last_warning[256];
    int wake[2];  /* the caller wakes the thread */
    int ready[2]; /* the thread tells the hub (the store's fd) */
    pthread_t thread;
    bool thread_started;
    /* The chat whose transaction (tx_begin .. tx_end) is open on q. */
    bool in_tx;
    int64_t tx_chat;
    /* Statements prepared on q: a bit per PREP_* for connection q_gen (a
     * reconnect or reset starts a new generation with none prepared). */
    uint64_t q_gen, prep_gen;
    unsigned prepared;
    char *prep_sql[PREP_COUNT]; /* their texts, built at open */
    /* The last statement failed after it was sent, with no answer: it may
     * have run (see collect). */
    bool unknown;
    /* Their names: the kind and a hash of the text, which names the schema,
     * so that stores of different schemas (or versions) that meet on one
     * server session through a pooler never run each other's statement. */
    char prep_name[PREP_COUNT][PREP_NAME_MAX];
    int l_pid; /* the listener's server process, as the server reports it */
    char sqlstate[6]; /* of the last statement that failed on the server */
    char err[512];
} pg_store;

#define FNV_OFFSET UINT64_C(14695981039346656037)

/* ---- pg_conn.c ---------------------------------------------------------- */
uint64_t pg_fnv1a(const void *p, size_t n, uint64_t h);
double pg_now(void);
int pg_fail(pg_store *s, int rc, const char *what, const char *detail);
int pg_conn_fail(pg_store *s, PGconn *c, const char *what);
int pg_write_failed(pg_store *s);
void pg_q_notice(void *arg, const PGresult *r);
void pg_l_notice(void *arg, const PGresult *r);
PGconn *pg_connect_db_mode(pg_store *s, bool start);
PGconn *pg_connect_db(pg_store *s);
int pg_wait_io(PGconn *c, bool write, double deadline);
PGresult *pg_run(pg_store *s, PGconn *c, const char *sql, int n,
                 const char *const *vals);
bool pg_prepare(pg_store *s, PGconn *c, int k, int n);
void pg_drop_conn(pg_store *s, PGconn *c);
PGresult *pg_run_prepared(pg_store *s, PGconn *c, int k, int n,
                          const char *const *vals);
int pg_exec(pg_store *s, PGconn *c, const char *sql, int n,
            const char *const *vals);
PGconn *pg_qconn(pg_store *s);
PGresult *pg_run_retry_k(pg_store *s, int k, const char *sql, int n,
                         const char *const *vals);
PGresult *pg_run_retry(pg_store *s, const char *sql, int n,
                       const char *const *vals);
PGconn *pg_live_qconn(pg_store *s);
int pg_exec_retry(pg_store *s, const char *sql, int n, const char *const *vals);
void pg_rollback(pg_store *s);
int pg_claim_q(pg_store *s);
int pg_begin_tx(pg_store *s);
int pg_commit_tx(pg_store *s);
void pg_i64s(char *buf, int64_t v);
bool pg_col_id(PGresult *r, int row, int col, int64_t *out);
bool pg_col_int(PGresult *r, int *out);
void pg_channel_of(pg_store *s, int64_t chat_id, char *buf, size_t cap);

/* ---- pg_sql.c ----------------------------------------------------------- */
bool pg_build_prepared(pg_store *s);

/* Its ops (pg_ops, in pg.c). */
int pg_create_chat(void *st, const char *owner, const char *title,
                   const char *key, int64_t *chat_id);
int pg_chat_get(void *st, int64_t chat_id, cs_chat_row *row);
int pg_tx_begin(void *st, int64_t chat_id, cs_chat_row *row);
int pg_tx_end(void *st, bool commit);
int pg_tx_insert(void *st, cs_chat_row *row, const cs_msg_in *msgs, size_t n,
                 cs_msglist *out);
int pg_tx_key_get(void *st, int64_t chat_id, const char *key, cs_keyed *out);
int pg_tx_key_put(void *st, int64_t chat_id, const char *key,
                  const cs_keyed *res);
int pg_messages_after_many(void *st, const int64_t *chats,
                           const int64_t *afters, size_t n, size_t limit,
                           cs_msglist *out, int64_t *histories);
int pg_append1_many(void *st, const cs_append_req *reqs, size_t n, int mode,
                    cs_msglist *out, int64_t *ids, int *rcs);
int pg_append1(void *st, int64_t chat_id, const cs_msg_in *msg, int mode,
               const char *worker, cs_msglist *out, int64_t *committed);
int pg_tx_update(void *st, const cs_chat_row *row, bool heartbeat);
int pg_tx_tail(void *st, int64_t chat_id, cs_msglist *out);
/* "no chat N" in s->err; CS_ENOTFOUND. */
int pg_no_chat(pg_store *s, int64_t chat_id);
int pg_tx_edit(void *st, cs_chat_row *row, int64_t message_id,
               const cs_msg_in *msg, cs_msglist *out, int64_t *after);
int pg_cuts(void *st, int64_t chat_id, int64_t since, int64_t *after,
            int64_t *upto, int64_t *history);
int pg_queue_list(void *st, int64_t chat_id, cs_queue *out);
int pg_tx_queue_add(void *st, int64_t chat_id, const char *actor,
                    const char *content, size_t len, int64_t *qid);
int pg_tx_queue_del(void *st, int64_t chat_id, int64_t qid);
int pg_tx_queue_front(void *st, int64_t chat_id, int64_t qid);
int pg_stuck(void *st, int kind, double age, size_t limit, int64_t *ids,
             int64_t *versions, size_t *n);
int pg_acquire(void *st, const char *worker, size_t limit, double stale_after,
               cs_chat_row *rows, size_t *n);
int pg_messages_after(void *st, int64_t chat_id, int64_t after, size_t limit,
                      cs_msglist *out, int64_t *history);
int pg_snapshot(void *st, int64_t chat_id, int64_t after, size_t limit,
                cs_chat_row *row, cs_queue *queue, cs_msglist *msgs,
                cs_parts *parts, int64_t *cut);
int pg_chats_state(void *st, const int64_t *ids, size_t n, cs_chat_state *out,
                   size_t *nout);
int pg_notify(void *st, int64_t chat_id, const char *payload, size_t len);
int pg_notify_part(void *st, int64_t chat_id, const char *worker,
                   const char *text, size_t len);

/* ---- pg_listen.c -------------------------------------------------------- */
int pg_make_pipe(int fds[2]);
void pg_wake_thread(pg_store *s);
void pg_notes_clear(pg_store *s, bool mark);
void *pg_listener_main(void *arg);
void pg_listener_close(pg_store *s);
int pg_listener_connect(pg_store *s, bool initial);

/* Its ops (pg_ops, in pg.c). */
int pg_listen(void *st, int64_t chat_id);
int pg_unlisten(void *st, int64_t chat_id);
int pg_poll(void *st,
            void (*cb)(void *ud, int64_t chat_id, const char *payload,
                       size_t len),
            void *ud);
int pg_fd(void *st);

/* ---- pg_migrate.c ------------------------------------------------------- */
/* Its ops (pg_ops, in pg.c). */
int pg_migrate(void *st);

#endif
