/* lifecycle.c - the chat lifecycle on top of the stream: status, queue,
 * promote, workers, parts (the actor check in front of them is auth.c's).
 *
 * Every write runs as the transaction of a publish (chat.c): the chat row
 * is locked first, the messages it inserts are published after the commit
 * (cache, then notification), and its status and queue hints follow them. */
#include "hub.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool fresh_worker(const cs_hub *hub, const cs_chat_row *row);
static int not_archived(cs_hub *hub, const cs_chat_row *row);
static int promote_head(cs_publish *p, cs_chat_row *row, int otherwise);

static bool idle(cs_status s)
{
    return s == CS_STATUS_WAITING || s == CS_STATUS_COMPLETED ||
           s == CS_STATUS_ERROR;
}

/* A status change: version + 1 in the same transaction, hint after. */
static int set_status(cs_publish *p, cs_chat_row *row, cs_status st,
                      const char *worker, bool heartbeat)
{
    cs_hub *hub = p->hub;
    row->status = st;
    row->version++;
    if (worker != row->worker)
        snprintf(row->worker, sizeof row->worker, "%s", worker ? worker : "");
    int rc = hub->store.ops->tx_update(hub->store.st, row, heartbeat);
    if (rc < 0)
        return rc;
    p->extras.status = true;
    p->extras.version = row->version;
    p->extras.st = st;
    memcpy(p->extras.error, row->last_error, sizeof p->extras.error);
    p->extras.archived = row->archived;
    return CS_OK;
}

int cs_hub_chat_info(cs_hub *hub, int64_t chat_id, const char *actor,
                     cs_chat_info *out)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    int rc = cs_hub_authorize(hub, chat_id, actor, "chat");
    if (rc < 0)
        return rc;
    rc = hub->store.ops->chat_get(hub->store.st, chat_id, out);
    return rc < 0 ? cs_hub_fail(hub, rc, NULL) : CS_OK;
}

/* Runs a publish of `run` to the end: commit, then cache and notify. */
static int run_publish(cs_hub *hub, int64_t chat_id, pub_run_fn run, void *arg)
{
    cs_publish *p;
    int rc = cs_pub_new(hub, chat_id, run, arg, &p);
    if (rc < 0)
        return rc;
    rc = cs_pub_commit(p, NULL, NULL);
    if (rc == CS_OK)
        cs_pub_publish_all(p);
    cs_pub_close(p);
    return rc;
}

/* ---- send ---------------------------------------------------------------- */

typedef struct send_arg {
    const char *actor, *content;
    size_t len;
    const char *key; /* idempotency key, or NULL */
    int64_t id;
    int queued;
} send_arg;

static int send_unkeyed(cs_publish *p, cs_chat_row *row);

/* A send with a key: the first call's result if the key has one (nothing
 * written), else the send and the key's record, in one transaction. */
static int run_send(cs_publish *p, cs_chat_row *row)
{
    send_arg *a = p->arg;
    cs_hub *hub = p->hub;
    const cs_store_ops *ops = hub->store.ops;
    if (!a->key)
        return send_unkeyed(p, row);
    cs_keyed k;
    cs_msg_in m = {CS_ROLE_USER, a->content, a->len, NULL};
    uint64_t request = cs_key_request('s', &m, 1);
    int rc = ops->tx_key_get(hub->store.st, row->id, a->key, &k);
    if (rc < 0)
        return rc;
    if (rc == 1) {
        bool one = k.n == 1 && k.request == request;
        a->id = one ? k.ids[0] : 0;
        a->queued = k.queued;
        free(k.ids);
        if (!one)
            return cs_hub_fail(hub, CS_EINVAL,
                               "idempotency key used before by another "
                               "write to this chat");
        /* A retry: nothing written; what the first call should have told
         * readers goes out again (they drop what they have): the chat's
         * status, its queue, and the message if it was appended. */
        p->extras.status = p->extras.queue = true;
        p->extras.version = row->version;
        p->extras.st = row->status;
        memcpy(p->extras.error, row->last_error, sizeof p->extras.error);
        p->extras.archived = row->archived;
        if (!a->queued &&
            cs_pub_load(hub, row->id, &a->id, 1, &p->committed) < 0)
            hub->stats.publish_errors++;
        return CS_OK;
    }
    if ((rc = send_unkeyed(p, row)) < 0)
        return rc;
    k = (cs_keyed){&a->id, 1, a->queued != 0, request};
    return ops->tx_key_put(hub->store.st, row->id, a->key, &k);
}

