/* test_hub.c - hub, publish and subscription tests through the public API only.
 */
#include "chatstream.h"
#include "hub.h"
#include "check.h"

#include <poll.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define MAXEV 256

/* What a subscription handed over until it went idle. */
typedef struct seen {
    int64_t ids[MAXEV];
    int n;
    int rc;        /* the rc that ended the drain: CS_IDLE or an error */
    int bad_event; /* events with wrong fields */
} seen;

/* The next message event: status and queue events (the snapshot's status
 * first) are skipped, their fields checked. */
static int next_msg(cs_sub *s, cs_event *ev)
{
    int rc;
    while ((rc = cs_sub_next(s, ev)) == CS_EVENT && ev->kind != CS_EV_MESSAGE)
        if (ev->kind == CS_EV_STATUS && (!ev->text || ev->version < 0))
            return CS_EINVAL;
    return rc;
}

static int wait_msg(cs_sub *s, double timeout, cs_event *ev)
{
    int rc;
    while ((rc = cs_sub_wait(s, timeout, ev)) == CS_EVENT &&
           ev->kind != CS_EV_MESSAGE)
        ;
    return rc;
}

/* Reads message events until CS_IDLE (or an error). */
static void drain(cs_sub *s, int64_t chat_id, seen *out)
{
    cs_event ev;
    int rc;
    while ((rc = next_msg(s, &ev)) == CS_EVENT) {
        if (ev.kind != CS_EV_MESSAGE || ev.chat_id != chat_id || !ev.role ||
            !ev.text || ev.prev_id >= ev.id)
            out->bad_event++;
        if (out->n < MAXEV)
            out->ids[out->n++] = ev.id;
    }
    out->rc = rc;
}

static int seen_is(const seen *s, const int64_t *want, int n)
{
    int ok = s->n == n && s->bad_event == 0;
    for (int i = 0; ok && i < n; i++)
        ok = s->ids[i] == want[i];
    if (!ok) {
        fprintf(stderr, "    got [");
        for (int i = 0; i < s->n; i++)
            fprintf(stderr, "%s%lld", i ? "," : "", (long long)s->ids[i]);
        fprintf(stderr, "] (bad %d), want [", s->bad_event);
        for (int i = 0; i < n; i++)
            fprintf(stderr, "%s%lld", i ? "," : "", (long long)want[i]);
        fprintf(stderr, "]\n");
    }
    return ok;
}

#define CHECK_SEEN(s, ...)                                                     \
    do {                                                                       \
        static const int64_t want_[] = {__VA_ARGS__};                          \
        CHECK(seen_is((s), want_, (int)(sizeof want_ / sizeof *want_)));       \
    } while (0)

/* Appends one user message with the given text; returns its id (or rc). */
static int64_t say(cs_hub *hub, int64_t chat, const char *text)
{
    cs_msg_in m = {CS_ROLE_USER, text, strlen(text), NULL};
    int64_t id = -1;
    int rc = cs_hub_append(hub, chat, &m, 1, &id);
    return rc < 0 ? rc : id;
}

static void test_errors(void)
{
    static const struct {
        int rc;
        const char *name, *text;
    } codes[] = {
        {CS_OK, "OK", "success"},
        {CS_ENOMEM, "ENOMEM", "out of memory"},
        {CS_EINVAL, "EINVAL", "invalid argument"},
        {CS_ECLOSED, "ECLOSED", "handle is closed"},
        {CS_EBACKEND, "EBACKEND", "store failure"},
        {CS_EPROTO, "EPROTO", "malformed notification"},
        {CS_EAUTH, "EAUTH", "not authorized"},
        {CS_ENOTFOUND, "ENOTFOUND", "no such chat"},
        {CS_ESTATE, "ESTATE", "not allowed in the chat's state"},
        {CS_ETIMEDOUT, "ETIMEDOUT", "timeout"},
        {CS_EUNKNOWN, "EUNKNOWN", "outcome unknown: it may have committed"},
        {CS_EVENT, "EVENT", "event"},
        {CS_IDLE, "IDLE", "idle"},
    };
    size_t n = sizeof codes / sizeof *codes;
    for (size_t i = 0; i < n; i++) {
        CHECK_EQ_STR(cs_errname(codes[i].rc), codes[i].name);
        CHECK_EQ_STR(cs_strerror(codes[i].rc), codes[i].text);
        for (size_t j = 0; j < i; j++)
            CHECK(strcmp(cs_strerror(codes[i].rc), cs_strerror(codes[j].rc)));
    }
    CHECK_EQ_STR(cs_errname(-99), "E?");
    CHECK_EQ_STR(cs_errname(99), "E?");
    CHECK_EQ_STR(cs_strerror(-99), "unknown error");
    CHECK(cs_strerror(INT32_MIN) != NULL);
    CHECK(cs_errname(INT32_MAX) != NULL);

    CHECK_EQ_I64(cs_role_parse("system", 6), CS_ROLE_SYSTEM);
    CHECK_EQ_I64(cs_role_parse("user", 4), CS_ROLE_USER);
    CHECK_EQ_I64(cs_role_parse("assistant", 9), CS_ROLE_ASSISTANT);
    CHECK_EQ_I64(cs_role_parse("tool", 4), CS_ROLE_TOOL);
    CHECK_EQ_I64(cs_role_parse("users", 4), CS_ROLE_USER);
    CHECK_EQ_I64(cs_role_parse("user", 3), -1);
    CHECK_EQ_I64(cs_role_parse("User", 4), -1);
    CHECK_EQ_I64(cs_role_parse(NULL, 0), -1);
    CHECK_EQ_STR(cs_role_name(CS_ROLE_ASSISTANT), "assistant");
    CHECK_EQ_STR(cs_role_name((cs_role)9), "?");
    CHECK_EQ_I64(cs_strategy_parse("watermark"), CS_STRATEGY_WATERMARK);
    CHECK_EQ_I64(cs_strategy_parse("rescan"), CS_STRATEGY_RESCAN);
    CHECK_EQ_I64(cs_strategy_parse("last_id"), CS_STRATEGY_LAST_ID);
    CHECK_EQ_I64(cs_strategy_parse("lastid"), -1);
    CHECK_EQ_I64(cs_strategy_parse(NULL), -1);
    CHECK_EQ_STR(cs_strategy_name(CS_STRATEGY_RESCAN), "rescan");
    CHECK_EQ_STR(cs_strategy_name((cs_strategy)5), "?");
}

