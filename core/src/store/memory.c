/* memory.c - the embedded in-memory store: chats, messages, a notification bus.
 */
#include "../internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

/* A queued message: immutable once made, so a transaction's undo copy of
 * the queue can share the items. */
typedef struct mem_qitem {
    int64_t id;
    char *content, *actor;
    size_t len;
    double created_at;
} mem_qitem;

typedef struct mem_queue {
    mem_qitem **items; /* queue order */
    size_t n, cap;
} mem_queue;

typedef struct mem_chat {
    int64_t id;
    char *owner, *title;
    cs_msglist msgs; /* ascending ids (commit order = id order) */
    cs_msglist dead; /* soft-deleted by edits, in the order they went */
    int64_t history; /* edits so far */
    struct mem_cut {
        int64_t history, after, id;
    } * cuts; /* one per edit, by history */
    size_t ncuts, capcuts;
    cs_status status;
    int64_t version;
    char worker[CS_NAME_MAX + 1];
    double heartbeat_at; /* wall clock seconds; 0: none */
    double updated_at;   /* wall clock seconds of the last write to it */
    bool archived;
    cs_parts parts; /* of the turn in progress (not durable: not rolled back) */
    char last_error[CS_ERROR_MAX + 1];
    mem_queue queue;
    char *key; /* the idempotency key it was made with, or NULL */
    struct mem_key {
        char *key;
        cs_keyed res;
    } * keys; /* results of keyed writes, as long as the chat */
    size_t nkeys, capkeys;
} mem_chat;

/* The open transaction of a database (the memory store runs one call at a
 * time, so at most one is open): what rollback restores. */
typedef struct mem_tx {
    mem_chat *chat;
    size_t nmsgs;
    int64_t next_msg_id;
    cs_status status;
    int64_t version;
    char worker[CS_NAME_MAX + 1];
    double heartbeat_at, updated_at;
    bool archived;
    char last_error[CS_ERROR_MAX + 1];
    mem_queue queue; /* a copy of the item pointers */
    size_t nkeys;
    /* an edit in the transaction: where the live messages were cut (keep:
     * how many stayed; SIZE_MAX: none), the dead ones before it and the
     * history */
    size_t keep, ndead, ncuts;
    int64_t history;
} mem_tx;

typedef struct mem_note {
    int64_t chat_id;
    char *payload;
    size_t len;
} mem_note;

typedef struct mem_conn mem_conn;

struct cs_memdb {
    int refs;
    int64_t next_msg_id;
    mem_chat **chats; /* chat id k at chats[k - 1] */
    size_t nchats, capchats;
    mem_conn *conns; /* every store opened on this database */
    int64_t fail_queries, drop_notifies;
    int64_t next_queue_id;
    int64_t next_part_seq;
    mem_tx *tx; /* the open transaction, or NULL */
};

struct mem_conn {
    cs_memdb *db;
    mem_conn *next;
    cs_idset listening; /* chat ids (no watermark: INT64_MIN) */
    mem_note *inbox;
    size_t ninbox, capinbox;
    int efd; /* readable while the inbox is not empty */
    char err[256];
};

int cs_memdb_open(cs_memdb **out)
{
    cs_memdb *db = calloc(1, sizeof *db);
    if (!db)
        return CS_ENOMEM;
    db->refs = 1;
    db->next_msg_id = 1;
    db->next_queue_id = 1;
    *out = db;
    return CS_OK;
}

static void qitem_free(mem_qitem *q)
{
    if (q) {
        free(q->content);
        free(q->actor);
        free(q);
    }
}

static bool queue_has(const mem_queue *q, const mem_qitem *it)
{
    for (size_t i = 0; i < q->n; i++)
        if (q->items[i] == it)
            return true;
    return false;
}

static void memdb_unref(cs_memdb *db)
{
    if (!db || --db->refs > 0)
        return;
    for (size_t i = 0; i < db->nchats; i++) {
        mem_chat *c = db->chats[i];
        free(c->owner);
        free(c->title);
        free(c->key);
        for (size_t k = 0; k < c->nkeys; k++) {
            free(c->keys[k].key);
            free(c->keys[k].res.ids);
        }
        free(c->keys);
        cs_msglist_free(&c->msgs);
        cs_msglist_free(&c->dead);
        free(c->cuts);
        for (size_t k = 0; k < c->queue.n; k++)
            qitem_free(c->queue.items[k]);
        free(c->queue.items);
        cs_parts_free(&c->parts);
        free(c);
    }
    free(db->chats);
    free(db);
}

void cs_memdb_close(cs_memdb *db)
{
    memdb_unref(db);
}

void cs_memdb_fail_queries(cs_memdb *db, int64_t n)
{
    db->fail_queries = n > 0 ? n : 0;
}