static int send_unkeyed(cs_publish *p, cs_chat_row *row)
{
    send_arg *a = p->arg;
    cs_hub *hub = p->hub;
    const cs_store_ops *ops = hub->store.ops;
    if (not_archived(hub, row) < 0)
        return CS_ESTATE;
    /* Interrupted (waiting, a worker still on it): its queue's head goes
     * first, so the message queues behind it; if that worker is gone, the
     * head is promoted now instead of waiting for its finish. */
    bool interrupted = row->status == CS_STATUS_WAITING && row->worker[0];
    /* An idle chat with a backlog (left by a finish with error, say): the
     * message queues behind it and the head goes first (FIFO). The queue's
     * length is also what max_queue bounds. */
    cs_queue q = {0};
    int rc = ops->queue_list(hub->store.st, row->id, &q);
    size_t queued = q.n;
    cs_queue_free(&q);
    if (rc < 0)
        return rc;
    bool backlog = idle(row->status) && !interrupted && queued > 0;
    if (idle(row->status) && !interrupted && !backlog) {
        cs_msg_in m = {CS_ROLE_USER, a->content, a->len, NULL};
        rc = ops->tx_insert(hub->store.st, row, &m, 1, &p->committed);
        if (rc < 0)
            return rc;
        a->id = p->committed.items[0]->id;
        a->queued = 0;
        return set_status(p, row, CS_STATUS_PENDING, NULL, false);
    }
    if (queued >= hub->max_queue) {
        char msg[96];
        snprintf(msg, sizeof msg,
                 "chat %lld's queue holds %zu items (max_queue)",
                 (long long)row->id, queued);
        return cs_hub_fail(hub, CS_EFULL, msg);
    }
    rc = ops->tx_queue_add(hub->store.st, row->id, a->actor, a->content, a->len,
                           &a->id);
    if (rc < 0)
        return rc;
    a->queued = 1;
    p->extras.queue = true;
    if (backlog || (interrupted && !fresh_worker(hub, row)))
        rc = promote_head(p, row, -1);
    return rc;
}

int cs_hub_send(cs_hub *hub, int64_t chat_id, const char *actor,
                const char *content, size_t len, int64_t *id, int *queued)
{
    return cs_hub_send_key(hub, chat_id, actor, NULL, content, len, id, queued);
}

int cs_hub_send_key(cs_hub *hub, int64_t chat_id, const char *actor,
                    const char *key, const char *content, size_t len,
                    int64_t *id, int *queued)
{
    if (!hub)
        return CS_ECLOSED;
    if (key && cs_check_key(hub, key) < 0)
        return CS_EINVAL;
    cs_msg_in m = {CS_ROLE_USER, content, len, NULL};
    int rc = cs_check_msgs(hub, &m, 1);
    if (rc < 0)
        return rc;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    if ((rc = cs_hub_authorize(hub, chat_id, actor, "send")) < 0)
        return rc;
    /* The stores take the content as a C string: it gets its terminator
     * here (a caller's buffer need not have one). */
    char *copy = malloc(len + 1);
    if (!copy)
        return CS_ENOMEM;
    if (len)
        memcpy(copy, content, len);
    copy[len] = '\0';
    send_arg a = {actor, copy, len, key, 0, 0};
    rc = run_publish(hub, chat_id, run_send, &a);
    free(copy);
    if (rc < 0)
        return rc;
    if (id)
        *id = a.id;
    if (queued)
        *queued = a.queued;
    return CS_OK;
}

/* ---- the queue ------------------------------------------------------------
 */

int cs_hub_queued(cs_hub *hub, int64_t chat_id, const char *actor,
                  cs_queue *out)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    int rc = cs_hub_authorize(hub, chat_id, actor, "queued");
    if (rc < 0)
        return rc;
    hub->counts.queries++;
    rc = hub->store.ops->queue_list(hub->store.st, chat_id, out);
    return rc < 0 ? cs_hub_fail(hub, rc, NULL) : CS_OK;
}

static int no_item(cs_hub *hub, cs_publish *p)
{
    char buf[96];
    snprintf(buf, sizeof buf, "no queued message %lld in chat %lld",
             (long long)p->qid, (long long)p->chat_id);
    return cs_hub_fail(hub, CS_ENOTFOUND, buf);
}

static int run_queue_delete(cs_publish *p, cs_chat_row *row)
{
    cs_hub *hub = p->hub;
    int rc = hub->store.ops->tx_queue_del(hub->store.st, row->id, p->qid);
    if (rc <= 0)
        return rc < 0 ? rc : no_item(hub, p);
    p->extras.queue = true;
    return CS_OK;
}

static int run_queue_front(cs_publish *p, cs_chat_row *row)
{
    cs_hub *hub = p->hub;
    int rc = hub->store.ops->tx_queue_front(hub->store.st, row->id, p->qid);
    if (rc <= 0)
        return rc < 0 ? rc : no_item(hub, p);
    p->extras.queue = true;
    return CS_OK;
}

