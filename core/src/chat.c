/* chat.c - chat operations: create, append, and the stepped publish. */
#include "hub.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void pub_unlink(cs_publish *p)
{
    if (!p->hub)
        return;
    if (p->prev)
        p->prev->next = p->next;
    else
        p->hub->pubs = p->next;
    if (p->next)
        p->next->prev = p->prev;
    p->next = p->prev = NULL;
}

static void free_inputs(cs_publish *p)
{
    if (!p->msgs)
        return;
    for (size_t i = 0; i < p->n; i++) {
        free((char *)p->msgs[i].content);
        free((char *)p->msgs[i].tool);
    }
    free(p->msgs);
    p->msgs = NULL;
}

void cs_pub_close(cs_publish *p)
{
    if (!p)
        return;
    pub_unlink(p);
    free_inputs(p);
    cs_msglist_free(&p->committed);
    free(p->worker);
    free(p->key);
    free(p->ids);
    free(p->cached);
    free(p->notified);
    free(p);
}

int cs_check_msgs(cs_hub *hub, const cs_msg_in *msgs, size_t n)
{
    if (n == 0 || n > CS_MAX_BATCH || !msgs)
        return cs_hub_fail(hub, CS_EINVAL,
                           "a publish takes 1 to 4096 messages");
    for (size_t i = 0; i < n; i++) {
        if ((unsigned)msgs[i].role > CS_ROLE_TOOL)
            return cs_hub_fail(hub, CS_EINVAL, "bad message role");
        if (msgs[i].content_len > CS_MAX_CONTENT ||
            (!msgs[i].content && msgs[i].content_len))
            return cs_hub_fail(hub, CS_EINVAL, "message content too large");
        /* Content is text (PostgreSQL's text type holds UTF-8 without NUL
         * bytes): both stores refuse anything else alike, as a bad
         * argument. */
        if (msgs[i].content_len &&
            memchr(msgs[i].content, '\0', msgs[i].content_len))
            return cs_hub_fail(hub, CS_EINVAL,
                               "message content contains a NUL byte");
        if (!cs_utf8_text(msgs[i].content, msgs[i].content_len))
            return cs_hub_fail(hub, CS_EINVAL,
                               "message content is not valid UTF-8");
        const char *why;
        if (cs_tool_check(msgs[i].role, msgs[i].tool, &why) < 0)
            return cs_hub_fail(hub, CS_EINVAL, why);
    }
    return CS_OK;
}

static void pub_link(cs_hub *hub, cs_publish *p)
{
    p->hub = hub;
    p->next = hub->pubs;
    if (hub->pubs)
        hub->pubs->prev = p;
    hub->pubs = p;
}

int cs_pub_new(cs_hub *hub, int64_t chat_id, pub_run_fn run, void *arg,
               cs_publish **out)
{
    cs_publish *p = calloc(1, sizeof *p);
    if (!p)
        return CS_ENOMEM;
    p->chat_id = chat_id;
    p->run = run;
    p->arg = arg;
    pub_link(hub, p);
    *out = p;
    return CS_OK;
}

int cs_pub_prepare(cs_hub *hub, int64_t chat_id, const cs_msg_in *msgs,
                   size_t n, cs_publish **out)
{
    return cs_pub_prepare_as(hub, chat_id, NULL, msgs, n, out);
}

