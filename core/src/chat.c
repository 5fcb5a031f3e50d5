/* chat.c - chat operations: create, append, and the stepped publish. */
#include "hub.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct cs_publish {
    cs_hub *hub; /* NULL once detached */
    cs_publish *next, *prev;
    int64_t chat_id;
    size_t n;
    cs_msg_in *msgs; /* copies, until commit */
    cs_msglist committed;
    int64_t *ids;
    unsigned char *cached, *notified;
};

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

void cs_pub_detach_all(cs_hub *hub)
{
    for (cs_publish *p = hub->pubs, *next; p; p = next) {
        next = p->next;
        p->hub = NULL;
        p->next = p->prev = NULL;
    }
    hub->pubs = NULL;
}

static void free_inputs(cs_publish *p)
{
    if (!p->msgs)
        return;
    for (size_t i = 0; i < p->n; i++)
        free((char *)p->msgs[i].content);
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
    free(p->ids);
    free(p->cached);
    free(p->notified);
    free(p);
}

static int check_msgs(cs_hub *hub, const cs_msg_in *msgs, size_t n)
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
        /* Content is text (PostgreSQL's text type cannot hold a NUL byte):
         * both stores refuse it alike. */
        if (msgs[i].content_len &&
            memchr(msgs[i].content, '\0', msgs[i].content_len))
            return cs_hub_fail(hub, CS_EINVAL,
                               "message content contains a NUL byte");
    }
    return CS_OK;
}

int cs_pub_prepare(cs_hub *hub, int64_t chat_id, const cs_msg_in *msgs,
                   size_t n, cs_publish **out)
{
    if (!hub)
        return CS_ECLOSED;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    int rc = check_msgs(hub, msgs, n);
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
        if (!c)
            goto oom;
        if (msgs[i].content_len)
            memcpy(c, msgs[i].content, msgs[i].content_len);
        c[msgs[i].content_len] = '\0';
        p->msgs[i] = (cs_msg_in){msgs[i].role, c, msgs[i].content_len};
    }
    p->hub = hub;
    p->next = hub->pubs;
    if (hub->pubs)
        hub->pubs->prev = p;
    hub->pubs = p;
    *out = p;
    return CS_OK;
oom:
    cs_pub_close(p);
    return CS_ENOMEM;
}

int cs_pub_commit(cs_publish *p, const int64_t **ids, size_t *n)
{
    if (!p || !p->hub)
        return CS_ECLOSED;
    cs_hub *hub = p->hub;
    if (!p->msgs)
        return cs_hub_fail(hub, CS_EINVAL, "already committed");
    int rc = hub->store.ops->commit(hub->store.st, p->chat_id, p->msgs, p->n,
                                    &p->committed);
    if (rc < 0)
        return cs_hub_fail(hub, rc, NULL);
    hub->stats.writes++;
    free_inputs(p);
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
    if (p->msgs)
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
    size_t lo = i == CS_ALL ? 0 : i, hi = i == CS_ALL ? p->n : i + 1;
    for (size_t k = lo; k < hi; k++) {
        if (p->cached[k])
            continue;
        cs_cache_append(&c->cache, p->committed.items[k]);
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
    return CS_OK;
}

int cs_hub_create_chat(cs_hub *hub, const char *owner, const char *title,
                       int64_t *chat_id)
{
    if (!hub)
        return CS_ECLOSED;
    int64_t id;
    int rc = hub->store.ops->create_chat(hub->store.st, owner, title, &id);
    if (rc < 0)
        return cs_hub_fail(hub, rc, NULL);
    hub->stats.writes++;
    *chat_id = id;
    return CS_OK;
}

int cs_hub_append(cs_hub *hub, int64_t chat_id, const cs_msg_in *msgs, size_t n,
                  int64_t *ids)
{
    cs_publish *p;
    const int64_t *got;
    int rc = cs_pub_prepare(hub, chat_id, msgs, n, &p);
    if (rc < 0)
        return rc;
    rc = cs_pub_commit(p, &got, NULL);
    if (rc == CS_OK) {
        if (ids)
            memcpy(ids, got, n * sizeof *ids);
        /* The messages are durable now: a failed cache append or notification
         * costs readers a query or some delay, never a message, so it is
         * counted rather than reported as a failed append. */
        if (cs_pub_cache(p, CS_ALL) < 0 || cs_pub_notify(p, CS_ALL) < 0)
            hub->stats.publish_errors++;
    }
    cs_pub_close(p);
    return rc;
}
