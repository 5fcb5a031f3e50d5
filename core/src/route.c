/* route.c - routing the store's notifications to the subscriptions of
 * their chats, and the ready list of subscriptions with work. */
#include "hub.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
void cs_sub_ready(cs_sub *s)
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
void cs_sub_unready(cs_sub *s)
{
    if (!s->hub || s->rstate == 0)
        return;
    ready_unlink(s);
    wake_update(s->hub);
}

/* A failed read left work: retried once the hub's stall delay passed, not
 * in a loop that would spin on a server that is down. */
#define STALL_DELAY 0.25

void cs_sub_stall(cs_sub *s)
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

void cs_hub_stalled_wake(cs_hub *hub)
{
    if (!hub->stalled || cs_now() < hub->stall_at)
        return;
    while (hub->stalled)
        cs_sub_ready(hub->stalled);
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
        case CS_HINT_STATUS:
            free(h->text); /* the status is read again, with its error */
            s->status_dirty = true;
            break;
        case CS_HINT_QUEUE: s->queue_dirty = true; break;
        case CS_HINT_PART:
            free(h->text);
            s->hub->stats.parts_dropped++;
            break;
        case CS_HINT_TRUNCATE:
            if (h->h > s->history)
                s->history_dirty = true; /* the cuts are read from the store */
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
        if (h->version > s->status_queued)
            s->status_queued = h->version;
        q.b = cs_status_parse(h->text, h->text_len);
        if (q.b >= 0 && h->archived)
            q.b |= CS_ARCHIVED_BIT;
        if (h->error_len) {
            q.len = h->error_len;
            if (!(q.text = malloc(h->error_len + 1))) {
                s->status_dirty = true; /* read with its error instead */
                cs_sub_ready(s);
                return;
            }
            memcpy(q.text, h->error, h->error_len);
            q.text[h->error_len] = '\0';
        }
        break;
    case CS_HINT_QUEUE: break;
    case CS_HINT_TRUNCATE:
        q.a = h->after;
        q.b = h->id;
        q.h = h->version;
        break;
    case CS_HINT_PART:
        q.a = h->after;
        q.b = h->id; /* its seq */
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
    cs_sub_ready(s);
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
    cs_sub_ready(s);
}

void cs_hub_resync_all(cs_hub *hub)
{
    for (size_t i = 0; i < hub->capchats; i++) {
        hub_chat *c = hub->chats[i];
        for (cs_sub *s = c ? c->subs : NULL; s; s = s->next)
            sub_mark_resync(s);
    }
}

void cs_hub_route(void *ud, int64_t chat_id, const char *payload, size_t len)
{
    cs_hub *hub = ud;
    cs_hint h;
    if (chat_id == CS_RESYNC_ALL) {
        /* Notifications may have been missed on every chat: a round of the
         * poll, from the start, read after the listener LISTENs again. */
        if (cs_round_start(hub, true) < 0)
            cs_hub_resync_all(hub); /* out of memory: the full resync */
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
    if (h.kind == CS_HINT_TRUNCATE && h.version > c->history)
        /* At once, for every subscription of the chat here: the cache
         * holds nothing the edit removed from now on. */
        cs_chat_cut(c, h.after, h.id, h.version);
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
            hub->stats.bodies += cs_chat_cache_put(hub, c, m);
            cs_msg_unref(m);
        }
    }
    for (cs_sub *s = c->subs; s; s = s->next)
        sub_enqueue(s, &h);
}

/* What the poll read of the subscription's chat: a DB pass is due when the
 * chat's messages end past the merge's cursor, the status when it is newer
 * than the one delivered, the queue when its signature is not the one of
 * the queue delivered. The subscription does its part on its next call. */
void cs_sub_polled(cs_sub *s, const cs_chat_state *st)
{
    bool work = false;
    if (st->last_message_id > cs_merge_cursor(&s->merge) &&
        st->last_message_id > s->poll_id) {
        s->poll_id = st->last_message_id;
        work = true;
    }
    if (st->version > s->status_version && st->version > s->status_queued &&
        !s->status_dirty) {
        s->status_dirty = true; /* a notification was missed: read the row */
        work = true;
    }
    if (st->queue_sig != s->queue_sig && !s->queue_dirty) {
        s->queue_dirty = true;
        work = true;
    }
    if (st->history > s->history && !s->history_dirty) {
        s->history_dirty = true; /* an edit's notification was missed */
        work = true;
    }
    if (work) {
        s->hub->stats.resyncs++;
        cs_sub_ready(s);
    }
}
