/* chats.c - the hub's chat table: open addressing by chat id, and the
 * eviction of the least recently used chat without subscriptions. */
#include "hub.h"

#include <stdlib.h>

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

int cs_chat_cache_put(cs_hub *hub, hub_chat *c, cs_msg *m)
{
    if (m->id < c->dead_upto) {
        hub->stats.cut_refused++;
        return 0;
    }
    return cs_cache_append(&c->cache, m);
}

void cs_chat_cut(hub_chat *c, int64_t after, int64_t upto, int64_t history)
{
    /* An edit this hub did not cut for before (the history skips one): what
     * it removed is not known here, so everything below this edit's new
     * message leaves the cache. */
    if (history > c->history + 1)
        after = -1;
    cs_cache_drop(&c->cache, after, upto);
    if (upto > c->dead_upto)
        c->dead_upto = upto;
    if (history > c->history)
        c->history = history;
    cs_msglist_clear(&c->memo);
}
