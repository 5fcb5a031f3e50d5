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
/* Whether an id with lo < id < hi is held above the watermark. */
bool cs_idset_any_in(const cs_idset *s, int64_t lo, int64_t hi);
/* Removes id if held above the watermark; 1 removed, 0 not there. */
int cs_idset_remove(cs_idset *s, int64_t id);
/* Forgets everything above w: the watermark goes down to w if above it,
 * ids > w are dropped (an edit cut the history there). */
void cs_idset_cut(cs_idset *s, int64_t w);
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
/* Drops the entries with lo < id < hi (an edit removed them); returns how
 * many. The eviction mark stays: what is gone is not "maybe elsewhere". */
size_t cs_cache_drop(cs_cache *c, int64_t lo, int64_t hi);
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
    CS_HINT_PART,        /* "1:p:<after>:<seq>:<text>" */
    CS_HINT_TRUNCATE     /* "1:t:<history>:<after>:<id>" */
} cs_hint_kind;

typedef struct cs_hint {
    cs_hint_kind kind;
    int64_t after, id; /* message: after = prev_id of id; part: after = the
                          chat's last message when the part was sent, id =
                          its seq; truncate: every message above after is
                          gone, id is the edit's new message */
    int64_t version;   /* status; truncate: the chat's history */
    const char *text;  /* status name, part text or message content: points
                          into the payload */
    size_t text_len;
    bool body;        /* message: role, tool and content (text) are carried */
    cs_role role;     /* message body */
    const char *tool; /* message body: tool_len bytes, not NUL-terminated */
    size_t tool_len;
    const char *error; /* status: the recorded error (error_len bytes) */
    size_t error_len;
    bool archived; /* status: the chat is archived */
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
/* An edit cut the chat's history above after: the merge forgets what it
 * delivered above it (floor, W, last and the delivered set go down to it),
 * so what comes after the cut is delivered from there. */
void cs_merge_cut(cs_merge *m, int64_t after);

/* ---- the store interface: the ops table, the store open functions ----- */
#include "store/store.h"

#endif
