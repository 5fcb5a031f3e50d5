/* idset.c - the delivered set: a watermark plus a sorted int64 array above it.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

void cs_idset_init(cs_idset *s, int64_t watermark)
{
    s->watermark = watermark;
    s->ids = NULL;
    s->n = s->cap = 0;
}

void cs_idset_free(cs_idset *s)
{
    free(s->ids);
    s->ids = NULL;
    s->n = s->cap = 0;
}

/* Index of the first element >= id. */
static size_t lower_bound(const cs_idset *s, int64_t id)
{
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->ids[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

bool cs_idset_any_in(const cs_idset *s, int64_t lo, int64_t hi)
{
    if (s->n == 0 || hi - 1 <= lo)
        return false;
    size_t i = lower_bound(s, lo + 1);
    return i < s->n && s->ids[i] < hi;
}

bool cs_idset_has(const cs_idset *s, int64_t id)
{
    if (id <= s->watermark)
        return true;
    if (s->n == 0 || id > s->ids[s->n - 1])
        return false;
    size_t i = lower_bound(s, id);
    return i < s->n && s->ids[i] == id;
}

int cs_idset_add(cs_idset *s, int64_t id)
{
    if (id <= s->watermark)
        return 0;
    size_t i = (s->n == 0 || id > s->ids[s->n - 1]) ? s->n : lower_bound(s, id);
    if (i < s->n && s->ids[i] == id)
        return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 8;
        int64_t *ids = realloc(s->ids, cap * sizeof *ids);
        if (!ids)
            return CS_ENOMEM;
        s->ids = ids;
        s->cap = cap;
    }
    memmove(s->ids + i + 1, s->ids + i, (s->n - i) * sizeof *s->ids);
    s->ids[i] = id;
    s->n++;
    return 1;
}

int cs_idset_remove(cs_idset *s, int64_t id)
{
    if (id <= s->watermark || s->n == 0)
        return 0;
    size_t i = lower_bound(s, id);
    if (i == s->n || s->ids[i] != id)
        return 0;
    memmove(s->ids + i, s->ids + i + 1, (s->n - i - 1) * sizeof *s->ids);
    s->n--;
    return 1;
}

void cs_idset_cut(cs_idset *s, int64_t w)
{
    if (s->watermark >= w) {
        s->watermark = w; /* every id held is above the old one: all go */
        s->n = 0;
        return;
    }
    while (s->n > 0 && s->ids[s->n - 1] > w)
        s->n--;
}

void cs_idset_advance_slow(cs_idset *s, int64_t w)
{
    if (w <= s->watermark)
        return;
    s->watermark = w;
    /* First element > w; every element is <= INT64_MAX. */
    size_t i = w == INT64_MAX ? s->n : lower_bound(s, w + 1);
    if (i == 0)
        return;
    if (i < s->n)
        memmove(s->ids, s->ids + i, (s->n - i) * sizeof *s->ids);
    s->n -= i;
    /* Give memory back when the window shrinks a lot. */
    if (s->cap > 64 && s->n < s->cap / 4) {
        size_t cap = s->cap / 2;
        int64_t *ids = realloc(s->ids, cap * sizeof *ids);
        if (ids) {
            s->ids = ids;
            s->cap = cap;
        }
    }
}

size_t cs_idset_count(const cs_idset *s)
{
    return s->n;
}

size_t cs_idset_bytes(const cs_idset *s)
{
    return s->cap * sizeof *s->ids;
}
