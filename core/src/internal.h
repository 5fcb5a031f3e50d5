/* internal.h - data structures shared inside the core (not installed). */
#ifndef CS_INTERNAL_H
#define CS_INTERNAL_H

#include "chatstream.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- messages: immutable, reference counted, one allocation ------------ */
typedef struct cs_msg {
    int refs;
    cs_role role;
    int64_t id, chat_id, prev_id;
    size_t content_len;
    const char *tool; /* the tool field ("" when none), after content */
    char content[];   /* NUL-terminated */
} cs_msg;

/* tool may be NULL (none). */
cs_msg *cs_msg_new(int64_t id, int64_t chat_id, int64_t prev_id, cs_role role,
                   const char *content, size_t len, const char *tool);
/* The same with the tool field's length given (tool need not end in NUL). */
cs_msg *cs_msg_new_n(int64_t id, int64_t chat_id, int64_t prev_id, cs_role role,
                     const char *content, size_t len, const char *tool,
                     size_t tlen);

cs_msg *cs_msg_ref(cs_msg *m);
void cs_msg_unref(cs_msg *m); /* NULL ok */

/* A growable array of message references (query results). */
typedef struct cs_msglist {
    cs_msg **items;
    size_t n, cap;
} cs_msglist;
int cs_msglist_push(cs_msglist *l, cs_msg *m); /* takes a reference */
/* Room for extra more items (pushes up to that many cannot fail). */
int cs_msglist_grow(cs_msglist *l, size_t extra);
static inline int cs_msglist_reserve(cs_msglist *l, size_t extra)
{
    return extra <= l->cap - l->n ? CS_OK : cs_msglist_grow(l, extra);
}
void cs_msglist_clear(cs_msglist *l); /* unrefs, keeps capacity */
void cs_msglist_free(cs_msglist *l);

/* ---- delivered set: watermark + sorted array above it ------------------ */
typedef struct cs_idset {
    int64_t watermark; /* every id <= watermark counts as present */
    int64_t *ids;      /* sorted, unique, all > watermark */
    size_t n, cap;
} cs_idset;

void cs_idset_init(cs_idset *s, int64_t watermark);
void cs_idset_free(cs_idset *s);
/* 1 added, 0 already present, CS_ENOMEM (set unchanged). */
int cs_idset_add(cs_idset *s, int64_t id);
bool cs_idset_has(const cs_idset *s, int64_t id);
/* Removes id if held above the watermark; 1 removed, 0 not there. */
int cs_idset_remove(cs_idset *s, int64_t id);
/* Raises the watermark to w (never lowers it) and drops ids <= w. */
void cs_idset_advance_slow(cs_idset *s, int64_t w);
static inline void cs_idset_advance(cs_idset *s, int64_t w)
{
    /* The common case, inline: nothing held above W, little memory. */
    if (w > s->watermark && s->n == 0 && s->cap <= 64)
        s->watermark = w;
    else
        cs_idset_advance_slow(s, w);
}
size_t cs_idset_count(const cs_idset *s); /* ids held above the watermark */
size_t cs_idset_bytes(const cs_idset *s); /* heap bytes held */

/* ---- per-chat cache: bounded, sorted by id ---------------------------- */
typedef struct cs_cache {
    cs_msg **ring; /* a ring buffer, logically sorted by id, lowest first */
    size_t head, n, cap;
    int64_t max_evicted_id; /* monotonic */
} cs_cache;

/* The i-th entry in id order (0 = lowest). */
static inline cs_msg *cs_cache_at(const cs_cache *c, size_t i)
{
    return c->ring[(c->head + i) % c->cap];
}

int cs_cache_init(cs_cache *c, size_t cap);
void cs_cache_free(cs_cache *c);
/* Inserts m in id order (takes a reference). When full, evicts the lowest
 * id and raises max_evicted_id. An id <= max_evicted_id or already present is
 * ignored. Returns 1 inserted, 0 ignored. */
int cs_cache_append(cs_cache *c, cs_msg *m);
/* Entries with id > after, in id order: cs_cache_at(c, *first) onwards,
 * *count of them. Returns false (a miss) when after < max_evicted_id, since
 * entries in (after, max_evicted_id] may be gone. */
bool cs_cache_after(const cs_cache *c, int64_t after, size_t *first,
                    size_t *count);
/* Evicts every entry with id <= upto (raising max_evicted_id to the highest
 * one evicted); returns how many. */
size_t cs_cache_trim(cs_cache *c, int64_t upto);

/* ---- notification payloads ------------------------------------------- */
#define CS_PAYLOAD_MAX 7999 /* PostgreSQL's limit is 8000 bytes */
#define CS_PAYLOAD_VERSION 1

typedef enum cs_hint_kind {
    CS_HINT_MESSAGE = 1, /* "1:m:<after>:<id>", or with the message itself:
                            "1:M:<after>:<id>:<role>:<tool bytes>:<tool>"
                            then the content to the end */
    CS_HINT_STATUS,      /* "1:s:<version>:<status>" */
    CS_HINT_QUEUE,       /* "1:q" */
    CS_HINT_PART         /* "1:p:<after>:<text>" */
} cs_hint_kind;

