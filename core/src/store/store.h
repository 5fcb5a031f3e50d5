/* store.h - the store interface: the ops table every store implements
 * (store/memory.c, store/pg*.c), what crosses it (chat rows, queues, keyed
 * results, chat states) and the stores' open functions. Not included on its
 * own: internal.h includes it at its end, after the message types it uses. */
#ifndef CS_STORE_H
#define CS_STORE_H

/* ---- store ops table -------------------------------------------------- */
typedef cs_chat_info cs_chat_row;

void cs_queue_clear(cs_queue *q); /* frees the items, keeps capacity */
/* A queue's signature: FNV-1a over its item IDs in queue order, mixed with
 * their count, built one ID at a time (a store hashes its rows as it reads
 * them) or over a whole queue. Two queues with the same IDs in the same
 * order have the same signature. */
#define CS_QUEUE_SIG_START UINT64_C(1469598103934665603)
uint64_t cs_queue_sig_add(uint64_t h, int64_t id);
static inline uint64_t cs_queue_sig_end(uint64_t h, size_t n)
{
    return h ^ n;
}
uint64_t cs_queue_sig(const cs_queue *q);

/* What the backstop poll reads of a chat: where its messages end, its
 * status with the version, its queue's signature and its history (the
 * edits that cut it). */
typedef struct cs_chat_state {
    int64_t id, last_message_id, version, history;
    cs_status status;
    uint64_t queue_sig;
} cs_chat_state;
/* Appends a copy; CS_ENOMEM leaves q as it was. actor may be NULL. */
int cs_queue_push(cs_queue *q, int64_t id, const char *content, size_t len,
                  const char *actor, double created_at);

/* The parts of a chat's turn in progress (published since its last
 * message), as a snapshot reads them: seq orders them (and tells a part
 * read with the snapshot from the same part notified live). */
typedef struct cs_part {
    int64_t seq, after;
    char *text; /* malloc'd, NUL-terminated */
    size_t len;
} cs_part;
typedef struct cs_parts {
    cs_part *items;
    size_t n, cap;
} cs_parts;
/* Appends a copy; CS_ENOMEM leaves p as it was. */
int cs_parts_push(cs_parts *p, int64_t seq, int64_t after, const char *text,
                  size_t len);
void cs_parts_free(cs_parts *p);

/* What stuck lists: chats in requires_action with no change for `age`
 * seconds; running chats, or interrupted ones (waiting, a worker still on
 * them), whose worker's heartbeat is older than `age` (< 0: none); idle
 * chats (waiting with no worker, completed, error, not archived) with a
 * queue. */
enum {
    CS_STUCK_ACTION,
    CS_STUCK_RUNNING,
    CS_STUCK_INTERRUPTED,
    CS_STUCK_QUEUE
};

/* append1's notify: none (a notify step follows), the plain hint, or the
 * hint with the message when it fits. */
enum { CS_APPEND_SILENT, CS_APPEND_PLAIN, CS_APPEND_BODY };

/* What a write recorded under its idempotency key. */
typedef struct cs_keyed {
    int64_t *ids; /* malloc'd */
    size_t n;
    bool queued;      /* send: the id is a queue item's */
    uint64_t request; /* what was asked (cs_key_request): a retry must match */
} cs_keyed;

/* A hash of a keyed write's request: its kind ('a' append, 's' send) and
 * its messages (roles, contents, tool fields). */
uint64_t cs_key_request(char kind, const cs_msg_in *msgs, size_t n);

