/* test_idset.c - unit tests of the delivered set (watermark + sorted ids). */
#include "check.h"
#include "internal.h"

#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* The array above the watermark is sorted, unique and all > watermark. */
static int well_formed(const cs_idset *s)
{
    for (size_t i = 0; i < s->n; i++) {
        if (s->ids[i] <= s->watermark)
            return 0;
        if (i > 0 && s->ids[i - 1] >= s->ids[i])
            return 0;
    }
    return s->n <= s->cap;
}

static void test_init(void)
{
    cs_idset s;
    cs_idset_init(&s, 10);
    CHECK_EQ_I64(s.watermark, 10);
    CHECK_EQ_SIZE(cs_idset_count(&s), 0);
    CHECK_EQ_SIZE(cs_idset_bytes(&s), 0);
    CHECK(cs_idset_has(&s, 0));
    CHECK(cs_idset_has(&s, 10));
    CHECK(cs_idset_has(&s, -5));
    CHECK(!cs_idset_has(&s, 11));
    CHECK(!cs_idset_has(&s, INT64_MAX));
    cs_idset_free(&s);
    cs_idset_free(&s); /* twice is fine */
    CHECK_EQ_SIZE(cs_idset_count(&s), 0);
}

static void test_add_has(void)
{
    cs_idset s;
    cs_idset_init(&s, 5);
    /* ids <= watermark are already present */
    CHECK_EQ_I64(cs_idset_add(&s, 5), 0);
    CHECK_EQ_I64(cs_idset_add(&s, 1), 0);
    CHECK_EQ_I64(cs_idset_add(&s, 0), 0);
    CHECK_EQ_SIZE(cs_idset_count(&s), 0);

    CHECK_EQ_I64(cs_idset_add(&s, 9), 1);
    CHECK_EQ_I64(cs_idset_add(&s, 7), 1);
    CHECK_EQ_I64(cs_idset_add(&s, 12), 1);
    CHECK_EQ_I64(cs_idset_add(&s, 6), 1);
    CHECK_EQ_I64(cs_idset_add(&s, 8), 1);
    /* duplicates */
    CHECK_EQ_I64(cs_idset_add(&s, 9), 0);
    CHECK_EQ_I64(cs_idset_add(&s, 6), 0);
    CHECK_EQ_I64(cs_idset_add(&s, 12), 0);
    CHECK_EQ_SIZE(cs_idset_count(&s), 5);
    CHECK(well_formed(&s));
    /* sorted despite out-of-order adds */
    static const int64_t want[] = {6, 7, 8, 9, 12};
    for (size_t i = 0; i < 5; i++)
        CHECK_EQ_I64(s.ids[i], want[i]);

    CHECK(cs_idset_has(&s, 6));
    CHECK(cs_idset_has(&s, 9));
    CHECK(cs_idset_has(&s, 12));
    CHECK(!cs_idset_has(&s, 10));
    CHECK(!cs_idset_has(&s, 11));
    CHECK(!cs_idset_has(&s, 13));
    CHECK(!cs_idset_has(&s, INT64_MAX));
    CHECK(cs_idset_has(&s, 3));
    CHECK(cs_idset_bytes(&s) >= 5 * sizeof(int64_t));

    /* extremes */
    CHECK_EQ_I64(cs_idset_add(&s, INT64_MAX), 1);
    CHECK(cs_idset_has(&s, INT64_MAX));
    CHECK_EQ_I64(cs_idset_add(&s, INT64_MAX), 0);
    CHECK_EQ_SIZE(cs_idset_count(&s), 6);
    cs_idset_free(&s);

    /* a negative watermark (not used by the core, but well defined) */
    cs_idset_init(&s, -3);
    CHECK_EQ_I64(cs_idset_add(&s, -2), 1);
    CHECK_EQ_I64(cs_idset_add(&s, -3), 0);
    CHECK(cs_idset_has(&s, -2));
    CHECK(!cs_idset_has(&s, -1));
    cs_idset_free(&s);
}

