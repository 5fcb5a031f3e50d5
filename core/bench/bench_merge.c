/* bench_merge.c - the merge alone: one subscription fed a fixed stream of
 * messages through a cache and an in-memory "DB" (no I/O), under three
 * arrival patterns, for every strategy. Prints a table: ns per delivered
 * message (median of several runs), DB passes per message, and the bytes the
 * delivered set holds at the end.
 *
 *   bench_merge [-n messages] [-r runs] [-c cache_size]
 *   bench_merge -n 100000 -s watermark -p seed -r 1    one cell (for callgrind:
 *     valgrind --tool=callgrind bench_merge -n 100000 -s watermark -p seed)
 *
 * Patterns (the order in which messages are published, each one cache
 * append + notification, right after its commit):
 *   inorder  ascending IDs;
 *   swap10   10% of neighbouring pairs published in swapped order;
 *   seed     the seed's shape: a two-message commit (a, b) published after
 *            the next message c: a, c, b (cache 5, 7, 6).
 * A message is in the "DB" once any message at or above it was published
 * (invariant 1: a chat's messages commit in ID order). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { PAT_INORDER, PAT_SWAP10, PAT_SEED, NPAT };
static const char *const pattern_names[] = {"inorder", "swap10", "seed"};

typedef struct kind {
    const char *name;
    cs_strategy strategy;
    bool ordered;
} kind;

static const kind kinds[] = {
    {"last_id", CS_STRATEGY_LAST_ID, false},
    {"rescan", CS_STRATEGY_RESCAN, false},
    {"watermark", CS_STRATEGY_WATERMARK, false},
    {"ordered", CS_STRATEGY_WATERMARK, true},
};
#define NKINDS (sizeof kinds / sizeof *kinds)

typedef struct db {
    cs_msg **msgs; /* message i has id 2 * (i + 1): IDs with holes */
    size_t n;
    size_t frontier; /* messages [0, frontier) are committed */
} db;

static size_t index_of(int64_t id)
{
    return (size_t)(id / 2) - 1;
}

static int db_query(void *ud, int64_t after, cs_msglist *out)
{
    db *d = ud;
    size_t i = after < 2 ? 0 : index_of(after) + 1;
    for (; i < d->frontier; i++)
        if (cs_msglist_push(out, cs_msg_ref(d->msgs[i])) < 0) {
            cs_msg_unref(d->msgs[i]);
            return CS_ENOMEM;
        }
    return CS_OK;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The publish order of n messages under pattern p (a fixed seed). */
static size_t *make_order(size_t n, int p)
{
    size_t *o = malloc(n * sizeof *o);
    if (!o)
        return NULL;
    for (size_t i = 0; i < n; i++)
        o[i] = i;
    uint64_t x = 0x9E3779B97F4A7C15ull;
    if (p == PAT_SWAP10) {
        for (size_t i = 0; i + 1 < n; i += 2) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            if (x % 10 == 0) {
                size_t t = o[i];
                o[i] = o[i + 1];
                o[i + 1] = t;
            }
        }
    } else if (p == PAT_SEED) {
        for (size_t i = 0; i + 2 < n; i += 3) {
            size_t t = o[i + 1]; /* a, b, c -> a, c, b */
            o[i + 1] = o[i + 2];
            o[i + 2] = t;
        }
    }
    return o;
}

typedef struct result {
    double seconds;
    int64_t delivered, db_passes, lost, dups;
    size_t set_bytes;
} result;

