/* hub.c - the hub: per-chat caches, subscriptions, notification routing. */
#include "hub.h"

#include <errno.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A pending notification for one subscription. */
typedef struct qhint {
    cs_hint_kind kind;
    int64_t a, b; /* message: after, id; status: version, status; part:
                     after */
    char *text;   /* part: owned */
    size_t len;
} qhint;

/* An event waiting to be handed to the reader; owns what it points to. */
typedef struct oevent {
    cs_event_kind kind; /* 0: empty */
    cs_msg *msg;        /* message */
    int64_t a, b;       /* status: version, status; part: after */
    char *text;         /* part */
    size_t len;
    cs_queue *queue; /* queue */
} oevent;

struct cs_sub {
    cs_hub *hub; /* NULL once detached */
    hub_chat *chat;
    cs_sub *next, *prev;
    int64_t chat_id;
    cs_merge merge;
    /* pending notifications: a ring buffer of queue_size entries */
    qhint *q;
    size_t qhead, qn, qcap;
    bool resync;
    int64_t resync_after, resync_id;
    bool status_dirty, queue_dirty; /* re-read them from the store */
    /* Found by the backstop poll: the chat's messages reach poll_id (a DB
     * pass is due while the merge's cursor is below it; 0: none), and its
     * status is poll_status at poll_version (-1: none). */
    int64_t poll_id, poll_version;
    cs_status poll_status;
    bool memo_ok;           /* the next DB pass may use the memo */
    int64_t need;           /* ... if the memo reaches this id */
    int64_t status_version; /* of the last status delivered; -1 */
    uint64_t queue_sig;     /* of the last queue delivered */
    cs_msglist out;         /* the merge's output */
    /* events ready for the reader, in order */
    oevent *ev;
    size_t evpos, evn, evcap;
    oevent current; /* the event last returned; released on the next call */
    /* What the reader was handed (a message counts once next returned it):
     * every message of the chat with id <= rw was returned (last_id: the
     * highest returned, its own rule). Messages returned above rw wait in
     * ret, sorted by id, until the prev_id chain reaches them; entries at or
     * below rw are stale and dropped on the next return. */
    int64_t rw;
    struct retd {
        int64_t id, prev;
    } * ret;
    size_t nret, capret;
    int64_t undo_rw; /* rw before the last return (cs_sub_unread) */
    bool undo_ret;   /* the last return added its message to ret */
    /* The hub's ready list (rstate 1) or its stalled list (2), or neither
     * (0). */
    cs_sub *rnext, *rprev;
    unsigned char rstate;
};

static void oevent_free(oevent *e)
{
    cs_msg_unref(e->msg);
    free(e->text);
    if (e->queue) {
        cs_queue_free(e->queue);
        free(e->queue);
    }
    *e = (oevent){0};
}

static int ev_push(cs_sub *s, oevent e)
{
    if (s->evpos > 0 && s->evpos == s->evn)
        s->evpos = s->evn = 0;
    if (s->evn == s->evcap) {
        size_t cap = s->evcap ? s->evcap * 2 : 16;
        oevent *ev = realloc(s->ev, cap * sizeof *ev);
        if (!ev) {
            oevent_free(&e);
            return CS_ENOMEM;
        }
        s->ev = ev;
        s->evcap = cap;
    }
    s->ev[s->evn++] = e;
    return CS_OK;
}

/* Moves what the merge delivered into the event list. Out of memory, the
 * rest stays in s->out (the merge counts it delivered already) and moves on
 * the next call. */
static int ev_take_merged(cs_sub *s)
{
    size_t i = 0;
    for (; i < s->out.n; i++) {
        if (s->evpos > 0 && s->evpos == s->evn)
            s->evpos = s->evn = 0;
        if (s->evn == s->evcap) {
            size_t cap = s->evcap ? s->evcap * 2 : 16;
            oevent *ev = realloc(s->ev, cap * sizeof *ev);
            if (!ev)
                break;
            s->ev = ev;
            s->evcap = cap;
        }
        s->ev[s->evn++] =
            (oevent){.kind = CS_EV_MESSAGE, .msg = s->out.items[i]};
    }
    if (i > 0 && i < s->out.n)
        memmove(s->out.items, s->out.items + i,
                (s->out.n - i) * sizeof *s->out.items);
    s->out.n -= i;
    return s->out.n ? CS_ENOMEM : CS_OK;
}

/* ---- what the reader was handed ------------------------------------------ */

static void ret_remove(cs_sub *s, int64_t id)
{
    for (size_t i = 0; i < s->nret; i++)
        if (s->ret[i].id == id) {
            memmove(s->ret + i, s->ret + i + 1,
                    (s->nret - i - 1) * sizeof *s->ret);
            s->nret--;
            return;
        }
}

/* Records that message m was returned to the reader and moves rw: onto m
 * when m follows it (its prev_id at or below rw), then along the returned
 * messages that continue the chain. CS_ENOMEM leaves everything as it was
 * (the caller does not hand m over). */
static int ret_record(cs_sub *s, const cs_msg *m)
{
    s->undo_rw = s->rw;
    s->undo_ret = false;
    if (s->merge.strategy == CS_STRATEGY_LAST_ID) {
        s->rw = m->id > s->rw ? m->id : s->rw;
        return CS_OK;
    }
    size_t stale = 0;
    while (stale < s->nret && s->ret[stale].id <= s->rw)
        stale++;
    if (stale) {
        memmove(s->ret, s->ret + stale, (s->nret - stale) * sizeof *s->ret);
        s->nret -= stale;
    }
    if (m->id <= s->rw)
        return CS_OK;
    if (m->prev_id <= s->rw) {
        s->rw = m->id;
        /* Entries consumed here stay until the next return (for unread). */
        for (size_t i = 0; i < s->nret && s->ret[i].prev <= s->rw; i++)
            if (s->ret[i].id > s->rw)
                s->rw = s->ret[i].id;
        return CS_OK;
    }
    if (s->nret == s->capret) {
        size_t cap = s->capret ? s->capret * 2 : 8;
        struct retd *r = realloc(s->ret, cap * sizeof *r);
        if (!r)
            return CS_ENOMEM;
        s->ret = r;
        s->capret = cap;
    }
    size_t i = s->nret;
    while (i > 0 && s->ret[i - 1].id > m->id)
        i--;
    if (i > 0 && s->ret[i - 1].id == m->id)
        return CS_OK; /* returned twice: the merge never does this */
    memmove(s->ret + i + 1, s->ret + i, (s->nret - i) * sizeof *s->ret);
    s->ret[i] = (struct retd){m->id, m->prev_id};
    s->nret++;
    s->undo_ret = true;
    return CS_OK;
}

