/* pg_conn.c - the PostgreSQL store's engine: connecting, one statement
 * with its deadline (a cancel on a thread of its own past it), the retry of
 * a statement safe to send twice, the store's transactions, its errors and
 * the server's warnings. */
#include "pg_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* ---- small helpers ------------------------------------------------------ */

#define FNV_PRIME UINT64_C(1099511628211)

/* 64-bit FNV-1a of n bytes, continuing from h (FNV_OFFSET to start). */
uint64_t pg_fnv1a(const void *p, size_t n, uint64_t h)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * FNV_PRIME;
    return h;
}

double pg_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Copies msg into buf with the password (if any) replaced by "***". */
static void scrub_copy(char *buf, size_t cap, const char *msg,
                       const char *password)
{
    size_t o = 0;
    size_t plen = password ? strlen(password) : 0;
    for (const char *p = msg; *p && o + 1 < cap;) {
        if (plen >= 1 && strncmp(p, password, plen) == 0) {
            for (const char *r = "***"; *r && o + 1 < cap; r++)
                buf[o++] = *r;
            p += plen;
            continue;
        }
        /* one line: libpq messages end with newlines */
        buf[o++] = (*p == '\n' || *p == '\r' || *p == '\t') ? ' ' : *p;
        p++;
    }
    while (o > 0 && buf[o - 1] == ' ')
        o--;
    buf[o] = '\0';
}

int pg_fail(pg_store *s, int rc, const char *what, const char *detail)
{
    char clean[400];
    scrub_copy(clean, sizeof clean, detail ? detail : "", s->password);
    snprintf(s->err, sizeof s->err, "%s%s%s", what, *clean ? ": " : "", clean);
    return rc;
}

int pg_conn_fail(pg_store *s, PGconn *c, const char *what)
{
    return pg_fail(s, CS_EBACKEND, what,
                   c ? PQerrorMessage(c) : "cannot allocate a connection");
}

/* A write statement (an autocommit write, a COMMIT) got no answer: its
 * outcome is unknown, said as such, never as rolled back. */
int pg_write_failed(pg_store *s)
{
    if (!s->unknown)
        return CS_EBACKEND;
    char keep[sizeof s->err];
    memcpy(keep, s->err, sizeof keep);
    snprintf(s->err, sizeof s->err,
             "sent, no answer (it may have committed; retry with the same "
             "idempotency key): %.400s",
             keep);
    return CS_EUNKNOWN;
}

/* WARNINGs the server sends on either connection ("NOTIFY queue is N%
 * full" above all) are counted, and the last one kept, for stats(); other
 * notices ("already exists, skipping") are not errors and are dropped. The
 * query connection's come on the caller's thread, the listener's under lmu
 * (its thread or a caller holding it). */
static void note_warning(pg_store *s, const PGresult *r)
{
    const char *sev = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
    if (!sev || strcmp(sev, "WARNING") != 0)
        return;
    const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    s->warnings++;
    scrub_copy(s->last_warning, sizeof s->last_warning, msg ? msg : "",
               s->password);
}

void pg_q_notice(void *arg, const PGresult *r)
{
    pg_store *s = arg;
    pthread_mutex_lock(&s->lmu);
    note_warning(s, r);
    pthread_mutex_unlock(&s->lmu);
}

void pg_l_notice(void *arg, const PGresult *r)
{
    note_warning(arg, r); /* lmu is held */
}

static void quiet(void *arg, const char *message)
{
    (void)arg;
    (void)
        message; /* NOTICEs (e.g. "already exists, skipping") are not errors */
}

/* Opens a connection: blocking (bounded by connect_timeout), or only
 * started, for PQconnectPoll to finish. */
PGconn *pg_connect_db_mode(pg_store *s, bool start)
{
    /* A dead peer is found by the kernel, not only by a statement that
     * waits: keepalives, and unacknowledged data given up after 10 s. They
     * come before the DSN, whose own settings override them. */
    const char *keys[] = {"keepalives",
                          "keepalives_idle",
                          "keepalives_interval",
                          "keepalives_count",
                          "tcp_user_timeout",
                          "dbname",
                          "fallback_application_name",
                          "connect_timeout",
                          NULL};
    const char *vals[] = {"1",     "10",   "5",          "3",
                          "10000", s->dsn, "chatstream", CONNECT_TIMEOUT,
                          NULL};
    if (s->has_timeout)
        keys[7] = NULL; /* the DSN's own connect_timeout wins */
    PGconn *c = start ? PQconnectStartParams(keys, vals, 1)
                      : PQconnectdbParams(keys, vals, 1);
    if (c)
        PQsetNoticeProcessor(c, quiet, NULL);
    return c;
}

