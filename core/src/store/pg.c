/* pg.c - the PostgreSQL store through libpq: a query connection and one
 * listener. This file: the ops table, open (with its probe of the listener)
 * and close, and the stats accessors; pg_internal.h says where the rest is. */
#include "pg_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define QUERY_TIMEOUT 30.0    /* default seconds for one statement */
#define PROBE_TIMEOUT_MAX 5.0 /* seconds: the longest wait of the probe */

bool cs_valid_identifier(const char *s)
{
    /* A channel "<schema>:chat:<id>" must fit PostgreSQL's 63-byte names:
     * 38 + 6 + 19 digits. */
    if (!s || !*s || strlen(s) > 38)
        return false;
    if (!((*s >= 'a' && *s <= 'z') || *s == '_'))
        return false;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') ||
              *p == '_'))
            return false;
    return true;
}

/* ---- errors, stats, close ----------------------------------------------- */

static const char *p_errmsg(void *st)
{
    return ((pg_store *)st)->err;
}

static int p_listener_pid(void *st)
{
    pg_store *s = st;
    pthread_mutex_lock(&s->lmu);
    int pid = s->l && PQstatus(s->l) == CONNECTION_OK ? s->l_pid : -1;
    pthread_mutex_unlock(&s->lmu);
    return pid;
}

static int p_queue_usage(void *st, double *out)
{
    pg_store *s = st;
    if (pg_claim_q(s) < 0)
        return CS_EBACKEND; /* in a transaction: next time */
    PGresult *r =
        pg_run_retry(s, "SELECT pg_notification_queue_usage()", 0, NULL);
    if (!r)
        return CS_EBACKEND;
    int rc = PQntuples(r) == 1 ? CS_OK : CS_EBACKEND;
    if (rc == CS_OK)
        *out = atof(PQgetvalue(r, 0, 0));
    PQclear(r);
    return rc;
}

static int64_t p_warnings(void *st, char *last, size_t cap)
{
    pg_store *s = st;
    pthread_mutex_lock(&s->lmu);
    int64_t n = s->warnings;
    snprintf(last, cap, "%s", s->last_warning);
    pthread_mutex_unlock(&s->lmu);
    return n;
}

static int64_t p_deaf_count(void *st)
{
    pg_store *s = st;
    pthread_mutex_lock(&s->lmu);
    int64_t n = s->deaf_count;
    pthread_mutex_unlock(&s->lmu);
    return n;
}

static int64_t p_reconnects(void *st)
{
    pg_store *s = st;
    pthread_mutex_lock(&s->lmu);
    int64_t n = s->l_reconnects;
    pthread_mutex_unlock(&s->lmu);
    return n + s->q_reconnects;
}

static void p_close(void *st)
{
    pg_store *s = st;
    if (s->thread_started) {
        pthread_mutex_lock(&s->lmu);
        s->lstop = true;
        pthread_mutex_unlock(&s->lmu);
        pg_wake_thread(s);
        pthread_join(s->thread, NULL); /* it never blocks: see listener_main */
    }
    pg_listener_close(s);
    PQfinish(s->q);
    PQfinish(s->l);
    pg_notes_clear(s, false);
    free(s->notes);
    cs_idset_free(&s->dropped);
    for (int i = 0; i < 2; i++) {
        if (s->wake[i] >= 0)
            close(s->wake[i]);
        if (s->ready[i] >= 0)
            close(s->ready[i]);
    }
    pthread_mutex_destroy(&s->lmu);
    cs_idset_free(&s->listening);
    cs_idset_free(&s->unlisten);
    for (int k = 0; k < PREP_COUNT; k++)
        free(s->prep_sql[k]);
    if (s->password) {
        memset(s->password, 0, strlen(s->password));
        free(s->password);
    }
    if (s->dsn) {
        memset(s->dsn, 0, strlen(s->dsn));
        free(s->dsn);
    }
    free(s);
}

/* ---- the probe at open ----------------------------------------------------
 */

/* A channel name no other open shares: a hash of the clock, both
 * connections' keys and the store's address, in hex. */
static void probe_token(pg_store *s, char *buf, size_t cap)
{
    static unsigned counter;
    struct timespec ts[2];
    clock_gettime(CLOCK_REALTIME, &ts[0]);
    clock_gettime(CLOCK_MONOTONIC, &ts[1]);
    int keys[2] = {PQbackendPID(s->q), PQbackendPID(s->l)};
    uintptr_t at = (uintptr_t)s;
    unsigned n = ++counter;
    uint64_t h = pg_fnv1a(ts, sizeof ts, FNV_OFFSET);
    h = pg_fnv1a(keys, sizeof keys, h);
    h = pg_fnv1a(&at, sizeof at, h);
    h = pg_fnv1a(&n, sizeof n, h);
    snprintf(buf, cap, "%016" PRIx64, h);
}