void cs_memdb_drop_notifies(cs_memdb *db, int64_t n)
{
    db->drop_notifies = n > 0 ? n : 0;
}

static char *dupstr(const char *s)
{
    if (!s)
        s = "";
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static mem_chat *find_chat(cs_memdb *db, int64_t id)
{
    if (id < 1 || (uint64_t)id > db->nchats)
        return NULL;
    return db->chats[id - 1];
}

static int fail(mem_conn *c, int rc, const char *msg, int64_t chat_id)
{
    snprintf(c->err, sizeof c->err, msg, (long long)chat_id);
    return rc;
}

static int m_create_chat(void *st, const char *owner, const char *title,
                         const char *key, int64_t *chat_id)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
    if (key && *key)
        for (size_t i = 0; i < db->nchats; i++) {
            mem_chat *o = db->chats[i];
            if (o->key && strcmp(o->key, key) == 0 &&
                strcmp(o->owner, owner ? owner : "") == 0) {
                *chat_id = o->id; /* made with this key already */
                return CS_OK;
            }
        }
    if (db->nchats == db->capchats) {
        size_t cap = db->capchats ? db->capchats * 2 : 16;
        mem_chat **chats = realloc(db->chats, cap * sizeof *chats);
        if (!chats)
            return CS_ENOMEM;
        db->chats = chats;
        db->capchats = cap;
    }
    mem_chat *ch = calloc(1, sizeof *ch);
    if (!ch)
        return CS_ENOMEM;
    ch->owner = dupstr(owner);
    ch->title = dupstr(title);
    ch->key = key && *key ? dupstr(key) : NULL;
    if (!ch->owner || !ch->title || (key && *key && !ch->key)) {
        free(ch->owner);
        free(ch->title);
        free(ch->key);
        free(ch);
        return CS_ENOMEM;
    }
    ch->id = (int64_t)db->nchats + 1;
    db->chats[db->nchats++] = ch;
    *chat_id = ch->id;
    return CS_OK;
}

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void row_of(const mem_chat *ch, cs_chat_row *row)
{
    memset(row, 0, sizeof *row);
    row->id = ch->id;
    row->version = ch->version;
    row->status = ch->status;
    row->last_message_id = ch->msgs.n ? ch->msgs.items[ch->msgs.n - 1]->id : 0;
    row->heartbeat_age =
        ch->heartbeat_at > 0 ? wall_now() - ch->heartbeat_at : -1;
    snprintf(row->owner, sizeof row->owner, "%s", ch->owner);
    snprintf(row->title, sizeof row->title, "%s", ch->title);
    snprintf(row->worker, sizeof row->worker, "%s", ch->worker);
    memcpy(row->last_error, ch->last_error, sizeof row->last_error);
    row->archived = ch->archived;
    row->history = ch->history;
}

/* The fault knob: the next n reads fail. */
static bool injected_failure(mem_conn *c, int64_t chat_id)
{
    if (c->db->fail_queries <= 0)
        return false;
    c->db->fail_queries--;
    fail(c, CS_EBACKEND, "injected query failure (chat %lld)", chat_id);
    return true;
}

static int m_chat_get(void *st, int64_t chat_id, cs_chat_row *row)
{
    mem_conn *c = st;
    if (injected_failure(c, chat_id))
        return CS_EBACKEND;
    mem_chat *ch = find_chat(c->db, chat_id);
    if (!ch)
        return fail(c, CS_ENOTFOUND, "no chat %lld", chat_id);
    row_of(ch, row);
    return CS_OK;
}

/* The memory store runs one call at a time: the "lock" is that nothing else
 * runs until tx_end; what tx_end(false) restores is saved here. */
static int m_tx_begin(void *st, int64_t chat_id, cs_chat_row *row)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
    if (db->tx)
        return fail(c, CS_EINVAL, "a transaction is open (chat %lld)",
                    db->tx->chat->id);
    mem_chat *ch = find_chat(db, chat_id);
    if (!ch)
        return fail(c, CS_ENOTFOUND, "no chat %lld", chat_id);
    mem_tx *tx = calloc(1, sizeof *tx);
    if (!tx)
        return CS_ENOMEM;
    if (ch->queue.n) {
        tx->queue.items = malloc(ch->queue.n * sizeof *tx->queue.items);
        if (!tx->queue.items) {
            free(tx);
            return CS_ENOMEM;
        }
        memcpy(tx->queue.items, ch->queue.items,
               ch->queue.n * sizeof *tx->queue.items);
        tx->queue.n = tx->queue.cap = ch->queue.n;
    }
    tx->chat = ch;
    tx->nmsgs = ch->msgs.n;
    tx->next_msg_id = db->next_msg_id;
    tx->status = ch->status;
    tx->version = ch->version;
    memcpy(tx->worker, ch->worker, sizeof tx->worker);
    tx->heartbeat_at = ch->heartbeat_at;
    tx->updated_at = ch->updated_at;
    tx->archived = ch->archived;
    memcpy(tx->last_error, ch->last_error, sizeof tx->last_error);
    tx->nkeys = ch->nkeys;
    tx->keep = SIZE_MAX;
    tx->ndead = ch->dead.n;
    tx->ncuts = ch->ncuts;
    tx->history = ch->history;
    db->tx = tx;
    row_of(ch, row);
    return CS_OK;
}

