/* test_cache.c - unit tests of the per-chat cache (bounded ring, id order). */
#include "check.h"
#include "internal.h"

#include <stdlib.h>

static cs_msg *mk(int64_t id)
{
    char text[32];
    int n = snprintf(text, sizeof text, "m%lld", (long long)id);
    return cs_msg_new(id, 1, id - 1, CS_ROLE_USER, text, (size_t)n, NULL);
}

/* Appends a fresh message and drops the caller's reference. */
static int app(cs_cache *c, int64_t id)
{
    cs_msg *m = mk(id);
    int rc = cs_cache_append(c, m);
    cs_msg_unref(m);
    return rc;
}

/* 1 if the cache holds exactly the ids want[0..n), in order. */
static int holds(const cs_cache *c, const int64_t *want, size_t n)
{
    if (c->n != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (cs_cache_at(c, i)->id != want[i])
            return 0;
    return 1;
}

static void test_in_order(void)
{
    cs_cache c;
    CHECK_EQ_I64(cs_cache_init(&c, 8), CS_OK);
    CHECK_EQ_SIZE(c.n, 0);
    CHECK_EQ_I64(c.max_evicted_id, 0);
    size_t first = 99, count = 99;
    CHECK(cs_cache_after(&c, 0, &first, &count));
    CHECK_EQ_SIZE(count, 0);
    for (int64_t id = 1; id <= 5; id++)
        CHECK_EQ_I64(app(&c, id), 1);
    static const int64_t want[] = {1, 2, 3, 4, 5};
    CHECK(holds(&c, want, 5));
    CHECK_EQ_STR(cs_cache_at(&c, 2)->content, "m3");

    CHECK(cs_cache_after(&c, 2, &first, &count));
    CHECK_EQ_SIZE(first, 2);
    CHECK_EQ_SIZE(count, 3);
    CHECK_EQ_I64(cs_cache_at(&c, first)->id, 3);
    CHECK(cs_cache_after(&c, 0, &first, &count));
    CHECK_EQ_SIZE(first, 0);
    CHECK_EQ_SIZE(count, 5);
    CHECK(cs_cache_after(&c, 5, &first, &count));
    CHECK_EQ_SIZE(count, 0);
    CHECK(cs_cache_after(&c, 100, &first, &count));
    CHECK_EQ_SIZE(count, 0);
    cs_cache_free(&c);
    cs_cache_free(&c); /* twice is fine */
}

static void test_out_of_order(void)
{
    cs_cache c;
    CHECK_EQ_I64(cs_cache_init(&c, 8), CS_OK);
    CHECK_EQ_I64(app(&c, 4), 1);
    CHECK_EQ_I64(app(&c, 5), 1);
    CHECK_EQ_I64(app(&c, 7), 1);
    CHECK_EQ_I64(app(&c, 6), 1);
    static const int64_t all[] = {4, 5, 6, 7};
    CHECK(holds(&c, all, 4));

    size_t first, count;
    CHECK(cs_cache_after(&c, 4, &first, &count));
    CHECK_EQ_SIZE(count, 3);
    CHECK_EQ_I64(cs_cache_at(&c, first)->id, 5);
    CHECK_EQ_I64(cs_cache_at(&c, first + 1)->id, 6);
    CHECK_EQ_I64(cs_cache_at(&c, first + 2)->id, 7);
    /* an "after" that is not itself cached */
    CHECK(cs_cache_after(&c, 3, &first, &count));
    CHECK_EQ_SIZE(first, 0);
    CHECK_EQ_SIZE(count, 4);

    /* duplicates are ignored */
    CHECK_EQ_I64(app(&c, 6), 0);
    CHECK_EQ_I64(app(&c, 4), 0);
    CHECK_EQ_I64(app(&c, 7), 0);
    CHECK(holds(&c, all, 4));

    /* below everything, with room: goes first */
    CHECK_EQ_I64(app(&c, 2), 1);
    CHECK_EQ_I64(cs_cache_at(&c, 0)->id, 2);
    CHECK_EQ_I64(cs_cache_at(&c, 1)->id, 4);
    CHECK_EQ_I64(app(&c, 3), 1);
    static const int64_t all2[] = {2, 3, 4, 5, 6, 7};
    CHECK(holds(&c, all2, 6));
    CHECK_EQ_I64(c.max_evicted_id, 0);
    cs_cache_free(&c);
}

static void test_eviction(void)
{
    cs_cache c;
    size_t first, count;
    CHECK_EQ_I64(cs_cache_init(&c, 3), CS_OK);
    CHECK_EQ_I64(app(&c, 10), 1);
    CHECK_EQ_I64(app(&c, 11), 1);
    CHECK_EQ_I64(app(&c, 12), 1);
    CHECK_EQ_I64(c.max_evicted_id, 0);
    CHECK_EQ_I64(app(&c, 13), 1); /* evicts 10 */
    CHECK_EQ_I64(c.max_evicted_id, 10);
    static const int64_t w1[] = {11, 12, 13};
    CHECK(holds(&c, w1, 3));

    /* lookups: below the mark is a miss, never a partial answer */
    first = count = 77;
    CHECK(!cs_cache_after(&c, 9, &first, &count));
    CHECK_EQ_SIZE(count, 0);
    CHECK_EQ_SIZE(first, c.n);
    CHECK(!cs_cache_after(&c, 0, &first, &count));
    CHECK_EQ_SIZE(count, 0);
    /* exactly at the mark is a hit */
    CHECK(cs_cache_after(&c, 10, &first, &count));
    CHECK_EQ_SIZE(first, 0);
    CHECK_EQ_SIZE(count, 3);
    CHECK(cs_cache_after(&c, 12, &first, &count));
    CHECK_EQ_SIZE(count, 1);
    CHECK_EQ_I64(cs_cache_at(&c, first)->id, 13);

    /* an id <= max_evicted_id is ignored, whatever the room */
    CHECK_EQ_I64(app(&c, 10), 0);
    CHECK_EQ_I64(app(&c, 5), 0);
    CHECK(holds(&c, w1, 3));
    CHECK_EQ_I64(c.max_evicted_id, 10);

    /* out of order into a full cache: evicts the lowest, lands in order */
    CHECK_EQ_I64(app(&c, 15), 1); /* evicts 11 */
    CHECK_EQ_I64(c.max_evicted_id, 11);
    CHECK_EQ_I64(app(&c, 14), 1); /* evicts 12 */
    CHECK_EQ_I64(c.max_evicted_id, 12);
    static const int64_t w2[] = {13, 14, 15};
    CHECK(holds(&c, w2, 3));

    /* below everything into a full cache: not kept, the mark covers it */
    CHECK_EQ_I64(app(&c, 12), 0); /* == mark: ignored */
    CHECK_EQ_I64(c.max_evicted_id, 12);
    cs_cache_free(&c);

    CHECK_EQ_I64(cs_cache_init(&c, 3), CS_OK);
    CHECK_EQ_I64(app(&c, 20), 1);
    CHECK_EQ_I64(app(&c, 30), 1);
    CHECK_EQ_I64(app(&c, 40), 1);
    CHECK_EQ_I64(app(&c, 50), 1); /* evicts 20 */
    CHECK_EQ_I64(c.max_evicted_id, 20);
    CHECK_EQ_I64(app(&c, 25), 0);  /* lowest of all: dropped at once */
    CHECK(c.max_evicted_id >= 25); /* a lookup after 20 must now miss */
    CHECK(!cs_cache_after(&c, 20, &first, &count));
    CHECK(cs_cache_after(&c, 25, &first, &count));
    CHECK_EQ_SIZE(count, 3);
    static const int64_t w3[] = {30, 40, 50};
    CHECK(holds(&c, w3, 3));
    CHECK_EQ_I64(app(&c, 35), 1); /* evicts 30 */
    CHECK_EQ_I64(c.max_evicted_id, 30);
    static const int64_t w4[] = {35, 40, 50};
    CHECK(holds(&c, w4, 3));
    cs_cache_free(&c);

    /* capacity 0 behaves as 1 */
    CHECK_EQ_I64(cs_cache_init(&c, 0), CS_OK);
    CHECK_EQ_SIZE(c.cap, 1);
    CHECK_EQ_I64(app(&c, 1), 1);
    CHECK_EQ_I64(app(&c, 2), 1);
    CHECK_EQ_I64(c.max_evicted_id, 1);
    CHECK_EQ_SIZE(c.n, 1);
    CHECK_EQ_I64(cs_cache_at(&c, 0)->id, 2);
    cs_cache_free(&c);
}

/* A naive model: a sorted array, the same rules, no ring. */
typedef struct model {
    int64_t ids[64];
    size_t n, cap;
    int64_t mark;
} model;

static int model_append(model *m, int64_t id)
{
    if (id <= m->mark)
        return 0;
    size_t pos = 0;
    while (pos < m->n && m->ids[pos] < id)
        pos++;
    if (pos < m->n && m->ids[pos] == id)
        return 0;
    if (m->n == m->cap) {
        if (pos == 0) {
            m->mark = id;
            return 0;
        }
        if (m->ids[0] > m->mark)
            m->mark = m->ids[0];
        memmove(m->ids, m->ids + 1, (m->n - 1) * sizeof *m->ids);
        m->n--;
        pos--;
    }
    memmove(m->ids + pos + 1, m->ids + pos, (m->n - pos) * sizeof *m->ids);
    m->ids[pos] = id;
    m->n++;
    return 1;
}

static void test_wrap_model(void)
{
    static const size_t caps[] = {1, 2, 5, 16};
    static const uint64_t seeds[] = {3, 99, 0xC0FFEE};
    for (size_t ci = 0; ci < sizeof caps / sizeof *caps; ci++) {
        for (size_t si = 0; si < sizeof seeds / sizeof *seeds; si++) {
            check_rng rng = {seeds[si]};
            cs_cache c;
            model md = {.cap = caps[ci]};
            CHECK_EQ_I64(cs_cache_init(&c, caps[ci]), CS_OK);
            int bad_rc = 0, bad_content = 0, bad_lookup = 0, monotonic = 1;
            int64_t next = 1, prev_mark = 0;
            for (int step = 0; step < 3000; step++) {
                /* mostly ascending with some local reordering and replays */
                int64_t id = next + (int64_t)check_below(&rng, 4) - 2;
                if (check_below(&rng, 3) != 0)
                    next++;
                if (id < 1)
                    id = 1;
                cs_msg *msg = mk(id);
                int got = cs_cache_append(&c, msg);
                cs_msg_unref(msg);
                if (got != model_append(&md, id))
                    bad_rc++;
                if (!holds(&c, md.ids, md.n) || c.max_evicted_id != md.mark)
                    bad_content++;
                if (c.max_evicted_id < prev_mark)
                    monotonic = 0;
                prev_mark = c.max_evicted_id;
                int64_t after = id - (int64_t)check_below(&rng, 6);
                size_t first, count;
                bool hit = cs_cache_after(&c, after, &first, &count);
                if (hit != (after >= md.mark)) {
                    bad_lookup++;
                } else if (hit) {
                    size_t k = 0;
                    while (k < md.n && md.ids[k] <= after)
                        k++;
                    if (first != k || count != md.n - k)
                        bad_lookup++;
                } else if (count != 0) {
                    bad_lookup++;
                }
            }
            CHECK_EQ_I64(bad_rc, 0);
            CHECK_EQ_I64(bad_content, 0);
            CHECK_EQ_I64(bad_lookup, 0);
            CHECK(monotonic);
            CHECK(c.max_evicted_id > 1000); /* it did wrap many times */
            cs_cache_free(&c);
        }
    }
}

static void test_refcounts(void)
{
    cs_cache c;
    CHECK_EQ_I64(cs_cache_init(&c, 2), CS_OK);
    cs_msg *a = mk(1), *b = mk(2), *d = mk(3);
    CHECK_EQ_I64(cs_cache_append(&c, a), 1);
    CHECK_EQ_I64(a->refs, 2);
    CHECK_EQ_I64(cs_cache_append(&c, a), 0); /* duplicate: no reference */
    CHECK_EQ_I64(a->refs, 2);
    CHECK_EQ_I64(cs_cache_append(&c, b), 1);
    CHECK_EQ_I64(cs_cache_append(&c, d), 1); /* evicts a */
    CHECK_EQ_I64(a->refs, 1);
    CHECK_EQ_I64(b->refs, 2);
    CHECK_EQ_I64(d->refs, 2);
    CHECK_EQ_I64(cs_cache_append(&c, a), 0); /* below the mark */
    CHECK_EQ_I64(a->refs, 1);
    cs_cache_free(&c);
    CHECK_EQ_I64(b->refs, 1);
    CHECK_EQ_I64(d->refs, 1);
    cs_msg_unref(a);
    cs_msg_unref(b);
    cs_msg_unref(d);

    /* the cache's references alone keep messages alive; free releases them
     * (valgrind reports a leak otherwise) */
    CHECK_EQ_I64(cs_cache_init(&c, 4), CS_OK);
    for (int64_t id = 1; id <= 10; id++)
        app(&c, id);
    CHECK_EQ_SIZE(c.n, 4);
    CHECK_EQ_I64(cs_cache_at(&c, 0)->refs, 1);
    CHECK_EQ_STR(cs_cache_at(&c, 3)->content, "m10");
    cs_cache_free(&c);
}

static void test_trim(void)
{
    cs_cache c;
    CHECK_EQ_I64(cs_cache_init(&c, 4), CS_OK);
    CHECK_EQ_SIZE(cs_cache_trim(&c, 10), 0); /* empty */
    CHECK_EQ_I64(c.max_evicted_id, 0);
    /* wrap the ring first: 1..6 into 4 slots keeps 3..6 */
    for (int64_t id = 1; id <= 6; id++)
        app(&c, id);
    CHECK_EQ_I64(c.max_evicted_id, 2);
    CHECK_EQ_SIZE(cs_cache_trim(&c, 2), 0); /* nothing at or below 2 left */
    CHECK_EQ_SIZE(cs_cache_trim(&c, 4), 2);
    static const int64_t left[] = {5, 6};
    CHECK(holds(&c, left, 2));
    CHECK_EQ_I64(c.max_evicted_id, 4);
    size_t first, count;
    CHECK(!cs_cache_after(&c, 3, &first, &count)); /* below the mark: a miss */
    CHECK(cs_cache_after(&c, 4, &first, &count));
    CHECK_EQ_SIZE(count, 2);
    /* appends after a trim go on in order; at or below the mark they are
     * refused */
    CHECK_EQ_I64(app(&c, 4), 0);
    CHECK_EQ_I64(app(&c, 7), 1);
    CHECK_EQ_SIZE(cs_cache_trim(&c, 100), 3);
    CHECK_EQ_SIZE(c.n, 0);
    CHECK_EQ_I64(c.max_evicted_id, 7);
    CHECK_EQ_I64(app(&c, 8), 1);
    static const int64_t last[] = {8};
    CHECK(holds(&c, last, 1));
    cs_cache_free(&c);
}

/* cs_cache_drop: what an edit removed leaves, in place, the rest keeps its
 * order, the eviction mark does not move. */
static void test_drop(void)
{
    cs_cache c;
    CHECK_EQ_I64(cs_cache_init(&c, 4), CS_OK);
    for (int64_t id = 1; id <= 6; id++) /* wraps: keeps 3..6 */
        app(&c, id);
    CHECK_EQ_SIZE(cs_cache_drop(&c, 3, 6), 2); /* 4 and 5 */
    static const int64_t left[] = {3, 6};
    CHECK(holds(&c, left, 2));
    CHECK_EQ_I64(c.max_evicted_id, 2);
    CHECK_EQ_SIZE(cs_cache_drop(&c, 6, 100), 0);
    CHECK_EQ_I64(app(&c, 8), 1);
    CHECK_EQ_I64(app(&c, 7), 1);
    static const int64_t more[] = {3, 6, 7, 8};
    CHECK(holds(&c, more, 4));
    CHECK_EQ_SIZE(cs_cache_drop(&c, 0, 100), 4);
    CHECK_EQ_SIZE(c.n, 0);
    cs_cache_free(&c);
}

int main(void)
{
    test_in_order();
    test_out_of_order();
    test_eviction();
    test_wrap_model();
    test_refcounts();
    test_trim();
    test_drop();
    return check_done("test_cache");
}