static void test_advance(void)
{
    cs_idset s;
    cs_idset_init(&s, 0);
    for (int64_t id = 2; id <= 20; id += 2)
        CHECK_EQ_I64(cs_idset_add(&s, id), 1);
    CHECK_EQ_SIZE(cs_idset_count(&s), 10);

    cs_idset_advance(&s, 7); /* drops 2,4,6 */
    CHECK_EQ_I64(s.watermark, 7);
    CHECK_EQ_SIZE(cs_idset_count(&s), 7);
    CHECK_EQ_I64(s.ids[0], 8);
    CHECK(well_formed(&s));
    CHECK(cs_idset_has(&s, 7));
    CHECK(cs_idset_has(&s, 5)); /* below W: present */
    CHECK(!cs_idset_has(&s, 9));
    CHECK_EQ_I64(cs_idset_add(&s, 3), 0);

    cs_idset_advance(&s, 8); /* exactly an element: drops it */
    CHECK_EQ_I64(s.watermark, 8);
    CHECK_EQ_SIZE(cs_idset_count(&s), 6);
    CHECK_EQ_I64(s.ids[0], 10);

    /* never lowers */
    cs_idset_advance(&s, 3);
    CHECK_EQ_I64(s.watermark, 8);
    CHECK_EQ_SIZE(cs_idset_count(&s), 6);
    cs_idset_advance(&s, 8);
    CHECK_EQ_I64(s.watermark, 8);
    CHECK_EQ_SIZE(cs_idset_count(&s), 6);
    cs_idset_advance(&s, INT64_MIN);
    CHECK_EQ_I64(s.watermark, 8);

    /* advance past everything */
    cs_idset_advance(&s, 100);
    CHECK_EQ_SIZE(cs_idset_count(&s), 0);
    CHECK(cs_idset_has(&s, 20));
    CHECK(!cs_idset_has(&s, 101));
    CHECK_EQ_I64(cs_idset_add(&s, 101), 1);
    CHECK_EQ_I64(cs_idset_add(&s, 50), 0);

    /* INT64_MAX: everything present, nothing held */
    CHECK_EQ_I64(cs_idset_add(&s, INT64_MAX - 1), 1);
    CHECK_EQ_I64(cs_idset_add(&s, INT64_MAX), 1);
    cs_idset_advance(&s, INT64_MAX);
    CHECK_EQ_I64(s.watermark, INT64_MAX);
    CHECK_EQ_SIZE(cs_idset_count(&s), 0);
    CHECK(cs_idset_has(&s, INT64_MAX));
    CHECK(cs_idset_has(&s, 0));
    CHECK_EQ_I64(cs_idset_add(&s, INT64_MAX), 0);
    cs_idset_advance(&s, 5);
    CHECK_EQ_I64(s.watermark, INT64_MAX);
    cs_idset_free(&s);

    /* advance to INT64_MAX - 1 keeps INT64_MAX */
    cs_idset_init(&s, 0);
    CHECK_EQ_I64(cs_idset_add(&s, INT64_MAX), 1);
    CHECK_EQ_I64(cs_idset_add(&s, INT64_MAX - 1), 1);
    cs_idset_advance(&s, INT64_MAX - 1);
    CHECK_EQ_SIZE(cs_idset_count(&s), 1);
    CHECK_EQ_I64(s.ids[0], INT64_MAX);
    cs_idset_free(&s);
}

/* Advance on a set that never held an id. Run in a child process so that a
 * sanitizer abort there is reported as one failed check here. */
static void test_advance_empty(void)
{
    /* Regression: advancing a set whose array was never allocated once
     * passed NULL to memmove, which UBSan reports; in the sanitizer build a
     * return of that bug kills the child and fails this check. */
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        cs_idset s;
        cs_idset_init(&s, 0);
        cs_idset_advance(&s, 42);
        int ok = s.watermark == 42 && cs_idset_count(&s) == 0 &&
                 cs_idset_bytes(&s) == 0 && cs_idset_has(&s, 42) &&
                 !cs_idset_has(&s, 43);
        cs_idset_free(&s);
        _exit(ok ? 0 : 2);
    }
    CHECK(pid > 0);
    int status = -1;
    if (pid > 0)
        CHECK_EQ_I64(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ_I64(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 0);
}