static int m_tx_end(void *st, bool commit)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
    mem_tx *tx = db->tx;
    if (!tx)
        return fail(c, CS_EINVAL, "no transaction is open%.0lld", 0);
    mem_chat *ch = tx->chat;
    if (commit) {
        /* Items deleted inside the transaction go now. */
        for (size_t i = 0; i < tx->queue.n; i++)
            if (!queue_has(&ch->queue, tx->queue.items[i]))
                qitem_free(tx->queue.items[i]);
    } else {
        if (tx->keep != SIZE_MAX) {
            /* An edit: what it inserted goes, what it cut comes back
             * (msgs has room: it held them before). */
            while (ch->msgs.n > tx->keep)
                cs_msg_unref(ch->msgs.items[--ch->msgs.n]);
            for (size_t i = tx->ndead; i < ch->dead.n; i++)
                ch->msgs.items[ch->msgs.n++] = ch->dead.items[i];
            ch->dead.n = tx->ndead;
            ch->ncuts = tx->ncuts;
            ch->history = tx->history;
        }
        while (ch->msgs.n > tx->nmsgs)
            cs_msg_unref(ch->msgs.items[--ch->msgs.n]);
        db->next_msg_id = tx->next_msg_id;
        ch->status = tx->status;
        ch->version = tx->version;
        memcpy(ch->worker, tx->worker, sizeof ch->worker);
        ch->heartbeat_at = tx->heartbeat_at;
        ch->updated_at = tx->updated_at;
        ch->archived = tx->archived;
        memcpy(ch->last_error, tx->last_error, sizeof ch->last_error);
        while (ch->nkeys > tx->nkeys) {
            ch->nkeys--;
            free(ch->keys[ch->nkeys].key);
            free(ch->keys[ch->nkeys].res.ids);
        }
        /* Items added inside the transaction go; the saved order returns. */
        for (size_t i = 0; i < ch->queue.n; i++)
            if (!queue_has(&tx->queue, ch->queue.items[i]))
                qitem_free(ch->queue.items[i]);
        free(ch->queue.items);
        ch->queue = tx->queue;
        tx->queue.items = NULL;
    }
    free(tx->queue.items);
    free(tx);
    db->tx = NULL;
    return CS_OK;
}

/* Checks that the open transaction is on chat_id. */
static mem_chat *tx_chat(mem_conn *c, int64_t chat_id)
{
    mem_tx *tx = c->db->tx;
    if (!tx || tx->chat->id != chat_id) {
        fail(c, CS_EINVAL, "no transaction is open on chat %lld", chat_id);
        return NULL;
    }
    return tx->chat;
}

static int m_tx_key_get(void *st, int64_t chat_id, const char *key,
                        cs_keyed *out)
{
    mem_conn *c = st;
    mem_chat *ch = tx_chat(c, chat_id);
    if (!ch)
        return CS_EINVAL;
    for (size_t i = 0; i < ch->nkeys; i++)
        if (strcmp(ch->keys[i].key, key) == 0) {
            const cs_keyed *r = &ch->keys[i].res;
            *out = *r;
            out->ids = malloc((r->n ? r->n : 1) * sizeof *out->ids);
            if (!out->ids)
                return CS_ENOMEM;
            memcpy(out->ids, r->ids, r->n * sizeof *r->ids);
            return 1;
        }
    return 0;
}

static int m_tx_key_put(void *st, int64_t chat_id, const char *key,
                        const cs_keyed *res)
{
    mem_conn *c = st;
    mem_chat *ch = tx_chat(c, chat_id);
    if (!ch)
        return CS_EINVAL;
    if (ch->nkeys == ch->capkeys) {
        size_t cap = ch->capkeys ? ch->capkeys * 2 : 8;
        struct mem_key *k = realloc(ch->keys, cap * sizeof *k);
        if (!k)
            return CS_ENOMEM;
        ch->keys = k;
        ch->capkeys = cap;
    }
    char *kc = dupstr(key);
    int64_t *ids = malloc((res->n ? res->n : 1) * sizeof *ids);
    if (!kc || !ids) {
        free(kc);
        free(ids);
        return CS_ENOMEM;
    }
    memcpy(ids, res->ids, res->n * sizeof *ids);
    ch->keys[ch->nkeys++] =
        (struct mem_key){kc, {ids, res->n, res->queued, res->request}};
    return CS_OK;
}