/* One run: returns its figures (and checks delivery: every message once). */
__attribute__((noinline)) static result run(db *d, const size_t *order,
                                            const kind *k, size_t cache_cap)
{
    result r = {0};
    cs_cache cache;
    cs_merge m;
    cs_merge_counts counts = {0};
    cs_msglist out = {0};
    unsigned char *seen = calloc(d->n, 1);
    if (!seen || cs_cache_init(&cache, cache_cap) < 0) {
        fprintf(stderr, "bench_merge: out of memory\n");
        exit(1);
    }
    cs_merge_init(&m, k->strategy, k->ordered, 0, &counts);
    cs_merge_source src = {&cache, db_query, d, 0};
    d->frontier = 0;
    double t0 = now();
    for (size_t j = 0; j < d->n; j++) {
        cs_msg *msg = d->msgs[order[j]];
        if (order[j] + 1 > d->frontier)
            d->frontier = order[j] + 1;
        cs_cache_append(&cache, msg);
        cs_merge_notify(&m, &src, msg->prev_id, msg->id, false, &out);
        for (size_t i = 0; i < out.n; i++) {
            size_t at = index_of(out.items[i]->id);
            if (seen[at]++)
                r.dups++;
        }
        r.delivered += (int64_t)out.n;
        cs_msglist_clear(&out);
    }
    r.seconds = now() - t0;
    for (size_t i = 0; i < d->n; i++)
        r.lost += seen[i] == 0;
    r.db_passes = counts.db_passes;
    r.set_bytes = cs_idset_bytes(&m.delivered);
    cs_msglist_free(&out);
    cs_merge_free(&m);
    cs_cache_free(&cache);
    free(seen);
    return r;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_merge [-n messages] [-r runs] [-c cache] "
                    "[-s strategy] [-p pattern]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    size_t n = 1000000, runs = 5, cache_cap = 256;
    const char *only_kind = NULL, *only_pat = NULL;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        const char *a = argv[i], *v = argv[++i];
        if (strcmp(a, "-n") == 0)
            n = strtoul(v, NULL, 10);
        else if (strcmp(a, "-r") == 0)
            runs = strtoul(v, NULL, 10);
        else if (strcmp(a, "-c") == 0)
            cache_cap = strtoul(v, NULL, 10);
        else if (strcmp(a, "-s") == 0)
            only_kind = v;
        else if (strcmp(a, "-p") == 0)
            only_pat = v;
        else
            usage();
    }
    if (n < 3 || runs < 1 || runs > 99 || cache_cap < 1)
        usage();
    db d = {calloc(n, sizeof(cs_msg *)), n, 0};
    if (!d.msgs)
        return 1;
    for (size_t i = 0; i < n; i++) {
        int64_t id = 2 * (int64_t)(i + 1);
        d.msgs[i] = cs_msg_new(id, 1, i ? id - 2 : 0, CS_ROLE_ASSISTANT,
                               "benchmark message", 17, NULL);
        if (!d.msgs[i])
            return 1;
    }
    printf("merge benchmark: %zu messages, cache %zu, median of %zu run(s)\n",
           n, cache_cap, runs);
    printf("%-9s %-10s %10s %12s %14s %6s %6s\n", "pattern", "strategy",
           "ns/msg", "passes/msg", "set bytes", "lost", "dups");
    int bad = 0;
    for (int p = 0; p < NPAT; p++) {
        if (only_pat && strcmp(only_pat, pattern_names[p]) != 0)
            continue;
        size_t *order = make_order(n, p);
        if (!order)
            return 1;
        for (size_t k = 0; k < NKINDS; k++) {
            if (only_kind && strcmp(only_kind, kinds[k].name) != 0)
                continue;
            double *ns = calloc(runs, sizeof *ns);
            result r = run(&d, order, &kinds[k], cache_cap); /* warm-up */
            for (size_t i = 0; i < runs; i++) {
                r = run(&d, order, &kinds[k], cache_cap);
                ns[i] = r.delivered ? r.seconds * 1e9 / (double)r.delivered : 0;
            }
            qsort(ns, runs, sizeof *ns, cmp_double);
            printf("%-9s %-10s %10.1f %12.4f %14zu %6lld %6lld\n",
                   pattern_names[p], kinds[k].name, ns[runs / 2],
                   (double)r.db_passes / (double)n, r.set_bytes,
                   (long long)r.lost, (long long)r.dups);
            /* Only last_id may lose; nothing may come twice. */
            if (r.dups || (r.lost && kinds[k].strategy != CS_STRATEGY_LAST_ID))
                bad = 1;
            free(ns);
        }
        free(order);
    }
    for (size_t i = 0; i < n; i++)
        cs_msg_unref(d.msgs[i]);
    free(d.msgs);
    if (bad)
        fprintf(stderr, "bench_merge: a lossless strategy lost or "
                        "duplicated messages\n");
    return bad;
}