/* A connection made the way a call waits (pg_wait_io: on an engine the
 * wait goes to the caller's loop), at most connect_timeout. Not OK when it
 * failed or timed out. */
PGconn *pg_connect_db(pg_store *s)
{
    PGconn *c = pg_connect_db_mode(s, true);
    if (!c || PQstatus(c) == CONNECTION_BAD)
        return c;
    double deadline = pg_now() + s->connect_timeout;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
        if (pg_wait_io(c, st == PGRES_POLLING_WRITING, deadline) == 0)
            break; /* timed out: still CONNECTION_STARTED, not OK */
        st = PQconnectPoll(c);
    }
    return c;
}

/* Waits until c is readable (or writable) or the deadline passes. */
/* Waits for c's socket (on an engine: hands the wait to the caller's event
 * loop instead, see cs_engine_wait): >0 ready, 0 deadline passed, <0. */
int pg_wait_io(PGconn *c, bool write, double deadline)
{
    if (deadline - pg_now() <= 0)
        return 0;
    return cs_engine_wait(PQsocket(c), write ? CS_WAIT_WRITE : CS_WAIT_READ,
                          deadline);
}

/* Runs one statement (parameters as text) with a timeout; returns the last
 * result, or NULL with s->err set. Works in blocking and non-blocking mode. */
static PGresult *collect(pg_store *s, PGconn *c);

PGresult *pg_run(pg_store *s, PGconn *c, const char *sql, int n,
                 const char *const *vals)
{
    s->unknown = false;
    if (!c || PQstatus(c) != CONNECTION_OK) {
        pg_conn_fail(s, c, "not connected");
        return NULL;
    }
    /* Without parameters the simple protocol runs it, which also allows the
     * several statements of a migration. */
    int sent = n > 0 ? PQsendQueryParams(c, sql, n, NULL, vals, NULL, NULL, 0)
                     : PQsendQuery(c, sql);
    if (!sent) {
        pg_conn_fail(s, c, "cannot send a query");
        return NULL;
    }
    return collect(s, c);
}

/* Prepares statement k of PREP_* on c when this connection has not seen
 * it yet: true when it is prepared. */
bool pg_prepare(pg_store *s, PGconn *c, int k, int n)
{
    if (s->prep_gen != s->q_gen || c != s->q) {
        s->prepared = 0;
        s->prep_gen = s->q_gen;
    }
    if (!(s->prepared & (1u << k))) {
        if (!PQsendPrepare(c, s->prep_name[k], s->prep_sql[k], n, NULL)) {
            pg_conn_fail(s, c, "cannot send a query");
            return false;
        }
        PGresult *r = collect(s, c);
        s->unknown = false; /* the statement itself was not sent */
        /* The name is the hash of the text: a statement of that name on
         * this session is this one, left by an earlier store of the schema
         * (a pooler that hands sessions on without DISCARD ALL). Outside a
         * transaction the failed PREPARE changed nothing else; inside one
         * it aborted it, and fails as before. */
        bool ours = !r && strcmp(s->sqlstate, "42P05") == 0 &&
                    PQstatus(c) == CONNECTION_OK &&
                    PQtransactionStatus(c) == PQTRANS_IDLE;
        if (!r && !ours)
            return false;
        PQclear(r);
        if (c != s->q || s->prep_gen != s->q_gen)
            return false; /* dropped meanwhile (a timeout): not prepared */
        s->prepared |= 1u << k;
    }
    return true;
}

/* Runs statement k of PREP_* on c, preparing it first when this connection
 * has not seen it yet. */
PGresult *pg_run_prepared(pg_store *s, PGconn *c, int k, int n,
                          const char *const *vals)
{
    s->unknown = false;
    if (!c || PQstatus(c) != CONNECTION_OK) {
        pg_conn_fail(s, c, "not connected");
        return NULL;
    }
    if (!pg_prepare(s, c, k, n))
        return NULL;
    if (!PQsendQueryPrepared(c, s->prep_name[k], n, vals, NULL, NULL, 0)) {
        pg_conn_fail(s, c, "cannot send a query");
        return NULL;
    }
    return collect(s, c);
}

/* How long a cancelled statement may take to answer before its connection
 * is given up: a call overruns query_timeout by about this much at most. */
#define CANCEL_GRACE 1.0

/* The cancel request, on a thread of its own: PQcancel connects to the
 * server and may block as long as the network does; the caller never waits
 * for it. It touches nothing but its own PGcancel. */