static void test_null_and_options(void)
{
    /* destructors accept NULL */
    cs_hub_close(NULL);
    cs_sub_close(NULL);
    cs_pub_close(NULL);
    cs_memdb_close(NULL);
    CHECK(1);
    cs_event ev;
    CHECK_EQ_I64(next_msg(NULL, &ev), CS_ECLOSED);
    CHECK_EQ_I64(cs_hub_step(NULL), CS_ECLOSED);
    CHECK_EQ_I64(cs_pub_commit(NULL, NULL, NULL), CS_ECLOSED);
    CHECK_EQ_I64(cs_pub_cache(NULL, 0), CS_ECLOSED);
    CHECK_EQ_I64(cs_pub_notify(NULL, CS_ALL), CS_ECLOSED);
    CHECK(cs_hub_errmsg(NULL) != NULL);
    cs_sub *s = (cs_sub *)&ev; /* sentinel: must stay untouched */
    CHECK_EQ_I64(cs_sub_open(NULL, 1, NULL, &s), CS_ECLOSED);
    CHECK(s == (cs_sub *)&ev);
    int64_t chat = -5;
    CHECK_EQ_I64(cs_hub_create_chat(NULL, "o", "t", &chat), CS_ECLOSED);
    CHECK_EQ_I64(chat, -5);
    cs_msg_in m = {CS_ROLE_USER, "x", 1, NULL};
    CHECK_EQ_I64(cs_hub_append(NULL, 1, &m, 1, NULL), CS_ECLOSED);

    /* invalid options; *out untouched */
    cs_hub *hub = (cs_hub *)&ev;
    cs_hub_options o = {0};
    o.cache_size = (size_t)CS_MAX_CACHE_SIZE + 1;
    CHECK_EQ_I64(cs_hub_open(&o, &hub), CS_EINVAL);
    CHECK(hub == (cs_hub *)&ev);
    o.cache_size = 0;
    o.queue_size = (size_t)CS_MAX_QUEUE_SIZE + 1;
    CHECK_EQ_I64(cs_hub_open(&o, &hub), CS_EINVAL);
    CHECK(hub == (cs_hub *)&ev);
    o.cache_size = (size_t)-1;
    o.queue_size = 0;
    CHECK_EQ_I64(cs_hub_open(&o, &hub), CS_EINVAL);
    /* the limits themselves are fine */
    o.cache_size = CS_MAX_CACHE_SIZE;
    o.queue_size = CS_MAX_QUEUE_SIZE;
    CHECK_EQ_I64(cs_hub_open(&o, &hub), CS_OK);
    CHECK(hub != (cs_hub *)&ev);
    cs_hub_close(hub);
    /* NULL options: defaults and a private database */
    hub = NULL;
    CHECK_EQ_I64(cs_hub_open(NULL, &hub), CS_OK);
    CHECK(hub != NULL);
    CHECK(cs_hub_fd(hub) >= 0); /* the event loop's fd, on every store */
    CHECK_EQ_I64(cs_hub_step(hub), 0);
    cs_stats st;
    cs_hub_stats(hub, &st);
    CHECK_EQ_I64(st.notifications + st.queries + st.writes + st.delivered, 0);
    cs_hub_close(hub);

    /* memdb: closing the caller's reference while hubs use it is safe */
    cs_memdb *db = NULL;
    CHECK_EQ_I64(cs_memdb_open(&db), CS_OK);
    o = (cs_hub_options){.memory = db};
    CHECK_EQ_I64(cs_hub_open(&o, &hub), CS_OK);
    cs_memdb_close(db);
    CHECK_EQ_I64(cs_hub_create_chat(hub, "alice", "t", &chat), CS_OK);
    CHECK_EQ_I64(chat, 1);
    CHECK_EQ_I64(say(hub, chat, "still here"), 1);
    cs_hub_close(hub);
}

static void test_basic(void)
{
    cs_hub *hub;
    CHECK_EQ_I64(cs_hub_open(NULL, &hub), CS_OK);
    int64_t c1 = 0, c2 = 0;
    CHECK_EQ_I64(cs_hub_create_chat(hub, "alice", "first", &c1), CS_OK);
    CHECK_EQ_I64(cs_hub_create_chat(hub, NULL, NULL, &c2), CS_OK);
    CHECK_EQ_I64(c1, 1);
    CHECK_EQ_I64(c2, 2);

    cs_msg_in msgs[3] = {
        {CS_ROLE_SYSTEM, "be brief", 8, NULL},
        {CS_ROLE_USER, "hello", 5, NULL},
        {CS_ROLE_ASSISTANT, "hi\tthere", 8, NULL}, /* any text but NUL */
    };
    int64_t ids[3] = {0};
    CHECK_EQ_I64(cs_hub_append(hub, c1, msgs, 3, ids), CS_OK);
    CHECK_EQ_I64(ids[0], 1);
    CHECK_EQ_I64(ids[1], 2);
    CHECK_EQ_I64(ids[2], 3);
    CHECK_EQ_I64(say(hub, c2, "other chat"), 4);

    /* snapshot */
    cs_sub *s = NULL;
    CHECK_EQ_I64(cs_sub_open(hub, c1, NULL, &s), CS_OK);
    cs_event ev;
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.kind, CS_EV_MESSAGE);
    CHECK_EQ_I64(ev.chat_id, c1);
    CHECK_EQ_I64(ev.id, 1);
    CHECK_EQ_I64(ev.prev_id, 0);
    CHECK_EQ_STR(ev.role, "system");
    CHECK_EQ_MEM(ev.text, ev.text_len, "be brief");
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, 2);
    CHECK_EQ_I64(ev.prev_id, 1);
    CHECK_EQ_STR(ev.role, "user");
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, 3);
    CHECK_EQ_SIZE(ev.text_len, 8);
    CHECK(memcmp(ev.text, "hi\tthere", 8) == 0);
    CHECK_EQ_STR(ev.role, "assistant");
    CHECK_EQ_I64(next_msg(s, &ev), CS_IDLE);
    CHECK_EQ_I64(next_msg(s, &ev), CS_IDLE);
    CHECK_EQ_I64(cs_sub_cursor(s), 3);

    /* live; chat 2's messages do not show */
    CHECK_EQ_I64(say(hub, c2, "elsewhere"), 5);
    CHECK_EQ_I64(say(hub, c1, "live one"), 6);
    CHECK_EQ_I64(say(hub, c1, "live two"), 7);
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, 6);
    CHECK_EQ_I64(ev.prev_id, 3);
    CHECK_EQ_MEM(ev.text, ev.text_len, "live one");
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, 7);
    CHECK_EQ_MEM(ev.text, ev.text_len, "live two");
    CHECK_EQ_I64(wait_msg(s, 0.01, &ev), CS_IDLE);
    CHECK_EQ_I64(cs_sub_cursor(s), 7);
    CHECK(cs_sub_delivered_bytes(s) <= 64 * sizeof(int64_t)); /* bounded */

    cs_stats st;
    cs_hub_stats(hub, &st);
    CHECK_EQ_I64(st.writes, 2 + 5); /* two chats, five appends */
    CHECK_EQ_I64(st.delivered, 5);
    CHECK_EQ_I64(st.notifications, 2); /* only chat 1 is listened to */
    CHECK_EQ_I64(st.db_passes, 0);     /* the cache proved the chain */
    CHECK_EQ_I64(st.queries, 1);       /* the snapshot: one statement */
    CHECK_EQ_I64(st.publish_errors, 0);
    CHECK_EQ_I64(st.malformed, 0);

    /* a second subscription, opened after 6, with the snapshot rule */
    cs_sub *s2 = NULL;
    cs_sub_options o = {.after = 6, .strategy = CS_STRATEGY_RESCAN};
    CHECK_EQ_I64(cs_sub_open(hub, c1, &o, &s2), CS_OK);
    seen a = {0};
    drain(s2, c1, &a);
    CHECK_SEEN(&a, 7);
    CHECK_EQ_I64(a.rc, CS_IDLE);
    /* closing the first keeps the second listening */
    cs_sub_close(s);
    CHECK_EQ_I64(say(hub, c1, "after close"), 8);
    seen b = {0};
    drain(s2, c1, &b);
    CHECK_SEEN(&b, 8);
    CHECK_EQ_I64(cs_sub_cursor(s2), 8);
    cs_sub_close(s2);

    /* all closed, then reopened: listening again */
    CHECK_EQ_I64(say(hub, c1, "nobody listens"), 9);
    CHECK_EQ_I64(cs_sub_open(hub, c1, &(cs_sub_options){.after = 8}, &s),
                 CS_OK);
    CHECK_EQ_I64(say(hub, c1, "back"), 10);
    seen c = {0};
    drain(s, c1, &c);
    CHECK_SEEN(&c, 9, 10);
    cs_sub_close(s);
    cs_hub_close(hub);
}

