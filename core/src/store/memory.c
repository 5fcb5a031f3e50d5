/* memory.c - the embedded in-memory store: chats, messages, a notification bus.
 */
#include "../internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct mem_chat {
    int64_t id;
    char *owner, *title;
    cs_msglist msgs; /* ascending ids (commit order = id order) */
} mem_chat;

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
};

struct mem_conn {
    cs_memdb *db;
    mem_conn *next;
    cs_idset listening; /* chat ids (no watermark: INT64_MIN) */
    mem_note *inbox;
    size_t ninbox, capinbox;
    char err[256];
};

int cs_memdb_open(cs_memdb **out)
{
    cs_memdb *db = calloc(1, sizeof *db);
    if (!db)
        return CS_ENOMEM;
    db->refs = 1;
    db->next_msg_id = 1;
    *out = db;
    return CS_OK;
}

static void memdb_unref(cs_memdb *db)
{
    if (!db || --db->refs > 0)
        return;
    for (size_t i = 0; i < db->nchats; i++) {
        mem_chat *c = db->chats[i];
        free(c->owner);
        free(c->title);
        cs_msglist_free(&c->msgs);
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
                         int64_t *chat_id)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
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
    if (!ch->owner || !ch->title) {
        free(ch->owner);
        free(ch->title);
        free(ch);
        return CS_ENOMEM;
    }
    ch->id = (int64_t)db->nchats + 1;
    db->chats[db->nchats++] = ch;
    *chat_id = ch->id;
    return CS_OK;
}

/* One transaction under the chat's lock: ids are taken here, so the chat's
 * commit order is its id order (invariant 1). All or nothing. */
static int m_commit(void *st, int64_t chat_id, const cs_msg_in *msgs, size_t n,
                    cs_msglist *out)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
    mem_chat *ch = find_chat(db, chat_id);
    if (!ch)
        return fail(c, CS_ENOTFOUND, "no chat %lld", chat_id);
    size_t base_out = out->n, base = ch->msgs.n;
    int64_t prev = base ? ch->msgs.items[base - 1]->id : 0;
    int64_t id = db->next_msg_id;
    for (size_t i = 0; i < n; i++, id++) {
        cs_msg *m = cs_msg_new(id, chat_id, prev, msgs[i].role, msgs[i].content,
                               msgs[i].content_len);
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
    return CS_OK;
oom:
    while (ch->msgs.n > base)
        cs_msg_unref(ch->msgs.items[--ch->msgs.n]);
    while (out->n > base_out)
        cs_msg_unref(out->items[--out->n]);
    return CS_ENOMEM;
}

static int m_messages_after(void *st, int64_t chat_id, int64_t after,
                            cs_msglist *out)
{
    mem_conn *c = st;
    cs_memdb *db = c->db;
    if (db->fail_queries > 0) {
        db->fail_queries--;
        return fail(c, CS_EBACKEND, "injected query failure (chat %lld)",
                    chat_id);
    }
    mem_chat *ch = find_chat(db, chat_id);
    if (!ch)
        return fail(c, CS_ENOTFOUND, "no chat %lld", chat_id);
    size_t lo = 0, hi = ch->msgs.n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ch->msgs.items[mid]->id <= after)
            lo = mid + 1;
        else
            hi = mid;
    }
    size_t base = out->n;
    for (size_t i = lo; i < ch->msgs.n; i++) {
        if (cs_msglist_push(out, cs_msg_ref(ch->msgs.items[i])) < 0) {
            cs_msg_unref(ch->msgs.items[i]);
            while (out->n > base)
                cs_msg_unref(out->items[--out->n]);
            return CS_ENOMEM;
        }
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

static int m_fd(void *st)
{
    (void)st;
    return -1;
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
    .commit = m_commit,
    .messages_after = m_messages_after,
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
    cs_idset_init(&c->listening, INT64_MIN);
    db->refs++;
    c->next = db->conns;
    db->conns = c;
    out->ops = &memory_ops;
    out->st = c;
    return CS_OK;
}