static void *cancel_main(void *arg)
{
    char buf[256];
    PQcancel(arg, buf, sizeof buf);
    PQfreeCancel(arg);
    return NULL;
}

static void send_cancel(PGconn *c)
{
    PGcancel *cancel = PQgetCancel(c);
    if (!cancel)
        return;
    pthread_t t;
    pthread_attr_t a;
    bool started = false;
    if (pthread_attr_init(&a) == 0) {
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        started = pthread_create(&t, &a, cancel_main, cancel) == 0;
        pthread_attr_destroy(&a);
    }
    if (!started)
        PQfreeCancel(cancel); /* no cancel: the connection is given up */
}

/* Reads the results of the statement on c until it is done (1), the
 * deadline passes (0) or the connection breaks (-1). *last keeps the first
 * error, else the last result. */
static int read_results(PGconn *c, double deadline, PGresult **last)
{
    PGresult *r;
    for (;;) {
        while (PQisBusy(c)) {
            if (pg_wait_io(c, false, deadline) == 0)
                return 0;
            if (!PQconsumeInput(c))
                return -1;
        }
        if (!(r = PQgetResult(c)))
            return 1;
        if (*last && PQresultStatus(*last) == PGRES_FATAL_ERROR)
            PQclear(r); /* keep the first error */
        else {
            PQclear(*last);
            *last = r;
        }
    }
}

/* Drops the connection c of the store (it cannot take another statement). */
void pg_drop_conn(pg_store *s, PGconn *c)
{
    if (c == s->q) {
        PQfinish(s->q);
        s->q = NULL;
        s->q_gen++;
    } else if (c == s->l) {
        PQfinish(s->l);
        s->l = NULL;
    }
}

/* Waits for the statement sent on c and returns its last result (the first
 * error wins), or NULL with s->err set. Past query_timeout the statement is
 * cancelled (without blocking: see send_cancel) and given CANCEL_GRACE to
 * answer: a statement that completes anyway (a COMMIT waiting on a
 * synchronous standby commits locally when cancelled) returns its result, a
 * cancelled one fails (it rolled back), and one that does not answer has its
 * connection given up. s->unknown tells the caller whether a failure leaves
 * the statement's outcome unknown (it was sent, and no answer came). */
static PGresult *collect(pg_store *s, PGconn *c)
{
    double deadline = pg_now() + s->query_timeout;
    PGresult *last = NULL;
    int f, done;
    s->unknown = true; /* from the first byte sent on */
    s->sqlstate[0] = '\0';
    while ((f = PQflush(c)) == 1)
        if (pg_wait_io(c, true, deadline) == 0)
            break;
    if (f < 0) {
        pg_conn_fail(s, c, "connection lost");
        return NULL;
    }
    if (f == 1) {
        /* Not all of it went out by the deadline: the server cannot have
         * run it (a statement runs, and commits, only once its message is
         * whole; the extended protocol's implicit commit waits for its
         * Sync). The connection is given up with the rest unsent. */
        pg_drop_conn(s, c);
        s->unknown = false;
        pg_fail(s, CS_EBACKEND, "query timed out before it was sent", NULL);
        return NULL;
    }
    done = read_results(c, deadline, &last);
    bool cancelled = false;
    if (done == 0) {
        send_cancel(c);
        cancelled = true;
        done = read_results(c, pg_now() + CANCEL_GRACE, &last);
        if (done == 1 && last && PQresultStatus(last) == PGRES_FATAL_ERROR) {
            const char *code = PQresultErrorField(last, PG_DIAG_SQLSTATE);
            bool by_cancel = code && strcmp(code, "57014") == 0;
            s->unknown = false;
            pg_fail(s, CS_EBACKEND,
                    by_cancel ? "query timed out (cancelled; not done)"
                              : "query timed out, then failed",
                    by_cancel ? NULL : PQresultErrorMessage(last));
            PQclear(last);
            return NULL;
        }
        if (done != 1) {
            /* No answer within the grace: give the connection up. */
            PQclear(last);
            pg_drop_conn(s, c);
            pg_fail(s, CS_EBACKEND,
                    "query timed out; no answer, the connection was given up",
                    NULL);
            return NULL;
        }
        /* It completed after all, late: its result stands. */
    }
    if (cancelled && done == 1 && last &&
        PQresultStatus(last) != PGRES_FATAL_ERROR) {
        /* The cancel request may still be on its way and would hit the
         * next statement: this connection is given up after its result
         * (a transaction open on it then fails, and rolls back). */
        ExecStatusType st = PQresultStatus(last);
        if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
            pg_drop_conn(s, c);
            s->unknown = false;
            return last;
        }
    }
    if (done < 0) {
        PQclear(last);
        pg_conn_fail(s, c, "connection lost");
        return NULL;
    }
    s->unknown = false;
    if (!last) {
        pg_conn_fail(s, c, "no result");
        return NULL;
    }
    ExecStatusType st = PQresultStatus(last);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        const char *code = PQresultErrorField(last, PG_DIAG_SQLSTATE);
        const char *msg = PQresultErrorMessage(last);
        snprintf(s->sqlstate, sizeof s->sqlstate, "%s", code ? code : "");
        /* The cluster's notification queue is full: every NOTIFY fails
         * until the listener holding it back reads (nothing was written). */
        bool full =
            code && strcmp(code, "54000") == 0 && strstr(msg, "NOTIFY queue");
        pg_fail(s, CS_EBACKEND,
                full ? "the server's notification queue is full (a listener "
                       "somewhere is not reading; see "
                       "stats().notify_queue_usage): nothing was written"
                     : "query failed",
                msg);
        PQclear(last);
        return NULL;
    }
    return last;
}