static void test_bad_arguments(void)
{
    cs_hub *hub;
    CHECK_EQ_I64(cs_hub_open(NULL, &hub), CS_OK);
    int64_t chat;
    CHECK_EQ_I64(cs_hub_create_chat(hub, "o", "t", &chat), CS_OK);
    cs_sub *s = NULL;
    CHECK_EQ_I64(cs_sub_open(hub, 0, NULL, &s), CS_EINVAL);
    CHECK(strlen(cs_hub_errmsg(hub)) > 0);
    CHECK_EQ_I64(cs_sub_open(hub, chat, &(cs_sub_options){.after = -1}, &s),
                 CS_EINVAL);
    CHECK_EQ_I64(cs_sub_open(hub, chat,
                             &(cs_sub_options){.strategy = (cs_strategy)3}, &s),
                 CS_EINVAL);
    CHECK_EQ_I64(cs_sub_open(hub, 99, NULL, &s), CS_ENOTFOUND);
    CHECK(s == NULL);

    cs_msg_in ok = {CS_ROLE_USER, "x", 1, NULL};
    CHECK_EQ_I64(cs_hub_append(hub, 99, &ok, 1, NULL), CS_ENOTFOUND);
    CHECK_EQ_I64(cs_hub_append(hub, 0, &ok, 1, NULL), CS_EINVAL);
    CHECK_EQ_I64(cs_hub_append(hub, chat, &ok, 0, NULL), CS_EINVAL);
    cs_msg_in nul = {CS_ROLE_USER, "a\0b", 3, NULL};
    CHECK_EQ_I64(cs_hub_append(hub, chat, &nul, 1, NULL), CS_EINVAL);
    CHECK_EQ_I64(cs_hub_append(hub, chat, NULL, 1, NULL), CS_EINVAL);
    CHECK_EQ_I64(cs_hub_append(hub, chat, &ok, CS_MAX_BATCH + 1, NULL),
                 CS_EINVAL);
    cs_msg_in badrole = {(cs_role)4, "x", 1, NULL};
    CHECK_EQ_I64(cs_hub_append(hub, chat, &badrole, 1, NULL), CS_EINVAL);
    cs_msg_in nulltext = {CS_ROLE_USER, NULL, 3, NULL};
    CHECK_EQ_I64(cs_hub_append(hub, chat, &nulltext, 1, NULL), CS_EINVAL);
    cs_msg_in toobig = {CS_ROLE_USER, "x", (size_t)CS_MAX_CONTENT + 1, NULL};
    CHECK_EQ_I64(cs_hub_append(hub, chat, &toobig, 1, NULL), CS_EINVAL);
    cs_msg_in empty = {CS_ROLE_TOOL, NULL, 0, NULL};
    int64_t id = 0;
    CHECK_EQ_I64(cs_hub_append(hub, chat, &empty, 1, &id), CS_OK);
    CHECK_EQ_I64(id, 1);
    cs_stats st;
    cs_hub_stats(hub, &st);
    CHECK_EQ_I64(st.writes, 2);

    CHECK_EQ_I64(cs_sub_open(hub, chat, NULL, &s), CS_OK);
    cs_event ev;
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_SIZE(ev.text_len, 0);
    CHECK_EQ_STR(ev.text, "");
    CHECK_EQ_STR(ev.role, "tool");
    cs_sub_close(s);
    cs_hub_close(hub);
}

static void test_stepped_misuse(void)
{
    cs_hub *hub;
    CHECK_EQ_I64(cs_hub_open(NULL, &hub), CS_OK);
    int64_t chat;
    CHECK_EQ_I64(cs_hub_create_chat(hub, "o", "t", &chat), CS_OK);
    cs_msg_in msgs[2] = {{CS_ROLE_USER, "a", 1, NULL},
                         {CS_ROLE_ASSISTANT, "b", 1, NULL}};
    cs_publish *p = NULL;
    CHECK_EQ_I64(cs_pub_prepare(hub, chat, msgs, 0, &p), CS_EINVAL);
    CHECK_EQ_I64(cs_pub_prepare(hub, -1, msgs, 2, &p), CS_EINVAL);
    CHECK(p == NULL);
    CHECK_EQ_I64(cs_pub_prepare(hub, chat, msgs, 2, &p), CS_OK);
    CHECK(p != NULL);
    /* nothing before the commit */
    CHECK_EQ_I64(cs_pub_notify(p, 0), CS_EINVAL);
    CHECK(strlen(cs_hub_errmsg(hub)) > 0);
    CHECK_EQ_I64(cs_pub_cache(p, 0), CS_EINVAL);
    CHECK_EQ_I64(cs_pub_notify(p, CS_ALL), CS_EINVAL);

    cs_sub *s;
    CHECK_EQ_I64(cs_sub_open(hub, chat, NULL, &s), CS_OK);
    const int64_t *ids = NULL;
    size_t n = 0;
    CHECK_EQ_I64(cs_pub_commit(p, &ids, &n), CS_OK);
    CHECK_EQ_SIZE(n, 2);
    CHECK(ids != NULL);
    CHECK_EQ_I64(ids[0], 1);
    CHECK_EQ_I64(ids[1], 2);
    CHECK_EQ_I64(cs_pub_commit(p, &ids, &n), CS_EINVAL); /* double commit */
    CHECK_EQ_I64(cs_pub_commit(p, NULL, NULL), CS_EINVAL);

    /* index out of range */
    CHECK_EQ_I64(cs_pub_cache(p, 2), CS_EINVAL);
    CHECK_EQ_I64(cs_pub_notify(p, 2), CS_EINVAL);
    CHECK_EQ_I64(cs_pub_notify(p, 1000), CS_EINVAL);

    /* committed but not published: the subscriber sees nothing yet */
    cs_event ev;
    CHECK_EQ_I64(next_msg(s, &ev), CS_IDLE);

    CHECK_EQ_I64(cs_pub_notify(p, 1), CS_OK);
    CHECK_EQ_I64(cs_pub_notify(p, 1), CS_EINVAL); /* same index twice */
    CHECK_EQ_I64(cs_pub_cache(p, 0), CS_OK);
    CHECK_EQ_I64(cs_pub_cache(p, 0), CS_EINVAL);
    CHECK_EQ_I64(cs_pub_cache(p, CS_ALL), CS_OK); /* the rest: 1 */
    CHECK_EQ_I64(cs_pub_cache(p, 1), CS_EINVAL);
    CHECK_EQ_I64(cs_pub_cache(p, CS_ALL), CS_OK); /* nothing left: fine */
    CHECK_EQ_I64(cs_pub_notify(p, CS_ALL), CS_OK);
    CHECK_EQ_I64(cs_pub_notify(p, 0), CS_EINVAL);
    seen a = {0};
    drain(s, chat, &a);
    CHECK_SEEN(&a, 1, 2);
    cs_pub_close(p);

    /* a commit to a missing chat fails and may not be published */
    CHECK_EQ_I64(cs_pub_prepare(hub, 99, msgs, 1, &p), CS_OK);
    CHECK_EQ_I64(cs_pub_commit(p, &ids, &n), CS_ENOTFOUND);
    CHECK_EQ_I64(cs_pub_notify(p, 0), CS_EINVAL);
    cs_pub_close(p);

    /* a publish closed after commit without cache or notify: the message is
     * durable; a later notification's DB pass finds it */
    CHECK_EQ_I64(cs_pub_prepare(hub, chat, msgs, 1, &p), CS_OK);
    CHECK_EQ_I64(cs_pub_commit(p, &ids, &n), CS_OK);
    CHECK_EQ_I64(ids[0], 3);
    cs_pub_close(p);
    CHECK_EQ_I64(say(hub, chat, "next"), 4);
    seen b = {0};
    drain(s, chat, &b);
    CHECK_SEEN(&b, 3, 4); /* ordered: 4 (cached) waits for the DB pass's 3 */
    cs_stats st;
    cs_hub_stats(hub, &st);
    CHECK_EQ_I64(st.db_passes, 1);
    cs_sub_close(s);
    cs_hub_close(hub);
}

/* The seed race, through stepped publishes: history 1,2; messages 3,4,5
 * committed; cache 3 and 5; notify 3 (read); cache 4; notify 5, notify 4. */
static void race(cs_strategy strategy, int ordered, seen *out, cs_stats *st)
{
    cs_hub *hub;
    cs_hub_open(NULL, &hub);
    int64_t chat;
    cs_hub_create_chat(hub, "o", "t", &chat);
    say(hub, chat, "one");
    say(hub, chat, "two");
    cs_sub_options o = {
        .after = 0, .strategy = strategy, .unordered = !ordered};
    cs_sub *s;
    cs_sub_open(hub, chat, &o, &s);
    cs_publish *p[3];
    for (int i = 0; i < 3; i++) {
        cs_msg_in m = {CS_ROLE_ASSISTANT, "r", 1, NULL};
        cs_pub_prepare(hub, chat, &m, 1, &p[i]);
        cs_pub_commit(p[i], NULL, NULL);
    }
    cs_pub_cache(p[0], 0);
    cs_pub_cache(p[2], 0);
    cs_pub_notify(p[0], 0);
    drain(s, chat, out);
    cs_pub_cache(p[1], 0);
    cs_pub_notify(p[2], 0);
    cs_pub_notify(p[1], 0);
    drain(s, chat, out);
    for (int i = 0; i < 3; i++)
        cs_pub_close(p[i]);
    cs_hub_stats(hub, st);
    cs_sub_close(s);
    cs_hub_close(hub);
}