static int queue_op(cs_hub *hub, int64_t chat_id, const char *actor,
                    int64_t qid, pub_run_fn run, const char *op)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1 || qid < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id or queued id");
    int rc = cs_hub_authorize(hub, chat_id, actor, op);
    if (rc < 0)
        return rc;
    cs_publish *p;
    if ((rc = cs_pub_new(hub, chat_id, run, NULL, &p)) < 0)
        return rc;
    p->qid = qid;
    rc = cs_pub_commit(p, NULL, NULL);
    if (rc == CS_OK)
        cs_pub_publish_all(p);
    cs_pub_close(p);
    return rc;
}

int cs_hub_queue_delete(cs_hub *hub, int64_t chat_id, const char *actor,
                        int64_t queued_id)
{
    return queue_op(hub, chat_id, actor, queued_id, run_queue_delete,
                    "delete_queued");
}

int cs_hub_queue_front(cs_hub *hub, int64_t chat_id, const char *actor,
                       int64_t queued_id)
{
    return queue_op(hub, chat_id, actor, queued_id, run_queue_front,
                    "move_queued");
}

/* ---- promote ----------------------------------------------------------------
 */

#define INTERRUPTED                                                            \
    "{\"interrupted\":true,\"reason\":\"the tool call was interrupted by a "   \
    "queued message\"}"

/* Inserts, in one go: a synthetic tool result for every tool call of the
 * chat's last turn (the messages after its last user message) that has no
 * result yet, then the item as a user message; deletes the item; sets the
 * chat pending (no worker). */
static int promote_item(cs_publish *p, cs_chat_row *row,
                        const cs_queue_item *item)
{
    cs_hub *hub = p->hub;
    const cs_store_ops *ops = hub->store.ops;
    cs_msglist tail = {0};
    cs_msg_in *in = NULL;
    char *calls = NULL;
    size_t n = 0, len = 0, ncalls = 0;
    int rc = ops->tx_tail(hub->store.st, row->id, &tail);
    if (rc < 0)
        goto out;
    /* Every call ID of the turn's assistant messages, in order. */
    for (size_t i = 0; i < tail.n; i++)
        if (tail.items[i]->role == CS_ROLE_ASSISTANT)
            len += strlen(tail.items[i]->tool) + 1;
    calls = malloc(len + 1);
    if (!calls) {
        rc = CS_ENOMEM;
        goto out;
    }
    calls[0] = '\0';
    for (size_t i = 0, o = 0; i < tail.n; i++) {
        const char *t = tail.items[i]->tool;
        if (tail.items[i]->role != CS_ROLE_ASSISTANT || !*t)
            continue;
        o += (size_t)sprintf(calls + o, "%s%s", o ? " " : "", t);
        ncalls++;
    }
    for (const char *c = calls; *c; c++)
        ncalls += *c == ' ';
    if (ncalls + 1 > CS_MAX_BATCH) {
        rc = cs_hub_fail(hub, CS_EINVAL, "too many open tool calls");
        goto out;
    }
    in = calloc(ncalls + 1, sizeof *in);
    if (!in) {
        rc = CS_ENOMEM;
        goto out;
    }
    for (char *save = NULL, *id = strtok_r(calls, " ", &save); id;
         id = strtok_r(NULL, " ", &save)) {
        bool answered = false;
        for (size_t i = 0; i < tail.n && !answered; i++)
            answered = tail.items[i]->role == CS_ROLE_TOOL &&
                       strcmp(tail.items[i]->tool, id) == 0;
        for (size_t k = 0; k < n && !answered; k++)
            answered = strcmp(in[k].tool, id) == 0; /* the same ID twice */
        if (!answered)
            in[n++] = (cs_msg_in){CS_ROLE_TOOL, INTERRUPTED,
                                  sizeof INTERRUPTED - 1, id};
    }
    in[n++] = (cs_msg_in){CS_ROLE_USER, item->content, item->content_len, NULL};
    rc = ops->tx_insert(hub->store.st, row, in, n, &p->committed);
    if (rc < 0)
        goto out;
    rc = ops->tx_queue_del(hub->store.st, row->id, item->id);
    if (rc < 0)
        goto out;
    p->extras.queue = true;
    rc = set_status(p, row, CS_STATUS_PENDING, NULL, false);
out:
    free(in);
    free(calls);
    cs_msglist_free(&tail);
    return rc;
}

/* Promotes the head of the chat's queue; with an empty queue (or an
 * archived chat, which keeps its queue), sets the status `otherwise` (no
 * worker), or leaves the chat as it is (-1). */
static int promote_head(cs_publish *p, cs_chat_row *row, int otherwise)
{
    cs_queue q = {0};
    int rc = p->hub->store.ops->queue_list(p->hub->store.st, row->id, &q);
    if (rc == CS_OK && q.n > 0 && !row->archived) /* archived: kept */
        rc = promote_item(p, row, &q.items[0]);
    else if (rc == CS_OK && otherwise >= 0)
        rc = set_status(p, row, (cs_status)otherwise, NULL, false);
    cs_queue_free(&q);
    return rc;
}