int cs_pub_prepare_as(cs_hub *hub, int64_t chat_id, const char *actor,
                      const cs_msg_in *msgs, size_t n, cs_publish **out)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    int rc = cs_check_msgs(hub, msgs, n);
    if (rc < 0)
        return rc;
    rc = cs_hub_authorize(hub, chat_id, actor, "append");
    if (rc < 0)
        return rc;
    cs_publish *p = calloc(1, sizeof *p);
    if (!p)
        return CS_ENOMEM;
    p->n = n;
    p->chat_id = chat_id;
    p->msgs = calloc(n, sizeof *p->msgs);
    p->ids = calloc(n, sizeof *p->ids);
    p->cached = calloc(n, 1);
    p->notified = calloc(n, 1);
    if (!p->msgs || !p->ids || !p->cached || !p->notified)
        goto oom;
    for (size_t i = 0; i < n; i++) {
        char *c = malloc(msgs[i].content_len + 1);
        size_t tl = msgs[i].tool ? strlen(msgs[i].tool) : 0;
        char *t = malloc(tl + 1);
        p->msgs[i] = (cs_msg_in){msgs[i].role, c, msgs[i].content_len, t};
        if (!c || !t)
            goto oom;
        if (msgs[i].content_len)
            memcpy(c, msgs[i].content, msgs[i].content_len);
        c[msgs[i].content_len] = '\0';
        if (tl)
            memcpy(t, msgs[i].tool, tl);
        t[tl] = '\0';
    }
    pub_link(hub, p);
    *out = p;
    return CS_OK;
oom:
    cs_pub_close(p);
    return CS_ENOMEM;
}

/* The status and queue hints, each sent once (a failed one is retried by
 * the next notify step). */
static int pub_send_extras(cs_publish *p)
{
    cs_hub *hub = p->hub;
    pub_extras *x = &p->extras;
    if (x->status) {
        int rc = cs_hub_notify_status(hub, p->chat_id, x->version, x->st,
                                      x->error, x->archived);
        if (rc < 0)
            return rc;
        x->status = false;
    }
    if (x->queue) {
        char buf[8];
        cs_hint h = {.kind = CS_HINT_QUEUE};
        int len = cs_payload_encode(&h, buf, sizeof buf);
        int rc = len < 0 ? len
                         : hub->store.ops->notify(hub->store.st, p->chat_id,
                                                  buf, (size_t)len);
        if (rc < 0)
            return cs_hub_fail(hub, rc, NULL);
        x->queue = false;
    }
    return CS_OK;
}

int cs_pub_load(cs_hub *hub, int64_t chat_id, const int64_t *ids, size_t n,
                cs_msglist *out)
{
    cs_msglist rows = {0};
    int rc = n ? hub->store.ops->messages_after(hub->store.st, chat_id,
                                                ids[0] - 1, n, &rows, NULL)
               : CS_OK;
    size_t base = out->n, k = 0;
    for (size_t i = 0; rc == CS_OK && i < rows.n && k < n; i++) {
        if (rows.items[i]->id != ids[k])
            continue;
        rc = cs_msglist_push(out, cs_msg_ref(rows.items[i]));
        if (rc < 0)
            cs_msg_unref(rows.items[i]);
        k++;
    }
    if (rc == CS_OK && k < n)
        rc = CS_ENOTFOUND;
    if (rc < 0)
        while (out->n > base)
            cs_msg_unref(out->items[--out->n]);
    cs_msglist_free(&rows);
    return rc;
}

/* A worker's append, under the chat's lock: CS_ESTATE unless the chat runs
 * on worker, or was interrupted while it did (waiting, still naming it: its
 * partial output) (NULL: anyone may). */
static int check_worker(cs_hub *hub, const cs_chat_row *row, const char *worker)
{
    if (!worker || ((row->status == CS_STATUS_RUNNING ||
                     row->status == CS_STATUS_WAITING) &&
                    strcmp(row->worker, worker) == 0))
        return CS_OK;
    char buf[CS_NAME_MAX + 96];
    snprintf(buf, sizeof buf, "chat %lld is %s, not running on worker %s",
             (long long)row->id, cs_status_name(row->status), worker);
    return cs_hub_fail(hub, CS_ESTATE, buf);
}

/* An append with an idempotency key, under the chat's lock: 1 when the key
 * has a result already (p->ids holds it; nothing written), else the insert
 * and the key's record, CS_OK. */