typedef struct cs_store_ops {
    const char *name;
    bool remote; /* notifications come from elsewhere (through fd) */
    /* key (NULL or ""): the owner's chat made with that key, if there is
     * one, is the answer and nothing is written. */
    int (*create_chat)(void *st, const char *owner, const char *title,
                       const char *key, int64_t *chat_id);
    /* The chat's row, outside any transaction: CS_ENOTFOUND if none. */
    int (*chat_get)(void *st, int64_t chat_id, cs_chat_row *row);
    /* Begins a transaction and locks the chat's row (FOR UPDATE): every
     * write to a chat runs under it (invariant 1). CS_ENOTFOUND (no
     * transaction left open) if there is no such chat. */
    int (*tx_begin)(void *st, int64_t chat_id, cs_chat_row *row);
    /* Commits (a failed commit is rolled back and reported) or rolls back. */
    int (*tx_end)(void *st, bool commit);
    /* Inserts messages after row->last_message_id: ids taken here, prev_id
     * chained; updates row->last_message_id and the chat's. out receives the
     * messages (references). */
    int (*tx_insert)(void *st, cs_chat_row *row, const cs_msg_in *msgs,
                     size_t n, cs_msglist *out);
    /* Writes status, version and worker ("" clears the worker and its
     * heartbeat); heartbeat: the worker's heartbeat is now. */
    int (*tx_update)(void *st, const cs_chat_row *row, bool heartbeat);
    /* Every message after the chat's last user message (all of them
     * without one), ascending: the turn whose tool calls may be open. */
    int (*tx_tail)(void *st, int64_t chat_id, cs_msglist *out);
    /* Idempotency keys, in the chat's transaction: the result recorded
     * under key (1, *out filled, out->ids malloc'd; 0: none), and recording
     * one. */
    int (*tx_key_get)(void *st, int64_t chat_id, const char *key,
                      cs_keyed *out);
    int (*tx_key_put)(void *st, int64_t chat_id, const char *key,
                      const cs_keyed *res);
    /* The queue in order, in a transaction or not. */
    int (*queue_list)(void *st, int64_t chat_id, cs_queue *out);
    /* At the end of the queue. */
    int (*tx_queue_add)(void *st, int64_t chat_id, const char *actor,
                        const char *content, size_t len, int64_t *qid);
    /* 1 deleted / moved to the front, 0 no such item in this chat. */
    int (*tx_queue_del)(void *st, int64_t chat_id, int64_t qid);
    int (*tx_queue_front)(void *st, int64_t chat_id, int64_t qid);
    /* Its own transaction: up to limit chats pending, or running with a
     * heartbeat older than stale_after seconds (< 0: never), oldest update
     * first, skipping rows another transaction holds, set running on worker
     * with version + 1 and a fresh heartbeat. rows receives them. */
    int (*acquire)(void *st, const char *worker, size_t limit,
                   double stale_after, cs_chat_row *rows, size_t *n);
    /* Optional (NULL: tx_begin + tx_insert + tx_end): one message in one
     * transaction, as few round trips as the store can (the same lock, the
     * same rule). Unless notify is CS_APPEND_SILENT, the message's
     * notification goes out with the commit (only if it commits) and needs
     * no notify step; with CS_APPEND_BODY it carries the message when it
     * fits. worker (or NULL): only while the chat runs on that worker, else
     * CS_ESTATE. CS_ENOTFOUND if no chat. *id receives the message's id
     * once it committed, even when the call then fails (CS_ENOMEM: the
     * message could not be copied into out), and 0 otherwise. */
    int (*append1)(void *st, int64_t chat_id, const cs_msg_in *msg, int notify,
                   const char *worker, cs_msglist *out, int64_t *id);
    /* Optional: append1 (no worker) for each of n requests, several in
     * flight at once, each its own transaction: rcs[i] and ids[i] as
     * append1's rc and *id; out receives the committed messages in request
     * order (a NULL entry where none: failed, or no memory for a copy).
     * Unless notify is CS_APPEND_SILENT, the notifications of those that
     * committed follow them in one statement of their own (after the
     * commits, as a publish's notify step: a connection lost in between
     * loses them to the backstop poll, never the messages). */
    int (*append1_many)(void *st, const cs_append_req *reqs, size_t n,
                        int notify, cs_msglist *out, int64_t *ids, int *rcs);
    /* Up to limit chats stuck in one way (CS_STUCK_*), oldest first, with
     * their versions: read only; the caller acts on each under its lock. */
    int (*stuck)(void *st, int kind, double age, size_t limit, int64_t *ids,
                 int64_t *versions, size_t *n);
    /* Keeps the part (with the next seq; the chat's parts of turns that
     * ended go) and notifies "1:p:<last_message_id>:<seq>:<text>" on the
     * chat's channel, the chat's last message ID read by the store.
     * CS_ENOTFOUND if no chat. worker (or NULL): only while the chat runs
     * on that worker, or was interrupted while it did, else CS_ESTATE (as
     * a worker's append). */
    int (*notify_part)(void *st, int64_t chat_id, const char *worker,
                       const char *text, size_t len);
    /* Messages with id > after, ascending: the lowest limit of them (0:
     * all). Every read of messages leaves out the soft-deleted ones (an
     * edit's). *history (may be NULL) receives the chat's history as of the
     * same view. */
    int (*messages_after)(void *st, int64_t chat_id, int64_t after,
                          size_t limit, cs_msglist *out, int64_t *history);
    /* Optional: messages_after for n chats in one statement (one view),
     * each after its own position, at most limit per chat; out receives
     * them ordered by chat, then id, and histories[i] the history of chat
     * i (-1 when it has no rows). A missing chat has no rows. */
    int (*messages_after_many)(void *st, const int64_t *chats,
                               const int64_t *afters, size_t n, size_t limit,
                               cs_msglist *out, int64_t *histories);
    /* An edit, in the chat's transaction: message_id must be a live user
     * message of the chat (else CS_EINVAL, nothing done). It and every
     * later message are soft-deleted, the chat's last message becomes its
     * prev_id (*after), msg is inserted after it (into out, as tx_insert
     * does), the history counts one more (row->history) and the cut is
     * recorded (history, after, the new message's id). */
    int (*tx_edit)(void *st, cs_chat_row *row, int64_t message_id,
                   const cs_msg_in *msg, cs_msglist *out, int64_t *after);
    /* The cuts of the chat recorded after history `since`: the lowest
     * after of them (*after; -1 when there are none), the highest new
     * message id (*upto) and the history now (*history). */
    int (*cuts)(void *st, int64_t chat_id, int64_t since, int64_t *after,
                int64_t *upto, int64_t *history);
    /* A subscription's snapshot in one statement, one consistent view: the
     * chat's row, its queue in order (appended to queue), its messages
     * with id > after, ascending, the lowest limit of them (0: all;
     * appended to msgs) and the parts of its turn in progress (those
     * published since its last message, by seq; appended to parts).
     * A cursor an edit left behind (a cut with after < `after` < its new
     * message) reads from the lowest such cut instead: *cut receives it
     * (-1: none), and the messages are those above it.
     * CS_ENOTFOUND if there is no chat. On failure queue, msgs and parts
     * are as they were. */
    int (*snapshot)(void *st, int64_t chat_id, int64_t after, size_t limit,
                    cs_chat_row *row, cs_queue *queue, cs_msglist *msgs,
                    cs_parts *parts, int64_t *cut);
    /* The state of each chat of ids (n of them, at most CS_POLL_CHUNK) in
     * one statement: a row in out (room for n) per chat that exists, in any
     * order; *nout receives how many. */
    int (*chats_state)(void *st, const int64_t *ids, size_t n,
                       cs_chat_state *out, size_t *nout);
    int (*listen)(void *st, int64_t chat_id);
    int (*unlisten)(void *st, int64_t chat_id);
    int (*notify)(void *st, int64_t chat_id, const char *payload, size_t len);
    /* Drains received notifications into cb; returns how many, or error.
     * A channel that is not a chat channel is reported with chat_id -1.
     * CS_RESYNC_ALL as chat_id (payload NULL) says notifications may have
     * been missed (the listener reconnected): every subscription resyncs; a
     * chat id with payload NULL says the same of that chat. */
    int (*poll)(void *st,
                void (*cb)(void *ud, int64_t chat_id, const char *payload,
                           size_t len),
                void *ud);
    int (*fd)(void *st);
    const char *(*errmsg)(void *st);
    void (*close)(void *st);
    int (*migrate)(void *st);
    int (*listener_pid)(void *st);
    int64_t (*reconnects)(void *st);
    /* Optional: the server's notification queue usage (0 to 1). */
    int (*queue_usage)(void *st, double *out);
    /* Optional: times the listener went deaf (nobody read its buffer). */
    int64_t (*deaf_count)(void *st);
    /* Optional: WARNINGs the server sent, and the last one's text. */
    int64_t (*warnings)(void *st, char *last, size_t cap);
} cs_store_ops;

#define CS_RESYNC_ALL (-2)
/* The most chats one chats_state statement reads. */
#define CS_POLL_CHUNK 1000

typedef struct cs_store {
    const cs_store_ops *ops;
    void *st;
} cs_store;

int cs_memory_store_open(cs_memdb *db, cs_store *out);
/* errbuf receives a detail on failure (never the password). */
int cs_pg_store_open(const char *dsn, const char *schema, double query_timeout,
                     cs_store *out, char *errbuf, size_t errlen);
/* A valid schema name: [a-z_][a-z0-9_]{0,37} (channel names must fit 63). */
bool cs_valid_identifier(const char *s);

#endif