/* ---- hub ---------------------------------------------------------------- */

static void sub_ready(cs_sub *s);

void cs_sub_unread(cs_sub *s)
{
    if (!s || !s->current.kind)
        return;
    /* pop_event left the slot as it was: the event goes back there. */
    if (s->evpos > 0) {
        s->evpos--;
        if (s->current.kind == CS_EV_MESSAGE) {
            s->rw = s->undo_rw;
            if (s->undo_ret)
                ret_remove(s, s->current.msg->id);
        }
        if (s->hub && s->current.kind == CS_EV_MESSAGE)
            s->hub->stats.delivered--;
        if (s->hub && s->current.kind == CS_EV_PART)
            s->hub->stats.parts--;
        s->current = (oevent){0};
        sub_ready(s); /* it has that event again */
    }
}

static double now(void)
{
    return cs_now();
}

/* The hub's pollfd: an epoll set of the store's fd (stable for the store's
 * life) and the hub's wakefd. Without them (out of descriptors) the hub
 * still works; cs_hub_fd is then -1. */
static void hub_pollfd_open(cs_hub *hub)
{
    hub->pollfd = epoll_create1(EPOLL_CLOEXEC);
    hub->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int sfd = hub->store.ops->fd(hub->store.st);
    struct epoll_event w = {.events = EPOLLIN, .data.fd = hub->wakefd};
    struct epoll_event f = {.events = EPOLLIN, .data.fd = sfd};
    if (hub->pollfd < 0 || hub->wakefd < 0 ||
        epoll_ctl(hub->pollfd, EPOLL_CTL_ADD, hub->wakefd, &w) < 0 ||
        (sfd >= 0 && epoll_ctl(hub->pollfd, EPOLL_CTL_ADD, sfd, &f) < 0)) {
        if (hub->pollfd >= 0)
            close(hub->pollfd);
        if (hub->wakefd >= 0)
            close(hub->wakefd);
        hub->pollfd = hub->wakefd = -1;
    }
}

int cs_hub_open_err(const cs_hub_options *opts, cs_hub **out, char *errbuf,
                    size_t errlen)
{
    cs_hub_options o = opts ? *opts : (cs_hub_options){0};
    if (errbuf && errlen)
        errbuf[0] = '\0';
    if (o.cache_size > CS_MAX_CACHE_SIZE || o.queue_size > CS_MAX_QUEUE_SIZE ||
        o.page_size > CS_MAX_PAGE_SIZE || o.max_chats > CS_MAX_CACHE_SIZE ||
        (o.dsn && o.memory) || o.poll_interval != o.poll_interval ||
        !(o.query_timeout >= 0 && o.query_timeout <= 86400) ||
        !(o.stale_after >= 0)) {
        if (errbuf && errlen)
            snprintf(errbuf, errlen, "bad hub options");
        return CS_EINVAL;
    }
    cs_hub *hub = calloc(1, sizeof *hub);
    if (!hub)
        return CS_ENOMEM;
    hub->cache_size = o.cache_size ? o.cache_size : CS_DEFAULT_CACHE_SIZE;
    hub->queue_size = o.queue_size ? o.queue_size : CS_DEFAULT_QUEUE_SIZE;
    hub->max_chats = o.max_chats ? o.max_chats : CS_DEFAULT_MAX_CHATS;
    hub->page_size = o.page_size ? o.page_size : CS_DEFAULT_PAGE_SIZE;
    hub->stale_after =
        o.stale_after > 0 ? o.stale_after : CS_DEFAULT_STALE_AFTER;
    hub->plain_notifications = o.plain_notifications;
    if (o.authorizer)
        hub->auth = *o.authorizer;
    int rc = CS_OK;
    if (o.dsn) {
        rc = cs_pg_store_open(o.dsn, o.schema, o.query_timeout, &hub->store,
                              errbuf, errlen);
        hub->poll_interval =
            o.poll_interval < 0 ? CS_DEFAULT_PG_POLL_INTERVAL : o.poll_interval;
    } else {
        cs_memdb *db = o.memory;
        if (!db && (rc = cs_memdb_open(&db)) < 0) {
            free(hub);
            return rc;
        }
        rc = cs_memory_store_open(db, &hub->store);
        if (!o.memory)
            cs_memdb_close(db); /* the store holds its own reference */
        hub->poll_interval = o.poll_interval < 0 ? 0 : o.poll_interval;
    }
    if (rc < 0) {
        free(hub);
        return rc;
    }
    if (hub->poll_interval > 0)
        hub->next_poll = now() + hub->poll_interval;
    hub->stats.notify_queue_usage = -1;
    hub_pollfd_open(hub);
    *out = hub;
    return CS_OK;
}

int cs_hub_open(const cs_hub_options *opts, cs_hub **out)
{
    return cs_hub_open_err(opts, out, NULL, 0);
}

int cs_hub_migrate(cs_hub *hub)
{
    if (!hub)
        return CS_ECLOSED;
    int rc = hub->store.ops->migrate(hub->store.st);
    return rc < 0 ? cs_hub_fail(hub, rc, NULL) : CS_OK;
}

const char *cs_hub_store_name(const cs_hub *hub)
{
    return hub->store.ops->name;
}

int cs_hub_listener_pid(const cs_hub *hub)
{
    return hub->store.ops->listener_pid(hub->store.st);
}

void cs_hub_close(cs_hub *hub)
{
    if (!hub)
        return;
    cs_hub_detach_subs(hub);
    cs_pub_detach_all(hub);
    for (size_t i = 0; i < hub->capchats; i++) {
        hub_chat *c = hub->chats[i];
        if (c) {
            cs_cache_free(&c->cache);
            cs_msglist_free(&c->memo);
            free(c);
        }
    }
    free(hub->chats);
    cs_round_free(&hub->round);
    hub->store.ops->close(hub->store.st);
    if (hub->pollfd >= 0) {
        close(hub->pollfd);
        close(hub->wakefd);
    }
    free(hub);
}

const char *cs_hub_errmsg(const cs_hub *hub)
{
    return hub ? hub->err : "no hub";
}

int cs_hub_fail(cs_hub *hub, int rc, const char *msg)
{
    if (!msg && (rc == CS_EBACKEND || rc == CS_ENOTFOUND || rc == CS_EINVAL ||
                 rc == CS_ESTATE || rc == CS_EUNKNOWN))
        msg = hub->store.ops->errmsg(hub->store.st);
    snprintf(hub->err, sizeof hub->err, "%s", msg ? msg : cs_strerror(rc));
    return rc;
}

const char *cs_hub_last_warning(const cs_hub *hub)
{
    return hub->last_warning;
}

