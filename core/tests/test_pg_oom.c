/* test_pg_oom.c - a write PostgreSQL committed reports its real id even when
 * the core runs out of memory right after the commit; the connections find a
 * dead peer (keepalives, tcp_user_timeout). Needs a server:
 * CHATSTREAM_TEST_DSN (make test starts one); without it the test fails in
 * CI and is skipped elsewhere (ctest shows it as skipped, saying why). */
#include "check.h"
#include "internal.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* The one allocation to fail: a cs_msg of this size (a message whose
 * content is CONTENT_LEN bytes and has no tool field), once armed. */
#define CONTENT_LEN 3001
static size_t fail_size;
static int armed;

extern void *__libc_malloc(size_t n);

void *malloc(size_t n)
{
    if (armed && n == fail_size) {
        armed = 0;
        return NULL;
    }
    return __libc_malloc(n);
}

static int next_msg(cs_sub *s, double timeout, cs_event *ev)
{
    int rc;
    while ((rc = cs_sub_wait(s, timeout, ev)) == CS_EVENT &&
           ev->kind != CS_EV_MESSAGE)
        ;
    return rc;
}

int main(void)
{
    const char *dsn = getenv("CHATSTREAM_TEST_DSN");
    if (!dsn || !*dsn) {
        const char *ci = getenv("CI");
        fprintf(stderr, "test_pg_oom: no PostgreSQL (CHATSTREAM_TEST_DSN): run "
                        "`make test`, or scripts/pg-test-server start\n");
        return ci && *ci ? 1 : 77; /* 77: skipped */
    }
    char schema[40];
    snprintf(schema, sizeof schema, "t_oom_%ld_%ld", (long)getpid(),
             (long)time(NULL) % 100000);
    fail_size = sizeof(cs_msg) + CONTENT_LEN + 1 + 0 + 1;
    static char content[CONTENT_LEN];
    memset(content, 'x', sizeof content);

    for (int plain = 0; plain < 2; plain++) {
        cs_hub_options o = {.dsn = dsn,
                            .schema = schema,
                            .poll_interval = 0,
                            .plain_notifications = plain};
        cs_hub *w, *r;
        char err[256];
        CHECK_EQ_I64(cs_hub_open_err(&o, &w, err, sizeof err), CS_OK);
        CHECK_EQ_I64(cs_hub_migrate(w), CS_OK);
        CHECK_EQ_I64(cs_hub_open_err(&o, &r, err, sizeof err), CS_OK);
        int64_t chat;
        CHECK_EQ_I64(cs_hub_create_chat(w, "o", "t", &chat), CS_OK);
        /* Every TCP connection of the process (the two stores' query and
         * listener connections): keepalives on, and data left
         * unacknowledged for 10 s gives the connection up. */
        int tcp = 0;
        for (int fd = 3; fd < 1024; fd++) {
            int type = 0, on = 0, uto = 0;
            socklen_t len = sizeof type;
            struct sockaddr_storage peer;
            socklen_t plen = sizeof peer;
            if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 ||
                type != SOCK_STREAM ||
                getpeername(fd, (struct sockaddr *)&peer, &plen) < 0 ||
                (peer.ss_family != AF_INET && peer.ss_family != AF_INET6))
                continue;
            tcp++;
            len = sizeof on;
            CHECK_EQ_I64(getsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, &len),
                         0);
            CHECK_EQ_I64(on, 1);
            len = sizeof uto;
            CHECK_EQ_I64(
                getsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &uto, &len), 0);
            CHECK_EQ_I64(uto, 10000);
        }
        CHECK(tcp >= 4); /* two stores, two connections each */
        cs_sub *reader, *own;
        CHECK_EQ_I64(cs_sub_open(r, chat, NULL, &reader), CS_OK);
        CHECK_EQ_I64(cs_sub_open(w, chat, NULL, &own), CS_OK);

        cs_msg_in m = {CS_ROLE_USER, content, CONTENT_LEN, NULL};
        int64_t id = 0;
        armed = 1;
        CHECK_EQ_I64(cs_hub_append(w, chat, &m, 1, &id), CS_OK);
        CHECK(!armed); /* the allocation after the commit did fail */
        armed = 0;
        CHECK(id > 0); /* the real id, not 0 */
        cs_stats st;
        cs_hub_stats(w, &st);
        CHECK_EQ_I64(st.publish_errors, 1);

        /* Both readers get it, with that id: the reader in another store
         * through its notification, the writer's own through a DB pass. */
        cs_event ev;
        CHECK_EQ_I64(next_msg(reader, 5, &ev), CS_EVENT);
        CHECK_EQ_I64(ev.id, id);
        CHECK_EQ_SIZE(ev.text_len, CONTENT_LEN);
        CHECK_EQ_I64(next_msg(own, 5, &ev), CS_EVENT);
        CHECK_EQ_I64(ev.id, id);

        /* The next append publishes as usual. */
        cs_msg_in m2 = {CS_ROLE_USER, "next", 4, NULL};
        int64_t id2 = 0;
        CHECK_EQ_I64(cs_hub_append(w, chat, &m2, 1, &id2), CS_OK);
        CHECK(id2 > id);
        CHECK_EQ_I64(next_msg(reader, 5, &ev), CS_EVENT);
        CHECK_EQ_I64(ev.id, id2);
        cs_sub_close(reader);
        cs_sub_close(own);
        cs_hub_close(r);
        cs_hub_close(w);
    }
    return check_done("test_pg_oom");
}
