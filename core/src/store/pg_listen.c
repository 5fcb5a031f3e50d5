/* pg_listen.c - the PostgreSQL store's listener: the thread that drains
 * its connection and reconnects it, LISTEN and UNLISTEN from the caller's
 * side, and the hand-over of what it read (poll, fd). */
#include "pg_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BACKOFF_MIN 0.05
#define BACKOFF_MAX 5.0

/* ---- the listener thread ----------------------------------------------------
 * A private thread drains the listener connection, so no reader, however
 * idle, leaves its server backend waiting to write notifications (which
 * holds back the cluster's notification queue and its cleanup). It takes
 * them off the socket into a buffer bounded in bytes, and reconnects the
 * listener in the background (LISTEN on every chat in one round trip).
 * It touches no hub state and no Lua: the hub takes the buffer in pg_poll,
 * woken through ready[] (the store's fd, the same for the store's life).
 * Past the bound the buffered hints are dropped and their chats marked: the
 * hub resyncs their subscriptions from W, which loses nothing. The thread
 * writes no field the caller's statements use (err, unknown, q ...). */

#define NOTE_BYTES_MAX (4u << 20) /* buffered hints, bytes */

struct lnote {
    int64_t chat_id; /* -1: not a chat channel */
    size_t len;
    char payload[];
};

/* A pipe, both ends non-blocking and closed on exec. */
int pg_make_pipe(int fds[2])
{
    if (pipe(fds) < 0)
        return -1;
    for (int i = 0; i < 2; i++)
        if (fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK) < 0 ||
            fcntl(fds[i], F_SETFD, FD_CLOEXEC) < 0)
            return -1;
    return 0;
}

void pg_wake_thread(pg_store *s)
{
    char b = 1;
    if (s->wake[1] >= 0 && write(s->wake[1], &b, 1) < 0 && errno != EAGAIN) {
        /* the pipe is full: the thread wakes anyway */
    }
}

/* Under lmu: tells the hub something waits (one byte at a time). */
static void signal_hub(pg_store *s)
{
    if (s->signalled)
        return;
    char b = 1;
    if (write(s->ready[1], &b, 1) == 1)
        s->signalled = true;
}

void pg_notes_clear(pg_store *s, bool mark)
{
    for (size_t i = 0; i < s->nnotes; i++) {
        if (mark && s->notes[i]->chat_id > 0 &&
            cs_idset_add(&s->dropped, s->notes[i]->chat_id) < 0)
            s->resync_pending = true; /* no room to say which: all */
        free(s->notes[i]);
    }
    s->nnotes = 0;
    s->note_bytes = 0;
}

static int64_t chat_of(pg_store *s, const char *channel);

/* Under lmu: room for one more buffered hint. */
static bool notes_room(pg_store *s)
{
    if (s->nnotes < s->capnotes)
        return true;
    size_t cap = s->capnotes ? s->capnotes * 2 : 64;
    struct lnote **t = realloc(s->notes, cap * sizeof *t);
    if (!t)
        return false;
    s->notes = t;
    s->capnotes = cap;
    return true;
}

/* Under lmu: every notification libpq holds for the listener goes into the
 * buffer (or, past its bound, is dropped with its chat marked). */
static void take_notes(pg_store *s)
{
    PGnotify *n;
    while (s->l && (n = PQnotifies(s->l))) {
        if (s->deaf || s->deaf_pending) {
            PQfreemem(n); /* deaf: all is read again when the hub is back */
            continue;
        }
        int64_t chat = chat_of(s, n->relname);
        size_t len = strlen(n->extra);
        size_t cost = sizeof(struct lnote) + sizeof(struct lnote *) + len;
        struct lnote *e =
            s->note_bytes + cost <= NOTE_BYTES_MAX && notes_room(s)
                ? malloc(sizeof *e + len)
                : NULL;
        if (e) {
            e->chat_id = chat;
            e->len = len;
            memcpy(e->payload, n->extra, len);
            s->notes[s->nnotes++] = e;
            s->note_bytes += cost;
        } else {
            /* Over the bound (or out of memory): nobody reads. What is
             * buffered goes, the listener goes deaf until the hub is back,
             * and then every subscription resyncs from W. */
            pg_notes_clear(s, true);
            if (!s->deaf_pending)
                pg_wake_thread(s); /* it sends the UNLISTEN */
            s->deaf_pending = true;
        }
        PQfreemem(n);
    }
    if (s->nnotes || s->dropped.n || s->resync_pending || s->deaf_pending)
        signal_hub(s);
}