void cs_hub_stats(const cs_hub *hub, cs_stats *out)
{
    *out = hub->stats;
    if (hub->store.ops->warnings)
        out->warnings = hub->store.ops->warnings(hub->store.st,
                                                 ((cs_hub *)hub)->last_warning,
                                                 sizeof hub->last_warning);
    out->queries += hub->counts.queries;
    out->query_errors += hub->counts.query_errors;
    out->cache_hits += hub->counts.cache_hits;
    out->cache_misses += hub->counts.cache_misses;
    out->db_passes += hub->counts.db_passes;
    out->reconnects = hub->store.ops->reconnects(hub->store.st);
    out->db_passes -= hub->stats.shared_passes; /* not queried: shared */
    out->cached_chats = (int64_t)hub->nchats;
    out->cached_messages = 0;
    for (size_t i = 0; i < hub->capchats; i++)
        if (hub->chats[i])
            out->cached_messages += (int64_t)hub->chats[i]->cache.n;
}

int cs_hub_fd(const cs_hub *hub)
{
    return hub->pollfd;
}

static size_t chat_slot(int64_t id, size_t cap)
{
    uint64_t h = (uint64_t)id * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 17) & (cap - 1);
}

hub_chat *cs_hub_chat_find(const cs_hub *hub, int64_t chat_id)
{
    if (!hub->capchats)
        return NULL;
    for (size_t i = chat_slot(chat_id, hub->capchats);;
         i = (i + 1) & (hub->capchats - 1)) {
        hub_chat *c = hub->chats[i];
        if (!c || c->id == chat_id)
            return c;
    }
}

static int chats_grow(cs_hub *hub)
{
    size_t cap = hub->capchats ? hub->capchats * 2 : 16;
    hub_chat **t = calloc(cap, sizeof *t);
    if (!t)
        return CS_ENOMEM;
    for (size_t i = 0; i < hub->capchats; i++) {
        hub_chat *c = hub->chats[i];
        if (!c)
            continue;
        size_t j = chat_slot(c->id, cap);
        while (t[j])
            j = (j + 1) & (cap - 1);
        t[j] = c;
    }
    free(hub->chats);
    hub->chats = t;
    hub->capchats = cap;
    return CS_OK;
}

/* Empties slot i of the table (linear probing: later entries of the run
 * move back so that every entry stays reachable from its home slot). */
static void chats_remove_slot(cs_hub *hub, size_t i)
{
    size_t mask = hub->capchats - 1, j = i;
    hub->chats[i] = NULL;
    for (;;) {
        j = (j + 1) & mask;
        hub_chat *c = hub->chats[j];
        if (!c)
            break;
        size_t k = chat_slot(c->id, hub->capchats);
        bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            hub->chats[i] = c;
            hub->chats[j] = NULL;
            i = j;
        }
    }
    hub->nchats--;
}

/* Drops the least recently used chat without subscriptions, if any. The
 * cache is never the truth (invariant 4): this costs a query at most. */
static void chats_evict(cs_hub *hub)
{
    size_t victim = hub->capchats;
    for (size_t i = 0; i < hub->capchats; i++) {
        hub_chat *c = hub->chats[i];
        if (c && c->nsubs == 0 && !c->listening &&
            (victim == hub->capchats || c->used < hub->chats[victim]->used))
            victim = i;
    }
    if (victim == hub->capchats)
        return; /* every chat has readers: they bound the count */
    hub_chat *c = hub->chats[victim];
    chats_remove_slot(hub, victim);
    cs_cache_free(&c->cache);
    cs_msglist_free(&c->memo);
    free(c);
}

hub_chat *cs_hub_chat(cs_hub *hub, int64_t chat_id)
{
    hub_chat *c = cs_hub_chat_find(hub, chat_id);
    if (c) {
        c->used = ++hub->tick;
        return c;
    }
    /* Only when some chat can go: with every chat subscribed the scan would
     * find nothing, and opening many subscriptions would turn quadratic. */
    if (hub->nchats >= hub->max_chats && hub->nchats > hub->busy_chats)
        chats_evict(hub);
    if ((hub->nchats + 1) * 4 > hub->capchats * 3 && chats_grow(hub) < 0)
        return NULL;
    c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    if (cs_cache_init(&c->cache, hub->cache_size) < 0) {
        free(c);
        return NULL;
    }
    c->id = chat_id;
    c->used = ++hub->tick;
    size_t j = chat_slot(chat_id, hub->capchats);
    while (hub->chats[j])
        j = (j + 1) & (hub->capchats - 1);
    hub->chats[j] = c;
    hub->nchats++;
    return c;
}

/* ---- the ready list: subscriptions with work ------------------------- */

/* Keeps wakefd set exactly while the ready list is not empty. */
static void wake_update(cs_hub *hub)
{
    bool want = hub->ready_head != NULL;
    if (want == hub->woken || hub->wakefd < 0)
        return;
    uint64_t v = 1;
    ssize_t r = want ? write(hub->wakefd, &v, sizeof v)
                     : read(hub->wakefd, &v, sizeof v);
    (void)r; /* an eventfd read or write of 8 bytes does not fail here */
    hub->woken = want;
}

static void ready_unlink(cs_sub *s)
{
    cs_hub *hub = s->hub;
    if (s->rstate == 1) {
        if (s->rprev)
            s->rprev->rnext = s->rnext;
        else
            hub->ready_head = s->rnext;
        if (s->rnext)
            s->rnext->rprev = s->rprev;
        else
            hub->ready_tail = s->rprev;
        hub->nready--;
    } else if (s->rstate == 2) {
        if (s->rprev)
            s->rprev->rnext = s->rnext;
        else
            hub->stalled = s->rnext;
        if (s->rnext)
            s->rnext->rprev = s->rprev;
    }
    s->rnext = s->rprev = NULL;
    s->rstate = 0;
}

/* The subscription has work: at the end of the ready list (if not on it). */
static void sub_ready(cs_sub *s)
{
    cs_hub *hub = s->hub;
    if (!hub || s->rstate == 1)
        return;
    ready_unlink(s);
    s->rprev = hub->ready_tail;
    if (hub->ready_tail)
        hub->ready_tail->rnext = s;
    else
        hub->ready_head = s;
    hub->ready_tail = s;
    s->rstate = 1;
    hub->nready++;
    wake_update(hub);
}

/* Off both lists. */
static void sub_unready(cs_sub *s)
{
    if (!s->hub || s->rstate == 0)
        return;
    ready_unlink(s);
    wake_update(s->hub);
}

/* A failed read left work: retried once the hub's stall delay passed, not
 * in a loop that would spin on a server that is down. */
#define STALL_DELAY 0.25

