/* sub.c - a subscription: its snapshot, the merge of what is pending, the
 * events it hands the reader and their cursor, next/try/wait, open and
 * close. */
#include "hub.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double now(void)
{
    return cs_now();
}

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

/* A truncate returned to the reader: what it was handed above `after` is
 * gone, its cursor goes down to it. (The messages it dropped from ret
 * were all removed by the cut: every event queued before the truncate was
 * at or below after, and every one after it comes after.) */
static void ret_cut(cs_sub *s, int64_t after)
{
    s->undo_rw = s->rw;
    s->undo_ret = false;
    if (s->rw > after)
        s->rw = after;
    while (s->nret > 0 && s->ret[s->nret - 1].id > after)
        s->nret--;
}

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
        } else if (s->current.kind == CS_EV_TRUNCATE) {
            s->rw = s->undo_rw; /* what it dropped of ret was gone anyway */
            if (s->hub)
                s->hub->stats.truncates--;
        }
        if (s->hub && s->current.kind == CS_EV_MESSAGE)
            s->hub->stats.delivered--;
        if (s->hub && s->current.kind == CS_EV_PART)
            s->hub->stats.parts--;
        s->current = (oevent){0};
        cs_sub_ready(s); /* it has that event again */
    }
}

static bool sub_has_work(const cs_sub *s)
{
    return s->evpos < s->evn || s->out.n || s->qn || s->resync ||
           s->status_dirty || s->queue_dirty || s->poll_id || s->history_dirty;
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
        c->memo_history == s->history &&
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
    int64_t history = 0;
    int rc = hub->store.ops->messages_after(hub->store.st, s->chat_id, after,
                                            limit, out, &history);
    if (rc < 0)
        return cs_hub_fail(hub, rc, NULL);
    if (history > s->history) {
        /* An edit cut the history since this subscription last looked: the
         * rows are read again once it caught up with the cut. */
        while (out->n > base)
            cs_msg_unref(out->items[--out->n]);
        s->history_dirty = true;
        return CS_EHISTORY;
    }
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
        c->memo_history = history;
    }
    return rc;
}

static void sub_unlink(cs_sub *s)
{
    cs_sub_unready(s);
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
        cs_hub_read(s->hub);
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
    oevent_free(&s->snap_part);
    free(s->snap_seqs);
    free(s->ret);
    free(s);
}

/* A row's status as an event carries it: with CS_ARCHIVED_BIT when
 * archived; and the length of the error it recorded (an error status). */
static int row_status(const cs_chat_row *row)
{
    return (int)row->status | (row->archived ? CS_ARCHIVED_BIT : 0);
}

static size_t row_error_len(const cs_chat_row *row)
{
    return row->status == CS_STATUS_ERROR ? strlen(row->last_error) : 0;
}

/* Delivers the status (with the error it recorded: error, len; copied) if
 * newer than the last delivered. */
