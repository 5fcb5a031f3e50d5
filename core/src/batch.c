/* batch.c - appends in a batch (cs_hub_append_many): many single-message
 * appends, each its own transaction, with several in flight at once where
 * the store can (the PostgreSQL store's pipeline mode). It sits beside
 * chat.c in the order of hub.h: it calls chat.c's checks and appends. */
#include "hub.h"

#include <stdlib.h>

/* The committed messages into this hub's caches, as an append's publish
 * does (their notifications went out with their commits). */
static void cache_all(cs_hub *hub, const cs_msglist *out)
{
    for (size_t i = 0; i < out->n; i++) {
        cs_msg *m = out->items[i];
        if (!m)
            continue;
        hub_chat *c = cs_hub_chat(hub, m->chat_id);
        if (c)
            cs_chat_cache_put(hub, c, m);
        else
            hub->stats.publish_errors++; /* durable: readers query for it */
    }
}

int cs_hub_append_many(cs_hub *hub, const cs_append_req *reqs, size_t n,
                       int64_t *ids, int *rcs)
{
    if (!hub)
        return CS_ECLOSED;
    if (n == 0 || n > CS_MAX_APPENDS)
        return cs_hub_fail(hub, CS_EINVAL, "expected 1 to 4096 appends");
    const cs_store_ops *ops = hub->store.ops;
    /* Requests that fail their checks are not sent; the rest go together. */
    cs_append_req *ok = malloc(n * sizeof *ok);
    size_t *at = malloc(n * sizeof *at);
    int64_t *oids = malloc(n * sizeof *oids);
    int *orcs = malloc(n * sizeof *orcs);
    cs_msglist out = {0};
    int rc = ok && at && oids && orcs ? CS_OK : CS_ENOMEM;
    size_t m = 0;
    for (size_t i = 0; rc == CS_OK && i < n; i++) {
        ids[i] = 0;
        rcs[i] = reqs[i].chat_id < 1 ? CS_EINVAL
                                     : cs_check_msgs(hub, &reqs[i].msg, 1);
        if (rcs[i] == CS_OK) {
            ok[m] = reqs[i];
            at[m++] = i;
        }
    }
    if (rc == CS_OK && m > 0 && ops->append1_many) {
        int notify =
            hub->plain_notifications ? CS_APPEND_PLAIN : CS_APPEND_BODY;
        rc = ops->append1_many(hub->store.st, ok, m, notify, &out, oids, orcs);
        if (rc == CS_OK) {
            for (size_t k = 0; k < m; k++) {
                ids[at[k]] = oids[k];
                rcs[at[k]] =
                    orcs[k] == CS_ENOMEM && oids[k] > 0 ? CS_OK : orcs[k];
                hub->stats.writes += oids[k] > 0;
            }
            cache_all(hub, &out);
        }
    } else if (rc == CS_OK) {
        /* One by one (the memory store completes each at once). */
        for (size_t k = 0; k < m; k++)
            rcs[at[k]] =
                cs_hub_append(hub, ok[k].chat_id, &ok[k].msg, 1, &ids[at[k]]);
    }
    cs_msglist_free(&out);
    free(ok);
    free(at);
    free(oids);
    free(orcs);
    return rc < 0 ? cs_hub_fail(hub, rc, NULL) : CS_OK;
}