/* Runs a statement whose result is not needed. */
int pg_exec(pg_store *s, PGconn *c, const char *sql, int n,
            const char *const *vals)
{
    PGresult *r = pg_run(s, c, sql, n, vals);
    if (!r)
        return CS_EBACKEND;
    PQclear(r);
    return CS_OK;
}

/* The query connection, reconnected when it was lost. */
/* A new connection within a call: bounded by connect_timeout and by the
 * call's own deadline (query_timeout), whichever is sooner, so that a call
 * that must reconnect during a network stall still returns in time. */
static PGconn *connect_in_call(pg_store *s)
{
    double bound = s->query_timeout < s->connect_timeout ? s->query_timeout
                                                         : s->connect_timeout;
    double deadline = pg_now() + bound;
    PGconn *c = pg_connect_db_mode(s, true);
    if (!c || PQstatus(c) == CONNECTION_BAD)
        return c;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
        if (pg_wait_io(c, st == PGRES_POLLING_WRITING, deadline) == 0) {
            PQfinish(c);
            return NULL; /* the caller says: cannot reconnect */
        }
        st = PQconnectPoll(c);
    }
    if (st == PGRES_POLLING_OK) {
        PQsetnonblocking(c, 1); /* sends, too, wait no longer than collect */
        PQsetNoticeReceiver(c, pg_q_notice, s);
    }
    return c;
}

PGconn *pg_qconn(pg_store *s)
{
    if (s->q && PQstatus(s->q) == CONNECTION_OK)
        return s->q;
    /* Dropped after a statement that did not answer its cancel, or found
     * dead: a fresh connection. */
    PQfinish(s->q);
    s->q = connect_in_call(s);
    s->q_gen++;
    if (s->q && PQstatus(s->q) == CONNECTION_OK) {
        s->q_reconnects++;
        return s->q;
    }
    if (s->q)
        pg_conn_fail(s, s->q, "cannot reconnect");
    else
        pg_fail(s, CS_EBACKEND, "cannot reconnect: timed out", NULL);
    PQfinish(s->q);
    s->q = NULL;
    return NULL;
}

/* For statements that are safe to send twice (reads, BEGIN, pg_notify) on
 * the query connection outside a transaction: when the connection turns out
 * to be dead (the server restarted since the last statement), reconnect and
 * try once more, instead of failing the caller for a connection that was
 * already gone. */
static PGresult *run_on(pg_store *s, PGconn *c, int k, const char *sql, int n,
                        const char *const *vals)
{
    return k < 0 ? pg_run(s, c, sql, n, vals)
                 : pg_run_prepared(s, c, k, n, vals);
}

/* k: a PREP_* statement (sql unused), or -1 for sql run unprepared. */
PGresult *pg_run_retry_k(pg_store *s, int k, const char *sql, int n,
                         const char *const *vals)
{
    PGconn *c = pg_qconn(s);
    if (!c)
        return NULL;
    bool idle = PQtransactionStatus(c) == PQTRANS_IDLE;
    PGresult *r = run_on(s, c, k, sql, n, vals);
    /* Not after a timeout that dropped the connection (s->q is no longer
     * c, and c is freed): that statement took too long, it is not retried. */
    if (!r && idle && s->q == c && PQstatus(c) == CONNECTION_BAD &&
        (c = pg_qconn(s)))
        r = run_on(s, c, k, sql, n, vals);
    return r;
}

PGresult *pg_run_retry(pg_store *s, const char *sql, int n,
                       const char *const *vals)
{
    return pg_run_retry_k(s, -1, sql, n, vals);
}