static void test_memory(void)
{
    cs_idset s;
    cs_idset_init(&s, 0);
    /* a gap at 1 keeps 2..10001 above W */
    int added = 0;
    for (int64_t id = 10001; id >= 2; id--)
        added += cs_idset_add(&s, id) == 1;
    CHECK_EQ_I64(added, 10000);
    CHECK_EQ_SIZE(cs_idset_count(&s), 10000);
    size_t big = cs_idset_bytes(&s);
    CHECK(big >= 10000 * sizeof(int64_t));
    CHECK(well_formed(&s));

    /* the gap closes: the window is nearly empty, memory goes back */
    cs_idset_advance(&s, 9995);
    CHECK_EQ_SIZE(cs_idset_count(&s), 6);
    CHECK_EQ_I64(s.ids[0], 9996);
    CHECK_EQ_I64(s.ids[5], 10001);
    size_t after1 = cs_idset_bytes(&s);
    CHECK(after1 < big);
    /* repeated advances keep shrinking towards a small size */
    for (int64_t w = 9996; w <= 10001; w++)
        cs_idset_advance(&s, w);
    for (int i = 0; i < 20; i++)
        cs_idset_advance(&s, 10001 + i);
    CHECK_EQ_SIZE(cs_idset_count(&s), 0);
    CHECK(cs_idset_bytes(&s) < after1);
    CHECK(cs_idset_bytes(&s) <= 128 * sizeof(int64_t));
    /* still usable */
    CHECK_EQ_I64(cs_idset_add(&s, 20000), 1);
    CHECK(cs_idset_has(&s, 20000));
    CHECK(!cs_idset_has(&s, 19999));
    CHECK(cs_idset_has(&s, 10020));
    cs_idset_free(&s);
    CHECK_EQ_SIZE(cs_idset_bytes(&s), 0);
}

/* A naive reference: a bitmap over a small id range plus a watermark. */
#define REF_RANGE 2000

typedef struct ref_set {
    int64_t w;
    unsigned char in[REF_RANGE];
} ref_set;

static int ref_add(ref_set *r, int64_t id)
{
    if (id <= r->w || r->in[id])
        return 0;
    r->in[id] = 1;
    return 1;
}

static int ref_has(const ref_set *r, int64_t id)
{
    return id <= r->w || r->in[id];
}

static void ref_advance(ref_set *r, int64_t w)
{
    if (w <= r->w)
        return;
    for (int64_t i = 0; i < REF_RANGE && i <= w; i++)
        r->in[i] = 0;
    r->w = w;
}

static size_t ref_count(const ref_set *r)
{
    size_t n = 0;
    for (int64_t i = 0; i < REF_RANGE; i++)
        n += r->in[i] && i > r->w;
    return n;
}

static void test_random(void)
{
    static const uint64_t seeds[] = {1, 42, 0xDEADBEEF, 12345678901ull, 7};
    for (size_t k = 0; k < sizeof seeds / sizeof *seeds; k++) {
        check_rng rng = {seeds[k]};
        cs_idset s;
        ref_set r;
        memset(&r, 0, sizeof r);
        cs_idset_init(&s, 0);
        /* start non-empty: the empty-set advance is test_advance_empty's */
        CHECK_EQ_I64(cs_idset_add(&s, 1), 1);
        ref_add(&r, 1);
        int mismatches = 0, bad_shape = 0, bad_count = 0;
        for (int step = 0; step < 3000; step++) {
            uint64_t op = check_below(&rng, 100);
            if (op < 70) {
                /* mostly near the watermark, like an out-of-order window */
                int64_t id = r.w + 1 + (int64_t)check_below(&rng, 40);
                if (check_below(&rng, 10) == 0)
                    id = (int64_t)check_below(&rng, REF_RANGE - 1);
                if (id >= REF_RANGE)
                    id = REF_RANGE - 1;
                if (cs_idset_add(&s, id) != ref_add(&r, id))
                    mismatches++;
            } else if (op < 80) {
                int64_t w = r.w + (int64_t)check_below(&rng, 12) - 3;
                if (w >= REF_RANGE)
                    w = REF_RANGE - 1;
                cs_idset_advance(&s, w);
                ref_advance(&r, w);
            } else {
                int64_t id = (int64_t)check_below(&rng, REF_RANGE);
                if (cs_idset_has(&s, id) != (ref_has(&r, id) != 0))
                    mismatches++;
            }
            if (!well_formed(&s) || s.watermark != r.w)
                bad_shape++;
            if (cs_idset_count(&s) != ref_count(&r))
                bad_count++;
        }
        /* a full sweep at the end */
        for (int64_t id = -2; id < REF_RANGE; id++)
            if (cs_idset_has(&s, id) != (ref_has(&r, id) != 0))
                mismatches++;
        CHECK_EQ_I64(mismatches, 0);
        CHECK_EQ_I64(bad_shape, 0);
        CHECK_EQ_I64(bad_count, 0);
        CHECK(r.w > 100); /* the run did move the watermark */
        cs_idset_free(&s);
    }
}