static void sub_stall(cs_sub *s)
{
    cs_hub *hub = s->hub;
    ready_unlink(s);
    if (!hub->stalled)
        hub->stall_at = cs_now() + STALL_DELAY;
    s->rnext = hub->stalled;
    if (hub->stalled)
        hub->stalled->rprev = s;
    hub->stalled = s;
    s->rstate = 2;
    wake_update(hub);
}

static void stalled_wake(cs_hub *hub)
{
    if (!hub->stalled || cs_now() < hub->stall_at)
        return;
    while (hub->stalled)
        sub_ready(hub->stalled);
}

static bool sub_has_work(const cs_sub *s)
{
    return s->evpos < s->evn || s->out.n || s->qn || s->resync ||
           s->status_dirty || s->queue_dirty || s->poll_id ||
           s->poll_version > s->status_version;
}

size_t cs_hub_ready(const cs_hub *hub, cs_sub **out, size_t cap)
{
    size_t i = 0;
    for (cs_sub *s = hub->ready_head; s && i < cap; s = s->rnext)
        out[i++] = s;
    return hub->nready;
}

double cs_hub_timeout(const cs_hub *hub)
{
    if (hub->ready_head)
        return 0;
    double t = cs_now(), best = 0, at;
    bool any = false;
    if (hub->poll_interval > 0) {
        best = hub->next_poll - t;
        any = true;
    }
    if (cs_round_due(hub, &at) && (!any || at - t < best)) {
        best = at - t;
        any = true;
    }
    if (hub->stalled && (!any || hub->stall_at - t < best)) {
        best = hub->stall_at - t;
        any = true;
    }
    return !any ? -1 : best > 0 ? best : 0;
}

/* ---- routing ------------------------------------------------------------- */

/* Collapses everything pending into one resync: message hints into a pass
 * from the lowest after up to the highest id with a forced DB pass, status
 * and queue hints into re-reads from the store. Parts are dropped (counted):
 * they are not durable. No message is dropped. */
static void sub_collapse(cs_sub *s)
{
    int64_t a = s->resync ? s->resync_after : INT64_MAX;
    int64_t n = s->resync ? s->resync_id : 0;
    if (!s->resync)
        s->hub->stats.resyncs++;
    for (size_t i = 0; i < s->qn; i++) {
        qhint *h = &s->q[(s->qhead + i) % s->qcap];
        switch (h->kind) {
        case CS_HINT_MESSAGE:
            a = h->a < a ? h->a : a;
            n = h->b > n ? h->b : n;
            break;
        case CS_HINT_STATUS: s->status_dirty = true; break;
        case CS_HINT_QUEUE: s->queue_dirty = true; break;
        case CS_HINT_PART:
            free(h->text);
            s->hub->stats.parts_dropped++;
            break;
        }
    }
    s->qhead = s->qn = 0;
    s->resync = true;
    s->resync_after = a;
    s->resync_id = n;
}

static void sub_enqueue(cs_sub *s, const cs_hint *h)
{
    if (s->qn == s->qcap)
        sub_collapse(s); /* overflow: nothing durable is lost */
    qhint q = {.kind = h->kind};
    switch (h->kind) {
    case CS_HINT_MESSAGE:
        q.a = h->after;
        q.b = h->id;
        break;
    case CS_HINT_STATUS:
        q.a = h->version;
        q.b = cs_status_parse(h->text, h->text_len);
        break;
    case CS_HINT_QUEUE: break;
    case CS_HINT_PART:
        q.a = h->after;
        q.len = h->text_len;
        q.text = malloc(h->text_len + 1);
        if (!q.text) {
            s->hub->stats.parts_dropped++;
            return;
        }
        memcpy(q.text, h->text, h->text_len);
        q.text[h->text_len] = '\0';
        break;
    }
    s->q[(s->qhead + s->qn) % s->qcap] = q;
    s->qn++;
    sub_ready(s);
}

/* A resync from the subscription's own position (listener reconnect,
 * backstop poll): a forced DB pass from W, and status and queue re-read
 * (their notifications may have been missed too). Pending hints stay. */
static void sub_mark_resync(cs_sub *s)
{
    if (!s->resync) {
        s->hub->stats.resyncs++;
        s->resync = true;
        s->resync_after = INT64_MAX;
        s->resync_id = 0;
    }
    s->status_dirty = s->queue_dirty = true;
    sub_ready(s);
}

static void resync_all(cs_hub *hub)
{
    for (size_t i = 0; i < hub->capchats; i++) {
        hub_chat *c = hub->chats[i];
        for (cs_sub *s = c ? c->subs : NULL; s; s = s->next)
            sub_mark_resync(s);
    }
}

static void route(void *ud, int64_t chat_id, const char *payload, size_t len)
{
    cs_hub *hub = ud;
    cs_hint h;
    if (chat_id == CS_RESYNC_ALL) {
        /* Notifications may have been missed on every chat: a round of the
         * poll, from the start, read after the listener LISTENs again. */
        if (cs_round_start(hub, true) < 0)
            resync_all(hub); /* out of memory: the full resync */
        return;
    }
    if (chat_id > 0 && !payload) {
        /* Its notifications were dropped (the store's buffer was full):
         * its subscriptions resync from their own positions. */
        hub_chat *c = cs_hub_chat_find(hub, chat_id);
        for (cs_sub *s = c ? c->subs : NULL; s; s = s->next)
            sub_mark_resync(s);
        return;
    }
    if (chat_id < 0 || cs_payload_parse(payload, len, &h) < 0) {
        hub->stats.malformed++;
        return;
    }
    hub->stats.notifications++;
    hub_chat *c = cs_hub_chat_find(hub, chat_id);
    if (!c)
        return;
    if (h.kind == CS_HINT_MESSAGE && h.body && c->subs) {
        /* The message itself, as its committing statement wrote it: into the
         * cache, where the merge finds it as it would a message this hub
         * wrote (continuity still proven through prev_id, never assumed).
         * What every subscription of the chat here has passed goes first:
         * no lookup starts below the lowest position, so it costs no query,
         * and a reader's cache holds only the window not yet read. */
        int64_t low = INT64_MAX;
        for (cs_sub *s = c->subs; s; s = s->next) {
            int64_t at = cs_merge_cursor(&s->merge);
            low = at < low ? at : low;
        }
        cs_cache_trim(&c->cache, low);
        cs_msg *m = h.id > low
                        ? cs_msg_new_n(h.id, chat_id, h.after, h.role, h.text,
                                       h.text_len, h.tool, h.tool_len)
                        : NULL;
        if (m) {
            hub->stats.bodies += cs_cache_append(&c->cache, m);
            cs_msg_unref(m);
        }
    }
    for (cs_sub *s = c->subs; s; s = s->next)
        sub_enqueue(s, &h);
}