/* A statement on a listener connection of the thread's own making (the
 * thread writes no shared error field): true if every result is fine; a
 * one-row integer result goes to *pid. */
static bool thread_exec(PGconn *c, const char *sql, double deadline, int *pid)
{
    if (!PQsendQuery(c, sql))
        return false;
    int f;
    while ((f = PQflush(c)) == 1)
        if (pg_wait_io(c, true, deadline) <= 0)
            return false;
    if (f < 0)
        return false;
    bool ok = true;
    PGresult *r;
    for (;;) {
        while (PQisBusy(c))
            if (pg_wait_io(c, false, deadline) <= 0 || !PQconsumeInput(c))
                return false;
        if (!(r = PQgetResult(c)))
            break;
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_TUPLES_OK && pid && PQntuples(r) == 1)
            *pid = atoi(PQgetvalue(r, 0, 0));
        else if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
            ok = false;
        PQclear(r);
    }
    return ok;
}

/* head, then `verb "<channel>";` for each chat of ids not in skip (NULL:
 * none), as one statement: malloc'd (NULL on ENOMEM); *added: how many. */
static char *channels_sql(pg_store *s, const char *head, const char *verb,
                          const cs_idset *ids, const cs_idset *skip,
                          size_t *added)
{
    size_t cap = strlen(head) + 1 + ids->n * (sizeof s->prefix + 40);
    char *sql = malloc(cap);
    if (!sql)
        return NULL;
    size_t o = (size_t)snprintf(sql, cap, "%s", head);
    *added = 0;
    for (size_t i = 0; i < ids->n; i++) {
        char channel[128];
        if (skip && cs_idset_has(skip, ids->ids[i]))
            continue;
        pg_channel_of(s, ids->ids[i], channel, sizeof channel);
        o += (size_t)snprintf(sql + o, cap - o, "%s \"%s\";", verb, channel);
        ++*added;
    }
    return sql;
}

/* Under lmu, on the thread: a connection it made becomes the listener:
 * its server process and a LISTEN on every chat, in one round trip, run
 * with lmu released (c is the thread's own until it is installed; a caller
 * that needs the listener meanwhile connects its own, and then c goes). */
static bool thread_install(pg_store *s, PGconn *c)
{
    size_t added;
    char *sql = channels_sql(s, "SELECT pg_backend_pid();", "LISTEN",
                             &s->listening, NULL, &added);
    if (!sql)
        return false;
    int pid = -1;
    PQsetnonblocking(c, 1);
    PQsetNoticeReceiver(c, pg_q_notice, s); /* it takes lmu itself */
    pthread_mutex_unlock(&s->lmu);
    bool ok = thread_exec(c, sql, pg_now() + s->connect_timeout, &pid);
    pthread_mutex_lock(&s->lmu);
    free(sql);
    if (!ok || s->l || s->lstop)
        return false;
    PQsetNoticeReceiver(c, pg_l_notice, s);
    s->l = c;
    s->l_pid = pid;
    s->deaf = s->deaf_pending = s->hear_pending = s->hearing = false;
    s->l_reconnects++;
    s->resync_pending = true; /* notifications meanwhile are gone */
    s->backoff = 0;
    take_notes(s);
    return true;
}

