/* cache.c - the per-chat cache of durable messages: bounded, in id order. */
#include "internal.h"

#include <stdlib.h>

int cs_cache_init(cs_cache *c, size_t cap)
{
    c->ring = calloc(cap ? cap : 1, sizeof *c->ring);
    if (!c->ring)
        return CS_ENOMEM;
    c->head = c->n = 0;
    c->cap = cap ? cap : 1;
    c->max_evicted_id = 0;
    return CS_OK;
}

void cs_cache_free(cs_cache *c)
{
    if (!c->ring)
        return;
    for (size_t i = 0; i < c->n; i++)
        cs_msg_unref(cs_cache_at(c, i));
    free(c->ring);
    c->ring = NULL;
    c->n = 0;
}

static cs_msg **slot(cs_cache *c, size_t i)
{
    return &c->ring[(c->head + i) % c->cap];
}

/* Drops the lowest entry, raising the eviction mark to it. */
static void evict_first(cs_cache *c)
{
    cs_msg *old = cs_cache_at(c, 0);
    if (old->id > c->max_evicted_id)
        c->max_evicted_id = old->id;
    cs_msg_unref(old);
    c->head = (c->head + 1) % c->cap;
    c->n--;
}

int cs_cache_append(cs_cache *c, cs_msg *m)
{
    if (m->id <= c->max_evicted_id)
        return 0;
    /* Position: after the last entry with a lower id (usually the end). */
    size_t pos = c->n;
    while (pos > 0 && cs_cache_at(c, pos - 1)->id >= m->id) {
        if (cs_cache_at(c, pos - 1)->id == m->id)
            return 0;
        pos--;
    }
    if (c->n == c->cap) {
        /* Evict the lowest id. If that is the new one, it is not kept. */
        if (pos == 0) {
            if (m->id > c->max_evicted_id)
                c->max_evicted_id = m->id;
            return 0;
        }
        evict_first(c);
        pos--;
    }
    for (size_t i = c->n; i > pos; i--)
        *slot(c, i) = *slot(c, i - 1);
    *slot(c, pos) = cs_msg_ref(m);
    c->n++;
    return 1;
}

size_t cs_cache_trim(cs_cache *c, int64_t upto)
{
    size_t k = 0;
    for (; c->n > 0 && cs_cache_at(c, 0)->id <= upto; k++)
        evict_first(c);
    return k;
}

size_t cs_cache_drop(cs_cache *c, int64_t lo, int64_t hi)
{
    size_t k = 0, out = 0;
    for (size_t i = 0; i < c->n; i++) {
        cs_msg *m = cs_cache_at(c, i);
        if (m->id > lo && m->id < hi) {
            cs_msg_unref(m);
            k++;
        } else {
            *slot(c, out++) = m;
        }
    }
    c->n = out;
    return k;
}

bool cs_cache_after(const cs_cache *c, int64_t after, size_t *first,
                    size_t *count)
{
    *first = c->n;
    *count = 0;
    if (after < c->max_evicted_id)
        return false;
    /* Binary search for the first entry with id > after. */
    size_t lo = 0, hi = c->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cs_cache_at(c, mid)->id <= after)
            lo = mid + 1;
        else
            hi = mid;
    }
    *first = lo;
    *count = c->n - lo;
    return true;
}