static int keyed_insert(cs_publish *p, cs_chat_row *row)
{
    cs_hub *hub = p->hub;
    const cs_store_ops *ops = hub->store.ops;
    cs_keyed k;
    uint64_t request = cs_key_request('a', p->msgs, p->n);
    int rc = ops->tx_key_get(hub->store.st, row->id, p->key, &k);
    if (rc < 0)
        return rc;
    if (rc == 1) {
        /* The first call's result, even if the chat moved on since (a
         * worker's retry after its turn ended): it did commit. */
        if (k.n != p->n || k.queued || k.request != request) {
            free(k.ids);
            return cs_hub_fail(hub, CS_EINVAL,
                               "idempotency key used before by another "
                               "write to this chat");
        }
        memcpy(p->ids, k.ids, p->n * sizeof *p->ids);
        free(k.ids);
        return 1;
    }
    if ((rc = check_worker(hub, row, p->worker)) < 0)
        return rc;
    rc = ops->tx_insert(hub->store.st, row, p->msgs, p->n, &p->committed);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < p->n; i++)
        p->ids[i] = p->committed.items[i]->id;
    k = (cs_keyed){p->ids, p->n, false, request};
    return ops->tx_key_put(hub->store.st, row->id, p->key, &k);
}

int cs_pub_commit(cs_publish *p, const int64_t **ids, size_t *n)
{
    if (!p || !p->hub)
        return CS_ECLOSED;
    cs_hub *hub = p->hub;
    if (p->committed_done)
        return cs_hub_fail(hub, CS_EINVAL, "already committed");
    const cs_store_ops *ops = hub->store.ops;
    if (!p->run && p->n == 1 && ops->append1 && !p->key) {
        /* One message (a worker's too): the store's short path. */
        int notify = !p->oneshot                ? CS_APPEND_SILENT
                     : hub->plain_notifications ? CS_APPEND_PLAIN
                                                : CS_APPEND_BODY;
        int64_t id = 0;
        int rc = ops->append1(hub->store.st, p->chat_id, p->msgs, notify,
                              p->worker, &p->committed, &id);
        if (rc == CS_ENOMEM && id > 0) {
            /* Committed, but no copy for the cache: the call succeeded and
             * reports the real id. Nothing is left to publish (readers find
             * the message through its notification, sent with the commit,
             * or the next DB pass): counted. */
            hub->stats.writes++;
            hub->stats.publish_errors++;
            p->committed_done = true;
            free_inputs(p);
            p->ids[0] = id;
            p->cached[0] = p->notified[0] = 1;
            if (ids)
                *ids = p->ids;
            if (n)
                *n = 1;
            return CS_OK;
        }
        if (rc < 0)
            return cs_hub_fail(hub, rc, NULL);
        hub->stats.writes++;
        p->committed_done = true;
        free_inputs(p);
        p->ids[0] = p->committed.items[0]->id;
        /* The store sent the notification with the commit; the cache step
         * still runs (before this hub reads its own notification). */
        p->notified[0] = p->oneshot;
        if (ids)
            *ids = p->ids;
        if (n)
            *n = 1;
        return CS_OK;
    }
    cs_chat_row row;
    int rc = ops->tx_begin(hub->store.st, p->chat_id, &row);
    if (rc < 0)
        return cs_hub_fail(hub, rc, NULL);
    hub->err[0] = '\0'; /* a run that fails may say why itself */
    if (p->run) {
        rc = p->run(p, &row);
    } else if (p->key) {
        rc = keyed_insert(p, &row);
        if (rc == 1) {
            /* A retry: the first call's result, nothing written. Its
             * messages are published again (the first call may have
             * failed before its notifications went out; readers drop
             * what they have), or, if they cannot be read, not at all
             * (counted: readers find them on the next pass). */
            ops->tx_end(hub->store.st, false);
            p->committed_done = true;
            free_inputs(p);
            if (cs_pub_load(hub, p->chat_id, p->ids, p->n, &p->committed) < 0) {
                hub->stats.publish_errors++;
                memset(p->cached, 1, p->n);
                memset(p->notified, 1, p->n);
            }
            if (ids)
                *ids = p->ids;
            if (n)
                *n = p->n;
            return CS_OK;
        }
    } else if (p->worker && check_worker(hub, &row, p->worker) < 0) {
        rc = CS_ESTATE;
    } else {
        rc = ops->tx_insert(hub->store.st, &row, p->msgs, p->n, &p->committed);
    }
    if (rc == CS_OK && p->run) {
        /* Room for what the commit reports, before it: a committed write
         * always reports its real ids. */
        size_t k = p->committed.n ? p->committed.n : 1;
        p->ids = calloc(k, sizeof *p->ids);
        p->cached = calloc(k, 1);
        p->notified = calloc(k, 1);
        if (!p->ids || !p->cached || !p->notified) {
            free(p->ids);
            free(p->cached);
            free(p->notified);
            p->ids = NULL;
            p->cached = p->notified = NULL;
            rc = CS_ENOMEM;
        }
    }
    if (rc < 0) {
        /* Keep the detail of the failure, not of the rollback. */
        char keep[sizeof hub->err];
        if (!hub->err[0])
            cs_hub_fail(hub, rc, NULL);
        memcpy(keep, hub->err, sizeof keep);
        ops->tx_end(hub->store.st, false);
        memcpy(hub->err, keep, sizeof keep);
        cs_msglist_clear(&p->committed);
        p->extras = (pub_extras){0};
        return rc;
    }
    rc = ops->tx_end(hub->store.st, true);
    if (rc < 0) {
        if (p->run) {
            free(p->ids);
            free(p->cached);
            free(p->notified);
            p->ids = NULL;
            p->cached = p->notified = NULL;
        }
        cs_msglist_clear(&p->committed);
        p->extras = (pub_extras){0};
        return cs_hub_fail(hub, rc, NULL);
    }
    hub->stats.writes++;
    p->committed_done = true;
    p->arg = NULL;
    free_inputs(p);
    if (p->run) {
        p->n = p->committed.n;
        /* Nothing to notify: the status and queue hints go now. */
        if (p->n == 0 && pub_send_extras(p) < 0)
            hub->stats.publish_errors++;
    }
    for (size_t i = 0; i < p->n; i++)
        p->ids[i] = p->committed.items[i]->id;
    if (ids)
        *ids = p->ids;
    if (n)
        *n = p->n;
    return CS_OK;
}

