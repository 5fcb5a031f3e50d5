/* check.h - a tiny assertion kit for the C unit tests: count, report, exit
 * code. */
#ifndef CS_CHECK_H
#define CS_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int check_passed, check_failed;

static inline void check_report(int ok, const char *file, int line,
                                const char *what)
{
    if (ok) {
        check_passed++;
    } else {
        check_failed++;
        fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what);
    }
}

#define CHECK(cond) check_report((cond) ? 1 : 0, __FILE__, __LINE__, #cond)

#define CHECK_EQ_I64(a, b)                                                     \
    do {                                                                       \
        long long check_a_ = (long long)(a), check_b_ = (long long)(b);        \
        check_report(check_a_ == check_b_, __FILE__, __LINE__, #a " == " #b);  \
        if (check_a_ != check_b_)                                              \
            fprintf(stderr, "    %lld != %lld\n", check_a_, check_b_);         \
    } while (0)

#define CHECK_EQ_SIZE(a, b)                                                    \
    do {                                                                       \
        size_t check_a_ = (size_t)(a), check_b_ = (size_t)(b);                 \
        check_report(check_a_ == check_b_, __FILE__, __LINE__, #a " == " #b);  \
        if (check_a_ != check_b_)                                              \
            fprintf(stderr, "    %zu != %zu\n", check_a_, check_b_);           \
    } while (0)

#define CHECK_EQ_STR(a, b)                                                     \
    do {                                                                       \
        const char *check_a_ = (a), *check_b_ = (b);                           \
        int check_ok_ =                                                        \
            check_a_ && check_b_ && strcmp(check_a_, check_b_) == 0;           \
        check_report(check_ok_, __FILE__, __LINE__, #a " == " #b);             \
        if (!check_ok_)                                                        \
            fprintf(stderr, "    \"%s\" != \"%s\"\n",                          \
                    check_a_ ? check_a_ : "(null)",                            \
                    check_b_ ? check_b_ : "(null)");                           \
    } while (0)

/* Compares n bytes at a with the NUL-terminated string b (length included). */
#define CHECK_EQ_MEM(a, n, b)                                                  \
    do {                                                                       \
        const char *check_a_ = (a), *check_b_ = (b);                           \
        size_t check_n_ = (size_t)(n);                                         \
        int check_ok_ = check_a_ && strlen(check_b_) == check_n_ &&            \
                        memcmp(check_a_, check_b_, check_n_) == 0;             \
        check_report(check_ok_, __FILE__, __LINE__, #a " == " #b);             \
        if (!check_ok_)                                                        \
            fprintf(stderr, "    \"%.*s\" != \"%s\"\n",                        \
                    check_a_ ? (int)check_n_ : 0, check_a_ ? check_a_ : "",    \
                    check_b_);                                                 \
    } while (0)

/* Prints the one summary line CI looks for; the exit status of main. */
static inline int check_done(const char *name)
{
    printf("%s: %d passed, %d failed\n", name, check_passed, check_failed);
    fflush(stdout);
    return check_failed ? 1 : 0;
}

/* A deterministic PRNG (xorshift64*), independent of libc's rand(). */
typedef struct check_rng {
    uint64_t s;
} check_rng;

static inline uint64_t check_rand(check_rng *r)
{
    uint64_t x = r->s ? r->s : 0x9E3779B97F4A7C15ull;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* Uniform-ish in [0, n); n > 0. */
static inline uint64_t check_below(check_rng *r, uint64_t n)
{
    return check_rand(r) % n;
}

#endif