/* Ids are taken under the chat's transaction, so the chat's commit order is
 * its id order (invariant 1). */
static int m_tx_insert(void *st, cs_chat_row *row, const cs_msg_in *msgs,
                       size_t n, cs_msglist *out)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
    mem_chat *ch = tx_chat(c, row->id);
    if (!ch)
        return CS_EINVAL;
    size_t base_out = out->n, base = ch->msgs.n;
    int64_t prev = base ? ch->msgs.items[base - 1]->id : 0;
    int64_t id = db->next_msg_id;
    for (size_t i = 0; i < n; i++, id++) {
        cs_msg *m = cs_msg_new(id, ch->id, prev, msgs[i].role, msgs[i].content,
                               msgs[i].content_len, msgs[i].tool);
        if (!m || cs_msglist_push(&ch->msgs, m) < 0) {
            cs_msg_unref(m);
            goto oom;
        }
        if (cs_msglist_push(out, cs_msg_ref(m)) < 0) {
            cs_msg_unref(m);
            goto oom;
        }
        prev = id;
    }
    db->next_msg_id = id;
    row->last_message_id = prev;
    ch->updated_at = wall_now(); /* as PostgreSQL's appends do */
    return CS_OK;
oom:
    while (ch->msgs.n > base)
        cs_msg_unref(ch->msgs.items[--ch->msgs.n]);
    while (out->n > base_out)
        cs_msg_unref(out->items[--out->n]);
    return CS_ENOMEM;
}

static int m_tx_update(void *st, const cs_chat_row *row, bool heartbeat)
{
    mem_conn *c = st;
    mem_chat *ch = tx_chat(c, row->id);
    if (!ch)
        return CS_EINVAL;
    ch->status = row->status;
    ch->version = row->version;
    snprintf(ch->worker, sizeof ch->worker, "%s", row->worker);
    memcpy(ch->last_error, row->last_error, sizeof ch->last_error);
    ch->updated_at = wall_now();
    ch->archived = row->archived;
    if (!ch->worker[0])
        ch->heartbeat_at = 0;
    else if (heartbeat)
        ch->heartbeat_at = wall_now();
    return CS_OK;
}

static int m_tx_edit(void *st, cs_chat_row *row, int64_t message_id,
                     const cs_msg_in *msg, cs_msglist *out, int64_t *after)
{
    mem_conn *c = st;
    mem_chat *ch = tx_chat(c, row->id);
    mem_tx *tx = c->db->tx;
    if (!ch)
        return CS_EINVAL;
    if (tx->keep != SIZE_MAX)
        return fail(c, CS_EINVAL, "one edit per transaction (chat %lld)",
                    ch->id);
    size_t k = 0;
    while (k < ch->msgs.n && ch->msgs.items[k]->id < message_id)
        k++;
    if (k == ch->msgs.n || ch->msgs.items[k]->id != message_id ||
        ch->msgs.items[k]->role != CS_ROLE_USER)
        return fail(c, CS_EINVAL,
                    "no user message with that id in chat %lld (edit)", ch->id);
    size_t cut = ch->msgs.n - k;
    if (cs_msglist_reserve(&ch->dead, cut) < 0)
        return CS_ENOMEM;
    if (ch->ncuts == ch->capcuts) {
        size_t cap = ch->capcuts ? ch->capcuts * 2 : 4;
        struct mem_cut *cs = realloc(ch->cuts, cap * sizeof *cs);
        if (!cs)
            return CS_ENOMEM;
        ch->cuts = cs;
        ch->capcuts = cap;
    }
    *after = ch->msgs.items[k]->prev_id;
    memcpy(ch->dead.items + ch->dead.n, ch->msgs.items + k,
           cut * sizeof *ch->msgs.items);
    ch->dead.n += cut;
    ch->msgs.n = k;
    tx->keep = k;
    ch->history++;
    row->history = ch->history;
    row->last_message_id = *after;
    size_t base = out->n;
    int rc = m_tx_insert(st, row, msg, 1, out);
    if (rc < 0)
        return rc; /* the rollback restores the cut */
    ch->cuts[ch->ncuts++] =
        (struct mem_cut){ch->history, *after, out->items[base]->id};
    return CS_OK;
}

static int m_cuts(void *st, int64_t chat_id, int64_t since, int64_t *after,
                  int64_t *upto, int64_t *history)
{
    mem_conn *c = st;
    if (injected_failure(c, chat_id))
        return CS_EBACKEND;
    mem_chat *ch = find_chat(c->db, chat_id);
    if (!ch)
        return fail(c, CS_ENOTFOUND, "no chat %lld", chat_id);
    *after = -1;
    *upto = 0;
    *history = ch->history;
    for (size_t i = 0; i < ch->ncuts; i++) {
        const struct mem_cut *k = &ch->cuts[i];
        if (k->history <= since)
            continue;
        if (*after < 0 || k->after < *after)
            *after = k->after;
        if (k->id > *upto)
            *upto = k->id;
    }
    return CS_OK;
}