/* Checks a step's target: committed, index in range, not done yet. */
static int check_step(cs_publish *p, size_t i, const unsigned char *done,
                      const char *what)
{
    if (!p || !p->hub)
        return CS_ECLOSED;
    if (!p->committed_done)
        return cs_hub_fail(p->hub, CS_EINVAL, "commit before publishing");
    if (i != CS_ALL && i >= p->n)
        return cs_hub_fail(p->hub, CS_EINVAL, "message index out of range");
    if (i != CS_ALL && done[i]) {
        char buf[64];
        snprintf(buf, sizeof buf, "message %zu already %s", i + 1, what);
        return cs_hub_fail(p->hub, CS_EINVAL, buf);
    }
    return CS_OK;
}

size_t cs_pub_size(const cs_publish *p)
{
    return p ? p->n : 0;
}

int cs_pub_cache(cs_publish *p, size_t i)
{
    int rc = check_step(p, i, p ? p->cached : NULL, "cached");
    if (rc < 0)
        return rc;
    hub_chat *c = cs_hub_chat(p->hub, p->chat_id);
    if (!c)
        return CS_ENOMEM;
    pub_extras *x = &p->extras;
    if (x->cut_cache) {
        /* An edit's cut goes first: what it removed leaves the cache, and
         * a late publish of it is not taken back in. */
        cs_chat_cut(c, x->cut_after, x->cut_id, x->cut_history);
        x->cut_cache = false;
    }
    size_t lo = i == CS_ALL ? 0 : i, hi = i == CS_ALL ? p->n : i + 1;
    for (size_t k = lo; k < hi; k++) {
        if (p->cached[k])
            continue;
        cs_chat_cache_put(p->hub, c, p->committed.items[k]);
        p->cached[k] = 1;
    }
    return CS_OK;
}