/* Reads the store's notifications and routes them. */
static int hub_read(cs_hub *hub)
{
    hub->last_step = now();
    hub->stats.steps++;
    int rc = hub->store.ops->poll(hub->store.st, route, hub);
    return rc < 0 ? cs_hub_fail(hub, rc, NULL) : rc;
}

/* What the poll read of the subscription's chat: a DB pass is due when the
 * chat's messages end past the merge's cursor, the status when it is newer
 * than the one delivered, the queue when its signature is not the one of
 * the queue delivered. The subscription does its part on its next call. */
static void sub_polled(cs_sub *s, const cs_chat_state *st)
{
    bool work = false;
    if (st->last_message_id > cs_merge_cursor(&s->merge) &&
        st->last_message_id > s->poll_id) {
        s->poll_id = st->last_message_id;
        work = true;
    }
    if (st->version > s->status_version && st->version > s->poll_version) {
        s->poll_version = st->version;
        s->poll_status = st->status;
        work = true;
    }
    if (st->queue_sig != s->queue_sig && !s->queue_dirty) {
        s->queue_dirty = true;
        work = true;
    }
    if (work) {
        s->hub->stats.resyncs++;
        sub_ready(s);
    }
}

/* One chunk of the round under way, if one is due: one statement. A chat
 * that did not move costs nothing more. */
static void hub_poll_chunk(cs_hub *hub)
{
    cs_chat_state *rows;
    size_t n;
    int rc = cs_round_next(hub, &rows, &n);
    if (rc < 0) {
        cs_hub_fail(hub, rc, NULL); /* retried: the round stays */
        return;
    }
    for (size_t i = 0; i < n; i++) {
        hub_chat *c = cs_hub_chat_find(hub, rows[i].id);
        for (cs_sub *s = c ? c->subs : NULL; s; s = s->next)
            sub_polled(s, &rows[i]);
    }
}

int cs_hub_step(cs_hub *hub)
{
    if (!hub)
        return CS_ECLOSED;
    int rc = hub_read(hub);
    if (rc < 0)
        return rc;
    stalled_wake(hub);
    if (hub->nodb) {
        /* cs_sub_try: the store's server is not asked; a poll chunk due
         * waits for a step that may. */
        double at;
        if (cs_round_due(hub, &at) && at <= now())
            hub->wanted_db = true;
        return rc;
    }
    if (hub->store.ops->queue_usage && hub->last_step >= hub->next_usage) {
        /* The cluster's notification queue, in the open: one query per
         * poll interval (10 s without a poll). */
        double u;
        hub->next_usage =
            hub->last_step + (hub->poll_interval > 0 ? hub->poll_interval : 10);
        if (hub->store.ops->queue_usage(hub->store.st, &u) == CS_OK)
            hub->stats.notify_queue_usage = u; /* not a read of chats:
                                                  not in queries */
    }
    if (hub->poll_interval > 0) {
        double t = now();
        if (t >= hub->next_poll) {
            /* The backstop: a lost notification costs delay, not a message.
             * One statement per chunk of followed chats, whatever the number
             * of subscriptions; a round still under way goes on. */
            hub->next_poll = t + hub->poll_interval;
            hub->stats.polls++;
            if (cs_round_start(hub, false) < 0)
                resync_all(hub); /* out of memory: the full resync */
        }
    }
    hub_poll_chunk(hub);
    return rc;
}

int cs_hub_try_step(cs_hub *hub, bool *again)
{
    if (!hub)
        return CS_ECLOSED;
    hub->nodb = true;
    hub->wanted_db = false;
    int rc = cs_hub_step(hub);
    hub->nodb = false;
    *again = hub->wanted_db;
    hub->wanted_db = false;
    return rc;
}

int cs_hub_notify_fd(const cs_hub *hub)
{
    return hub->store.ops->fd(hub->store.st);
}

/* Sleeps until the store's fd is readable, at most `left` seconds, and less
 * when something is due sooner: the backstop poll, or (fd -1 on a remote
 * store) the next step of a listener reconnect, which only steps move on.
 * Returns 0, 1 when nothing can ever arrive (the memory store without a
 * poll), or an error. */
static int hub_sleep(cs_hub *hub, double left)
{
    /* The store's own fd, not the pollfd: another subscription's buffered
     * events keep the pollfd readable, and this call waits for its own. */
    int fd = hub->store.ops->remote ? hub->store.ops->fd(hub->store.st) : -1;
    double t = now();
    bool due = false;
    if (hub->poll_interval > 0) {
        double p = hub->next_poll - t > 0 ? hub->next_poll - t : 0;
        left = p < left ? p : left;
        due = true;
    }
    double at;
    if (cs_round_due(hub, &at)) {
        /* A round of the poll goes on at the next step. */
        double r = at - t > 0 ? at - t : 0;
        left = r < left ? r : left;
        due = true;
    }
    if (fd < 0 && !due)
        return 1;
    if (cs_engine_wait(fd, CS_WAIT_READ, now() + left) < 0)
        return cs_hub_fail(hub, CS_EBACKEND, strerror(errno));
    return 0;
}

int cs_hub_wait(cs_hub *hub, double timeout)
{
    if (!hub)
        return CS_ECLOSED;
    double deadline = now() + (timeout > 0 ? timeout : 0);
    /* First what is already there: libpq may hold notifications it read
     * while another statement ran, and then the socket is not readable. */
    for (;;) {
        int rc = cs_hub_step(hub);
        double left = deadline - now();
        if (rc != 0 || left <= 0)
            return rc;
        rc = hub_sleep(hub, left);
        if (rc != 0)
            return rc < 0 ? rc : 0;
    }
}

/* ---- subscriptions ---------------------------------------------------- */

/* The merge's DB pass. A watermark pass for a notification of message
 * `need` is answered by the chat's memo when the memo starts at or below
 * `after` and reaches `need`: its rows above `after` are then exactly what a
 * query would have returned when the memo was read (every message up to its
 * end had committed by then), and they include the notified message. So the
 * subscriptions of a chat in one hub share one query per batch of
 * notifications. Resyncs (notifications may have been missed) always ask
 * the store. */
/* The page of a subscription's DB passes: rescan (the reference fix) reads
 * everything, its lookups do not move forward page by page. */
static size_t sub_page(const cs_sub *s)
{
    return s->merge.strategy == CS_STRATEGY_RESCAN ? 0 : s->hub->page_size;
}

