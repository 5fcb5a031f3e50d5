/* test_payload.c - unit tests of the notification payload codec and id parser.
 */
#include "check.h"
#include "internal.h"

#include <stdlib.h>

/* The result of a parse, copied out of the (freed) input buffer. */
typedef struct parsed {
    int rc;
    cs_hint h;
    char text[CS_PAYLOAD_MAX + 1];
    char tool[CS_PAYLOAD_MAX + 1];
    char error[CS_ERROR_MAX + 1];
    int in_bounds; /* h.text (and h.tool, h.error) lay inside the input */
} parsed;

/* Parses len bytes of s from an exactly-sized heap copy, no terminator, so
 * ASan/valgrind catch any read past the end. */
static void parse_exact(const void *s, size_t len, parsed *out)
{
    char *buf = malloc(len); /* malloc(0): a zero-sized block (or NULL) */
    if (len)
        memcpy(buf, s, len);
    memset(out, 0, sizeof *out);
    out->rc = cs_payload_parse(buf, len, &out->h);
    out->in_bounds = 1;
    if (out->rc == CS_OK && out->h.text) {
        out->in_bounds = out->h.text >= buf && out->h.text_len <= len &&
                         (size_t)(out->h.text - buf) <= len - out->h.text_len;
        if (out->in_bounds && out->h.text_len <= CS_PAYLOAD_MAX)
            memcpy(out->text, out->h.text, out->h.text_len);
        out->h.text = out->text;
    }
    if (out->rc == CS_OK && out->h.tool) {
        bool in = out->h.tool >= buf && out->h.tool_len <= len &&
                  (size_t)(out->h.tool - buf) <= len - out->h.tool_len;
        if (in && out->h.tool_len <= CS_PAYLOAD_MAX)
            memcpy(out->tool, out->h.tool, out->h.tool_len);
        out->in_bounds = out->in_bounds && in;
        out->h.tool = out->tool;
    }
    if (out->rc == CS_OK && out->h.error) {
        bool in = out->h.error >= buf && out->h.error_len <= len &&
                  (size_t)(out->h.error - buf) <= len - out->h.error_len;
        if (in && out->h.error_len <= CS_ERROR_MAX)
            memcpy(out->error, out->h.error, out->h.error_len);
        out->in_bounds = out->in_bounds && in;
        out->h.error = out->error;
    }
    free(buf);
}

static int parse_rc(const char *s)
{
    parsed p;
    parse_exact(s, strlen(s), &p);
    return p.rc;
}

/* How many of the n payloads parse (each should be refused); names them. */
static int accepted(const char *const *bad, size_t n)
{
    int wrong = 0;
    for (size_t i = 0; i < n; i++) {
        int rc = parse_rc(bad[i]);
        if (rc != CS_EPROTO) {
            wrong++;
            fprintf(stderr, "accepted: \"%s\" (rc %d)\n", bad[i], rc);
        }
    }
    return wrong;
}

static bool id_exact(const char *s, size_t len, int64_t *out)
{
    char *buf = malloc(len ? len : 1);
    if (len)
        memcpy(buf, s, len);
    bool ok = cs_parse_id(buf, len, out);
    free(buf);
    return ok;
}

static void test_parse_id(void)
{
    int64_t v = -1;
    CHECK(id_exact("0", 1, &v));
    CHECK_EQ_I64(v, 0);
    CHECK(id_exact("7", 1, &v));
    CHECK_EQ_I64(v, 7);
    CHECK(id_exact("1234567890", 10, &v));
    CHECK_EQ_I64(v, 1234567890);
    CHECK(id_exact("9223372036854775807", 19, &v));
    CHECK_EQ_I64(v, INT64_MAX);
    CHECK(id_exact("9223372036854775806", 19, &v));
    CHECK_EQ_I64(v, INT64_MAX - 1);
    CHECK(id_exact("1000000000000000000", 19, &v));
    CHECK_EQ_I64(v, 1000000000000000000LL);
    CHECK(id_exact("123", 2, &v)); /* only len bytes count */
    CHECK_EQ_I64(v, 12);

    v = 55;
    CHECK(!id_exact("", 0, &v));
    CHECK(!id_exact("9223372036854775808", 19, &v));
    CHECK(!id_exact("9999999999999999999", 19, &v));
    CHECK(!id_exact("10000000000000000000", 20, &v));
    CHECK(!id_exact("00", 2, &v));
    CHECK(!id_exact("01", 2, &v));
    CHECK(!id_exact("-1", 2, &v));
    CHECK(!id_exact("+1", 2, &v));
    CHECK(!id_exact(" 1", 2, &v));
    CHECK(!id_exact("1 ", 2, &v));
    CHECK(!id_exact("1a", 2, &v));
    CHECK(!id_exact("1:", 2, &v));
    CHECK(!id_exact("1\0", 2, &v));
    CHECK(!id_exact("/", 1, &v));
    CHECK(!id_exact(":", 1, &v));
    CHECK_EQ_I64(v, 55); /* untouched on failure */
}