static void thread_backoff(pg_store *s)
{
    s->backoff = s->backoff ? s->backoff * 2 : BACKOFF_MIN;
    if (s->backoff > BACKOFF_MAX)
        s->backoff = BACKOFF_MAX;
    s->retry_at = pg_now() + s->backoff;
}

static int poll_ms(double seconds)
{
    if (seconds <= 0)
        return 0;
    return seconds > 3600 ? 3600000 : (int)(seconds * 1000) + 1;
}

/* Under lmu, on the thread: the UNLISTENs callers left, sent in one go
 * without waiting (their results are read with the notifications). */
static void thread_unlisten(pg_store *s)
{
    if (!s->l || s->l_inflight || s->unlisten.n == 0 ||
        PQstatus(s->l) != CONNECTION_OK)
        return;
    size_t added; /* not the chats listened to again since */
    char *sql =
        channels_sql(s, "", "UNLISTEN", &s->unlisten, &s->listening, &added);
    if (!sql)
        return; /* later */
    cs_idset_free(&s->unlisten);
    cs_idset_init(&s->unlisten, INT64_MIN);
    if (added > 0 && PQsendQuery(s->l, sql)) {
        s->l_inflight = true;
        PQflush(s->l); /* a few hundred bytes: they go at once */
    }
    free(sql);
}

/* Under lmu: reads the results of the thread's UNLISTENs that arrived
 * (every one when wait: a caller about to use the connection). */
static bool inflight_done(pg_store *s, bool wait)
{
    PGresult *r;
    while (s->l_inflight) {
        if (PQisBusy(s->l)) {
            if (!wait)
                return true;
            if (pg_wait_io(s->l, false, pg_now() + s->connect_timeout) <= 0 ||
                !PQconsumeInput(s->l))
                return false;
            continue;
        }
        if ((r = PQgetResult(s->l))) {
            PQclear(r);
        } else {
            s->l_inflight = false;
            if (s->hearing) {
                /* Every chat is listened to again: what was missed is
                 * found by the resync that follows. */
                s->hearing = s->deaf = false;
                s->resync_pending = true;
                signal_hub(s);
            }
        }
    }
    return true;
}

/* Under lmu, on the thread: going deaf (UNLISTEN *) or hearing again
 * (LISTEN to every chat), sent without waiting, read like the UNLISTENs. */
static void thread_deafness(pg_store *s)
{
    if (!s->l || s->l_inflight || PQstatus(s->l) != CONNECTION_OK)
        return;
    if (s->deaf_pending) {
        s->deaf_pending = false;
        if (PQsendQuery(s->l, "UNLISTEN *")) {
            s->l_inflight = true;
            s->deaf = true;
            s->deaf_count++;
            cs_idset_free(&s->unlisten);
            cs_idset_init(&s->unlisten, INT64_MIN);
            PQflush(s->l);
        }
        return;
    }
    if (!s->deaf || !s->hear_pending)
        return;
    size_t added;
    char *sql =
        channels_sql(s, "SELECT 1;", "LISTEN", &s->listening, NULL, &added);
    if (!sql)
        return; /* later */
    if (PQsendQuery(s->l, sql)) {
        s->hear_pending = false;
        s->hearing = s->l_inflight = true;
        PQflush(s->l);
    }
    free(sql);
}