/* Refuses, before anything is written, a connection where notifications
 * cannot reach the listener: a pooler in transaction (or statement) mode,
 * where LISTEN "succeeds" but the server session that ran it goes back to
 * the pool at the end of its transaction, so notifications would reach
 * nobody and messages would wait for the backstop poll. The listener
 * LISTENs on a private channel ("<schema>:probe:<token>", never a chat
 * channel) and names its server process; the query connection NOTIFYs the
 * channel and names its own. One server process for both connections is a
 * pooler sharing it; otherwise the notification must arrive within the
 * connect timeout. It is consumed here, and UNLISTENed. On a direct
 * connection: one round trip on each connection, the delivery, and the
 * UNLISTEN. */
static int probe_listener(pg_store *s)
{
    char token[24], channel[sizeof s->schema + 32], sql[sizeof channel + 40];
    probe_token(s, token, sizeof token);
    snprintf(channel, sizeof channel, "%s:probe:%s", s->schema, token);
    snprintf(sql, sizeof sql, "LISTEN \"%s\"; SELECT pg_backend_pid()",
             channel);
    PGresult *r = pg_run(s, s->l, sql, 0, NULL);
    int rc = r && pg_col_int(r, &s->l_pid) ? CS_OK : CS_EBACKEND;
    PQclear(r);
    int q_pid = -1;
    if (rc == CS_OK) {
        const char *vals[2] = {channel, token};
        r = pg_run(s, s->q, "SELECT pg_backend_pid(), pg_notify($1, $2)", 2,
                   vals);
        rc = r && pg_col_int(r, &q_pid) ? CS_OK : CS_EBACKEND;
        PQclear(r);
    }
    if (rc < 0) {
        char detail[sizeof s->err - 32];
        memcpy(detail, s->err, sizeof detail - 1);
        detail[sizeof detail - 1] = '\0';
        snprintf(s->err, sizeof s->err, "cannot probe the listener: %s",
                 *detail ? detail : "bad backend pid returned");
        return CS_EBACKEND;
    }
    /* Two sessions on one server process: only a pooler does that. */
    bool shared = q_pid == s->l_pid, arrived = false;
    double bound = s->connect_timeout < PROBE_TIMEOUT_MAX ? s->connect_timeout
                                                          : PROBE_TIMEOUT_MAX;
    double deadline = pg_now() + bound;
    bool lost = false;
    while (!shared && !arrived && !lost) {
        PGnotify *n;
        while ((n = PQnotifies(s->l))) {
            if (strcmp(n->relname, channel) == 0 &&
                strcmp(n->extra, token) == 0)
                arrived = true;
            PQfreemem(n);
        }
        if (arrived)
            break;
        int w = pg_wait_io(s->l, false, deadline);
        if (w == 0)
            break;
        lost = w < 0 || !PQconsumeInput(s->l);
    }
    if (lost)
        return pg_conn_fail(s, s->l, "cannot probe the listener");
    /* Also after a refusal: through a pooler it may reach the session that
     * listens, which otherwise goes on listening for whoever gets it. */
    snprintf(sql, sizeof sql, "UNLISTEN \"%s\"", channel);
    rc = pg_exec(s, s->l, sql, 0, NULL);
    if (!arrived) {
        char why[96];
        if (shared)
            snprintf(why, sizeof why,
                     "the query connection and the listener ran on one "
                     "server process (pid %d)",
                     q_pid);
        else
            snprintf(why, sizeof why,
                     "a probe notification did not arrive within %.0f s",
                     bound);
        snprintf(s->err, sizeof s->err,
                 "notifications do not reach the listener (a pooler in "
                 "transaction mode?): %s; connect directly or through a "
                 "pooler in session mode",
                 why);
        return CS_EBACKEND;
    }
    if (rc < 0)
        return rc;
    /* Nothing else was listened to yet: whatever came is the probe's. */
    PGnotify *n;
    while ((n = PQnotifies(s->l)))
        PQfreemem(n);
    return CS_OK;
}

/* ---- the ops table, open ------------------------------------------------ */