static bool fresh_worker(const cs_hub *hub, const cs_chat_row *row)
{
    return row->worker[0] && row->heartbeat_age >= 0 &&
           row->heartbeat_age <= hub->stale_after;
}

static int run_promote(cs_publish *p, cs_chat_row *row)
{
    cs_hub *hub = p->hub;
    if (not_archived(hub, row) < 0)
        return CS_ESTATE;
    cs_queue q = {0};
    int rc = hub->store.ops->queue_list(hub->store.st, row->id, &q);
    if (rc < 0)
        return rc;
    size_t i = 0;
    while (i < q.n && q.items[i].id != p->qid)
        i++;
    if (i == q.n) {
        rc = no_item(hub, p);
    } else if ((row->status == CS_STATUS_RUNNING ||
                row->status == CS_STATUS_WAITING) &&
               fresh_worker(hub, row)) {
        /* A live worker holds the chat: the item goes first, and the worker
         * is told to stop (waiting); its finish promotes the head. */
        rc = hub->store.ops->tx_queue_front(hub->store.st, row->id, p->qid);
        p->extras.queue = true;
        if (rc >= 0 && row->status == CS_STATUS_RUNNING)
            rc = set_status(p, row, CS_STATUS_WAITING, row->worker, false);
    } else {
        rc = promote_item(p, row, &q.items[i]);
    }
    cs_queue_free(&q);
    return rc < 0 ? rc : CS_OK;
}

int cs_promote_prepare(cs_hub *hub, int64_t chat_id, const char *actor,
                       int64_t queued_id, cs_publish **out)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1 || queued_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id or queued id");
    int rc = cs_hub_authorize(hub, chat_id, actor, "promote_queued");
    if (rc < 0)
        return rc;
    if ((rc = cs_pub_new(hub, chat_id, run_promote, NULL, out)) < 0)
        return rc;
    (*out)->qid = queued_id;
    return CS_OK;
}

/* ---- edit ------------------------------------------------------------------
 */

/* The edit's transaction: the cut and the new message (the store's
 * tx_edit), the queue cleared, the worker let go, pending. Its publish
 * sends the truncate hint before the message (chat.c). */
static int run_edit(cs_publish *p, cs_chat_row *row)
{
    cs_hub *hub = p->hub;
    const cs_store_ops *ops = hub->store.ops;
    if (not_archived(hub, row) < 0)
        return CS_ESTATE;
    int64_t after;
    int rc = ops->tx_edit(hub->store.st, row, p->qid, p->msgs, &p->committed,
                          &after);
    if (rc < 0)
        return rc;
    cs_queue q = {0};
    rc = ops->queue_list(hub->store.st, row->id, &q);
    for (size_t i = 0; rc == CS_OK && i < q.n; i++)
        rc = ops->tx_queue_del(hub->store.st, row->id, q.items[i].id);
    p->extras.queue = q.n > 0;
    cs_queue_free(&q);
    if (rc < 0)
        return rc;
    pub_extras *x = &p->extras;
    x->cut = x->cut_cache = true;
    x->cut_history = row->history;
    x->cut_after = after;
    x->cut_id = p->committed.items[p->committed.n - 1]->id;
    /* The worker is let go (not kept as interrupted): what it appends now
     * would land after the cut, so it is refused. */
    return set_status(p, row, CS_STATUS_PENDING, NULL, false);
}

int cs_edit_prepare(cs_hub *hub, int64_t chat_id, int64_t message_id,
                    const char *actor, const char *content, size_t len,
                    cs_publish **out)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1 || message_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id or message id");
    cs_msg_in m = {CS_ROLE_USER, content, len, NULL};
    int rc = cs_check_msgs(hub, &m, 1);
    if (rc < 0)
        return rc;
    if ((rc = cs_hub_authorize(hub, chat_id, actor, "edit")) < 0)
        return rc;
    cs_publish *p;
    if ((rc = cs_pub_new(hub, chat_id, run_edit, NULL, &p)) < 0)
        return rc;
    /* The content is the publish's own until the commit (the stores take it
     * as a C string). */
    p->msgs = calloc(1, sizeof *p->msgs);
    char *copy = malloc(len + 1);
    char *tool = calloc(1, 1);
    if (!p->msgs || !copy || !tool) {
        free(copy);
        free(tool);
        cs_pub_close(p);
        return CS_ENOMEM;
    }
    if (len)
        memcpy(copy, content, len);
    copy[len] = '\0';
    p->msgs[0] = (cs_msg_in){CS_ROLE_USER, copy, len, tool};
    p->n = 1;
    p->qid = message_id;
    *out = p;
    return CS_OK;
}