static int m_tx_tail(void *st, int64_t chat_id, cs_msglist *out)
{
    mem_conn *c = st;
    mem_chat *ch = tx_chat(c, chat_id);
    if (!ch)
        return CS_EINVAL;
    size_t i = ch->msgs.n;
    while (i > 0 && ch->msgs.items[i - 1]->role != CS_ROLE_USER)
        i--;
    size_t base = out->n;
    for (; i < ch->msgs.n; i++) {
        if (cs_msglist_push(out, cs_msg_ref(ch->msgs.items[i])) < 0) {
            cs_msg_unref(ch->msgs.items[i]);
            while (out->n > base)
                cs_msg_unref(out->items[--out->n]);
            return CS_ENOMEM;
        }
    }
    return CS_OK;
}

static void unpush_queue(cs_queue *q, size_t base)
{
    while (q->n > base) {
        q->n--;
        free(q->items[q->n].content);
        free(q->items[q->n].actor);
    }
}

/* Appends a copy of the chat's queue to out; CS_ENOMEM leaves out as it
 * was. */
static int chat_queue(const mem_chat *ch, cs_queue *out)
{
    size_t base = out->n;
    for (size_t i = 0; i < ch->queue.n; i++) {
        const mem_qitem *q = ch->queue.items[i];
        if (cs_queue_push(out, q->id, q->content, q->len, q->actor,
                          q->created_at) < 0) {
            unpush_queue(out, base);
            return CS_ENOMEM;
        }
    }
    return CS_OK;
}

static int m_queue_list(void *st, int64_t chat_id, cs_queue *out)
{
    mem_conn *c = st;
    if (!c->db->tx && injected_failure(c, chat_id))
        return CS_EBACKEND;
    mem_chat *ch = find_chat(c->db, chat_id);
    if (!ch)
        return fail(c, CS_ENOTFOUND, "no chat %lld", chat_id);
    return chat_queue(ch, out);
}

static int m_tx_queue_add(void *st, int64_t chat_id, const char *actor,
                          const char *content, size_t len, int64_t *qid)
{
    mem_conn *c = st;
    mem_chat *ch = tx_chat(c, chat_id);
    if (!ch)
        return CS_EINVAL;
    mem_queue *q = &ch->queue;
    if (q->n == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 8;
        mem_qitem **items = realloc(q->items, cap * sizeof *items);
        if (!items)
            return CS_ENOMEM;
        q->items = items;
        q->cap = cap;
    }
    mem_qitem *it = calloc(1, sizeof *it);
    size_t alen = actor ? strlen(actor) : 0;
    if (it) {
        it->content = malloc(len + 1);
        it->actor = malloc(alen + 1);
    }
    if (!it || !it->content || !it->actor) {
        qitem_free(it);
        return CS_ENOMEM;
    }
    if (len)
        memcpy(it->content, content, len);
    it->content[len] = '\0';
    if (alen)
        memcpy(it->actor, actor, alen);
    it->actor[alen] = '\0';
    it->len = len;
    it->id = c->db->next_queue_id++;
    it->created_at = wall_now();
    q->items[q->n++] = it;
    *qid = it->id;
    return CS_OK;
}

static size_t queue_find(const mem_queue *q, int64_t qid)
{
    size_t i = 0;
    while (i < q->n && q->items[i]->id != qid)
        i++;
    return i;
}

static int m_tx_queue_del(void *st, int64_t chat_id, int64_t qid)
{
    mem_conn *c = st;
    mem_chat *ch = tx_chat(c, chat_id);
    if (!ch)
        return CS_EINVAL;
    mem_queue *q = &ch->queue;
    size_t i = queue_find(q, qid);
    if (i == q->n)
        return 0;
    /* Not freed here: tx_end frees it on commit, or puts it back. */
    memmove(q->items + i, q->items + i + 1, (q->n - i - 1) * sizeof *q->items);
    q->n--;
    return 1;
}

static int m_tx_queue_front(void *st, int64_t chat_id, int64_t qid)
{
    mem_conn *c = st;
    mem_chat *ch = tx_chat(c, chat_id);
    if (!ch)
        return CS_EINVAL;
    mem_queue *q = &ch->queue;
    size_t i = queue_find(q, qid);
    if (i == q->n)
        return 0;
    mem_qitem *it = q->items[i];
    memmove(q->items + 1, q->items, i * sizeof *q->items);
    q->items[0] = it;
    return 1;
}

/* Oldest update first: the memory store orders by the chat's id, which is
 * what a fresh database's updated_at order mostly is; callers must not
 * depend on either. */