static void test_race(void)
{
    seen a = {0};
    cs_stats st;
    race(CS_STRATEGY_LAST_ID, 0, &a, &st);
    CHECK_SEEN(&a, 1, 2, 3, 5); /* the loss the fix is about */
    a = (seen){0};
    race(CS_STRATEGY_RESCAN, 0, &a, &st);
    CHECK_SEEN(&a, 1, 2, 3, 5, 4);
    a = (seen){0};
    race(CS_STRATEGY_WATERMARK, 0, &a, &st);
    CHECK_SEEN(&a, 1, 2, 3, 5, 4);
    CHECK_EQ_I64(st.db_passes, 0);
    a = (seen){0};
    race(CS_STRATEGY_WATERMARK, 1, &a, &st);
    CHECK_SEEN(&a, 1, 2, 3, 4, 5);
    CHECK_EQ_I64(st.db_passes, 0);
    CHECK_EQ_I64(st.delivered, 5);
}

static void test_replicas(void)
{
    for (int k = 0; k < 3; k++) {
        cs_strategy strategy = (cs_strategy)k;
        cs_memdb *db;
        CHECK_EQ_I64(cs_memdb_open(&db), CS_OK);
        cs_hub_options o = {.memory = db};
        cs_hub *a, *b;
        CHECK_EQ_I64(cs_hub_open(&o, &a), CS_OK);
        CHECK_EQ_I64(cs_hub_open(&o, &b), CS_OK);
        int64_t chat;
        CHECK_EQ_I64(cs_hub_create_chat(a, "o", "t", &chat), CS_OK);
        CHECK_EQ_I64(say(a, chat, "before"), 1);

        cs_sub_options so = {.strategy = strategy};
        cs_sub *sa, *sb;
        CHECK_EQ_I64(cs_sub_open(a, chat, &so, &sa), CS_OK);
        CHECK_EQ_I64(cs_sub_open(b, chat, &so, &sb), CS_OK);
        seen ga = {0}, gb = {0};
        drain(sa, chat, &ga);
        drain(sb, chat, &gb);
        CHECK_SEEN(&ga, 1);
        CHECK_SEEN(&gb, 1);

        /* A publishes; B has nothing in its cache: its DB pass finds them */
        CHECK_EQ_I64(say(a, chat, "x"), 2);
        CHECK_EQ_I64(say(a, chat, "y"), 3);
        drain(sa, chat, &ga);
        drain(sb, chat, &gb);
        CHECK_SEEN(&ga, 1, 2, 3);
        CHECK_SEEN(&gb, 1, 2, 3);
        cs_stats sta, stb;
        cs_hub_stats(a, &sta);
        cs_hub_stats(b, &stb);
        CHECK(stb.db_passes > 0);
        CHECK_EQ_I64(stb.notifications, 2);
        CHECK_EQ_I64(stb.writes, 0);
        CHECK_EQ_I64(sta.writes, 4);
        if (strategy == CS_STRATEGY_WATERMARK)
            CHECK_EQ_I64(sta.db_passes, 0);

        /* B publishes too: A's DB pass now */
        CHECK_EQ_I64(say(b, chat, "z"), 4);
        drain(sa, chat, &ga);
        drain(sb, chat, &gb);
        CHECK_SEEN(&ga, 1, 2, 3, 4);
        CHECK_SEEN(&gb, 1, 2, 3, 4);

        /* a failing query on B: not an error of the call, retried later */
        cs_memdb_fail_queries(db, 1);
        CHECK_EQ_I64(say(a, chat, "w"), 5);
        seen gb2 = {0};
        drain(sb, chat, &gb2);
        CHECK_EQ_I64(gb2.rc, CS_IDLE);
        CHECK_EQ_I64(gb2.n, 0);
        cs_hub_stats(b, &stb);
        CHECK_EQ_I64(stb.query_errors, 1);
        drain(sb, chat, &gb2);
        CHECK_SEEN(&gb2, 5);
        drain(sa, chat, &ga); /* A has 5 in its cache */
        CHECK_SEEN(&ga, 1, 2, 3, 4, 5);

        /* a dropped notification: the next one's DB pass covers it */
        cs_memdb_drop_notifies(db, 1);
        CHECK_EQ_I64(say(a, chat, "lost note"), 6);
        seen gb3 = {0}, ga3 = {0};
        drain(sb, chat, &gb3);
        drain(sa, chat, &ga3);
        CHECK_EQ_I64(gb3.n, 0);
        CHECK_EQ_I64(ga3.n, 0);
        CHECK_EQ_I64(say(a, chat, "found"), 7);
        drain(sb, chat, &gb3);
        drain(sa, chat, &ga3);
        CHECK_SEEN(&gb3, 6, 7);
        CHECK_SEEN(&ga3, 6, 7);
        CHECK_EQ_I64(cs_sub_cursor(sa), 7);
        CHECK_EQ_I64(cs_sub_cursor(sb), 7);

        /* knobs cleared with 0 */
        cs_memdb_fail_queries(db, 5);
        cs_memdb_fail_queries(db, 0);
        cs_memdb_drop_notifies(db, 5);
        cs_memdb_drop_notifies(db, 0);
        CHECK_EQ_I64(say(a, chat, "clear"), 8);
        seen gb4 = {0};
        drain(sb, chat, &gb4);
        CHECK_SEEN(&gb4, 8);

        /* a subscription cannot open while queries fail */
        cs_memdb_fail_queries(db, 1);
        cs_sub *sc = NULL;
        CHECK_EQ_I64(cs_sub_open(b, chat, NULL, &sc), CS_EBACKEND);
        CHECK(sc == NULL);
        CHECK(strstr(cs_hub_errmsg(b), "injected") != NULL);
        CHECK_EQ_I64(cs_sub_open(b, chat, NULL, &sc), CS_OK);
        seen gc = {0};
        drain(sc, chat, &gc);
        CHECK_EQ_I64(gc.n, 8);
        cs_sub_close(sc);

        /* B's other subscription still works after sc closed */
        CHECK_EQ_I64(say(a, chat, "last"), 9);
        seen gb5 = {0};
        drain(sb, chat, &gb5);
        CHECK_SEEN(&gb5, 9);

        cs_sub_close(sa);
        cs_sub_close(sb);
        cs_memdb_close(db); /* hubs still hold it */
        cs_hub_close(a);
        cs_hub_close(b);
    }
}

/* A resume from the cursor: the cursor over what was returned loses
 * nothing (ordered: and repeats nothing); the "highest delivered" cursor of
 * last_id loses the late lower id. k: watermark ordered, rescan, last_id,
 * watermark unordered. */