/* Remove: only ids held above the watermark; the order stays sorted. */
static void test_remove(void)
{
    cs_idset s;
    cs_idset_init(&s, INT64_MIN);
    CHECK_EQ_I64(cs_idset_remove(&s, 5), 0); /* empty, never allocated */
    int64_t in[] = {7, 3, 9, 1, 5};
    for (size_t i = 0; i < 5; i++)
        CHECK_EQ_I64(cs_idset_add(&s, in[i]), 1);
    CHECK_EQ_I64(cs_idset_remove(&s, 4), 0);
    CHECK_EQ_I64(cs_idset_remove(&s, 5), 1);
    CHECK_EQ_I64(cs_idset_remove(&s, 5), 0);
    CHECK(!cs_idset_has(&s, 5));
    CHECK_EQ_I64(cs_idset_remove(&s, 9), 1); /* the last */
    CHECK_EQ_I64(cs_idset_remove(&s, 1), 1); /* the first */
    CHECK_EQ_SIZE(cs_idset_count(&s), 2);
    CHECK_EQ_I64(s.ids[0], 3);
    CHECK_EQ_I64(s.ids[1], 7);
    cs_idset_advance(&s, 3);
    CHECK_EQ_I64(cs_idset_remove(&s, 3), 0); /* at the watermark: stays */
    CHECK(cs_idset_has(&s, 3));
    CHECK_EQ_I64(cs_idset_remove(&s, 7), 1);
    CHECK_EQ_SIZE(cs_idset_count(&s), 0);
    cs_idset_free(&s);
}

/* cs_idset_cut: an edit's cut forgets everything above it. */
static void test_cut(void)
{
    cs_idset s;
    cs_idset_init(&s, 10);
    CHECK_EQ_I64(cs_idset_add(&s, 12), 1);
    CHECK_EQ_I64(cs_idset_add(&s, 15), 1);
    CHECK_EQ_I64(cs_idset_add(&s, 20), 1);
    cs_idset_cut(&s, 15); /* above W: the ids above go */
    CHECK_EQ_I64(s.watermark, 10);
    CHECK_EQ_SIZE(cs_idset_count(&s), 2);
    CHECK(cs_idset_has(&s, 15));
    CHECK(!cs_idset_has(&s, 20));
    cs_idset_cut(&s, 7); /* below W: W goes down, nothing is held */
    CHECK_EQ_I64(s.watermark, 7);
    CHECK_EQ_SIZE(cs_idset_count(&s), 0);
    CHECK(!cs_idset_has(&s, 8));
    CHECK(cs_idset_has(&s, 7));
    CHECK_EQ_I64(cs_idset_add(&s, 9), 1); /* and it goes on from there */
    cs_idset_advance(&s, 9);
    CHECK_EQ_I64(s.watermark, 9);
    CHECK(!cs_idset_any_in(&s, 0, 100)); /* empty */
    CHECK_EQ_I64(cs_idset_add(&s, 12), 1);
    CHECK_EQ_I64(cs_idset_add(&s, 20), 1);
    CHECK(cs_idset_any_in(&s, 9, 13));
    CHECK(!cs_idset_any_in(&s, 12, 20)); /* both ends excluded */
    CHECK(cs_idset_any_in(&s, 12, 21));
    CHECK(!cs_idset_any_in(&s, 20, 100));
    CHECK(!cs_idset_any_in(&s, 5, 6));
    cs_idset_free(&s);
}

int main(void)
{
    test_advance_empty(); /* first: the child inherits no heap */
    test_init();
    test_add_has();
    test_advance();
    test_memory();
    test_random();
    test_remove();
    test_cut();
    return check_done("test_idset");
}