int cs_hub_edit(cs_hub *hub, int64_t chat_id, int64_t message_id,
                const char *actor, const char *content, size_t len, int64_t *id)
{
    cs_publish *p;
    int rc = cs_edit_prepare(hub, chat_id, message_id, actor, content, len, &p);
    if (rc < 0)
        return rc;
    const int64_t *ids;
    size_t n;
    rc = cs_pub_commit(p, &ids, &n);
    if (rc == CS_OK) {
        if (id)
            *id = ids[n - 1];
        cs_pub_publish_all(p);
    }
    cs_pub_close(p);
    return rc;
}

/* ---- workers ----------------------------------------------------------------
 */

#define ACQUIRE_MAX 1024

/* An interrupted chat whose worker went silent: under the chat's lock, if
 * it still is, its queue's head is promoted, or it is released (waiting, no
 * worker) when the queue is empty. */
typedef struct stuck_arg {
    int64_t version; /* as the listing saw it */
    double stale_after;
    bool done;
} stuck_arg;

/* Interrupted, its worker silent for stale_after (unchanged since it was
 * listed): the queue's head promoted, or the chat released. */
static int run_revive(cs_publish *p, cs_chat_row *row)
{
    stuck_arg *a = p->arg;
    if (row->status != CS_STATUS_WAITING || !row->worker[0] ||
        row->version != a->version ||
        (row->heartbeat_age >= 0 && row->heartbeat_age <= a->stale_after))
        return CS_OK; /* moved on meanwhile */
    a->done = true;
    return promote_head(p, row, CS_STATUS_WAITING);
}

/* ---- recovery -------------------------------------------------------------
 */

/* requires_action past action_timeout (unchanged since it was listed):
 * error, with why recorded. */
static int run_expire(cs_publish *p, cs_chat_row *row)
{
    stuck_arg *a = p->arg;
    if (row->status != CS_STATUS_REQUIRES_ACTION || row->version != a->version)
        return CS_OK; /* moved on meanwhile */
    snprintf(row->last_error, sizeof row->last_error,
             "requires_action for more than %g s (action_timeout)",
             p->hub->action_timeout);
    a->done = true;
    return set_status(p, row, CS_STATUS_ERROR, NULL, false);
}

/* Running on a worker silent for stale_after: pending, for any worker. */
static int run_release(cs_publish *p, cs_chat_row *row)
{
    stuck_arg *a = p->arg;
    if (row->status != CS_STATUS_RUNNING || row->version != a->version ||
        (row->heartbeat_age >= 0 && row->heartbeat_age <= a->stale_after))
        return CS_OK;
    a->done = true;
    return set_status(p, row, CS_STATUS_PENDING, NULL, false);
}

/* Idle with a queue: its head promoted. */
static int run_stranded(cs_publish *p, cs_chat_row *row)
{
    stuck_arg *a = p->arg;
    if (!idle(row->status) || row->worker[0] || row->version != a->version)
        return CS_OK;
    int64_t v = row->version;
    int rc = promote_head(p, row, -1);
    a->done = rc == CS_OK && row->version != v;
    return rc;
}

/* Runs run on each chat stuck in the way kind says (at most limit);
 * returns how many it changed, or an error of the listing. */
static int recover_kind(cs_hub *hub, int kind, double age, size_t limit,
                        pub_run_fn run, size_t *count)
{
    int64_t *ids = malloc(2 * limit * sizeof *ids);
    if (!ids)
        return CS_ENOMEM;
    size_t n = 0;
    int rc = hub->store.ops->stuck(hub->store.st, kind, age, limit, ids,
                                   ids + limit, &n);
    for (size_t i = 0; rc == CS_OK && i < n; i++) {
        stuck_arg a = {ids[limit + i], age, false};
        if (run_publish(hub, ids[i], run, &a) < 0)
            hub->stats.publish_errors++; /* gone, or another's turn: fine */
        else if (a.done)
            (*count)++;
    }
    free(ids);
    return rc < 0 ? cs_hub_fail(hub, rc, NULL) : CS_OK;
}

int cs_hub_recover(cs_hub *hub, size_t limit, cs_recovered *out)
{
    if (!hub)
        return CS_ECLOSED;
    if (limit > ACQUIRE_MAX)
        return cs_hub_fail(hub, CS_EINVAL, "limit must be 1 to 1024");
    if (limit == 0)
        limit = ACQUIRE_MAX;
    cs_recovered r = {0};
    int rc = CS_OK;
    if (hub->action_timeout >= 0)
        rc = recover_kind(hub, CS_STUCK_ACTION, hub->action_timeout, limit,
                          run_expire, &r.expired);
    if (rc == CS_OK)
        rc = recover_kind(hub, CS_STUCK_INTERRUPTED, hub->stale_after, limit,
                          run_revive, &r.revived);
    if (rc == CS_OK)
        rc = recover_kind(hub, CS_STUCK_RUNNING, hub->stale_after, limit,
                          run_release, &r.released);
    if (rc == CS_OK)
        rc = recover_kind(hub, CS_STUCK_QUEUE, 0, limit, run_stranded,
                          &r.promoted);
    if (out)
        *out = r;
    return rc;
}