/* The query connection for a statement that must not be sent twice (it
 * writes and commits on its own): a connection the server closed while it
 * sat idle (a restart) shows as readable EOF, so it is read first without
 * blocking and replaced if dead. What breaks after the send is reported,
 * not retried: the statement may have committed. */
PGconn *pg_live_qconn(pg_store *s)
{
    PGconn *c = pg_qconn(s);
    if (!c || PQtransactionStatus(c) != PQTRANS_IDLE)
        return c;
    /* Idle, the server has nothing to say unless it is going away (a FATAL
     * message, then EOF: read until both are seen or nothing is left). */
    for (int i = 0; i < 8 && PQstatus(c) == CONNECTION_OK; i++) {
        struct pollfd p = {.fd = PQsocket(c), .events = POLLIN};
        if (poll(&p, 1, 0) <= 0)
            break;
        if (!PQconsumeInput(c))
            break;
    }
    return PQstatus(c) == CONNECTION_OK ? c : pg_qconn(s);
}

int pg_exec_retry(pg_store *s, const char *sql, int n, const char *const *vals)
{
    PGresult *r = pg_run_retry(s, sql, n, vals);
    if (!r)
        return CS_EBACKEND;
    PQclear(r);
    return CS_OK;
}

/* Ends a failed transaction on the query connection, if it is still there
 * (a statement that timed out may have dropped it). */
void pg_rollback(pg_store *s)
{
    PGconn *c = s->q;
    if (c && PQstatus(c) == CONNECTION_OK &&
        PQtransactionStatus(c) != PQTRANS_IDLE) {
        char keep[sizeof s->err];
        memcpy(keep, s->err, sizeof keep);
        pg_exec(s, c, "ROLLBACK", 0, NULL);
        memcpy(s->err, keep, sizeof keep);
    }
}

/* The query connection for a statement of its own: refused while the
 * store's transaction is open; a transaction left open on it (never by the
 * store: a statement that failed inside one) is rolled back first. */
int pg_claim_q(pg_store *s)
{
    if (s->in_tx) {
        snprintf(s->err, sizeof s->err,
                 "a transaction is open (chat %" PRId64 ")", s->tx_chat);
        return CS_EINVAL;
    }
    if (s->q && PQstatus(s->q) == CONNECTION_OK &&
        PQtransactionStatus(s->q) != PQTRANS_IDLE)
        pg_rollback(s);
    return CS_OK;
}

/* Opens a transaction on the query connection: refused while the store's
 * own one is open; never on top of a transaction left open on the
 * connection (BEGIN would only warn, and the work would join it). BEGIN is
 * the statement that may be resent on a fresh connection. */
int pg_begin_tx(pg_store *s)
{
    int rc = pg_claim_q(s);
    return rc < 0 ? rc : pg_exec_retry(s, "BEGIN", 0, NULL);
}

/* COMMIT, reporting a transaction the server rolled back instead (an aborted
 * one answers COMMIT with ROLLBACK and no error). Rolls back on failure. */
int pg_commit_tx(pg_store *s)
{
    int rc = CS_OK;
    if (!s->q || PQtransactionStatus(s->q) != PQTRANS_INTRANS)
        rc = pg_fail(s, CS_EBACKEND, "transaction aborted, rolled back", NULL);
    if (rc == CS_OK) {
        PGresult *r = pg_run(s, s->q, "COMMIT", 0, NULL);
        if (!r)
            rc = pg_write_failed(s);
        else if (strcmp(PQcmdStatus(r), "COMMIT") != 0)
            rc = pg_fail(s, CS_EBACKEND, "transaction rolled back", NULL);
        PQclear(r);
    }
    if (rc < 0)
        pg_rollback(s);
    return rc;
}

void pg_i64s(char *buf, int64_t v)
{
    snprintf(buf, 24, "%" PRId64, v);
}

bool pg_col_id(PGresult *r, int row, int col, int64_t *out)
{
    if (PQgetisnull(r, row, col))
        return false;
    const char *v = PQgetvalue(r, row, col);
    return cs_parse_id(v, strlen(v), out);
}

/* The one integer column of the one row of a result, as an int. */
bool pg_col_int(PGresult *r, int *out)
{
    int64_t v;
    if (PQntuples(r) != 1 || PQnfields(r) < 1 || !pg_col_id(r, 0, 0, &v) ||
        v > INT32_MAX)
        return false;
    *out = (int)v;
    return true;
}

void pg_channel_of(pg_store *s, int64_t chat_id, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s%" PRId64, s->prefix, chat_id);
}