static int m_acquire(void *st, const char *worker, size_t limit,
                     double stale_after, cs_chat_row *rows, size_t *n)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
    double t = wall_now();
    *n = 0;
    for (size_t i = 0; i < db->nchats && *n < limit; i++) {
        mem_chat *ch = db->chats[i];
        bool stale =
            ch->status == CS_STATUS_RUNNING && stale_after >= 0 &&
            (ch->heartbeat_at <= 0 || t - ch->heartbeat_at > stale_after);
        if (ch->status != CS_STATUS_PENDING && !stale)
            continue;
        ch->status = CS_STATUS_RUNNING;
        ch->version++;
        snprintf(ch->worker, sizeof ch->worker, "%s", worker);
        ch->heartbeat_at = t;
        row_of(ch, &rows[(*n)++]);
    }
    return CS_OK;
}

static int m_stuck(void *st, int kind, double age, size_t limit, int64_t *ids,
                   int64_t *versions, size_t *n)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
    double t = wall_now();
    *n = 0;
    if (age < 0 && kind != CS_STUCK_QUEUE)
        return CS_OK;
    for (size_t i = 0; i < db->nchats && *n < limit; i++) {
        mem_chat *ch = db->chats[i];
        bool silent = ch->heartbeat_at <= 0 || t - ch->heartbeat_at > age;
        bool hit;
        if (kind == CS_STUCK_ACTION)
            hit = ch->status == CS_STATUS_REQUIRES_ACTION &&
                  t - ch->updated_at > age;
        else if (kind == CS_STUCK_RUNNING)
            hit = ch->status == CS_STATUS_RUNNING && silent;
        else if (kind == CS_STUCK_INTERRUPTED)
            hit = ch->status == CS_STATUS_WAITING && ch->worker[0] && silent;
        else
            hit = ch->queue.n > 0 && !ch->worker[0] && !ch->archived &&
                  (ch->status == CS_STATUS_WAITING ||
                   ch->status == CS_STATUS_COMPLETED ||
                   ch->status == CS_STATUS_ERROR);
        if (hit) {
            ids[*n] = ch->id;
            versions[(*n)++] = ch->version;
        }
    }
    return CS_OK;
}

static int m_notify(void *st, int64_t chat_id, const char *payload, size_t len);

static int m_notify_part(void *st, int64_t chat_id, const char *worker,
                         const char *text, size_t len)
{
    mem_conn *c = st;
    mem_chat *ch = find_chat(c->db, chat_id);
    if (!ch)
        return fail(c, CS_ENOTFOUND, "no chat %lld", chat_id);
    if (worker && *worker &&
        !((ch->status == CS_STATUS_RUNNING ||
           ch->status == CS_STATUS_WAITING) &&
          strcmp(ch->worker, worker) == 0))
        return fail(c, CS_ESTATE, "chat %lld does not run on that worker",
                    chat_id);
    cs_hint h = {.kind = CS_HINT_PART, .text = text, .text_len = len};
    h.after = ch->msgs.n ? ch->msgs.items[ch->msgs.n - 1]->id : 0;
    /* The parts of turns that ended go; this one is kept for late joiners
     * (a snapshot reads them). */
    size_t keep = 0;
    for (size_t i = 0; i < ch->parts.n; i++) {
        if (ch->parts.items[i].after < h.after)
            free(ch->parts.items[i].text);
        else
            ch->parts.items[keep++] = ch->parts.items[i];
    }
    ch->parts.n = keep;
    h.id = ++c->db->next_part_seq;
    if (cs_parts_push(&ch->parts, h.id, h.after, text, len) < 0)
        return CS_ENOMEM;
    char *buf = malloc(CS_PAYLOAD_MAX + 1);
    if (!buf)
        return CS_ENOMEM;
    int plen = cs_payload_encode(&h, buf, CS_PAYLOAD_MAX + 1);
    int rc = plen < 0 ? fail(c, CS_EINVAL, "part too long (chat %lld)", chat_id)
                      : m_notify(st, chat_id, buf, (size_t)plen);
    free(buf);
    return rc;
}

/* The chat's messages with id > after, the lowest limit of them (0: all). */
static int chat_messages_after(const mem_chat *ch, int64_t after, size_t limit,
                               cs_msglist *out)
{
    size_t lo = 0, hi = ch->msgs.n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ch->msgs.items[mid]->id <= after)
            lo = mid + 1;
        else
            hi = mid;
    }
    size_t base = out->n, end = ch->msgs.n;
    if (limit && end - lo > limit)
        end = lo + limit;
    for (size_t i = lo; i < end; i++) {
        if (cs_msglist_push(out, cs_msg_ref(ch->msgs.items[i])) < 0) {
            cs_msg_unref(ch->msgs.items[i]);
            while (out->n > base)
                cs_msg_unref(out->items[--out->n]);
            return CS_ENOMEM;
        }
    }
    return CS_OK;
}