void *pg_listener_main(void *arg)
{
    pg_store *s = arg;
    PGconn *c = NULL; /* a listener being connected, the thread's own */
    PostgresPollingStatusType cst = PGRES_POLLING_WRITING;
    double c_deadline = 0;
    pthread_mutex_lock(&s->lmu);
    while (!s->lstop) {
        struct pollfd p[2] = {{.fd = s->wake[0], .events = POLLIN}, {.fd = -1}};
        int ms = -1;
        if (s->l && PQstatus(s->l) != CONNECTION_OK) {
            PQfinish(s->l); /* found broken by the caller */
            s->l = NULL;
            s->l_inflight = false;
        }
        if (c && s->l) {
            PQfinish(c); /* the caller reconnected it first */
            c = NULL;
        }
        thread_deafness(s);
        thread_unlisten(s);
        if (s->l) {
            p[1] = (struct pollfd){.fd = PQsocket(s->l), .events = POLLIN};
        } else if (c) {
            p[1] = (struct pollfd){
                .fd = PQsocket(c),
                .events = cst == PGRES_POLLING_READING ? POLLIN : POLLOUT};
            ms = poll_ms(c_deadline - pg_now());
        } else if (s->listening.n > 0) {
            double wait = s->retry_at - pg_now();
            if (wait <= 0) {
                /* Started without lmu: resolving a host name may block. */
                pthread_mutex_unlock(&s->lmu);
                c = pg_connect_db_mode(s, true);
                pthread_mutex_lock(&s->lmu);
                cst = PGRES_POLLING_WRITING;
                c_deadline = pg_now() + s->connect_timeout;
                if (!c || PQstatus(c) == CONNECTION_BAD) {
                    PQfinish(c);
                    c = NULL;
                    thread_backoff(s);
                }
                continue;
            }
            ms = poll_ms(wait);
        }
        pthread_mutex_unlock(&s->lmu);
        int got = poll(p, p[1].fd >= 0 ? 2 : 1, ms);
        pthread_mutex_lock(&s->lmu);
        if (got > 0 && (p[0].revents & POLLIN)) {
            char buf[64];
            while (read(s->wake[0], buf, sizeof buf) > 0)
                ;
        }
        if (c && !s->l) {
            if (got > 0 && p[1].revents)
                cst = PQconnectPoll(c);
            if (cst == PGRES_POLLING_OK) {
                if (!thread_install(s, c)) {
                    PQfinish(c);
                    thread_backoff(s);
                }
                c = NULL;
            } else if (cst == PGRES_POLLING_FAILED || pg_now() > c_deadline) {
                PQfinish(c);
                c = NULL;
                thread_backoff(s);
            }
        } else if (s->l && got > 0 && p[1].fd == PQsocket(s->l) &&
                   p[1].revents) {
            if (!PQconsumeInput(s->l) || PQstatus(s->l) != CONNECTION_OK) {
                take_notes(s); /* what was read before the loss */
                PQfinish(s->l);
                s->l = NULL;
                s->l_inflight = false;
                s->backoff = 0;
                s->retry_at = 0; /* the first retry is immediate */
            } else {
                inflight_done(s, false);
                take_notes(s);
            }
        }
    }
    PQfinish(c);
    pthread_mutex_unlock(&s->lmu);
    return NULL;
}

/* ---- the listener, from the caller's side (under lmu) ----------------------
 */

/* LISTEN or UNLISTEN on the listener; the channel is an identifier built
 * from the validated schema and an integer, quoted. Under lmu. */
static int listen_cmd(pg_store *s, const char *verb, int64_t chat_id)
{
    if (s->l && !inflight_done(s, true)) {
        s->l_inflight = false;
        return pg_conn_fail(s, s->l, "listener connection lost");
    }
    char channel[128], sql[200];
    pg_channel_of(s, chat_id, channel, sizeof channel);
    snprintf(sql, sizeof sql, "%s \"%s\"", verb, channel);
    return pg_exec(s, s->l, sql, 0, NULL);
}

static void listener_drop(pg_store *s)
{
    if (s->l) {
        PQfinish(s->l);
        s->l = NULL;
    }
    s->l_inflight = s->hearing = false;
    /* a new connection listens only to what is followed */
    cs_idset_free(&s->unlisten);
    cs_idset_init(&s->unlisten, INT64_MIN);
    s->backoff = 0;
    s->retry_at = 0; /* the first retry is immediate */
    pg_wake_thread(s);
}