int cs_pub_notify(cs_publish *p, size_t i)
{
    int rc = check_step(p, i, p ? p->notified : NULL, "notified");
    if (rc < 0)
        return rc;
    cs_hub *hub = p->hub;
    pub_extras *x = &p->extras;
    if (x->cut) {
        /* An edit's truncate hint goes before its message. */
        char buf[80];
        cs_hint h = {.kind = CS_HINT_TRUNCATE,
                     .version = x->cut_history,
                     .after = x->cut_after,
                     .id = x->cut_id};
        int len = cs_payload_encode(&h, buf, sizeof buf);
        rc = len < 0 ? len
                     : hub->store.ops->notify(hub->store.st, p->chat_id, buf,
                                              (size_t)len);
        if (rc < 0)
            return cs_hub_fail(hub, rc, NULL);
        x->cut = false;
    }
    size_t lo = i == CS_ALL ? 0 : i, hi = i == CS_ALL ? p->n : i + 1;
    for (size_t k = lo; k < hi; k++) {
        if (p->notified[k])
            continue;
        cs_msg *m = p->committed.items[k];
        char buf[64];
        cs_hint h = {.kind = CS_HINT_MESSAGE, .after = m->prev_id, .id = m->id};
        int len = cs_payload_encode(&h, buf, sizeof buf);
        if (len < 0)
            return cs_hub_fail(hub, len, "cannot encode notification");
        rc =
            hub->store.ops->notify(hub->store.st, p->chat_id, buf, (size_t)len);
        if (rc < 0)
            return cs_hub_fail(hub, rc, NULL);
        p->notified[k] = 1;
    }
    for (size_t k = 0; k < p->n; k++)
        if (!p->notified[k])
            return CS_OK;
    /* Every message is notified: the status and queue hints follow. */
    return pub_send_extras(p);
}

int cs_hub_notify_status(cs_hub *hub, int64_t chat_id, int64_t version,
                         cs_status st, const char *error, bool archived)
{
    char buf[64 + CS_ERROR_MAX];
    const char *name = cs_status_name(st);
    cs_hint h = {.kind = CS_HINT_STATUS,
                 .version = version,
                 .text = name,
                 .text_len = strlen(name)};
    if (st == CS_STATUS_ERROR && error && *error) {
        h.error = error;
        h.error_len = strlen(error);
    }
    h.archived = archived;
    int len = cs_payload_encode(&h, buf, sizeof buf);
    int rc = len < 0 ? len
                     : hub->store.ops->notify(hub->store.st, chat_id, buf,
                                              (size_t)len);
    return rc < 0 ? cs_hub_fail(hub, rc, NULL) : CS_OK;
}

void cs_pub_publish_all(cs_publish *p)
{
    if (cs_pub_cache(p, CS_ALL) < 0 || cs_pub_notify(p, CS_ALL) < 0)
        p->hub->stats.publish_errors++;
}

int cs_hub_create_chat(cs_hub *hub, const char *owner, const char *title,
                       int64_t *chat_id)
{
    return cs_hub_create_chat_key(hub, owner, title, NULL, chat_id);
}

int cs_hub_create_chat_key(cs_hub *hub, const char *owner, const char *title,
                           const char *key, int64_t *chat_id)
{
    if (!hub)
        return CS_ECLOSED;
    if (key && cs_check_key(hub, key) < 0)
        return CS_EINVAL;
    if ((owner && strlen(owner) > CS_NAME_MAX) ||
        (title && strlen(title) > CS_TITLE_MAX))
        return cs_hub_fail(hub, CS_EINVAL,
                           "owner (255 bytes) or title (1023 bytes) too long");
    if ((owner && !cs_utf8_text(owner, strlen(owner))) ||
        (title && !cs_utf8_text(title, strlen(title))))
        return cs_hub_fail(hub, CS_EINVAL, "owner or title is not valid UTF-8");
    int64_t id;
    int rc = hub->store.ops->create_chat(hub->store.st, owner, title, key, &id);
    if (rc < 0)
        return cs_hub_fail(hub, rc, NULL);
    hub->stats.writes++;
    *chat_id = id;
    return CS_OK;
}

int cs_check_key(cs_hub *hub, const char *key)
{
    size_t len = key ? strlen(key) : 0;
    if (!key || len < 1 || len > CS_KEY_MAX || !cs_utf8_text(key, len))
        return cs_hub_fail(hub, CS_EINVAL,
                           "an idempotency key is 1 to 255 bytes of UTF-8");
    return CS_OK;
}