int cs_hub_acquire(cs_hub *hub, const char *worker, size_t limit,
                   double stale_after, int64_t *ids, size_t *n)
{
    if (!hub)
        return CS_ECLOSED;
    int rc = cs_check_name(hub, worker, "worker");
    if (rc < 0)
        return rc;
    if (limit < 1 || limit > ACQUIRE_MAX || stale_after != stale_after)
        return cs_hub_fail(hub, CS_EINVAL, "limit must be 1 to 1024");
    if (stale_after == 0)
        stale_after = hub->stale_after;
    /* First the chats left in requires_action past action_timeout (to
     * error), and those whose worker was interrupted and then went silent
     * (revived), so they cannot stay stuck. */
    size_t done = 0;
    if (hub->action_timeout >= 0 &&
        (rc = recover_kind(hub, CS_STUCK_ACTION, hub->action_timeout,
                           ACQUIRE_MAX, run_expire, &done)) < 0)
        return rc;
    if ((rc = recover_kind(hub, CS_STUCK_INTERRUPTED, stale_after, limit,
                           run_revive, &done)) < 0)
        return rc;
    cs_chat_row *rows = malloc(limit * sizeof *rows);
    if (!rows)
        return CS_ENOMEM;
    size_t got = 0;
    rc = hub->store.ops->acquire(hub->store.st, worker, limit, stale_after,
                                 rows, &got);
    if (rc < 0) {
        free(rows);
        return cs_hub_fail(hub, rc, NULL);
    }
    if (got)
        hub->stats.writes++;
    for (size_t i = 0; i < got; i++) {
        ids[i] = rows[i].id;
        if (cs_hub_notify_status(hub, rows[i].id, rows[i].version,
                                 rows[i].status, NULL, rows[i].archived) < 0)
            hub->stats.publish_errors++;
    }
    free(rows);
    *n = got;
    return CS_OK;
}

typedef struct worker_arg {
    const char *worker;
    int held;
    cs_status status, final;
    const char *error; /* finish: the error to record, or NULL */
} worker_arg;

static int run_heartbeat(cs_publish *p, cs_chat_row *row)
{
    worker_arg *a = p->arg;
    a->status = row->status;
    a->held =
        row->status == CS_STATUS_RUNNING && strcmp(row->worker, a->worker) == 0;
    if (!a->held)
        return CS_OK;
    return p->hub->store.ops->tx_update(p->hub->store.st, row, true);
}

int cs_hub_heartbeat(cs_hub *hub, int64_t chat_id, const char *worker,
                     cs_status *status)
{
    if (!hub)
        return CS_ECLOSED;
    int rc = cs_check_name(hub, worker, "worker");
    if (rc < 0)
        return rc;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    worker_arg a = {worker, 0, 0, 0, NULL};
    if ((rc = run_publish(hub, chat_id, run_heartbeat, &a)) < 0)
        return rc;
    if (status)
        *status = a.status;
    return a.held;
}

static int run_finish(cs_publish *p, cs_chat_row *row)
{
    worker_arg *a = p->arg;
    cs_hub *hub = p->hub;
    char buf[160];
    bool interrupted = row->status == CS_STATUS_WAITING && row->worker[0];
    if (row->status != CS_STATUS_RUNNING && !interrupted) {
        snprintf(buf, sizeof buf, "chat %lld is %s, not running",
                 (long long)row->id, cs_status_name(row->status));
        return cs_hub_fail(hub, CS_ESTATE, buf);
    }
    if (a->worker && strcmp(a->worker, row->worker) != 0) {
        snprintf(buf, sizeof buf, "chat %lld is not held by worker %.64s",
                 (long long)row->id, a->worker);
        return cs_hub_fail(hub, CS_ESTATE, buf);
    }
    /* An error turn records its error; any other ends the last one's. */
    snprintf(row->last_error, sizeof row->last_error, "%s",
             a->status == CS_STATUS_ERROR && a->error ? a->error : "");
    int rc;
    if (interrupted || a->status == CS_STATUS_WAITING ||
        a->status == CS_STATUS_COMPLETED)
        rc = promote_head(p, row, (int)a->status);
    else
        rc = set_status(p, row, a->status, NULL, false);
    a->final = row->status;
    return rc;
}

int cs_hub_finish(cs_hub *hub, int64_t chat_id, const char *worker,
                  const char *actor, cs_status status, cs_status *final)
{
    return cs_hub_finish_error(hub, chat_id, worker, actor, status, NULL,
                               final);
}