static int sub_query(void *ud, int64_t after, cs_msglist *out)
{
    cs_sub *s = ud;
    cs_hub *hub = s->hub;
    hub_chat *c = s->chat;
    cs_msglist *memo = &c->memo;
    size_t limit = sub_page(s);
    if (s->memo_ok && memo->n > 0 && c->memo_after <= after &&
        memo->items[memo->n - 1]->id >= s->need) {
        size_t base = out->n;
        for (size_t i = 0; i < memo->n; i++) {
            if (memo->items[i]->id <= after)
                continue;
            if (limit && out->n - base >= limit)
                break; /* a page, as the query would have read */
            if (cs_msglist_push(out, cs_msg_ref(memo->items[i])) < 0) {
                cs_msg_unref(memo->items[i]);
                while (out->n > base)
                    cs_msg_unref(out->items[--out->n]);
                return CS_ENOMEM;
            }
        }
        hub->counts.queries--; /* the merge counted one; none was sent */
        hub->stats.shared_passes++;
        return CS_OK;
    }
    if (hub->nodb) {
        hub->counts.queries--; /* not sent */
        hub->counts.db_passes--;
        hub->wanted_db = true;
        return CS_EWOULDBLOCK;
    }
    size_t base = out->n;
    int rc = hub->store.ops->messages_after(hub->store.st, s->chat_id, after,
                                            limit, out);
    if (rc < 0)
        return cs_hub_fail(hub, rc, NULL);
    /* Kept when small (at most a cache's worth): the memo is an
     * optimisation, its memory stays bounded. */
    cs_msglist_clear(memo);
    if (out->n - base <= hub->cache_size) {
        for (size_t i = base; i < out->n; i++)
            if (cs_msglist_push(memo, cs_msg_ref(out->items[i])) < 0) {
                cs_msg_unref(out->items[i]);
                cs_msglist_clear(memo);
                break;
            }
        c->memo_after = after;
    }
    return rc;
}

static void sub_unlink(cs_sub *s)
{
    sub_unready(s);
    hub_chat *c = s->chat;
    if (!c)
        return;
    if (s->prev)
        s->prev->next = s->next;
    else
        c->subs = s->next;
    if (s->next)
        s->next->prev = s->prev;
    s->next = s->prev = NULL;
    if (--c->nsubs == 0 && s->hub)
        s->hub->busy_chats--;
    if (c->nsubs == 0 && c->listening && s->hub) {
        s->hub->store.ops->unlisten(s->hub->store.st, c->id);
        c->listening = false;
        /* UNLISTEN may have read notifications of other chats into the
         * store's buffer: route them now, so a loop on the fd misses none. */
        hub_read(s->hub);
    }
    s->chat = NULL;
}

static void sub_free(cs_sub *s)
{
    cs_merge_free(&s->merge);
    for (size_t i = 0; i < s->qn; i++)
        free(s->q[(s->qhead + i) % s->qcap].text);
    free(s->q);
    cs_msglist_free(&s->out);
    /* Events before evpos were handed over (moved to current). */
    for (size_t i = s->evpos; i < s->evn; i++)
        oevent_free(&s->ev[i]);
    free(s->ev);
    oevent_free(&s->current);
    free(s->ret);
    free(s);
}

/* Delivers the status if newer than the last delivered. */
static int sub_take_status(cs_sub *s, int64_t version, cs_status st)
{
    if (version <= s->status_version)
        return CS_OK;
    oevent e = {.kind = CS_EV_STATUS, .a = version, .b = st};
    int rc = ev_push(s, e);
    if (rc == CS_OK)
        s->status_version = version;
    return rc;
}

/* Reads the status; delivers it if newer than the last delivered. */
static int sub_read_status(cs_sub *s)
{
    cs_hub *hub = s->hub;
    if (hub->nodb) {
        hub->wanted_db = true;
        return CS_EWOULDBLOCK;
    }
    cs_chat_row *row = malloc(sizeof *row);
    if (!row)
        return CS_ENOMEM;
    hub->counts.queries++;
    int rc = hub->store.ops->chat_get(hub->store.st, s->chat_id, row);
    if (rc < 0) {
        if (rc == CS_EBACKEND)
            hub->counts.query_errors++;
        free(row);
        return cs_hub_fail(hub, rc, NULL);
    }
    rc = sub_take_status(s, row->version, row->status);
    free(row);
    return rc;
}

/* Delivers the queue q (taking it) if it differs from the last delivered,
 * or, for the snapshot, if it is not empty; frees it otherwise. */
static int sub_take_queue(cs_sub *s, cs_queue *q, bool snapshot)
{
    uint64_t sig = cs_queue_sig(q);
    if (snapshot ? q->n == 0 : sig == s->queue_sig) {
        s->queue_sig = sig;
        cs_queue_free(q);
        free(q);
        return CS_OK;
    }
    oevent e = {.kind = CS_EV_QUEUE, .queue = q};
    int rc = ev_push(s, e); /* frees q on failure */
    if (rc == CS_OK)
        s->queue_sig = sig;
    return rc;
}

/* Reads the queue; delivers it if it differs from the last delivered. */
static int sub_read_queue(cs_sub *s)
{
    cs_hub *hub = s->hub;
    if (hub->nodb) {
        hub->wanted_db = true;
        return CS_EWOULDBLOCK;
    }
    cs_queue *q = calloc(1, sizeof *q);
    if (!q)
        return CS_ENOMEM;
    hub->counts.queries++;
    int rc = hub->store.ops->queue_list(hub->store.st, s->chat_id, q);
    if (rc < 0) {
        if (rc == CS_EBACKEND)
            hub->counts.query_errors++;
        cs_queue_free(q);
        free(q);
        return cs_hub_fail(hub, rc, NULL);
    }
    return sub_take_queue(s, q, false);
}

/* The snapshot, one statement: status, queue (when not empty), the first
 * page of messages. A cursor past the chat's last message is refused. */
static int sub_snapshot(cs_sub *s, int64_t after)
{
    cs_hub *hub = s->hub;
    cs_chat_row *row = malloc(sizeof *row);
    cs_queue *q = calloc(1, sizeof *q);
    cs_msglist rows = {0};
    int rc = row && q ? CS_OK : CS_ENOMEM;
    if (rc == CS_OK) {
        hub->counts.queries++;
        rc = hub->store.ops->snapshot(hub->store.st, s->chat_id, after,
                                      sub_page(s), row, q, &rows);
        if (rc < 0) {
            if (rc == CS_EBACKEND)
                hub->counts.query_errors++;
            cs_hub_fail(hub, rc, NULL);
        }
    }
    if (rc == CS_OK && after > row->last_message_id) {
        /* A cursor is never past what was committed: this one comes from
         * another database or chat, or a typo. */
        char buf[160];
        snprintf(buf, sizeof buf,
                 "after = %lld is beyond the last message of chat %lld (%lld)",
                 (long long)after, (long long)s->chat_id,
                 (long long)row->last_message_id);
        rc = cs_hub_fail(hub, CS_EINVAL, buf);
    }
    if (rc == CS_OK)
        rc = sub_take_status(s, row->version, row->status);
    if (rc == CS_OK) {
        rc = sub_take_queue(s, q, true);
        q = NULL; /* taken, or freed */
    }
    if (rc == CS_OK)
        rc = cs_merge_snapshot(&s->merge, &rows, &s->out);
    if (rc == CS_OK)
        rc = ev_take_merged(s);
    if (rc == CS_OK && sub_page(s) && rows.n >= sub_page(s)) {
        /* A page of the snapshot: the rest is read from W, page by page,
         * as the reader takes them (not counted a resync). */
        s->resync = true;
        s->resync_after = INT64_MAX;
        s->resync_id = 0;
    }
    cs_msglist_free(&rows);
    if (q) {
        cs_queue_free(q);
        free(q);
    }
    free(row);
    return rc;
}