int cs_pub_set_key(cs_publish *p, const char *key)
{
    if (!p || !p->hub)
        return CS_ECLOSED;
    if (p->committed_done || p->run)
        return cs_hub_fail(p->hub, CS_EINVAL,
                           "an idempotency key goes on an append before its "
                           "commit");
    int rc = cs_check_key(p->hub, key);
    if (rc < 0)
        return rc;
    char *k = malloc(strlen(key) + 1);
    if (!k)
        return CS_ENOMEM;
    strcpy(k, key);
    free(p->key);
    p->key = k;
    return CS_OK;
}

int cs_pub_set_worker(cs_publish *p, const char *worker)
{
    if (!p || !p->hub)
        return CS_ECLOSED;
    if (p->committed_done || p->run || !worker || !*worker ||
        strlen(worker) > CS_NAME_MAX || !cs_utf8_text(worker, strlen(worker)))
        return cs_hub_fail(
            p->hub, CS_EINVAL,
            "a worker (1 to 255 bytes) is set before the commit");
    char *w = strdup(worker);
    if (!w)
        return CS_ENOMEM;
    free(p->worker);
    p->worker = w;
    return CS_OK;
}

int cs_hub_append(cs_hub *hub, int64_t chat_id, const cs_msg_in *msgs, size_t n,
                  int64_t *ids)
{
    return cs_hub_append_as(hub, chat_id, NULL, msgs, n, ids);
}

static int append(cs_hub *hub, int64_t chat_id, const char *actor,
                  const char *worker, const char *key, const cs_msg_in *msgs,
                  size_t n, int64_t *ids);

int cs_hub_append_as(cs_hub *hub, int64_t chat_id, const char *actor,
                     const cs_msg_in *msgs, size_t n, int64_t *ids)
{
    return append(hub, chat_id, actor, NULL, NULL, msgs, n, ids);
}

int cs_hub_append_opts(cs_hub *hub, int64_t chat_id, const cs_append_options *o,
                       const cs_msg_in *msgs, size_t n, int64_t *ids)
{
    cs_append_options d = o ? *o : (cs_append_options){0};
    if (hub && d.actor && d.worker)
        return cs_hub_fail(hub, CS_EINVAL, "an actor or a worker, not both");
    return append(hub, chat_id, d.actor, d.worker, d.idempotency_key, msgs, n,
                  ids);
}

int cs_hub_append_worker(cs_hub *hub, int64_t chat_id, const char *worker,
                         const cs_msg_in *msgs, size_t n, int64_t *ids)
{
    if (!worker)
        return hub ? cs_hub_fail(hub, CS_EINVAL, "a worker is needed")
                   : CS_ECLOSED;
    return append(hub, chat_id, NULL, worker, NULL, msgs, n, ids);
}

static int append(cs_hub *hub, int64_t chat_id, const char *actor,
                  const char *worker, const char *key, const cs_msg_in *msgs,
                  size_t n, int64_t *ids)
{
    cs_publish *p;
    const int64_t *got;
    int rc = cs_pub_prepare_as(hub, chat_id, actor, msgs, n, &p);
    if (rc == CS_OK && worker && (rc = cs_pub_set_worker(p, worker)) < 0) {
        cs_pub_close(p);
        return rc;
    }
    if (rc == CS_OK && key && (rc = cs_pub_set_key(p, key)) < 0) {
        cs_pub_close(p);
        return rc;
    }
    if (rc < 0)
        return rc;
    p->oneshot = true;
    rc = cs_pub_commit(p, &got, NULL);
    if (rc == CS_OK) {
        if (ids)
            memcpy(ids, got, n * sizeof *ids);
        /* The messages are durable now: a failed cache append or notification
         * costs readers a query or some delay, never a message, so it is
         * counted rather than reported as a failed append. */
        cs_pub_publish_all(p);
    }
    cs_pub_close(p);
    return rc;
}