/* A failed listener connection: the next attempt waits (backoff). */
static int listener_failed(pg_store *s, PGconn *l, const char *what)
{
    pg_conn_fail(s, l, what);
    PQfinish(l);
    thread_backoff(s);
    return CS_EBACKEND;
}

/* The listener's server process as the server reports it: through a pooler
 * the process id of the connection's start-up message is the pooler's own
 * key, not a server process. */
static int listener_identify(pg_store *s)
{
    PGresult *r = pg_run(s, s->l, "SELECT pg_backend_pid()", 0, NULL);
    if (!r)
        return CS_EBACKEND;
    int rc = pg_col_int(r, &s->l_pid)
                 ? CS_OK
                 : pg_fail(s, CS_EBACKEND, "bad backend pid returned", NULL);
    PQclear(r);
    return rc;
}

/* A connected listener: LISTEN on every chat; after a reconnect every
 * subscription must resync, since notifications sent meanwhile are gone. At
 * open the probe (probe_listener) names the server process instead. */
static int listener_ready(pg_store *s, PGconn *l, bool initial)
{
    PQsetnonblocking(l, 1);
    PQsetNoticeReceiver(l, pg_l_notice, s);
    s->l = l;
    s->deaf = s->deaf_pending = s->hear_pending = s->hearing = false;
    if (!initial && listener_identify(s) < 0) {
        listener_drop(s);
        return CS_EBACKEND;
    }
    for (size_t i = 0; i < s->listening.n; i++) {
        if (listen_cmd(s, "LISTEN", s->listening.ids[i]) < 0) {
            listener_drop(s);
            return CS_EBACKEND;
        }
    }
    if (!initial) {
        s->l_reconnects++;
        s->resync_pending = true;
        take_notes(s);
    }
    s->backoff = 0;
    pg_wake_thread(s); /* it polls the new socket */
    return CS_OK;
}

/* Connects the listener, blocking (at most connect_timeout): a caller that
 * needs it now (a subscription's LISTEN), while the thread's own attempt
 * may still be under way (the thread then drops its own). */
int pg_listener_connect(pg_store *s, bool initial)
{
    if (pg_now() < s->retry_at)
        return pg_fail(s, CS_EBACKEND, "listener reconnect backing off", NULL);
    PGconn *l = pg_connect_db(s);
    if (!l || PQstatus(l) != CONNECTION_OK)
        return listener_failed(s, l, "listener connection failed");
    return listener_ready(s, l, initial);
}

/* The listener is down: the chat joins what the thread LISTENs to when it
 * reconnects, and since that reconnect resyncs every subscription from its
 * own position, what is committed before the LISTEN is found then. The
 * call does not wait for a connection. */
static int listen_later(pg_store *s, int64_t chat_id)
{
    if (cs_idset_add(&s->listening, chat_id) < 0)
        return CS_ENOMEM;
    pg_wake_thread(s);
    return CS_OK;
}

static int listen_locked(pg_store *s, int64_t chat_id)
{
    cs_idset_remove(&s->unlisten, chat_id); /* not sent yet: not needed */
    if (cs_idset_has(&s->listening, chat_id))
        return CS_OK;
    if (!s->l || PQstatus(s->l) != CONNECTION_OK) {
        if (s->l)
            listener_drop(s);
        return listen_later(s, chat_id);
    }
    /* LISTEN is committed when its result arrives: before the snapshot. A
     * listener the server closed while idle still looks connected until it
     * is used: then reconnect (which resyncs everything) and try once more. */
    int rc = listen_cmd(s, "LISTEN", chat_id);
    if (rc < 0 && (!s->l || PQstatus(s->l) == CONNECTION_BAD)) {
        listener_drop(s);
        return listen_later(s, chat_id);
    }
    if (rc < 0) {
        listener_drop(s);
        return rc;
    }
    if (cs_idset_add(&s->listening, chat_id) < 0) {
        listen_cmd(s, "UNLISTEN", chat_id);
        return CS_ENOMEM;
    }
    return CS_OK;
}

