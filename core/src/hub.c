/* hub.c - the hub: open and close, errors, stats, the pollfd, stepping and
 * waiting. */
#include "hub.h"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- hub ---------------------------------------------------------------- */

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
        !(o.stale_after >= 0) || o.max_queue > CS_MAX_MAX_QUEUE ||
        o.action_timeout != o.action_timeout) {
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
    hub->max_queue = o.max_queue ? o.max_queue : CS_DEFAULT_MAX_QUEUE;
    hub->action_timeout =
        o.action_timeout != 0 ? o.action_timeout : CS_DEFAULT_ACTION_TIMEOUT;
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

void cs_pub_detach_all(cs_hub *hub)
{
    for (cs_publish *p = hub->pubs, *next; p; p = next) {
        next = p->next;
        p->hub = NULL;
        p->next = p->prev = NULL;
    }
    hub->pubs = NULL;
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
    if (hub->store.ops->deaf_count)
        out->listener_deaf = hub->store.ops->deaf_count(hub->store.st);
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

/* ---- stepping and waiting ------------------------------------------------ */

/* Reads the store's notifications and routes them. */
int cs_hub_read(cs_hub *hub)
{
    if (hub->store.ops->remote)
        hub->last_step =
            now(); /* only a server's reads are spaced (STEP_GAP) */
    hub->stats.steps++;
    int rc = hub->store.ops->poll(hub->store.st, cs_hub_route, hub);
    return rc < 0 ? cs_hub_fail(hub, rc, NULL) : rc;
}

typedef struct prefetch {
    int64_t id, after;
    hub_chat *chat;
} prefetch;

static int prefetch_cmp(const void *a, const void *b)
{
    int64_t x = ((const prefetch *)a)->id, y = ((const prefetch *)b)->id;
    return (x > y) - (x < y);
}

/* The chats of a poll chunk that moved past a watermark subscription (k
 * of them in p, each with its lowest such position): their messages, for
 * all of them in one statement, into each chat's memo, where the
 * subscriptions' passes find them. So the resync of many chats (after a
 * listener reconnect, or what the backstop poll found) is one query, not
 * one per chat. */
static void hub_prefetch(cs_hub *hub, prefetch *p, size_t k)
{
    if (k < 2)
        return; /* one chat: its own pass is the same one query */
    qsort(p, k, sizeof *p, prefetch_cmp); /* the rows come by chat id */
    int64_t *ids = malloc(2 * k * sizeof *ids);
    if (!ids)
        return; /* each chat's own pass reads it */
    for (size_t i = 0; i < k; i++) {
        ids[i] = p[i].id;
        ids[k + i] = p[i].after;
    }
    cs_msglist out = {0};
    int64_t *histories = malloc(k * sizeof *histories);
    if (!histories) {
        free(ids);
        return;
    }
    hub->counts.queries++;
    int rc = hub->store.ops->messages_after_many(
        hub->store.st, ids, ids + k, k, hub->page_size, &out, histories);
    if (rc == CS_EBACKEND)
        hub->counts.query_errors++;
    for (size_t i = 0, j = 0; rc == CS_OK && i < k; i++) {
        size_t start = j;
        while (j < out.n && out.items[j]->chat_id == p[i].id)
            j++;
        if (j == start || j - start > hub->cache_size)
            continue; /* nothing, or more than a memo keeps: its own pass */
        hub_chat *c = p[i].chat;
        cs_msglist_clear(&c->memo);
        if (cs_msglist_reserve(&c->memo, j - start) < 0)
            continue;
        for (size_t m = start; m < j; m++)
            cs_msglist_push(&c->memo, cs_msg_ref(out.items[m]));
        c->memo_after = p[i].after;
        c->memo_history = histories[i];
    }
    cs_msglist_free(&out);
    free(histories);
    free(ids);
}

/* One chunk of the round under way, if one is due: one statement. A chat
 * that did not move costs nothing more; the chats that did are read in one
 * more (hub_prefetch), their lowest positions found in the same pass. */
static void hub_poll_chunk(cs_hub *hub)
{
    cs_chat_state *rows;
    size_t n;
    int rc = cs_round_next(hub, &rows, &n);
    if (rc < 0) {
        cs_hub_fail(hub, rc, NULL); /* retried: the round stays */
        return;
    }
    /* Without room for the prefetch (or a store without it) the passes
     * read each chat on their own. */
    prefetch *p = n >= 2 && hub->store.ops->messages_after_many
                      ? malloc(n * sizeof *p)
                      : NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        hub_chat *c = cs_hub_chat_find(hub, rows[i].id);
        int64_t low = INT64_MAX;
        for (cs_sub *s = c ? c->subs : NULL; s; s = s->next) {
            cs_sub_polled(s, &rows[i]);
            int64_t at = cs_merge_cursor(&s->merge);
            if (s->merge.strategy == CS_STRATEGY_WATERMARK && s->poll_id > at &&
                at < low)
                low = at;
        }
        if (p && low != INT64_MAX)
            p[k++] = (prefetch){rows[i].id, low, c};
    }
    if (p)
        hub_prefetch(hub, p, k);
    free(p);
}

int cs_hub_step(cs_hub *hub)
{
    if (!hub)
        return CS_ECLOSED;
    int rc = cs_hub_read(hub);
    if (rc < 0)
        return rc;
    cs_hub_stalled_wake(hub);
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
                cs_hub_resync_all(hub); /* out of memory: the full resync */
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
int cs_hub_sleep(cs_hub *hub, double left)
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
        rc = cs_hub_sleep(hub, left);
        if (rc != 0)
            return rc < 0 ? rc : 0;
    }
}