typedef struct cs_hint {
    cs_hint_kind kind;
    int64_t after, id; /* message: after = prev_id of id; part: after = the
                          chat's last message when the part was sent */
    int64_t version;   /* status */
    const char *text;  /* status name, part text or message content: points
                          into the payload */
    size_t text_len;
    bool body;        /* message: role, tool and content (text) are carried */
    cs_role role;     /* message body */
    const char *tool; /* message body: tool_len bytes, not NUL-terminated */
    size_t tool_len;
} cs_hint;

/* The longest header of a message hint with its body ("1:M:" two ids, role,
 * tool length): with tool_len + content_len it must stay <= CS_PAYLOAD_MAX. */
#define CS_BODY_HEAD (4 + 20 + 20 + 10 + 6)

/* Writes a NUL-terminated payload into buf; returns its length or CS_EINVAL
 * (bad hint, or it does not fit cap / CS_PAYLOAD_MAX). */
int cs_payload_encode(const cs_hint *h, char *buf, size_t cap);
/* Strict: CS_OK, or CS_EPROTO for anything malformed, truncated, of an
 * unknown version or over CS_PAYLOAD_MAX. Never reads past p[len-1]. */
int cs_payload_parse(const char *p, size_t len, cs_hint *out);

/* Well-formed UTF-8 (no overlong forms, no surrogates, nothing past
 * U+10FFFF) without NUL bytes: what PostgreSQL's text accepts, so both
 * stores refuse the same input. */
bool cs_utf8_text(const char *p, size_t len);

/* Canonical decimal int64 >= 0 (no sign, no leading zero, no overflow). */
bool cs_parse_id(const char *p, size_t len, int64_t *out);

/* ---- merge: per subscription, independent of the hub ------------------
 * The merge sees the chat through a source: a cache (may be NULL) and a DB
 * query function. It appends what it delivers to an output list. */
typedef struct cs_merge_source {
    const cs_cache *cache;
    /* Messages of the chat with id > after, ascending (at most limit of
     * them, the lowest, when limit is set). CS_OK or an error. */
    int (*query)(void *ud, int64_t after, cs_msglist *out);
    void *ud;
    /* A DB pass reads at most this many rows (0: all). A full page means
     * there may be more: cs_merge_notify then returns CS_MERGE_MORE. */
    size_t limit;
} cs_merge_source;

/* cs_merge_notify read a full page: call it again for the next one. */
#define CS_MERGE_MORE 3

typedef struct cs_merge_counts {
    int64_t cache_hits, cache_misses, db_passes, queries, query_errors;
} cs_merge_counts;

typedef struct cs_merge {
    cs_strategy strategy;
    bool ordered;
    int64_t floor;      /* the after the subscription was opened with */
    int64_t last;       /* highest delivered (last_id: last handed over) */
    cs_idset delivered; /* its watermark is W for the watermark strategy */
    cs_msglist scratch;
    cs_merge_counts *counts; /* where to count; never NULL after init */
    cs_merge_counts own;     /* used when init was given no counts */
} cs_merge;

/* counts may be NULL (the merge then counts into m->own). */
void cs_merge_init(cs_merge *m, cs_strategy s, bool ordered, int64_t floor,
                   cs_merge_counts *counts);
void cs_merge_free(cs_merge *m);
/* The snapshot: rows (ascending, id > floor) are delivered to out. */
int cs_merge_snapshot(cs_merge *m, const cs_msglist *rows, cs_msglist *out);
/* One notification: "message id exists, after = its prev_id". force_db makes
 * the watermark strategy do its DB pass from W (a resync). On a DB error the
 * messages found so far stay delivered and the error is returned so the
 * caller can retry the same hint later. */
int cs_merge_notify(cs_merge *m, const cs_merge_source *src, int64_t after,
                    int64_t id, bool force_db, cs_msglist *out);
int64_t cs_merge_cursor(const cs_merge *m);

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
 * status with the version, and its queue's signature. */
typedef struct cs_chat_state {
    int64_t id, last_message_id, version;
    cs_status status;
    uint64_t queue_sig;
} cs_chat_state;
/* Appends a copy; CS_ENOMEM leaves q as it was. actor may be NULL. */
int cs_queue_push(cs_queue *q, int64_t id, const char *content, size_t len,
                  const char *actor, double created_at);

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
    /* Up to limit chats interrupted (waiting, a worker still on them) whose
     * worker's heartbeat is older than stale_after seconds: read only; the
     * caller revives each under its lock. */
    int (*stale_interrupted)(void *st, double stale_after, size_t limit,
                             int64_t *ids, size_t *n);
    /* Notifies "1:p:<last_message_id>:<text>" on the chat's channel, the
     * chat's last message ID read by the store. CS_ENOTFOUND if no chat. */
    int (*notify_part)(void *st, int64_t chat_id, const char *text, size_t len);
    /* Messages with id > after, ascending: the lowest limit of them (0:
     * all). */
    int (*messages_after)(void *st, int64_t chat_id, int64_t after,
                          size_t limit, cs_msglist *out);
    /* A subscription's snapshot in one statement, one consistent view: the
     * chat's row, its queue in order (appended to queue) and its messages
     * with id > after, ascending, the lowest limit of them (0: all;
     * appended to msgs). CS_ENOTFOUND if there is no chat. On failure
     * queue and msgs are as they were. */
    int (*snapshot)(void *st, int64_t chat_id, int64_t after, size_t limit,
                    cs_chat_row *row, cs_queue *queue, cs_msglist *msgs);
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