int cs_sub_open(cs_hub *hub, int64_t chat_id, const cs_sub_options *opts,
                cs_sub **out)
{
    cs_sub_options o = opts ? *opts : (cs_sub_options){0};
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1 || o.after < 0 ||
        (unsigned)o.strategy > CS_STRATEGY_LAST_ID)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id, after or strategy");
    /* The actor first: a refusal reads nothing of the chat. */
    int rc = cs_hub_authorize(hub, chat_id, o.actor, "subscribe");
    if (rc < 0)
        return rc;
    cs_sub *s = calloc(1, sizeof *s);
    if (!s)
        return CS_ENOMEM;
    s->q = malloc(hub->queue_size * sizeof *s->q);
    if (!s->q) {
        free(s);
        return CS_ENOMEM;
    }
    s->qcap = hub->queue_size;
    s->status_version = -1;
    s->poll_version = -1;
    s->hub = hub;
    s->chat_id = chat_id;
    s->rw = o.after;
    cs_merge_init(&s->merge, o.strategy, !o.unordered, o.after, &hub->counts);

    hub_chat *c = cs_hub_chat(hub, chat_id);
    if (!c) {
        sub_free(s);
        return CS_ENOMEM;
    }
    /* Listen first (invariant 3), then read the snapshot. */
    if (!c->listening) {
        rc = hub->store.ops->listen(hub->store.st, chat_id);
        if (rc < 0) {
            sub_free(s);
            return cs_hub_fail(hub, rc, NULL);
        }
        c->listening = true;
    }
    s->chat = c;
    s->next = c->subs;
    if (c->subs)
        c->subs->prev = s;
    c->subs = s;
    if (c->nsubs++ == 0)
        hub->busy_chats++;

    /* The snapshot: status, queue (when not empty), messages. */
    rc = sub_snapshot(s, o.after);
    if (rc < 0) {
        sub_unlink(s);
        sub_free(s);
        return rc;
    }
    /* The LISTEN and the snapshot may have left notifications in the
     * store's buffer, where the fd does not show them: route them now. */
    hub_read(hub);
    if (sub_has_work(s))
        sub_ready(s); /* the snapshot's events */
    *out = s;
    return CS_OK;
}

/* One merge pass into the event list. A page that gave the reader nothing
 * (every row was handed over already, above W, out of order) is not a page
 * the reader has to take: the next one is read at once, so a call never
 * looks idle while there is more to read. (Such pages hold only the
 * out-of-order window: W moves past each one.) The merge's rc:
 * CS_MERGE_MORE when the reader has a page to take first. */
static int sub_pass(cs_sub *s, const cs_merge_source *src, int64_t after,
                    int64_t id, bool force_db)
{
    for (;;) {
        size_t n0 = s->out.n;
        int rc = cs_merge_notify(&s->merge, src, after, id, force_db, &s->out);
        bool gave = s->out.n > n0;
        ev_take_merged(s);
        if (rc != CS_MERGE_MORE || gave)
            return rc;
    }
}

/* Runs the merge for everything pending, in arrival order. A failed read
 * leaves its work pending for the next call. */
static void sub_process(cs_sub *s)
{
    cs_merge_source src = {&s->chat->cache, sub_query, s, sub_page(s)};
    if (s->resync) {
        s->memo_ok = false; /* a resync reads what is there now */
        int rc = sub_pass(s, &src, s->resync_after, s->resync_id, true);
        if (rc < 0 || rc == CS_MERGE_MORE)
            return; /* retried, or the next page, on the next call */
        s->resync = false;
    }
    if (s->poll_id) {
        /* The poll saw the chat's messages reach poll_id: a pass up to it,
         * like a notification of it (watermark: from W, through the cache,
         * sharing the chat's memo when it reaches poll_id, which then holds
         * every message up to it; the others, as a resync did: a forced DB
         * pass from their position). */
        if (s->poll_id > cs_merge_cursor(&s->merge)) {
            bool wm = s->merge.strategy == CS_STRATEGY_WATERMARK;
            s->memo_ok = wm;
            s->need = s->poll_id;
            int rc = sub_pass(s, &src, s->poll_id, s->poll_id, !wm);
            if (rc < 0 || rc == CS_MERGE_MORE)
                return; /* retried, or the next page, on the next call */
        }
        s->poll_id = 0;
    }
    if (s->poll_version > s->status_version &&
        sub_take_status(s, s->poll_version, s->poll_status) < 0)
        return;
    if (s->status_dirty) {
        if (sub_read_status(s) < 0)
            return;
        s->status_dirty = false;
    }
    if (s->queue_dirty) {
        if (sub_read_queue(s) < 0)
            return;
        s->queue_dirty = false;
    }
    while (s->qn > 0) {
        qhint *h = &s->q[s->qhead];
        size_t take = 1;
        int rc = CS_OK;
        if (h->kind == CS_HINT_MESSAGE) {
            qhint m = *h;
            /* Coalesce a run of message hints: one watermark pass up to the
             * highest id covers them all. */
            while (s->merge.strategy == CS_STRATEGY_WATERMARK && take < s->qn) {
                qhint *n = &s->q[(s->qhead + take) % s->qcap];
                if (n->kind != CS_HINT_MESSAGE)
                    break;
                m.a = n->a < m.a ? n->a : m.a;
                m.b = n->b > m.b ? n->b : m.b;
                take++;
            }
            if (take > 1) {
                /* Keep the merged hint in the last slot, for a retry. */
                s->qhead = (s->qhead + take - 1) % s->qcap;
                s->qn -= take - 1;
                s->q[s->qhead] = m;
                take = 1;
            }
            s->memo_ok = s->merge.strategy == CS_STRATEGY_WATERMARK;
            s->need = m.b;
            rc = sub_pass(s, &src, m.a, m.b, false);
            if (rc == CS_MERGE_MORE)
                return; /* the hint stays: its next page on the next call */
        } else if (h->kind == CS_HINT_STATUS) {
            if (h->a > s->status_version && h->b >= 0) {
                oevent e = {.kind = CS_EV_STATUS, .a = h->a, .b = h->b};
                rc = ev_push(s, e);
                if (rc == CS_OK)
                    s->status_version = h->a;
            }
        } else if (h->kind == CS_HINT_QUEUE) {
            while (take < s->qn &&
                   s->q[(s->qhead + take) % s->qcap].kind == CS_HINT_QUEUE)
                take++;
            rc = sub_read_queue(s);
            if (rc == CS_OK) {
                s->qhead = (s->qhead + take - 1) % s->qcap;
                s->qn -= take - 1;
                take = 1;
            }
        } else if (h->kind == CS_HINT_PART) {
            /* A part of a message this reader already has is stale. */
            if (h->a >= s->merge.last) {
                oevent e = {.kind = CS_EV_PART,
                            .a = h->a,
                            .text = h->text,
                            .len = h->len};
                h->text = NULL;
                rc = ev_push(s, e);
                if (rc < 0)
                    s->hub->stats.parts_dropped++;
                rc = CS_OK;
            } else {
                free(h->text);
                h->text = NULL;
            }
        }
        if (rc < 0)
            return;
        s->qhead = (s->qhead + 1) % s->qcap;
        s->qn--;
    }
}