static int sub_take_status(cs_sub *s, int64_t version, int st,
                           const char *error, size_t len)
{
    if (version <= s->status_version)
        return CS_OK;
    oevent e = {.kind = CS_EV_STATUS, .a = version, .b = st};
    if (len) {
        if (!(e.text = malloc(len + 1)))
            return CS_ENOMEM;
        memcpy(e.text, error, len);
        e.text[len] = '\0';
        e.len = len;
    }
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
    rc = sub_take_status(s, row->version, row_status(row), row->last_error,
                         row_error_len(row));
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

/* The parts of the turn in progress a snapshot read: one part event with
 * their text, handed over after the snapshot's messages (at once, or once
 * its pages are read: paged); their seqs are kept, so the same parts
 * notified meanwhile are dropped as repeats (a part with another seq, from
 * a concurrent publisher, still comes). */
static int sub_take_parts(cs_sub *s, const cs_parts *parts, bool paged)
{
    if (parts->n == 0)
        return CS_OK;
    size_t len = 0;
    for (size_t i = 0; i < parts->n; i++)
        len += parts->items[i].len;
    oevent e = {.kind = CS_EV_PART, .a = parts->items[0].after};
    int64_t *seqs = malloc(parts->n * sizeof *seqs);
    if (!seqs || !(e.text = malloc(len + 1))) {
        free(seqs);
        s->hub->stats.parts_dropped += (int64_t)parts->n;
        return CS_OK; /* parts may be lost, messages never */
    }
    for (size_t i = 0, o = 0; i < parts->n; i++) {
        memcpy(e.text + o, parts->items[i].text, parts->items[i].len);
        o += parts->items[i].len;
        seqs[i] = parts->items[i].seq;
    }
    e.text[len] = '\0';
    e.len = len;
    free(s->snap_seqs);
    s->snap_seqs = seqs;
    s->snap_n = parts->n;
    if (paged) {
        s->snap_part = e;
        return CS_OK;
    }
    return ev_push(s, e);
}

static bool snap_has(const cs_sub *s, int64_t seq)
{
    size_t lo = 0, hi = s->snap_n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->snap_seqs[mid] == seq)
            return true;
        if (s->snap_seqs[mid] < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    return false;
}

/* ---- edits: the cut --------------------------------------------------- */

/* An edit cut the chat's history above `after` (its new message upto, the
 * chat's history now `history`): the cache and memo forget what it removed,
 * the merge what it delivered above the cut, the events not handed over yet
 * lose the messages above it and every part (of a turn before the cut);
 * then a truncate event is queued, and what comes next is merged from the
 * cut. CS_ENOMEM changes nothing the next try would not do again. */
static int sub_cut(cs_sub *s, int64_t after, int64_t upto, int64_t history)
{
    cs_chat_cut(s->chat, after, upto, history);
    ev_take_merged(s);
    size_t k = 0;
    for (size_t i = 0; i < s->out.n; i++) {
        if (s->out.items[i]->id > after)
            cs_msg_unref(s->out.items[i]);
        else
            s->out.items[k++] = s->out.items[i];
    }
    s->out.n = k;
    k = s->evpos;
    for (size_t i = s->evpos; i < s->evn; i++) {
        oevent *e = &s->ev[i];
        if ((e->kind == CS_EV_MESSAGE && e->msg->id > after) ||
            e->kind == CS_EV_PART)
            oevent_free(e);
        else
            s->ev[k++] = *e;
    }
    s->evn = k;
    oevent_free(&s->snap_part);
    int rc =
        ev_push(s, (oevent){.kind = CS_EV_TRUNCATE, .a = after, .b = history});
    if (rc < 0)
        return rc;
    cs_merge_cut(&s->merge, after);
    s->history = history;
    if (upto > s->parts_floor)
        s->parts_floor = upto;
    return CS_OK;
}

/* The cuts since this subscription's history, read from the store (a
 * truncate notification was missed, or a DB pass saw the history move):
 * one truncate down to the lowest of them. */
static int sub_catch_up(cs_sub *s)
{
    cs_hub *hub = s->hub;
    if (hub->nodb) {
        hub->wanted_db = true;
        return CS_EWOULDBLOCK;
    }
    int64_t after, upto, history;
    hub->counts.queries++;
    hub->stats.cut_reads++;
    int rc = hub->store.ops->cuts(hub->store.st, s->chat_id, s->history, &after,
                                  &upto, &history);
    if (rc < 0) {
        if (rc == CS_EBACKEND)
            hub->counts.query_errors++;
        return cs_hub_fail(hub, rc, NULL);
    }
    if (after < 0 && history > s->history)
        /* The history moved with no cut on record (cut rows removed by
         * hand): everything is read again, from a truncate at 0. */
        after = upto = 0;
    if (history > s->history)
        rc = sub_cut(s, after, upto, history);
    if (rc == CS_OK)
        s->history_dirty = false;
    return rc;
}

/* The snapshot, one statement: status, queue (when not empty), the first
 * page of messages, the parts of the turn in progress. A cursor past the
 * chat's last message is refused; one an edit left behind (it was handed
 * messages the edit removed) gets a truncate down to the cut first, and the
 * messages from there. */
static int sub_snapshot(cs_sub *s, int64_t after)
{
    cs_hub *hub = s->hub;
    cs_chat_row *row = malloc(sizeof *row);
    cs_queue *q = calloc(1, sizeof *q);
    cs_msglist rows = {0};
    cs_parts parts = {0};
    int64_t cut = -1;
    int rc = row && q ? CS_OK : CS_ENOMEM;
    if (rc == CS_OK) {
        hub->counts.queries++;
        rc = hub->store.ops->snapshot(hub->store.st, s->chat_id, after,
                                      sub_page(s), row, q, &rows, &parts, &cut);
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
        rc = sub_take_status(s, row->version, row_status(row), row->last_error,
                             row_error_len(row));
    if (rc == CS_OK) {
        rc = sub_take_queue(s, q, true);
        q = NULL; /* taken, or freed */
    }
    if (rc == CS_OK) {
        s->history = row->history;
        if (row->history > s->chat->history)
            /* Edits this hub has not cut its cache for (their notifications
             * are to come, or were lost): it may hold what they removed, and
             * a late publish may offer it again. Everything up to the
             * chat's last message leaves the cache and stays out. */
            cs_chat_cut(s->chat, -1, row->last_message_id + 1, row->history);
    }
    if (rc == CS_OK && cut >= 0) {
        rc = ev_push(
            s, (oevent){.kind = CS_EV_TRUNCATE, .a = cut, .b = row->history});
        cs_merge_cut(&s->merge, cut);
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
    if (rc == CS_OK)
        rc = sub_take_parts(s, &parts, s->resync);
    cs_parts_free(&parts);
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
    s->status_queued = -1;
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
    cs_hub_read(hub);
    if (sub_has_work(s))
        cs_sub_ready(s); /* the snapshot's events */
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
 * leaves its work pending for the next call (a pass that found the history
 * moved too: sub_process catches up with the cut and runs it again). */
static void sub_work(cs_sub *s)
{
    cs_merge_source src = {&s->chat->cache, sub_query, s, sub_page(s)};
    if (s->resync) {
        s->memo_ok = false; /* a resync reads what is there now */
        int rc = sub_pass(s, &src, s->resync_after, s->resync_id, true);
        if (rc < 0 || rc == CS_MERGE_MORE)
            return; /* retried, or the next page, on the next call */
        s->resync = false;
        if (s->snap_part.kind) { /* the snapshot's pages are read: its parts */
            oevent e = s->snap_part;
            s->snap_part = (oevent){0};
            if (ev_push(s, e) < 0)
                s->hub->stats.parts_dropped++;
        }
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
                oevent e = {.kind = CS_EV_STATUS,
                            .a = h->a,
                            .b = h->b,
                            .text = h->text,
                            .len = h->len};
                rc = ev_push(s, e); /* takes the text, or frees it */
                h->text = NULL;
                if (rc == CS_OK) {
                    s->status_version = h->a;
                } else {
                    s->status_dirty = true; /* read again, with its error */
                    rc = CS_OK;
                }
            } else {
                free(h->text);
                h->text = NULL;
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
            /* A part of a message this reader already has is stale, and
             * one it was handed already (by the snapshot) a repeat; so is
             * one of a turn an edit cut off (before parts_floor). */
            if (h->a >= s->merge.last && h->a >= s->parts_floor &&
                !snap_has(s, h->b)) {
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
        } else if (h->kind == CS_HINT_TRUNCATE && h->h > s->history) {
            /* The next edit: its cut as notified; after several (some
             * missed), the lowest of their cuts, read from the store. */
            rc = h->h == s->history + 1 ? sub_cut(s, h->a, h->b, h->h)
                                        : sub_catch_up(s);
        }
        if (rc < 0)
            return;
        s->qhead = (s->qhead + 1) % s->qcap;
        s->qn--;
    }
}

static void sub_process(cs_sub *s)
{
    /* Bounded: edits that keep coming while a pass runs are caught up with
     * on the next call. */
    for (int i = 0; i < 4; i++) {
        if (s->history_dirty && sub_catch_up(s) < 0)
            return;
        sub_work(s);
        if (!s->history_dirty)
            return;
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
        ev->status = (cs_status)(e->b & ~CS_ARCHIVED_BIT);
        ev->archived = (e->b & CS_ARCHIVED_BIT) != 0;
        ev->text = cs_status_name(ev->status);
        ev->text_len = strlen(ev->text);
        ev->error = e->text;
        ev->error_len = e->len;
        break;
    case CS_EV_QUEUE: ev->queue = e->queue; break;
    case CS_EV_PART:
        ev->prev_id = e->a;
        ev->text = e->text;
        ev->text_len = e->len;
        break;
    case CS_EV_TRUNCATE:
        ev->prev_id = e->a;
        ev->version = e->b;
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
    if (e->kind == CS_EV_TRUNCATE)
        ret_cut(s, e->a);
    s->current = *e; /* ownership moves to current */
    s->evpos++;
    fill_event(s, &s->current, ev);
    ev->cursor = s->rw;
    if (s->current.kind == CS_EV_MESSAGE)
        s->hub->stats.delivered++;
    else if (s->current.kind == CS_EV_PART)
        s->hub->stats.parts++;
    else if (s->current.kind == CS_EV_TRUNCATE)
        s->hub->stats.truncates++;
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
        cs_sub_unready(s); /* that was the last: off the ready list at once */
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
        cs_sub_unready(s);
    if (got == 0 && !hub->wanted_db) {
        /* Nothing more to do, or only what a failed read left. */
        if (sub_has_work(s))
            cs_sub_stall(s);
        else
            cs_sub_unready(s);
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
    double deadline = timeout > 0 ? now() + timeout : 0; /* next(0): no clock */
    /* A call that may wait reads the store each time: libpq may hold
     * notifications it read while the listener ran a LISTEN, and then its
     * socket is not readable. */
    for (;;) {
        int rc = sub_next(s, ev, timeout > 0);
        if (rc != CS_IDLE || timeout <= 0)
            return rc;
        double left = deadline - now();
        if (left <= 0)
            return CS_IDLE;
        rc = cs_hub_sleep(s->hub, left);
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