static const cs_store_ops pg_ops = {
    .name = "postgresql",
    .remote = true,
    .create_chat = pg_create_chat,
    .chat_get = pg_chat_get,
    .tx_begin = pg_tx_begin,
    .tx_end = pg_tx_end,
    .tx_insert = pg_tx_insert,
    .tx_update = pg_tx_update,
    .tx_tail = pg_tx_tail,
    .tx_edit = pg_tx_edit,
    .cuts = pg_cuts,
    .queue_list = pg_queue_list,
    .tx_key_get = pg_tx_key_get,
    .tx_key_put = pg_tx_key_put,
    .tx_queue_add = pg_tx_queue_add,
    .tx_queue_del = pg_tx_queue_del,
    .tx_queue_front = pg_tx_queue_front,
    .acquire = pg_acquire,
    .notify_part = pg_notify_part,
    .stuck = pg_stuck,
    .append1 = pg_append1,
    .append1_many = pg_append1_many,
    .messages_after_many = pg_messages_after_many,
    .messages_after = pg_messages_after,
    .snapshot = pg_snapshot,
    .chats_state = pg_chats_state,
    .listen = pg_listen,
    .unlisten = pg_unlisten,
    .notify = pg_notify,
    .poll = pg_poll,
    .fd = pg_fd,
    .errmsg = p_errmsg,
    .close = p_close,
    .migrate = pg_migrate,
    .listener_pid = p_listener_pid,
    .reconnects = p_reconnects,
    .deaf_count = p_deaf_count,
    .queue_usage = p_queue_usage,
    .warnings = p_warnings,
};

int cs_pg_store_open(const char *dsn, const char *schema, double query_timeout,
                     cs_store *out, char *errbuf, size_t errlen)
{
    if (!schema)
        schema = "chatstream";
    if (!dsn || !cs_valid_identifier(schema)) {
        if (errbuf && errlen)
            snprintf(errbuf, errlen, "%s",
                     dsn ? "schema must match [a-z_][a-z0-9_]{0,37}"
                         : "no dsn");
        return CS_EINVAL;
    }
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(dsn, &perr);
    if (!opts) {
        if (errbuf && errlen)
            snprintf(errbuf, errlen, "bad dsn%s",
                     perr ? " (cannot parse)" : "");
        PQfreemem(perr);
        return CS_EINVAL;
    }
    pg_store *s = calloc(1, sizeof *s);
    if (!s) {
        PQconninfoFree(opts);
        return CS_ENOMEM;
    }
    cs_idset_init(&s->listening, INT64_MIN);
    cs_idset_init(&s->unlisten, INT64_MIN);
    cs_idset_init(&s->dropped, INT64_MIN);
    s->wake[0] = s->wake[1] = s->ready[0] = s->ready[1] = -1;
    pthread_mutex_init(&s->lmu, NULL);
    s->connect_timeout = atof(CONNECT_TIMEOUT);
    s->query_timeout = query_timeout > 0 ? query_timeout : QUERY_TIMEOUT;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val)
            continue;
        if (strcmp(o->keyword, "password") == 0 && *o->val)
            s->password = strdup(o->val);
        if (strcmp(o->keyword, "connect_timeout") == 0) {
            s->has_timeout = true;
            /* libpq: 0 or less waits forever, below 2 counts as 2. */
            double t = atof(o->val);
            s->connect_timeout = t <= 0 ? 1e9 : t < 2 ? 2 : t;
        }
    }
    PQconninfoFree(opts);
    s->dsn = strdup(dsn);
    snprintf(s->schema, sizeof s->schema, "%s", schema);
    if (strcmp(schema, "chatstream") == 0)
        snprintf(s->prefix, sizeof s->prefix, "chat:");
    else
        snprintf(s->prefix, sizeof s->prefix, "%s:chat:", schema);
    if (!s->dsn || !pg_build_prepared(s)) {
        p_close(s);
        return CS_ENOMEM;
    }
    s->q = pg_connect_db(s);
    if (s->q && PQstatus(s->q) == CONNECTION_OK) {
        PQsetnonblocking(s->q, 1); /* see connect_in_call */
        PQsetNoticeReceiver(s->q, pg_q_notice, s);
    }
    if (!s->q || PQstatus(s->q) != CONNECTION_OK) {
        pg_conn_fail(s, s->q, "cannot connect");
        if (errbuf && errlen)
            snprintf(errbuf, errlen, "%s", s->err);
        p_close(s);
        return CS_EBACKEND;
    }
    if (pg_listener_connect(s, true) < 0 || probe_listener(s) < 0) {
        if (errbuf && errlen)
            snprintf(errbuf, errlen, "%s", s->err);
        p_close(s);
        return CS_EBACKEND;
    }
    if (pg_make_pipe(s->wake) < 0 || pg_make_pipe(s->ready) < 0 ||
        pthread_create(&s->thread, NULL, pg_listener_main, s) != 0) {
        if (errbuf && errlen)
            snprintf(errbuf, errlen, "cannot start the listener thread: %s",
                     strerror(errno));
        p_close(s);
        return CS_EBACKEND;
    }
    s->thread_started = true;
    out->ops = &pg_ops;
    out->st = s;
    return CS_OK;
}