static void fill_event(cs_sub *s, const oevent *e, cs_event *ev)
{
    *ev = (cs_event){0};
    ev->kind = e->kind;
    ev->chat_id = s->chat_id;
    switch (e->kind) {
    case CS_EV_MESSAGE:
        ev->id = e->msg->id;
        ev->prev_id = e->msg->prev_id;
        ev->role = cs_role_name(e->msg->role);
        ev->text = e->msg->content;
        ev->text_len = e->msg->content_len;
        ev->tool = e->msg->tool;
        break;
    case CS_EV_STATUS:
        ev->version = e->a;
        ev->status = (cs_status)e->b;
        ev->text = cs_status_name(ev->status);
        ev->text_len = strlen(ev->text);
        break;
    case CS_EV_QUEUE: ev->queue = e->queue; break;
    case CS_EV_PART:
        ev->prev_id = e->a;
        ev->text = e->text;
        ev->text_len = e->len;
        break;
    }
}

/* Hands the next ready event over: 1, 0 when there is none, or CS_ENOMEM
 * (nothing handed over). */
static int pop_event(cs_sub *s, cs_event *ev)
{
    if (s->evpos >= s->evn) {
        s->evpos = s->evn = 0;
        return 0;
    }
    oevent *e = &s->ev[s->evpos];
    if (e->kind == CS_EV_MESSAGE && ret_record(s, e->msg) < 0)
        return CS_ENOMEM;
    s->current = *e; /* ownership moves to current */
    s->evpos++;
    fill_event(s, &s->current, ev);
    ev->cursor = s->rw;
    if (s->current.kind == CS_EV_MESSAGE)
        s->hub->stats.delivered++;
    else if (s->current.kind == CS_EV_PART)
        s->hub->stats.parts++;
    return 1;
}

/* A remote store's listener is read at most this often by calls that do
 * not wait (a loop polling many subscriptions reads it once, not once per
 * subscription); a call that may wait always reads it. */
#define STEP_GAP 0.001

static int sub_next(cs_sub *s, cs_event *ev, bool force_step)
{
    if (!s || !s->hub)
        return CS_ECLOSED;
    oevent_free(&s->current);
    ev_take_merged(s); /* what an earlier call could not move */
    int got = pop_event(s, ev);
    if (got > 0 && !sub_has_work(s))
        sub_unready(s); /* that was the last: off the ready list at once */
    if (got != 0)
        return got > 0 ? CS_EVENT : got;
    cs_hub *hub = s->hub;
    if (force_step || !hub->store.ops->remote ||
        now() - hub->last_step >= STEP_GAP) {
        int rc = cs_hub_step(hub);
        if (rc < 0)
            return rc;
    }
    sub_process(s);
    got = pop_event(s, ev);
    if (got > 0 && !sub_has_work(s))
        sub_unready(s);
    if (got == 0 && !hub->wanted_db) {
        /* Nothing more to do, or only what a failed read left. */
        if (sub_has_work(s))
            sub_stall(s);
        else
            sub_unready(s);
    }
    return got > 0 ? CS_EVENT : got == 0 ? CS_IDLE : got;
}

int cs_sub_next(cs_sub *s, cs_event *ev)
{
    return sub_next(s, ev, false);
}

int cs_sub_try(cs_sub *s, cs_event *ev)
{
    if (!s || !s->hub)
        return CS_ECLOSED;
    cs_hub *hub = s->hub;
    hub->nodb = true;
    hub->wanted_db = false;
    int rc = sub_next(s, ev, false);
    hub->nodb = false;
    if (rc == CS_IDLE && hub->wanted_db)
        rc = CS_AGAIN;
    hub->wanted_db = false;
    return rc;
}

int cs_sub_wait(cs_sub *s, double timeout, cs_event *ev)
{
    double deadline = now() + (timeout > 0 ? timeout : 0);
    /* A call that may wait reads the store each time: libpq may hold
     * notifications it read while the listener ran a LISTEN, and then its
     * socket is not readable. */
    for (;;) {
        int rc = sub_next(s, ev, timeout > 0);
        if (rc != CS_IDLE)
            return rc;
        double left = deadline - now();
        if (left <= 0)
            return CS_IDLE;
        rc = hub_sleep(s->hub, left);
        if (rc != 0)
            return rc < 0 ? rc : CS_IDLE; /* 1: nothing can arrive */
    }
}

int64_t cs_sub_cursor(const cs_sub *s)
{
    return s->rw;
}

size_t cs_sub_delivered_bytes(const cs_sub *s)
{
    return cs_idset_bytes(&s->merge.delivered);
}

void cs_sub_close(cs_sub *s)
{
    if (!s)
        return;
    sub_unlink(s);
    sub_free(s);
}

void cs_hub_detach_subs(cs_hub *hub)
{
    for (size_t i = 0; i < hub->capchats; i++) {
        hub_chat *c = hub->chats[i];
        if (!c)
            continue;
        for (cs_sub *s = c->subs, *next; s; s = next) {
            next = s->next;
            s->rnext = s->rprev = NULL;
            s->rstate = 0;
            s->hub = NULL;
            s->chat = NULL;
            s->next = s->prev = NULL;
        }
        c->subs = NULL;
        c->nsubs = 0;
        hub->busy_chats = 0;
    }
    hub->ready_head = hub->ready_tail = hub->stalled = NULL;
    hub->nready = 0;
}