static void test_resume(void)
{
    for (int k = 0; k < 4; k++) {
        cs_strategy strategy = k == 3 ? CS_STRATEGY_WATERMARK : (cs_strategy)k;
        int unordered = k == 3;
        cs_hub *hub;
        cs_hub_open(NULL, &hub);
        int64_t chat;
        cs_hub_create_chat(hub, "o", "t", &chat);
        say(hub, chat, "one");
        say(hub, chat, "two");
        cs_sub *s;
        CHECK_EQ_I64(cs_sub_open(hub, chat,
                                 &(cs_sub_options){.strategy = strategy,
                                                   .unordered = unordered},
                                 &s),
                     CS_OK);
        cs_publish *p[3];
        for (int i = 0; i < 3; i++) {
            cs_msg_in m = {CS_ROLE_USER, "m", 1, NULL};
            cs_pub_prepare(hub, chat, &m, 1, &p[i]);
            cs_pub_commit(p[i], NULL, NULL);
        }
        cs_pub_cache(p[0], 0); /* 3 */
        cs_pub_cache(p[2], 0); /* 5 */
        cs_pub_notify(p[0], 0);
        seen g = {0};
        drain(s, chat, &g);
        int64_t w = cs_sub_cursor(s);
        cs_sub_close(s); /* the reader stops here */
        for (int i = 0; i < 3; i++)
            cs_pub_close(p[i]);
        CHECK_EQ_I64(
            cs_sub_open(hub, chat,
                        &(cs_sub_options){.after = w, .strategy = strategy},
                        &s),
            CS_OK);
        drain(s, chat, &g);
        if (k == 3) {
            CHECK_EQ_I64(w, 3);               /* 4 is missing: W stops at 3 */
            CHECK_SEEN(&g, 1, 2, 3, 5, 4, 5); /* 5 again, 4 not lost */
        } else if (strategy == CS_STRATEGY_WATERMARK) {
            CHECK_EQ_I64(w, 3); /* 5 waits for 4: never returned */
            CHECK_SEEN(&g, 1, 2, 3, 4, 5);
        } else if (strategy == CS_STRATEGY_RESCAN) {
            CHECK_EQ_I64(w, 5); /* its DB pass had found 4 already */
            CHECK_SEEN(&g, 1, 2, 3, 5, 4);
        } else {
            CHECK_EQ_I64(w, 5);
            CHECK_SEEN(&g, 1, 2, 3, 5); /* 4 lost for good */
        }
        cs_sub_close(s);
        cs_hub_close(hub);
    }
}

static void test_queue_overflow(void)
{
    for (int k = 0; k < 3; k++) {
        for (int replica = 0; replica < 2; replica++) {
            cs_memdb *db;
            cs_memdb_open(&db);
            cs_hub_options o = {.memory = db, .queue_size = 2, .cache_size = 4};
            cs_hub *a, *b;
            CHECK_EQ_I64(cs_hub_open(&o, &a), CS_OK);
            CHECK_EQ_I64(cs_hub_open(&o, &b), CS_OK);
            cs_hub *reader = replica ? b : a;
            int64_t chat;
            cs_hub_create_chat(a, "o", "t", &chat);
            cs_sub *s;
            cs_sub_options so = {.strategy = (cs_strategy)k};
            CHECK_EQ_I64(cs_sub_open(reader, chat, &so, &s), CS_OK);
            for (int i = 0; i < 20; i++)
                say(a, chat, "burst");
            seen g = {0};
            drain(s, chat, &g);
            CHECK_EQ_I64(g.n, 20);
            int inorder = 1;
            for (int i = 0; i < g.n; i++)
                inorder &= g.ids[i] == i + 1;
            CHECK(inorder);
            CHECK_EQ_I64(cs_sub_cursor(s), 20);
            cs_stats st;
            cs_hub_stats(reader, &st);
            CHECK(st.resyncs > 0);
            CHECK_EQ_I64(st.notifications, 20);
            CHECK_EQ_I64(st.delivered, 20);

            /* after the resync, normal service */
            say(a, chat, "calm");
            seen g2 = {0};
            drain(s, chat, &g2);
            CHECK_SEEN(&g2, 21);
            cs_hub_stats(reader, &st);
            int64_t resyncs = st.resyncs;
            say(a, chat, "calm 2");
            drain(s, chat, &g2);
            CHECK_SEEN(&g2, 21, 22);
            cs_hub_stats(reader, &st);
            CHECK_EQ_I64(st.resyncs, resyncs);

            /* an overflow while queries fail: retried, still nothing lost */
            for (int i = 0; i < 6; i++)
                say(a, chat, "burst 2");
            cs_memdb_fail_queries(db, 1);
            seen g3 = {0};
            drain(s, chat, &g3);
            drain(s, chat, &g3);
            CHECK_EQ_I64(g3.n, 6);
            CHECK_EQ_I64(g3.ids[0], 23);
            CHECK_EQ_I64(g3.ids[g3.n - 1], 28);
            CHECK_EQ_I64(cs_sub_cursor(s), 28);
            cs_sub_close(s);
            cs_hub_close(a);
            cs_hub_close(b);
            cs_memdb_close(db);
        }
    }
}

static void test_close_with_open_handles(void)
{
    cs_hub *hub;
    CHECK_EQ_I64(cs_hub_open(NULL, &hub), CS_OK);
    int64_t chat;
    cs_hub_create_chat(hub, "o", "t", &chat);
    say(hub, chat, "one");
    say(hub, chat, "two");
    cs_sub *s1, *s2;
    CHECK_EQ_I64(cs_sub_open(hub, chat, NULL, &s1), CS_OK);
    CHECK_EQ_I64(cs_sub_open(hub, chat,
                             &(cs_sub_options){.strategy = CS_STRATEGY_RESCAN},
                             &s2),
                 CS_OK);
    cs_event ev;
    CHECK_EQ_I64(next_msg(s1, &ev), CS_EVENT); /* holds an event */
    CHECK_EQ_I64(ev.id, 1);
    cs_msg_in m = {CS_ROLE_USER, "pending", 7, NULL};
    cs_publish *committed, *prepared;
    CHECK_EQ_I64(cs_pub_prepare(hub, chat, &m, 1, &committed), CS_OK);
    CHECK_EQ_I64(cs_pub_commit(committed, NULL, NULL), CS_OK);
    CHECK_EQ_I64(cs_pub_prepare(hub, chat, &m, 1, &prepared), CS_OK);

    cs_hub_close(hub);

    CHECK_EQ_I64(next_msg(s1, &ev), CS_ECLOSED);
    CHECK_EQ_I64(next_msg(s2, &ev), CS_ECLOSED);
    CHECK_EQ_I64(wait_msg(s1, 0.01, &ev), CS_ECLOSED);
    CHECK_EQ_I64(cs_sub_cursor(s1), 1); /* still readable: 1 was returned */
    CHECK_EQ_I64(cs_pub_cache(committed, 0), CS_ECLOSED);
    CHECK_EQ_I64(cs_pub_notify(committed, 0), CS_ECLOSED);
    CHECK_EQ_I64(cs_pub_commit(prepared, NULL, NULL), CS_ECLOSED);
    CHECK_EQ_I64(cs_pub_notify(prepared, CS_ALL), CS_ECLOSED);
    cs_sub_close(s1);
    cs_sub_close(s2);
    cs_pub_close(committed);
    cs_pub_close(prepared);
    CHECK(1);
}

/* An event put back with cs_sub_unread is returned again, once. */
static void test_unread(void)
{
    cs_hub *hub;
    int64_t chat;
    CHECK_EQ_I64(cs_hub_open(NULL, &hub), CS_OK);
    CHECK_EQ_I64(cs_hub_create_chat(hub, "a", "t", &chat), CS_OK);
    cs_sub *s;
    CHECK_EQ_I64(cs_sub_open(hub, chat, NULL, &s), CS_OK);
    int64_t a = say(hub, chat, "one"), b = say(hub, chat, "two");
    cs_event ev;
    cs_sub_unread(s); /* nothing returned yet: no effect */
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, a);
    cs_sub_unread(s);
    cs_sub_unread(s); /* twice: still one event put back */
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, a);
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, b);
    cs_sub_unread(s); /* the last one of the batch */
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, b);
    CHECK_EQ_I64(next_msg(s, &ev), CS_IDLE);
    cs_stats st;
    cs_hub_stats(hub, &st);
    CHECK_EQ_I64(st.delivered, 2);
    cs_sub_unread(NULL);
    cs_sub_close(s);
    cs_hub_close(hub);
}

/* The hub keeps at most max_chats caches; a chat with a subscription keeps
 * its cache whatever the traffic elsewhere. */