int cs_hub_finish_error(cs_hub *hub, int64_t chat_id, const char *worker,
                        const char *actor, cs_status status, const char *error,
                        cs_status *final)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    if (worker && cs_check_name(hub, worker, "worker") < 0)
        return CS_EINVAL;
    if (status != CS_STATUS_WAITING && status != CS_STATUS_COMPLETED &&
        status != CS_STATUS_ERROR && status != CS_STATUS_PAUSED &&
        status != CS_STATUS_REQUIRES_ACTION)
        return cs_hub_fail(hub, CS_EINVAL,
                           "a worker finishes with waiting, completed, error, "
                           "paused or requires_action");
    if (error && *error) {
        size_t len = strlen(error);
        if (status != CS_STATUS_ERROR)
            return cs_hub_fail(hub, CS_EINVAL,
                               "an error is recorded by a finish with error");
        if (len > CS_ERROR_MAX || !cs_utf8_text(error, len))
            return cs_hub_fail(hub, CS_EINVAL,
                               "the error is UTF-8 text of at most 1024 "
                               "bytes");
    }
    int rc = cs_hub_authorize(hub, chat_id, actor, "finish");
    if (rc < 0)
        return rc;
    worker_arg a = {worker, 0, status, status, error};
    if ((rc = run_publish(hub, chat_id, run_finish, &a)) < 0)
        return rc;
    if (final)
        *final = a.final;
    return CS_OK;
}

/* ---- tool results ---------------------------------------------------------
 */

typedef struct results_arg {
    const cs_msg_in *msgs;
    size_t n;
    int64_t *ids;
} results_arg;

/* Whether id is one of the space-separated IDs of list. */
static bool in_list(const char *list, const char *id)
{
    size_t len = strlen(id);
    for (const char *c = list; *c;) {
        const char *end = strchr(c, ' ');
        size_t l = end ? (size_t)(end - c) : strlen(c);
        if (l == len && memcmp(c, id, len) == 0)
            return true;
        c += l + (end ? 1 : 0);
    }
    return false;
}

/* Whether id is an open call of the turn in tail (the messages after the
 * last user message): an assistant's call with no tool result yet. */
static bool open_call(const cs_msglist *tail, const char *id)
{
    bool called = false;
    for (size_t i = 0; i < tail->n; i++) {
        const cs_msg *m = tail->items[i];
        if (m->role == CS_ROLE_ASSISTANT && in_list(m->tool, id))
            called = true;
        else if (m->role == CS_ROLE_TOOL && strcmp(m->tool, id) == 0)
            return false; /* answered */
    }
    return called;
}

static int run_submit(cs_publish *p, cs_chat_row *row)
{
    results_arg *a = p->arg;
    cs_hub *hub = p->hub;
    char buf[CS_MAX_TOOL + 96];
    if (not_archived(hub, row) < 0)
        return CS_ESTATE;
    if (row->status != CS_STATUS_REQUIRES_ACTION) {
        snprintf(buf, sizeof buf, "chat %lld is %s, not requires_action",
                 (long long)row->id, cs_status_name(row->status));
        return cs_hub_fail(hub, CS_ESTATE, buf);
    }
    cs_msglist tail = {0};
    int rc = hub->store.ops->tx_tail(hub->store.st, row->id, &tail);
    for (size_t i = 0; rc == CS_OK && i < a->n; i++) {
        bool twice = false;
        for (size_t k = 0; k < i && !twice; k++)
            twice = strcmp(a->msgs[k].tool, a->msgs[i].tool) == 0;
        if (twice || !open_call(&tail, a->msgs[i].tool)) {
            snprintf(buf, sizeof buf,
                     "tool_call_id %s is not an open call of chat %lld's "
                     "last turn%s",
                     a->msgs[i].tool, (long long)row->id,
                     twice ? " (given twice)" : "");
            rc = cs_hub_fail(hub, CS_EINVAL, buf);
        }
    }
    cs_msglist_free(&tail);
    if (rc < 0)
        return rc;
    size_t base = p->committed.n;
    rc = hub->store.ops->tx_insert(hub->store.st, row, a->msgs, a->n,
                                   &p->committed);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < a->n; i++)
        a->ids[i] = p->committed.items[base + i]->id;
    return set_status(p, row, CS_STATUS_PENDING, NULL, false);
}

int cs_hub_submit_tool_results(cs_hub *hub, int64_t chat_id, const char *actor,
                               const cs_msg_in *msgs, size_t n, int64_t *ids)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    if (n == 0 || n > CS_MAX_BATCH)
        return cs_hub_fail(hub, CS_EINVAL, "1 to 4096 tool results");
    for (size_t i = 0; i < n; i++)
        if (msgs[i].role != CS_ROLE_TOOL || !msgs[i].tool || !*msgs[i].tool)
            return cs_hub_fail(hub, CS_EINVAL,
                               "a tool result has role tool and a call id");
    int rc = cs_check_msgs(hub, msgs, n);
    if (rc < 0)
        return rc;
    if ((rc = cs_hub_authorize(hub, chat_id, actor, "submit_tool_results")) < 0)
        return rc;
    results_arg a = {msgs, n, ids};
    return run_publish(hub, chat_id, run_submit, &a);
}