int pg_listen(void *st, int64_t chat_id)
{
    pg_store *s = st;
    pthread_mutex_lock(&s->lmu);
    int rc = listen_locked(s, chat_id);
    take_notes(s); /* what the statement read, for the thread to hand on */
    pthread_mutex_unlock(&s->lmu);
    return rc;
}

/* At close, with the thread stopped: a listener session a pooler hands on
 * keeps no channel of this store (one round trip, bounded). */
void pg_listener_close(pg_store *s)
{
    if (!s->l || PQstatus(s->l) != CONNECTION_OK ||
        (s->listening.n == 0 && s->unlisten.n == 0 && !s->l_inflight))
        return;
    if (inflight_done(s, true))
        PQclear(pg_run(s, s->l, "UNLISTEN *", 0, NULL));
}

/* Never waits: the thread sends the UNLISTEN (its notifications meanwhile
 * find no subscription and are dropped by the hub). */
int pg_unlisten(void *st, int64_t chat_id)
{
    pg_store *s = st;
    pthread_mutex_lock(&s->lmu);
    if (cs_idset_remove(&s->listening, chat_id) && s->l &&
        cs_idset_add(&s->unlisten, chat_id) >= 0)
        pg_wake_thread(s);
    pthread_mutex_unlock(&s->lmu);
    return CS_OK;
}

/* "chat:<id>" (or "<schema>:chat:<id>") -> id; -1 if it is not ours. */
static int64_t chat_of(pg_store *s, const char *channel)
{
    size_t n = strlen(s->prefix);
    int64_t id;
    if (strncmp(channel, s->prefix, n) != 0 ||
        !cs_parse_id(channel + n, strlen(channel + n), &id) || id < 1)
        return -1;
    return id;
}

/* Hands the hub what the thread buffered: a resync of everything after a
 * reconnect, a resync of each chat whose hints were dropped, then the
 * hints in arrival order. */
int pg_poll(void *st,
            void (*cb)(void *ud, int64_t chat_id, const char *payload,
                       size_t len),
            void *ud)
{
    pg_store *s = st;
    char buf[64];
    pthread_mutex_lock(&s->lmu);
    while (read(s->ready[0], buf, sizeof buf) > 0)
        ;
    s->signalled = false;
    /* The hub reads: a listener gone deaf (nobody read its buffer) hears
     * again; one about to go deaf stays as it is, with what it dropped
     * resynced. */
    if (s->deaf_pending) {
        s->deaf_pending = false;
        s->resync_pending = true;
    }
    if (s->deaf && !s->hearing && !s->hear_pending) {
        s->hear_pending = true;
        pg_wake_thread(s);
    }
    struct lnote **notes = s->notes;
    size_t n = s->nnotes;
    cs_idset dropped = s->dropped;
    bool resync = s->resync_pending;
    s->notes = NULL;
    s->nnotes = s->capnotes = s->note_bytes = 0;
    cs_idset_init(&s->dropped, INT64_MIN);
    s->resync_pending = false;
    pthread_mutex_unlock(&s->lmu);
    int count = 0;
    if (resync)
        cb(ud, CS_RESYNC_ALL, NULL, 0);
    for (size_t i = 0; i < dropped.n; i++)
        cb(ud, dropped.ids[i], NULL, 0);
    for (size_t i = 0; i < n; i++) {
        cb(ud, notes[i]->chat_id, notes[i]->payload, notes[i]->len);
        free(notes[i]);
        count++;
    }
    free(notes);
    cs_idset_free(&dropped);
    return count;
}

/* The store's fd: readable when pg_poll has something. The same descriptor
 * for the store's whole life, whatever happens to the listener. */
int pg_fd(void *st)
{
    return ((pg_store *)st)->ready[0];
}