static void test_max_chats(void)
{
    cs_hub *hub;
    cs_hub_options o = {.max_chats = 4};
    CHECK_EQ_I64(cs_hub_open(&o, &hub), CS_OK);
    int64_t watched, others[10];
    CHECK_EQ_I64(cs_hub_create_chat(hub, "a", "t", &watched), CS_OK);
    cs_sub *s;
    CHECK_EQ_I64(cs_sub_open(hub, watched, NULL, &s), CS_OK);
    for (int i = 0; i < 10; i++) {
        CHECK_EQ_I64(cs_hub_create_chat(hub, "a", "t", &others[i]), CS_OK);
        CHECK(say(hub, others[i], "x") > 0);
    }
    cs_stats st;
    cs_hub_stats(hub, &st);
    CHECK_EQ_I64(st.cached_chats, 4);
    /* The watched chat kept its cache: a new message there is proven by the
     * cache chain, no DB pass. */
    int64_t id = say(hub, watched, "hello");
    cs_event ev;
    CHECK_EQ_I64(next_msg(s, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, id);
    cs_hub_stats(hub, &st);
    CHECK_EQ_I64(st.db_passes, 0);
    /* Every evicted chat still works: its next publish starts a new cache. */
    for (int i = 0; i < 10; i++)
        CHECK(say(hub, others[i], "y") > 0);
    cs_hub_stats(hub, &st);
    CHECK_EQ_I64(st.cached_chats, 4);
    cs_sub *t;
    CHECK_EQ_I64(cs_sub_open(hub, others[0], NULL, &t), CS_OK);
    int n = 0;
    while (next_msg(t, &ev) == CS_EVENT)
        n++;
    CHECK_EQ_I64(n, 2);
    cs_sub_close(t);
    cs_sub_close(s);
    cs_hub_close(hub);
}

/* Many evictions (deletions from the hub's open-addressing table) must
 * never lose a subscribed chat: each still gets its messages from its cache. */
static void test_evictions_keep_subscribed(void)
{
    cs_hub *hub;
    cs_hub_options o = {.max_chats = 8};
    CHECK_EQ_I64(cs_hub_open(&o, &hub), CS_OK);
    enum { NSUB = 39, NOTHER = 500 }; /* 47 entries of 64 slots: long runs */
    int64_t subbed[NSUB], other;
    cs_sub *subs[NSUB];
    for (int i = 0; i < NSUB; i++) {
        CHECK_EQ_I64(cs_hub_create_chat(hub, "a", "t", &subbed[i]), CS_OK);
        CHECK_EQ_I64(cs_sub_open(hub, subbed[i], NULL, &subs[i]), CS_OK);
    }
    uint32_t x = 12345;
    for (int i = 0; i < NOTHER; i++) {
        CHECK_EQ_I64(cs_hub_create_chat(hub, "a", "t", &other), CS_OK);
        say(hub, other, "x");
        x = x * 1103515245u + 12345u;
        say(hub, subbed[(x >> 16) % NSUB], "y"); /* interleaved */
    }
    cs_stats st;
    cs_hub_stats(hub, &st);
    CHECK(st.cached_chats <= NSUB + 8);
    int64_t passes = st.db_passes;
    int ok = 1;
    for (int i = 0; i < NSUB; i++) {
        int64_t id = say(hub, subbed[i], "z"), last = -1;
        cs_event ev;
        while (next_msg(subs[i], &ev) == CS_EVENT)
            last = ev.id;
        ok &= last == id;
    }
    CHECK(ok);
    cs_hub_stats(hub, &st);
    CHECK_EQ_I64(st.db_passes, passes); /* every chat found its own cache */
    for (int i = 0; i < NSUB; i++)
        cs_sub_close(subs[i]);
    cs_hub_close(hub);
}

/* White box: after every insertion (and the eviction it may cause) every
 * entry of the hub's table is found from its home slot, and the max_chats
 * most recently used chats are all there. */
static void test_chat_table(void)
{
    cs_hub *hub;
    cs_hub_options o = {.max_chats = 24};
    CHECK_EQ_I64(cs_hub_open(&o, &hub), CS_OK);
    int consistent = 1, recent = 1;
    uint32_t x = 7;
    for (int64_t id = 1; id <= 3000; id++) {
        x = x * 1103515245u + 12345u;
        int64_t chat = 1 + (int64_t)((x >> 8) % 200); /* revisits some */
        if (!cs_hub_chat(hub, chat))
            consistent = 0;
        for (size_t i = 0; i < hub->capchats; i++) {
            hub_chat *c = hub->chats[i];
            if (c && cs_hub_chat_find(hub, c->id) != c)
                consistent = 0;
        }
        if (hub->nchats > 24 || !cs_hub_chat_find(hub, chat))
            recent = 0;
    }
    CHECK(consistent);
    CHECK(recent);
    cs_hub_close(hub);
}

/* An unordered watermark reader with pages of one: a DB pass whose page
 * holds only messages it was handed already (out of order, from the cache)
 * is not a page it has to take. The next page is read in the same call, so
 * what is there is handed over, never reported idle. */
static void test_empty_page(void)
{
    cs_memdb *db;
    CHECK_EQ_I64(cs_memdb_open(&db), CS_OK);
    cs_hub_options o = {.memory = db, .page_size = 1, .cache_size = 2};
    cs_hub *hub;
    CHECK_EQ_I64(cs_hub_open(&o, &hub), CS_OK);
    int64_t chat;
    CHECK_EQ_I64(cs_hub_create_chat(hub, "o", "t", &chat), CS_OK);
    CHECK_EQ_I64(say(hub, chat, "first"), 1);
    cs_sub_options so = {.unordered = 1};
    cs_sub *s;
    CHECK_EQ_I64(cs_sub_open(hub, chat, &so, &s), CS_OK);
    seen got = {0};
    drain(s, chat, &got);
    CHECK_SEEN(&got, 1);
    /* 2, 3, 4 committed; 3 and 4 cached and notified, 2 neither: the reader
     * has 3 and 4 from the cache; its DB pass for 2 fails, twice, and W stays
     * 1. */
    cs_msg_in m[3] = {{CS_ROLE_USER, "a", 1, NULL},
                      {CS_ROLE_USER, "b", 1, NULL},
                      {CS_ROLE_USER, "c", 1, NULL}};
    cs_publish *p;
    CHECK_EQ_I64(cs_pub_prepare(hub, chat, m, 3, &p), CS_OK);
    CHECK_EQ_I64(cs_pub_commit(p, NULL, NULL), CS_OK);
    cs_pub_cache(p, 1);
    cs_pub_cache(p, 2);
    cs_pub_notify(p, 2);
    cs_memdb_fail_queries(db, 2);
    drain(s, chat, &got);
    CHECK_SEEN(&got, 1, 3, 4);
    /* 5 and 6 evict 3 and 4 from the cache: the pass from W = 1 reads
     * pages of the DB, [2] for the reader, then [3] and [4] it has. */
    CHECK_EQ_I64(say(hub, chat, "fifth"), 5);
    CHECK_EQ_I64(say(hub, chat, "sixth"), 6);
    drain(s, chat, &got);
    CHECK_SEEN(&got, 1, 3, 4, 2, 5, 6);
    CHECK_EQ_I64(got.rc, CS_IDLE);
    cs_pub_close(p);
    cs_sub_close(s);
    cs_hub_close(hub);
    cs_memdb_close(db);
}

/* Steps the hub until a backstop poll has begun (its round of one chunk is
 * read in the same step). */
static void until_poll(cs_hub *hub)
{
    cs_stats st;
    cs_hub_stats(hub, &st);
    int64_t p0 = st.polls;
    for (int i = 0; i < 2000 && st.polls == p0; i++) {
        cs_hub_wait(hub, 0.005);
        cs_hub_stats(hub, &st);
    }
    CHECK(st.polls > p0);
}

/* The backstop poll on the memory store: idle chats cost one statement per
 * poll whatever the number of subscriptions; a message, a status and a
 * queue change whose notifications were lost are found by the next poll. */
static void test_poll(void)
{
    cs_memdb *db;
    CHECK_EQ_I64(cs_memdb_open(&db), CS_OK);
    cs_hub_options ow = {.memory = db},
                   orr = {.memory = db, .poll_interval = 0.05};
    cs_hub *w, *r;
    CHECK_EQ_I64(cs_hub_open(&ow, &w), CS_OK);
    CHECK_EQ_I64(cs_hub_open(&orr, &r), CS_OK);
    int64_t chats[3];
    cs_sub *subs[12];
    int n = 0;
    for (int i = 0; i < 3; i++) {
        CHECK_EQ_I64(cs_hub_create_chat(w, "o", "t", &chats[i]), CS_OK);
        CHECK(say(w, chats[i], "hello") > 0);
        for (int k = 0; k < (i == 0 ? 10 : 1); k++)
            CHECK_EQ_I64(cs_sub_open(r, chats[i], NULL, &subs[n++]), CS_OK);
    }
    static seen all[12];
    for (int i = 0; i < n; i++)
        drain(subs[i], i < 10 ? chats[0] : chats[i - 9], &all[i]);

    /* Idle: each poll is one statement, read in the step that begins it. */
    cs_stats st0, st1;
    cs_hub_stats(r, &st0);
    until_poll(r);
    for (int i = 0; i < n; i++) {
        seen none = {0};
        drain(subs[i], i < 10 ? chats[0] : chats[i - 9], &none);
        CHECK_EQ_I64(none.n, 0);
    }
    cs_hub_step(r);
    cs_hub_stats(r, &st1);
    CHECK_EQ_I64(st1.queries - st0.queries, st1.polls - st0.polls);

    /* A message whose notification was lost: found, once, by each of the
     * chat's 10 subscriptions, through one DB pass they share. */
    cs_memdb_drop_notifies(db, 1);
    int64_t id = say(w, chats[0], "silent");
    CHECK(id > 0);
    cs_hub_stats(r, &st0);
    for (int i = 0; i < 10; i++) {
        cs_event ev;
        CHECK_EQ_I64(wait_msg(subs[i], 2.0, &ev), CS_EVENT);
        CHECK_EQ_I64(ev.id, id);
    }
    cs_hub_stats(r, &st1);
    CHECK_EQ_I64(st1.shared_passes - st0.shared_passes, 9);
    CHECK_EQ_I64(st1.notifications - st0.notifications, 0);
    until_poll(r);
    for (int i = 0; i < 10; i++) {
        seen none = {0};
        drain(subs[i], chats[0], &none);
        CHECK_EQ_I64(none.n, 0);
    }

    /* A message, the status and a queue item, every notification lost. */
    int64_t mid, qid;
    int queued = -1;
    cs_memdb_drop_notifies(db, 100);
    CHECK_EQ_I64(cs_hub_send(w, chats[1], NULL, "go", 2, &mid, &queued), CS_OK);
    CHECK_EQ_I64(queued, 0);
    CHECK_EQ_I64(cs_hub_send(w, chats[1], NULL, "later", 5, &qid, &queued),
                 CS_OK);
    CHECK_EQ_I64(queued, 1);
    cs_memdb_drop_notifies(db, 0);
    cs_sub *s = subs[10];
    int got_msg = 0, got_status = 0, got_queue = 0;
    cs_event ev;
    while (!(got_msg && got_status && got_queue) &&
           cs_sub_wait(s, 2.0, &ev) == CS_EVENT) {
        if (ev.kind == CS_EV_MESSAGE && ev.id == mid && !got_status)
            got_msg++;
        if (ev.kind == CS_EV_STATUS && ev.status == CS_STATUS_PENDING &&
            ev.version == 1)
            got_status++;
        if (ev.kind == CS_EV_QUEUE && ev.queue->n == 1 &&
            ev.queue->items[0].id == qid)
            got_queue++;
    }
    CHECK_EQ_I64(got_msg, 1);
    CHECK_EQ_I64(got_status, 1);
    CHECK_EQ_I64(got_queue, 1);
    until_poll(r);
    CHECK_EQ_I64(cs_sub_next(s, &ev), CS_IDLE);

    for (int i = 0; i < n; i++)
        cs_sub_close(subs[i]);
    cs_hub_close(r);
    cs_hub_close(w);
    cs_memdb_close(db);
}

/* poll(2) on fd without waiting: 1 readable, 0 not. */
static int readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* The event-loop contract on the memory store: one fd for the hub's life,
 * readable exactly while a step or a subscription has work; the ready list
 * names the subscriptions; the timeout names the next poll. */
static void test_loop_contract(void)
{
    cs_memdb *db;
    CHECK_EQ_I64(cs_memdb_open(&db), CS_OK);
    cs_hub_options ow = {.memory = db}, orr = {.memory = db};
    cs_hub *w, *r;
    CHECK_EQ_I64(cs_hub_open(&ow, &w), CS_OK);
    CHECK_EQ_I64(cs_hub_open(&orr, &r), CS_OK);
    int fd = cs_hub_fd(r);
    CHECK(fd >= 0);
    CHECK(!readable(fd));
    CHECK(cs_hub_timeout(r) == -1); /* no poll, nothing to do: never */
    int64_t a, b;
    CHECK_EQ_I64(cs_hub_create_chat(w, "o", "t", &a), CS_OK);
    CHECK_EQ_I64(cs_hub_create_chat(w, "o", "t", &b), CS_OK);
    cs_sub *sa, *sb, *list[4];
    double t;
    CHECK_EQ_I64(cs_sub_open(r, a, NULL, &sa), CS_OK);
    CHECK_EQ_I64(cs_sub_open(r, b, NULL, &sb), CS_OK);
    /* The snapshots' status events wait: both ready, the fd readable. */
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 2);
    CHECK(list[0] == sa && list[1] == sb);
    CHECK(readable(fd));
    CHECK(cs_hub_timeout(r) == 0);
    cs_event ev;
    while (cs_sub_next(sa, &ev) == CS_EVENT)
        ;
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 1);
    CHECK(list[0] == sb);
    CHECK(readable(fd)); /* sb still has its event */
    while (cs_sub_next(sb, &ev) == CS_EVENT)
        ;
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 0);
    CHECK(!readable(fd));

    /* Another hub writes: the fd turns readable before any step. */
    int64_t id = say(w, b, "hi");
    CHECK(id > 0);
    CHECK(readable(fd));
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 0); /* not routed yet */
    CHECK(cs_hub_step(r) >= 1);
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 1);
    CHECK(list[0] == sb);
    CHECK(readable(fd));
    /* Its body is not in this hub's cache: cs_sub_try needs the store,
     * asks nothing, and leaves it ready; cs_sub_next reads it. */
    cs_stats s0, s1;
    cs_hub_stats(r, &s0);
    CHECK_EQ_I64(cs_sub_try(sb, &ev), CS_AGAIN);
    cs_hub_stats(r, &s1);
    CHECK_EQ_I64(s1.queries, s0.queries);
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 1);
    CHECK_EQ_I64(next_msg(sb, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, id);
    CHECK_EQ_I64(cs_sub_next(sb, &ev), CS_IDLE);
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 0);
    CHECK(!readable(fd));
    /* What this hub wrote is in its cache: try takes it, no store. */
    id = say(r, b, "mine");
    CHECK(id > 0);
    CHECK(cs_hub_step(r) >= 1);
    cs_hub_stats(r, &s0);
    CHECK_EQ_I64(cs_sub_try(sb, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, id);
    /* that was its last event: off the list at once, no idle call needed */
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 0);
    CHECK(!readable(fd));
    CHECK_EQ_I64(cs_sub_try(sb, &ev), CS_IDLE);
    cs_hub_stats(r, &s1);
    CHECK_EQ_I64(s1.queries, s0.queries);
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 0);
    CHECK(!readable(fd));

    /* A pass that needs the store: try says so and keeps the subscription
     * ready; next does it. A lost notification, found by the backstop poll
     * of a second reader, needs a DB pass (its cache never saw it). */
    cs_hub *rp;
    cs_hub_options opp = {.memory = db, .poll_interval = 0.02};
    CHECK_EQ_I64(cs_hub_open(&opp, &rp), CS_OK);
    int pfd = cs_hub_fd(rp);
    cs_sub *sp;
    CHECK_EQ_I64(cs_sub_open(rp, a, NULL, &sp), CS_OK);
    while (cs_sub_next(sp, &ev) == CS_EVENT)
        ;
    CHECK(!readable(pfd));
    t = cs_hub_timeout(rp);
    CHECK(t >= 0 && t <= 0.02);
    cs_memdb_drop_notifies(db, 1);
    id = say(w, a, "lost");
    CHECK(id > 0);
    CHECK(!readable(pfd));
    until_poll(rp);
    CHECK_EQ_I64(cs_hub_ready(rp, list, 4), 1);
    CHECK(readable(pfd));
    cs_hub_stats(rp, &s0);
    CHECK_EQ_I64(cs_sub_try(sp, &ev), CS_AGAIN);
    cs_hub_stats(rp, &s1);
    CHECK_EQ_I64(s1.queries, s0.queries); /* nothing asked */
    CHECK_EQ_I64(cs_hub_ready(rp, list, 4), 1);
    int got = 0;
    while (cs_sub_next(sp, &ev) == CS_EVENT)
        got += ev.kind == CS_EV_MESSAGE && ev.id == id;
    CHECK_EQ_I64(got, 1);
    CHECK_EQ_I64(cs_hub_ready(rp, list, 4), 0);

    /* A failed read stalls the subscription (its fd goes quiet) and it is
     * ready again after the stall delay, through the timeout. */
    cs_memdb_drop_notifies(db, 1);
    id = say(w, a, "lost again");
    until_poll(rp);
    CHECK_EQ_I64(cs_hub_ready(rp, list, 4), 1);
    cs_memdb_fail_queries(db, 1);
    CHECK_EQ_I64(cs_sub_next(sp, &ev), CS_IDLE);
    CHECK_EQ_I64(cs_hub_ready(rp, list, 4), 0);
    CHECK(rp->stalled == sp);
    CHECK(!readable(pfd));
    t = cs_hub_timeout(rp);
    CHECK(t >= 0 && t <= 0.25);
    struct timespec ts = {0, 260000000};
    nanosleep(&ts, NULL);
    CHECK(cs_hub_step(rp) >= 0);
    CHECK_EQ_I64(cs_hub_ready(rp, list, 4), 1);
    CHECK(readable(pfd));
    got = 0;
    while (cs_sub_next(sp, &ev) == CS_EVENT)
        got += ev.kind == CS_EV_MESSAGE && ev.id == id;
    CHECK_EQ_I64(got, 1);
    CHECK_EQ_I64(cs_hub_ready(rp, list, 4), 0);
    cs_sub_close(sp);
    cs_hub_close(rp);
    cs_hub_step(r);
    while (cs_sub_next(sa, &ev) == CS_EVENT)
        ;

    /* unread puts the subscription back on the list; close takes it off. */
    id = say(r, b, "x");
    cs_hub_step(r);
    CHECK_EQ_I64(cs_sub_next(sb, &ev), CS_EVENT);
    cs_sub_unread(sb);
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 1);
    CHECK(readable(fd));
    CHECK_EQ_I64(cs_sub_next(sb, &ev), CS_EVENT);
    CHECK_EQ_I64(ev.id, id);
    CHECK_EQ_I64(cs_sub_next(sb, &ev), CS_IDLE);
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 0);
    CHECK(!readable(fd));
    say(r, b, "y");
    cs_hub_step(r);
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 1);
    cs_sub_close(sb);
    CHECK_EQ_I64(cs_hub_ready(r, list, 4), 0);
    CHECK(!readable(fd));
    CHECK_EQ_I64(cs_hub_fd(r), fd); /* the same fd throughout */
    cs_sub_close(sa);
    cs_hub_close(r);

    /* With a backstop poll the timeout is the time to the next one. */
    cs_hub_options op = {.memory = db, .poll_interval = 0.5};
    CHECK_EQ_I64(cs_hub_open(&op, &r), CS_OK);
    t = cs_hub_timeout(r);
    CHECK(t > 0.3 && t <= 0.5);
    cs_hub_close(r);
    cs_hub_close(w);
    cs_memdb_close(db);
}