static int m_messages_after(void *st, int64_t chat_id, int64_t after,
                            size_t limit, cs_msglist *out, int64_t *history)
{
    mem_conn *c = st;
    if (injected_failure(c, chat_id))
        return CS_EBACKEND;
    mem_chat *ch = find_chat(c->db, chat_id);
    if (!ch)
        return fail(c, CS_ENOTFOUND, "no chat %lld", chat_id);
    if (history)
        *history = ch->history;
    return chat_messages_after(ch, after, limit, out);
}

/* Many chats as one statement: the fault knob counts it once. */
static int m_messages_after_many(void *st, const int64_t *chats,
                                 const int64_t *afters, size_t n, size_t limit,
                                 cs_msglist *out, int64_t *histories)
{
    mem_conn *c = st;
    if (n > 0 && injected_failure(c, chats[0]))
        return CS_EBACKEND;
    size_t base = out->n;
    for (size_t i = 0; i < n; i++) {
        mem_chat *ch = find_chat(c->db, chats[i]);
        histories[i] = ch ? ch->history : -1;
        int rc = ch ? chat_messages_after(ch, afters[i], limit, out) : CS_OK;
        if (rc < 0) {
            while (out->n > base)
                cs_msg_unref(out->items[--out->n]);
            return rc;
        }
    }
    return CS_OK;
}

/* One read, as one statement: the fault knob counts it once. */
static int m_snapshot(void *st, int64_t chat_id, int64_t after, size_t limit,
                      cs_chat_row *row, cs_queue *queue, cs_msglist *msgs,
                      cs_parts *parts, int64_t *cut)
{
    mem_conn *c = st;
    if (injected_failure(c, chat_id))
        return CS_EBACKEND;
    mem_chat *ch = find_chat(c->db, chat_id);
    if (!ch)
        return fail(c, CS_ENOTFOUND, "no chat %lld", chat_id);
    size_t qbase = queue->n;
    int rc = chat_queue(ch, queue);
    if (rc < 0)
        return rc;
    size_t mbase = msgs->n, pbase = parts->n;
    *cut = -1;
    for (size_t i = 0; i < ch->ncuts; i++) {
        const struct mem_cut *k = &ch->cuts[i];
        if (k->after < after && after < k->id && (*cut < 0 || k->after < *cut))
            *cut = k->after;
    }
    rc = chat_messages_after(ch, *cut >= 0 ? *cut : after, limit, msgs);
    int64_t last = ch->msgs.n ? ch->msgs.items[ch->msgs.n - 1]->id : 0;
    for (size_t i = 0; rc == CS_OK && i < ch->parts.n; i++) {
        const cs_part *pt = &ch->parts.items[i];
        if (pt->after == last)
            rc = cs_parts_push(parts, pt->seq, pt->after, pt->text, pt->len);
    }
    if (rc < 0) {
        unpush_queue(queue, qbase);
        while (msgs->n > mbase)
            cs_msg_unref(msgs->items[--msgs->n]);
        while (parts->n > pbase)
            free(parts->items[--parts->n].text);
        return rc;
    }
    row_of(ch, row);
    return CS_OK;
}

static int m_chats_state(void *st, const int64_t *ids, size_t n,
                         cs_chat_state *out, size_t *nout)
{
    mem_conn *c = st;
    *nout = 0;
    if (injected_failure(c, n ? ids[0] : 0))
        return CS_EBACKEND;
    for (size_t i = 0; i < n; i++) {
        mem_chat *ch = find_chat(c->db, ids[i]);
        if (!ch)
            continue;
        uint64_t h = CS_QUEUE_SIG_START;
        for (size_t k = 0; k < ch->queue.n; k++)
            h = cs_queue_sig_add(h, ch->queue.items[k]->id);
        out[(*nout)++] = (cs_chat_state){
            .id = ch->id,
            .last_message_id =
                ch->msgs.n ? ch->msgs.items[ch->msgs.n - 1]->id : 0,
            .version = ch->version,
            .history = ch->history,
            .status = ch->status,
            .queue_sig = cs_queue_sig_end(h, ch->queue.n),
        };
    }
    return CS_OK;
}

static int m_listen(void *st, int64_t chat_id)
{
    mem_conn *c = st;
    return cs_idset_add(&c->listening, chat_id) < 0 ? CS_ENOMEM : CS_OK;
}

static int m_unlisten(void *st, int64_t chat_id)
{
    mem_conn *c = st;
    cs_idset_remove(&c->listening, chat_id);
    return CS_OK;
}