/* ---- archive --------------------------------------------------------------
 */

static int run_archive(cs_publish *p, cs_chat_row *row)
{
    bool *archived = p->arg;
    if (row->archived == *archived)
        return CS_OK;
    row->archived = *archived;
    cs_status st = row->status;
    const char *worker = row->worker;
    if (*archived && st == CS_STATUS_RUNNING) { /* interrupted */
        st = CS_STATUS_WAITING;
    } else if (*archived && st == CS_STATUS_PENDING) {
        st = CS_STATUS_WAITING;
        worker = NULL;
    }
    return set_status(p, row, st, worker, false);
}

int cs_hub_archive(cs_hub *hub, int64_t chat_id, const char *actor,
                   bool archived, cs_chat_info *out)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    int rc = cs_hub_authorize(hub, chat_id, actor,
                              archived ? "archive" : "unarchive");
    if (rc < 0)
        return rc;
    if ((rc = run_publish(hub, chat_id, run_archive, &archived)) < 0)
        return rc;
    return out ? cs_hub_chat_info(hub, chat_id, NULL, out) : CS_OK;
}

/* CS_ESTATE for an archived chat (nothing written). */
static int not_archived(cs_hub *hub, const cs_chat_row *row)
{
    if (!row->archived)
        return CS_OK;
    char buf[64];
    snprintf(buf, sizeof buf, "chat %lld is archived", (long long)row->id);
    return cs_hub_fail(hub, CS_ESTATE, buf);
}

static int run_interrupt(cs_publish *p, cs_chat_row *row)
{
    cs_chat_row *out = p->arg;
    int rc = CS_OK;
    if (row->status == CS_STATUS_RUNNING)
        rc = set_status(p, row, CS_STATUS_WAITING, row->worker, false);
    else if (row->status == CS_STATUS_PENDING)
        rc = set_status(p, row, CS_STATUS_WAITING, NULL, false);
    *out = *row;
    return rc;
}

int cs_hub_interrupt(cs_hub *hub, int64_t chat_id, const char *actor,
                     cs_chat_info *out)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    int rc = cs_hub_authorize(hub, chat_id, actor, "interrupt");
    if (rc < 0)
        return rc;
    cs_chat_row row;
    if ((rc = run_publish(hub, chat_id, run_interrupt, &row)) < 0)
        return rc;
    if (out)
        return cs_hub_chat_info(hub, chat_id, NULL, out);
    return CS_OK;
}

/* ---- parts --------------------------------------------------------------- */

/* Room for the text in one part payload: "1:p:<after>:<seq>:" takes at most
 * 46. */
#define PART_CHUNK (CS_PAYLOAD_MAX - 48)

int cs_hub_publish_part(cs_hub *hub, int64_t chat_id, const char *actor,
                        const char *text, size_t len)
{
    return cs_hub_publish_part_as(hub, chat_id, actor, NULL, text, len);
}

int cs_hub_publish_part_as(cs_hub *hub, int64_t chat_id, const char *actor,
                           const char *worker, const char *text, size_t len)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    if (worker && cs_check_name(hub, worker, "worker") < 0)
        return CS_EINVAL;
    if (worker && actor)
        return cs_hub_fail(hub, CS_EINVAL, "an actor or a worker, not both");
    if (len > CS_MAX_CONTENT || (!text && len) ||
        (len && memchr(text, '\0', len)))
        return cs_hub_fail(hub, CS_EINVAL,
                           "a part is text without NUL bytes, up to 64 MiB");
    if (!cs_utf8_text(text, len))
        return cs_hub_fail(hub, CS_EINVAL, "a part is not valid UTF-8");
    int rc = cs_hub_authorize(hub, chat_id, actor, "publish_part");
    if (rc < 0)
        return rc;
    char *chunk = malloc(PART_CHUNK + 1);
    if (!chunk)
        return CS_ENOMEM;
    size_t off = 0;
    do {
        size_t n = len - off < PART_CHUNK ? len - off : PART_CHUNK;
        /* Never split a UTF-8 sequence: back off over continuation bytes. */
        if (off + n < len)
            while (n > 1 && ((unsigned char)text[off + n] & 0xC0) == 0x80)
                n--;
        if (n)
            memcpy(chunk, text + off, n);
        chunk[n] = '\0';
        rc = hub->store.ops->notify_part(hub->store.st, chat_id, worker, chunk,
                                         n);
        off += n;
    } while (rc == CS_OK && off < len);
    free(chunk);
    return rc < 0 ? cs_hub_fail(hub, rc, NULL) : CS_OK;
}