/* ---- the engine -------------------------------------------------------- */

typedef struct wait_job {
    int fd;
    double deadline;
    int result, steps;
} wait_job;

static void wait_fn(void *arg)
{
    wait_job *j = arg;
    j->steps++;
    j->result = cs_engine_wait(j->fd, CS_WAIT_READ, j->deadline);
    j->steps++;
}

static void test_engine(void)
{
    cs_engine *e;
    CHECK_EQ_I64(cs_engine_new(&e), CS_OK);
    int p[2];
    CHECK(pipe(p) == 0);
    /* Ready at once: the call returns without parking. */
    char c = 'x';
    CHECK(write(p[1], &c, 1) == 1);
    wait_job j = {.fd = p[0], .deadline = cs_now() + 5};
    cs_wait w = {0};
    CHECK_EQ_I64(cs_engine_start(e, wait_fn, &j, &w), CS_OK);
    CHECK_EQ_I64(j.result, 1);
    CHECK_EQ_I64(j.steps, 2);
    CHECK(read(p[0], &c, 1) == 1);

    /* Not ready: the call parks, the caller gets the engine's fd, a second
     * call is refused, and a resume before the fd is ready is harmless. */
    int efd = cs_engine_fd(e);
    j = (wait_job){.fd = p[0], .deadline = cs_now() + 5};
    CHECK_EQ_I64(cs_engine_start(e, wait_fn, &j, &w), CS_AGAIN);
    CHECK_EQ_I64(w.fd, efd);
    CHECK_EQ_I64(w.events, CS_WAIT_READ);
    CHECK_EQ_I64(j.steps, 1);
    CHECK(cs_engine_busy(e));
    CHECK(!readable(efd));
    wait_job other = {.fd = -1, .deadline = 0};
    CHECK_EQ_I64(cs_engine_start(e, wait_fn, &other, NULL), CS_EBUSY);
    CHECK_EQ_I64(other.steps, 0);
    CHECK_EQ_I64(cs_engine_resume(e, &w), CS_AGAIN);
    CHECK(write(p[1], &c, 1) == 1);
    CHECK_EQ_I64(cs_engine_wait(efd, CS_WAIT_READ, cs_now() + 2), 1);
    CHECK_EQ_I64(cs_engine_resume(e, &w), CS_OK);
    CHECK_EQ_I64(j.result, 1);
    CHECK_EQ_I64(j.steps, 2);
    CHECK(!cs_engine_busy(e));
    CHECK(!readable(efd));
    CHECK_EQ_I64(cs_engine_resume(e, &w), CS_EINVAL);
    CHECK(read(p[0], &c, 1) == 1);

    /* The deadline: the engine's fd turns readable at it, and the wait
     * reports 0. A sleep (fd -1) is the same without a descriptor. */
    struct timespec ts = {0, 30000000};
    for (int fd = p[0], k = 0; k < 2; k++, fd = -1) {
        j = (wait_job){.fd = fd, .deadline = cs_now() + 0.02};
        double t0 = cs_now();
        CHECK_EQ_I64(cs_engine_start(e, wait_fn, &j, &w), CS_AGAIN);
        CHECK_EQ_I64(cs_engine_wait(efd, CS_WAIT_READ, t0 + 2), 1);
        CHECK(cs_now() - t0 >= 0.015);
        CHECK_EQ_I64(cs_engine_resume(e, &w), CS_OK);
        CHECK_EQ_I64(j.result, 0);
    }
    nanosleep(&ts, NULL);

    /* Off an engine the same wait blocks in place. */
    double t0 = cs_now();
    CHECK_EQ_I64(cs_engine_wait(p[0], CS_WAIT_READ, t0 + 0.02), 0);
    CHECK(cs_now() - t0 >= 0.015);

    /* Freed with a call parked: it finishes (its wait blocking). */
    j = (wait_job){.fd = p[0], .deadline = cs_now() + 0.05};
    CHECK_EQ_I64(cs_engine_start(e, wait_fn, &j, &w), CS_AGAIN);
    cs_engine_free(e);
    CHECK_EQ_I64(j.steps, 2);
    CHECK_EQ_I64(j.result, 0);
    close(p[0]);
    close(p[1]);
}

int main(void)
{
    test_errors();
    test_null_and_options();
    test_basic();
    test_bad_arguments();
    test_stepped_misuse();
    test_race();
    test_replicas();
    test_resume();
    test_queue_overflow();
    test_close_with_open_handles();
    test_unread();
    test_max_chats();
    test_evictions_keep_subscribed();
    test_chat_table();
    test_empty_page();
    test_poll();
    test_loop_contract();
    test_engine();
    return check_done("test_hub");
}