static int inbox_push(mem_conn *c, int64_t chat_id, const char *p, size_t len)
{
    if (c->ninbox == c->capinbox) {
        size_t cap = c->capinbox ? c->capinbox * 2 : 16;
        mem_note *in = realloc(c->inbox, cap * sizeof *in);
        if (!in)
            return CS_ENOMEM;
        c->inbox = in;
        c->capinbox = cap;
    }
    char *copy = malloc(len + 1);
    if (!copy)
        return CS_ENOMEM;
    memcpy(copy, p, len);
    copy[len] = '\0';
    c->inbox[c->ninbox++] = (mem_note){chat_id, copy, len};
    if (c->ninbox == 1 && c->efd >= 0) {
        uint64_t one = 1; /* the fd shows the inbox is not empty */
        ssize_t r = write(c->efd, &one, sizeof one);
        (void)r;
    }
    return CS_OK;
}

/* Delivered at once to every connection listening on the chat, in the order
 * the notifications are sent (commit order of the notifying statements). */
static int m_notify(void *st, int64_t chat_id, const char *payload, size_t len)
{
    mem_conn *self = st;
    cs_memdb *db = self->db;
    if (db->drop_notifies > 0) {
        db->drop_notifies--;
        return CS_OK; /* lost without an error, as a real one can be */
    }
    int rc = CS_OK;
    for (mem_conn *c = db->conns; c; c = c->next)
        if (cs_idset_has(&c->listening, chat_id) &&
            inbox_push(c, chat_id, payload, len) < 0)
            rc = CS_ENOMEM;
    return rc;
}

static int m_poll(void *st,
                  void (*cb)(void *ud, int64_t chat_id, const char *payload,
                             size_t len),
                  void *ud)
{
    mem_conn *c = st;
    size_t n = c->ninbox;
    mem_note *in = c->inbox;
    uint64_t v;
    if (n && c->efd >= 0 && read(c->efd, &v, sizeof v) < 0)
        v = 0; /* already clear */
    /* Detach the inbox first: cb may cause more notifications. */
    c->inbox = NULL;
    c->ninbox = c->capinbox = 0;
    for (size_t i = 0; i < n; i++) {
        cb(ud, in[i].chat_id, in[i].payload, in[i].len);
        free(in[i].payload);
    }
    free(in);
    return (int)(n > (size_t)INT32_MAX ? INT32_MAX : n);
}

/* Readable while the inbox is not empty (an eventfd; -1 without one). */
static int m_fd(void *st)
{
    return ((mem_conn *)st)->efd;
}

static const char *m_errmsg(void *st)
{
    return ((mem_conn *)st)->err;
}

static void m_close(void *st)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
    for (mem_conn **p = &db->conns; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    for (size_t i = 0; i < c->ninbox; i++)
        free(c->inbox[i].payload);
    free(c->inbox);
    cs_idset_free(&c->listening);
    if (c->efd >= 0)
        close(c->efd);
    free(c);
    memdb_unref(db);
}

static int m_migrate(void *st)
{
    (void)st;
    return CS_OK;
}

static int m_listener_pid(void *st)
{
    (void)st;
    return -1;
}

static int64_t m_reconnects(void *st)
{
    (void)st;
    return 0;
}

static const cs_store_ops memory_ops = {
    .name = "memory",
    .create_chat = m_create_chat,
    .chat_get = m_chat_get,
    .tx_begin = m_tx_begin,
    .tx_end = m_tx_end,
    .tx_insert = m_tx_insert,
    .tx_update = m_tx_update,
    .tx_tail = m_tx_tail,
    .tx_edit = m_tx_edit,
    .cuts = m_cuts,
    .queue_list = m_queue_list,
    .tx_key_get = m_tx_key_get,
    .tx_key_put = m_tx_key_put,
    .tx_queue_add = m_tx_queue_add,
    .tx_queue_del = m_tx_queue_del,
    .tx_queue_front = m_tx_queue_front,
    .acquire = m_acquire,
    .notify_part = m_notify_part,
    .stuck = m_stuck,
    .messages_after = m_messages_after,
    .messages_after_many = m_messages_after_many,
    .snapshot = m_snapshot,
    .chats_state = m_chats_state,
    .listen = m_listen,
    .unlisten = m_unlisten,
    .notify = m_notify,
    .poll = m_poll,
    .fd = m_fd,
    .errmsg = m_errmsg,
    .close = m_close,
    .migrate = m_migrate,
    .listener_pid = m_listener_pid,
    .reconnects = m_reconnects,
};

int cs_memory_store_open(cs_memdb *db, cs_store *out)
{
    mem_conn *c = calloc(1, sizeof *c);
    if (!c)
        return CS_ENOMEM;
    c->db = db;
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    cs_idset_init(&c->listening, INT64_MIN);
    db->refs++;
    c->next = db->conns;
    db->conns = c;
    out->ops = &memory_ops;
    out->st = c;
    return CS_OK;
}
