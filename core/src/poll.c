/* poll.c - the backstop poll's rounds: the state of every chat the hub
 * follows, read CS_POLL_CHUNK chats per statement, one statement per step. */
#include "hub.h"

#include <stdlib.h>
#include <time.h>

/* After a failed state read, the next try waits this long (seconds). */
#define ROUND_RETRY 0.05

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int cs_round_start(cs_hub *hub, bool restart)
{
    hub_round *r = &hub->round;
    if (!restart && r->pos < r->n)
        return CS_OK; /* the round under way goes on */
    r->n = r->pos = 0;
    r->retry_at = 0;
    if (!r->rows) {
        r->rows = malloc(CS_POLL_CHUNK * sizeof *r->rows);
        if (!r->rows)
            return CS_ENOMEM;
    }
    if (hub->busy_chats > r->cap) {
        int64_t *ids = realloc(r->ids, hub->busy_chats * sizeof *ids);
        if (!ids)
            return CS_ENOMEM;
        r->ids = ids;
        r->cap = hub->busy_chats;
    }
    /* The chats followed now: one that gains its first subscription later
     * reads its own snapshot after this. */
    for (size_t i = 0; i < hub->capchats && r->n < r->cap; i++) {
        hub_chat *c = hub->chats[i];
        if (c && c->nsubs > 0)
            r->ids[r->n++] = c->id;
    }
    return CS_OK;
}

bool cs_round_due(const cs_hub *hub, double *at)
{
    const hub_round *r = &hub->round;
    if (r->pos >= r->n)
        return false;
    *at = r->retry_at;
    return true;
}

int cs_round_next(cs_hub *hub, cs_chat_state **rows, size_t *n)
{
    hub_round *r = &hub->round;
    *n = 0;
    if (r->pos >= r->n || now() < r->retry_at)
        return 0;
    size_t take = r->n - r->pos;
    if (take > CS_POLL_CHUNK)
        take = CS_POLL_CHUNK;
    hub->counts.queries++;
    int rc = hub->store.ops->chats_state(hub->store.st, r->ids + r->pos, take,
                                         r->rows, n);
    if (rc < 0) {
        if (rc == CS_EBACKEND)
            hub->counts.query_errors++;
        *n = 0;
        r->retry_at = now() + ROUND_RETRY; /* the same chunk, later */
        return rc;
    }
    r->pos += take;
    *rows = r->rows;
    return 1;
}

void cs_round_free(hub_round *r)
{
    free(r->ids);
    free(r->rows);
    *r = (hub_round){0};
}