/* Encodes h (which must give exactly want), parses the result back into p
 * and checks it is a message hint with h's ids. */
static void encode_parse_msg(const cs_hint *h, const char *want, parsed *p)
{
    char buf[CS_PAYLOAD_MAX + 1];
    int n = cs_payload_encode(h, buf, sizeof buf);
    CHECK_EQ_I64(n, (int64_t)strlen(want));
    CHECK_EQ_STR(buf, want);
    parse_exact(buf, (size_t)(n > 0 ? n : 0), p);
    CHECK_EQ_I64(p->rc, CS_OK);
    CHECK_EQ_I64(p->h.kind, CS_HINT_MESSAGE);
    CHECK_EQ_I64(p->h.after, h->after);
    CHECK_EQ_I64(p->h.id, h->id);
}

static void roundtrip_msg(int64_t after, int64_t id, const char *want)
{
    cs_hint h = {.kind = CS_HINT_MESSAGE, .after = after, .id = id};
    parsed p;
    encode_parse_msg(&h, want, &p);
    CHECK(!p.h.body);
}

static void test_roundtrip(void)
{
    char buf[CS_PAYLOAD_MAX + 1];
    parsed p;
    int n;

    roundtrip_msg(0, 1, "1:m:0:1");
    roundtrip_msg(4, 5, "1:m:4:5");
    roundtrip_msg(41, 1000, "1:m:41:1000");
    roundtrip_msg(INT64_MAX - 1, INT64_MAX,
                  "1:m:9223372036854775806:9223372036854775807");

    static const char *const names[] = {
        "waiting",   "pending", "running",        "paused",
        "completed", "error",   "requires_action"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        cs_hint h = {.kind = CS_HINT_STATUS,
                     .version = (int64_t)i * 1000,
                     .text = names[i],
                     .text_len = strlen(names[i])};
        char want[64];
        snprintf(want, sizeof want, "1:s:%lld:%s", (long long)i * 1000,
                 names[i]);
        n = cs_payload_encode(&h, buf, sizeof buf);
        CHECK_EQ_I64(n, (int64_t)strlen(want));
        CHECK_EQ_STR(buf, want);
        parse_exact(buf, strlen(want), &p);
        CHECK_EQ_I64(p.rc, CS_OK);
        CHECK_EQ_I64(p.h.kind, CS_HINT_STATUS);
        CHECK_EQ_I64(p.h.version, (int64_t)i * 1000);
        CHECK_EQ_MEM(p.h.text, p.h.text_len, names[i]);
        CHECK(p.in_bounds);
    }
    /* status with the largest version */
    cs_hint hs = {.kind = CS_HINT_STATUS,
                  .version = INT64_MAX,
                  .text = "paused",
                  .text_len = 6};
    n = cs_payload_encode(&hs, buf, sizeof buf);
    CHECK_EQ_STR(buf, "1:s:9223372036854775807:paused");
    parse_exact(buf, (size_t)n, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_I64(p.h.version, INT64_MAX);
    CHECK_EQ_I64(p.h.error_len, 0);

    /* an error status with the error it recorded (colons in it too) */
    cs_hint he = {.kind = CS_HINT_STATUS,
                  .version = 7,
                  .text = "error",
                  .text_len = 5,
                  .error = "timeout: 30 s",
                  .error_len = 13};
    n = cs_payload_encode(&he, buf, sizeof buf);
    CHECK_EQ_STR(buf, "1:s:7:error::timeout: 30 s");
    parse_exact(buf, (size_t)n, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_MEM(p.h.text, p.h.text_len, "error");
    CHECK_EQ_MEM(p.h.error, p.h.error_len, "timeout: 30 s");
    CHECK(p.in_bounds);
    CHECK(!p.h.archived);
    he.archived = true; /* and archived */
    n = cs_payload_encode(&he, buf, sizeof buf);
    CHECK_EQ_STR(buf, "1:s:7:error:a:timeout: 30 s");
    parse_exact(buf, (size_t)n, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK(p.h.archived);
    CHECK_EQ_MEM(p.h.error, p.h.error_len, "timeout: 30 s");
    cs_hint ha = {.kind = CS_HINT_STATUS,
                  .version = 8,
                  .text = "waiting",
                  .text_len = 7,
                  .archived = true};
    n = cs_payload_encode(&ha, buf, sizeof buf);
    CHECK_EQ_STR(buf, "1:s:8:waiting:a");
    parse_exact(buf, (size_t)n, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK(p.h.archived);
    CHECK_EQ_I64(p.h.error_len, 0);
    he.error_len = CS_ERROR_MAX + 1; /* too long: refused */
    CHECK_EQ_I64(cs_payload_encode(&he, buf, sizeof buf), CS_EINVAL);

    cs_hint hq = {.kind = CS_HINT_QUEUE};
    n = cs_payload_encode(&hq, buf, sizeof buf);
    CHECK_EQ_I64(n, 3);
    CHECK_EQ_STR(buf, "1:q");
    parse_exact(buf, 3, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_I64(p.h.kind, CS_HINT_QUEUE);
    CHECK(p.h.text == NULL);

    static const char *const parts[] = {"",      "x",       "hello, world",
                                        "a:b:c", "1:m:4:5", " spaced \t"};
    for (size_t i = 0; i < sizeof parts / sizeof *parts; i++) {
        cs_hint h = {.kind = CS_HINT_PART,
                     .after = 7,
                     .id = 3,
                     .text = parts[i],
                     .text_len = strlen(parts[i])};
        n = cs_payload_encode(&h, buf, sizeof buf);
        CHECK_EQ_I64(n, 8 + (int64_t)strlen(parts[i]));
        CHECK(strncmp(buf, "1:p:7:3:", 8) == 0);
        parse_exact(buf, (size_t)(n > 0 ? n : 0), &p);
        CHECK_EQ_I64(p.rc, CS_OK);
        CHECK_EQ_I64(p.h.kind, CS_HINT_PART);
        CHECK_EQ_I64(p.h.after, 7);
        CHECK_EQ_I64(p.h.id, 3);
        CHECK_EQ_MEM(p.h.text, p.h.text_len, parts[i]);
        CHECK(p.in_bounds);
    }
    /* the largest part that fits */
    size_t big = CS_PAYLOAD_MAX - 8; /* "1:p:0:1:" */
    char *text = malloc(big + 1);
    memset(text, 'z', big);
    text[big] = '\0';
    cs_hint hp = {.kind = CS_HINT_PART, .id = 1, .text = text, .text_len = big};
    n = cs_payload_encode(&hp, buf, sizeof buf);
    CHECK_EQ_I64(n, CS_PAYLOAD_MAX);
    parse_exact(buf, (size_t)(n > 0 ? n : 0), &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_SIZE(p.h.text_len, big);
    CHECK(p.in_bounds);
    /* one byte more does not fit */
    hp.text_len = big + 1;
    char *text2 = malloc(big + 2);
    memset(text2, 'z', big + 1);
    text2[big + 1] = '\0';
    hp.text = text2;
    CHECK_EQ_I64(cs_payload_encode(&hp, buf, sizeof buf), CS_EINVAL);
    free(text);
    free(text2);

    /* Part text with an embedded NUL: the payload is NUL-terminated text, so
     * the encoder must refuse it (CS_EINVAL) or carry it whole. */
    cs_hint hn = {.kind = CS_HINT_PART, .id = 1, .text = "a\0b", .text_len = 3};
    n = cs_payload_encode(&hn, buf, sizeof buf);
    CHECK_EQ_I64(n, CS_EINVAL);
}

static void test_encode_errors(void)
{
    char buf[64];
    cs_hint h = {.kind = CS_HINT_MESSAGE, .after = -1, .id = 5};
    CHECK_EQ_I64(cs_payload_encode(&h, buf, sizeof buf), CS_EINVAL);
    h.after = 5;
    CHECK_EQ_I64(cs_payload_encode(&h, buf, sizeof buf), CS_EINVAL);
    h.after = 6;
    CHECK_EQ_I64(cs_payload_encode(&h, buf, sizeof buf), CS_EINVAL);
    h.after = 4;
    CHECK_EQ_I64(cs_payload_encode(&h, buf, sizeof buf), 7);
    /* does not fit cap: "1:m:4:5" needs 8 bytes with the NUL */
    CHECK_EQ_I64(cs_payload_encode(&h, buf, 7), CS_EINVAL);
    CHECK_EQ_I64(cs_payload_encode(&h, buf, 8), 7);
    CHECK_EQ_I64(cs_payload_encode(&h, buf, 0), CS_EINVAL);

    cs_hint s = {
        .kind = CS_HINT_STATUS, .version = 1, .text = "bogus", .text_len = 5};
    CHECK_EQ_I64(cs_payload_encode(&s, buf, sizeof buf), CS_EINVAL);
    s.text = "running";
    s.text_len = 6; /* "runnin" */
    CHECK_EQ_I64(cs_payload_encode(&s, buf, sizeof buf), CS_EINVAL);
    s.text_len = 7;
    s.version = -1;
    CHECK_EQ_I64(cs_payload_encode(&s, buf, sizeof buf), CS_EINVAL);
    s.version = 1;
    s.text = NULL;
    CHECK_EQ_I64(cs_payload_encode(&s, buf, sizeof buf), CS_EINVAL);

    cs_hint p = {.kind = CS_HINT_PART, .id = 1, .text = NULL, .text_len = 0};
    CHECK_EQ_I64(cs_payload_encode(&p, buf, sizeof buf), CS_EINVAL);
    p.text = "0123456789012345678901234567890123456789012345678901234567890";
    p.text_len = 56; /* "1:p:0:1:" + 56 does not fit 64 */
    CHECK_EQ_I64(cs_payload_encode(&p, buf, sizeof buf), CS_EINVAL);
    p.after = -1;
    p.text_len = 55;
    CHECK_EQ_I64(cs_payload_encode(&p, buf, sizeof buf), CS_EINVAL);
    p.after = 0;
    p.id = 0; /* a part has a seq */
    CHECK_EQ_I64(cs_payload_encode(&p, buf, sizeof buf), CS_EINVAL);
    p.id = 1; /* 63 fits */
    CHECK_EQ_I64(cs_payload_encode(&p, buf, sizeof buf), 63);

    cs_hint bad = {.kind = (cs_hint_kind)0};
    CHECK_EQ_I64(cs_payload_encode(&bad, buf, sizeof buf), CS_EINVAL);
    bad.kind = (cs_hint_kind)9;
    CHECK_EQ_I64(cs_payload_encode(&bad, buf, sizeof buf), CS_EINVAL);
}

static void test_reject(void)
{
    static const char *const bad[] = {
        /* version */
        "2:m:1:2",
        "0:m:1:2",
        "11:m:1:2",
        "x:m:1:2",
        ":m:1:2",
        /* kind */
        "1:x:1:2",
        "1:M:1:2",
        "1:mm:1:2",
        "1::1:2",
        "1:z",
        "1:1",
        /* missing fields */
        "1:m",
        "1:m:",
        "1:m:1",
        "1:m:1:",
        "1:m::2",
        "1:m::",
        "1:s",
        "1:s:",
        "1:s:1",
        "1:s:1:",
        "1:s::running",
        "1:p",
        "1:q:",
        "1:qq",
        "1:q:x",
        "1:mx1:2",
        "1;m:1:2",
        "1:m;1:2",
        "1:m:1;2",
        /* extra fields */
        "1:m:1:2:3",
        "1:m:1:2:",
        "1:s:1:running:x",
        "1:s:1:running:",
        /* leading zeros */
        "1:m:01:2",
        "1:m:1:02",
        "1:m:00:2",
        "1:m:0:01",
        "1:s:01:running",
        /* signs and spaces */
        "1:m:+1:2",
        "1:m:-1:2",
        "1:m:1:-2",
        "1:m:1:+2",
        "1:m: 1:2",
        "1:m:1 :2",
        "1:m:1: 2",
        "1:m:1:2 ",
        " 1:m:1:2",
        "1 :m:1:2",
        "1:s: 1:running",
        "1:s:1: running",
        "1:s:-1:running",
        /* overflow */
        "1:m:1:9223372036854775808",
        "1:m:9223372036854775808:9223372036854775809",
        "1:m:1:99999999999999999999",
        "1:m:1:18446744073709551617",
        "1:s:9223372036854775808:running",
        /* after >= id */
        "1:m:2:2",
        "1:m:3:2",
        "1:m:0:0",
        "1:m:9223372036854775807:9223372036854775807",
        /* unknown status names */
        "1:s:1:bogus",
        "1:s:1:Running",
        "1:s:1:RUNNING",
        "1:s:1:runnin",
        "1:s:1:runningg",
        "1:s:1:requires-action",
        "1:s:1:done",
        /* an error text: only after error, never empty */
        "1:s:1:running:x",
        "1:s:1:running::x",
        "1:s:1:error:",
        "1:s:1:error::",
        "1:s:1:error:a:",
        "1:s:1:error:boom",
        "1:s:1:running:",
        "1:s:1:running:aa",
        /* truncate: history >= 1, after < id, three fields */
        "1:t",
        "1:t:",
        "1:t:1:2",
        "1:t:0:2:3",
        "1:t:1:3:3",
        "1:t:1:4:3",
        "1:t:1:2:3:",
        "1:t:1:2:3:4",
        "1:t:01:2:3",
        "1:t:1:-2:3",
        /* short */
        "",
        "1",
        "1:",
        "2:",
        "q",
        /* hex, dots */
        "1:m:0x1:2",
        "1:m:1.0:2",
        "1:m:1e3:2000",
    };
    CHECK_EQ_I64(accepted(bad, sizeof bad / sizeof *bad), 0);
    /* a few individually, so a failure names the input */
    CHECK_EQ_I64(parse_rc("2:m:1:2"), CS_EPROTO);
    CHECK_EQ_I64(parse_rc("1:m:1:2:3"), CS_EPROTO);
    CHECK_EQ_I64(parse_rc("1:m:1:9223372036854775808"), CS_EPROTO);
    CHECK_EQ_I64(parse_rc("1:m:01:2"), CS_EPROTO);
    CHECK_EQ_I64(parse_rc("1:m:5:5"), CS_EPROTO);
    CHECK_EQ_I64(parse_rc("1:s:3:sleeping"), CS_EPROTO);
    CHECK_EQ_I64(parse_rc("1:"), CS_EPROTO);

    /* embedded NUL bytes */
    parsed p;
    parse_exact("1:m:1:2\0", 8, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    parse_exact("1:m:1\0:2", 8, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    parse_exact("1:s:1:paused\0", 13, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    parse_exact("1:q\0", 4, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    CHECK_EQ_I64(cs_payload_parse(NULL, 7, &p.h), CS_EPROTO);

    /* lengths 0..2 */
    for (size_t len = 0; len <= 2; len++) {
        parse_exact("1:q", len, &p);
        CHECK_EQ_I64(p.rc, CS_EPROTO);
    }

    /* over CS_PAYLOAD_MAX: a part one byte too long */
    size_t n = CS_PAYLOAD_MAX + 1;
    char *big = malloc(n);
    memcpy(big, "1:p:0:1:", 8);
    memset(big + 8, 'y', n - 8);
    parse_exact(big, n, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    parse_exact(big, n - 1, &p); /* exactly the limit */
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_SIZE(p.h.text_len, CS_PAYLOAD_MAX - 8);
    /* a message hint padded with leading zeros to over the limit */
    memcpy(big, "1:m:", 4);
    memset(big + 4, '0', n - 4);
    big[n - 2] = ':';
    big[n - 1] = '1';
    parse_exact(big, n, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    CHECK_EQ_I64(cs_payload_parse(big, (size_t)-1, &p.h), CS_EPROTO);
    free(big);

    /* accepted edge cases */
    parse_exact("1:m:0:1", 7, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_I64(p.h.after, 0);
    CHECK_EQ_I64(p.h.id, 1);
    parse_exact("1:p:0:1:", 8, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_I64(p.h.kind, CS_HINT_PART);
    CHECK_EQ_SIZE(p.h.text_len, 0);
    parse_exact("1:p:3:2:a:b", 11, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_I64(p.h.after, 3);
    CHECK_EQ_I64(p.h.id, 2);
    CHECK_EQ_MEM(p.h.text, p.h.text_len, "a:b");
    /* a part without its after or seq, or with a bad one */
    parse_exact("1:p:", 4, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    parse_exact("1:p:a:b", 7, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    parse_exact("1:p:01:1:b", 10, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    parse_exact("1:p:3:b", 7, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    parse_exact("1:p:3:0:b", 9, &p);
    CHECK_EQ_I64(p.rc, CS_EPROTO);
    parse_exact("1:s:0:waiting", 13, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_I64(p.h.version, 0);
    CHECK_EQ_MEM(p.h.text, p.h.text_len, "waiting");
}

/* Checks a successful parse: fields sane and the encoder gives back the very
 * same bytes (the parser accepts only the canonical form). */
static int accepted_ok(const char *in, size_t len, const parsed *p)
{
    char buf[CS_PAYLOAD_MAX + 1];
    switch (p->h.kind) {
    case CS_HINT_MESSAGE:
        if (p->h.after < 0 || p->h.id <= p->h.after)
            return 0;
        break;
    case CS_HINT_STATUS:
        if (p->h.version < 0 || !p->in_bounds)
            return 0;
        break;
    case CS_HINT_QUEUE: break;
    case CS_HINT_PART:
        if (!p->in_bounds)
            return 0;
        if (memchr(p->h.text, '\0', p->h.text_len))
            return 1; /* cannot be encoded: refused (test_roundtrip) */
        break;
    default: return 0;
    }
    int n = cs_payload_encode(&p->h, buf, sizeof buf);
    return n >= 0 && (size_t)n == len && memcmp(buf, in, len) == 0;
}

static void test_truncation(void)
{
    static const char *const valid[] = {
        "1:m:12:345",
        "1:m:0:1",
        "1:q",
        "1:s:7:running",
        "1:s:12:requires_action",
        "1:p:5:2:hello",
        "1:m:9223372036854775806:9223372036854775807",
    };
    /* how many strict prefixes are themselves valid payloads */
    static const int want_ok[] = {1, 0, 0, 0, 0, 5, 0};
    for (size_t v = 0; v < sizeof valid / sizeof *valid; v++) {
        size_t len = strlen(valid[v]);
        parsed p;
        parse_exact(valid[v], len, &p);
        CHECK_EQ_I64(p.rc, CS_OK);
        int ok = 0, weird = 0;
        for (size_t k = 0; k < len; k++) {
            parse_exact(valid[v], k, &p);
            if (p.rc == CS_OK) {
                ok++;
                if (!accepted_ok(valid[v], k, &p))
                    weird++;
            } else if (p.rc != CS_EPROTO) {
                weird++;
            }
        }
        CHECK_EQ_I64(ok, want_ok[v]);
        CHECK_EQ_I64(weird, 0);
    }
    /* the accepted prefix of "1:m:12:345" is "1:m:12:34" */
    parsed p;
    parse_exact("1:m:12:345", 9, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_I64(p.h.after, 12);
    CHECK_EQ_I64(p.h.id, 34);
}

static void test_fuzz(void)
{
    static const char alphabet[] = "0123456789:::msqp1-+ \0x";
    static const char *const seeds[] = {
        "1:m:4:5",         "1:m:12:345",
        "1:s:3:paused",    "1:q",
        "1:p:4:1:delta",   "1:m:9223372036854775806:9223372036854775807",
        "1:s:0:completed",
    };
    check_rng rng = {0x5EED};
    char in[64];
    int weird = 0, accepted = 0, total = 0;
    for (int iter = 0; iter < 30000; iter++) {
        size_t len;
        if (iter % 2 == 0) {
            /* random bytes, biased towards the payload alphabet */
            len = (size_t)check_below(&rng, 30);
            for (size_t i = 0; i < len; i++) {
                if (check_below(&rng, 8) == 0)
                    in[i] = (char)check_below(&rng, 256);
                else
                    in[i] = alphabet[check_below(&rng, sizeof alphabet - 1)];
            }
            if (len >= 2 && check_below(&rng, 2) == 0) {
                in[0] = '1';
                in[1] = ':';
            }
        } else {
            /* a mutated valid payload */
            const char *s =
                seeds[check_below(&rng, sizeof seeds / sizeof *seeds)];
            len = strlen(s);
            memcpy(in, s, len);
            int muts = 1 + (int)check_below(&rng, 3);
            for (int m = 0; m < muts; m++) {
                size_t at = len ? (size_t)check_below(&rng, len) : 0;
                switch (check_below(&rng, 4)) {
                case 0: /* replace */
                    if (len)
                        in[at] =
                            alphabet[check_below(&rng, sizeof alphabet - 1)];
                    break;
                case 1: /* insert */
                    if (len < sizeof in - 1) {
                        memmove(in + at + 1, in + at, len - at);
                        in[at] =
                            alphabet[check_below(&rng, sizeof alphabet - 1)];
                        len++;
                    }
                    break;
                case 2: /* delete */
                    if (len) {
                        memmove(in + at, in + at + 1, len - at - 1);
                        len--;
                    }
                    break;
                default: /* truncate */ len = at; break;
                }
            }
        }
        parsed p;
        parse_exact(in, len, &p);
        total++;
        if (p.rc == CS_OK) {
            accepted++;
            if (!accepted_ok(in, len, &p))
                weird++;
        } else if (p.rc != CS_EPROTO) {
            weird++;
        }
    }
    CHECK_EQ_I64(total, 30000);
    CHECK_EQ_I64(weird, 0);
    CHECK(accepted > 100); /* the fuzz reaches the accepting paths too */
    CHECK(accepted < total);
}

/* Message hints that carry the message ("1:M"). */
static void body_roundtrip(int64_t after, int64_t id, cs_role role,
                           const char *tool, const char *content,
                           const char *want)
{
    cs_hint h = {.kind = CS_HINT_MESSAGE,
                 .after = after,
                 .id = id,
                 .body = true,
                 .role = role,
                 .tool = tool,
                 .tool_len = strlen(tool),
                 .text = content,
                 .text_len = strlen(content)};
    parsed p;
    encode_parse_msg(&h, want, &p);
    CHECK(p.h.body);
    CHECK_EQ_I64(p.h.role, role);
    CHECK_EQ_MEM(p.h.tool, p.h.tool_len, tool);
    CHECK_EQ_MEM(p.h.text, p.h.text_len, content);
    CHECK(p.in_bounds);
}

static void test_body(void)
{
    body_roundtrip(4, 5, CS_ROLE_USER, "", "hello", "1:M:4:5:user:0:hello");
    body_roundtrip(0, 1, CS_ROLE_SYSTEM, "", "", "1:M:0:1:system:0:");
    /* colons in the tool field and the content: the tool is length-prefixed,
     * the content runs to the end */
    body_roundtrip(41, 1000, CS_ROLE_ASSISTANT, "call_1:call_2",
                   "a:b\n1:m:4:5 \xc3\xbc",
                   "1:M:41:1000:assistant:13:call_1:call_2a:b\n1:m:4:5 "
                   "\xc3\xbc");
    body_roundtrip(7, 9, CS_ROLE_TOOL, "c", "42", "1:M:7:9:tool:1:c42");
    /* a plain hint parses as no body */
    parsed p;
    parse_exact("1:m:4:5", 7, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK(!p.h.body);

    /* CS_BODY_HEAD bounds the longest header */
    char head[128];
    int hn = snprintf(head, sizeof head,
                      "1:M:%lld:%lld:%s:%d:", (long long)INT64_MAX - 1,
                      (long long)INT64_MAX, "assistant", CS_MAX_TOOL);
    CHECK(hn > 0 && hn <= CS_BODY_HEAD);

    /* the largest content that fits, and one byte more */
    char buf[CS_PAYLOAD_MAX + 1];
    size_t big = CS_PAYLOAD_MAX - strlen("1:M:4:5:user:0:");
    char *text = malloc(big + 2);
    memset(text, 'z', big + 1);
    text[big] = '\0';
    cs_hint h = {.kind = CS_HINT_MESSAGE,
                 .after = 4,
                 .id = 5,
                 .body = true,
                 .role = CS_ROLE_USER,
                 .tool = "",
                 .text = text,
                 .text_len = big};
    int n = cs_payload_encode(&h, buf, sizeof buf);
    CHECK_EQ_I64(n, CS_PAYLOAD_MAX);
    parse_exact(buf, (size_t)(n > 0 ? n : 0), &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_SIZE(p.h.text_len, big);
    h.text_len = big + 1;
    CHECK_EQ_I64(cs_payload_encode(&h, buf, sizeof buf), CS_EINVAL);
    free(text);

    /* refused by the encoder: NUL in content or tool, an unknown role, a
     * missing pointer, ids out of order */
    cs_hint e = h;
    e.text = "a\0b";
    e.text_len = 3;
    CHECK_EQ_I64(cs_payload_encode(&e, buf, sizeof buf), CS_EINVAL);
    e = h;
    e.text = "ok";
    e.text_len = 2;
    e.tool = "x\0y";
    e.tool_len = 3;
    CHECK_EQ_I64(cs_payload_encode(&e, buf, sizeof buf), CS_EINVAL);
    e.tool = NULL;
    CHECK_EQ_I64(cs_payload_encode(&e, buf, sizeof buf), CS_EINVAL);
    e.tool_len = 0;
    CHECK_EQ_I64(cs_payload_encode(&e, buf, sizeof buf), 17);
    e.role = (cs_role)4;
    CHECK_EQ_I64(cs_payload_encode(&e, buf, sizeof buf), CS_EINVAL);
    e.role = CS_ROLE_USER;
    e.text = NULL;
    CHECK_EQ_I64(cs_payload_encode(&e, buf, sizeof buf), CS_EINVAL);
    e.text = "ok";
    e.after = 5;
    CHECK_EQ_I64(cs_payload_encode(&e, buf, sizeof buf), CS_EINVAL);

    /* refused by the parser */
    static const char *const bad[] = {
        "1:M:1:2",
        "1:M:1:2:",
        "1:M:1:2:user",
        "1:M:1:2:user:",
        "1:M:1:2:user:0",
        "1:M:1:2:bogus:0:x",
        "1:M:1:2:User:0:x",
        "1:M:1:2::0:x",
        "1:M:2:2:user:0:x",
        "1:M:3:2:user:0:x",
        "1:M:01:2:user:0:x",
        "1:M:1:2:user:01:ax",
        "1:M:1:2:user:-1:x",
        "1:M:1:2:user:4:abc",
        "1:M:1:2:user:x:abc",
        "1:M:1:2:user:9999:abc",
        "1:M:1:2:user:99999999999999999999:abc",
    };
    CHECK_EQ_I64(accepted(bad, sizeof bad / sizeof *bad), 0);
    /* the tool exactly to the end: an empty content */
    parse_exact("1:M:1:2:assistant:3:abc", 23, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_MEM(p.h.tool, p.h.tool_len, "abc");
    CHECK_EQ_SIZE(p.h.text_len, 0);
    CHECK(p.in_bounds);
}

/* The truncate hint: encoded, parsed back, and refused when it says
 * nothing coherent. */
static void test_truncate(void)
{
    char buf[80];
    cs_hint h = {.kind = CS_HINT_TRUNCATE, .version = 3, .after = 41, .id = 57};
    int n = cs_payload_encode(&h, buf, sizeof buf);
    CHECK_EQ_I64(n, 11);
    CHECK(strcmp(buf, "1:t:3:41:57") == 0);
    parsed p;
    parse_exact(buf, (size_t)n, &p);
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_I64(p.h.kind, CS_HINT_TRUNCATE);
    CHECK_EQ_I64(p.h.version, 3);
    CHECK_EQ_I64(p.h.after, 41);
    CHECK_EQ_I64(p.h.id, 57);
    parse_exact("1:t:1:0:1", 9, &p); /* the first message edited */
    CHECK_EQ_I64(p.rc, CS_OK);
    CHECK_EQ_I64(p.h.after, 0);
    h.version = 0; /* an edit makes the history at least 1 */
    CHECK_EQ_I64(cs_payload_encode(&h, buf, sizeof buf), CS_EINVAL);
    h.version = 1;
    h.id = h.after; /* the new message comes after the cut */
    CHECK_EQ_I64(cs_payload_encode(&h, buf, sizeof buf), CS_EINVAL);
}

int main(void)
{
    test_parse_id();
    test_roundtrip();
    test_encode_errors();
    test_reject();
    test_body();
    test_truncation();
    test_truncate();
    test_fuzz();
    return check_done("test_payload");
}
