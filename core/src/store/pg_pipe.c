/* pg_pipe.c - the PostgreSQL store's appends in pipeline mode
 * (store:append_many): many single-message appends, each its own
 * transaction, a chunk of them per round trip, and their notifications
 * after them in one statement per chunk. */
#include "pg_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- appends in pipeline mode ------------------------------------------ */

/* The parameters of one pipelined append (kept until the chunk is sent). */
typedef struct pipe_req {
    char chat[24], channel[128], head[16], rest[40 + CS_MAX_TOOL];
    const char *vals[8];
    int k, nvals;
} pipe_req;

/* The most appends one round trip carries: their answers must fit what the
 * server may write before the client reads. */
#define PIPE_CHUNK 64

static void pipe_params(pg_store *s, const cs_append_req *q, int mode,
                        pipe_req *p)
{
    const cs_msg_in *msg = &q->msg;
    const char *tool = msg->tool ? msg->tool : "";
    size_t tool_len = strlen(tool);
    bool body = mode == CS_APPEND_BODY &&
                CS_BODY_HEAD + tool_len + msg->content_len <= CS_PAYLOAD_MAX;
    p->k = mode == CS_APPEND_SILENT ? PREP_APPEND
           : body                   ? PREP_APPEND_BODY
                                    : PREP_APPEND_NOTIFY;
    p->nvals = mode == CS_APPEND_SILENT ? 5 : body ? 8 : 7;
    pg_i64s(p->chat, q->chat_id);
    pg_channel_of(s, q->chat_id, p->channel, sizeof p->channel);
    snprintf(p->head, sizeof p->head, "%d:%c:", CS_PAYLOAD_VERSION,
             body ? 'M' : 'm');
    p->rest[0] = '\0';
    if (body)
        snprintf(p->rest, sizeof p->rest, "%s:%zu:%s", cs_role_name(msg->role),
                 tool_len, tool);
    const char *vals[8] = {p->chat,
                           cs_role_name(msg->role),
                           msg->content ? msg->content : "",
                           tool,
                           "",
                           p->channel,
                           p->head,
                           p->rest};
    memcpy(p->vals, vals, sizeof vals);
}

/* The next result of the pipeline, waiting for it up to the deadline:
 * NULL at the end of a statement's results; *lost when the connection
 * broke or the deadline passed. */
static PGresult *pipe_result(PGconn *c, double deadline, bool *lost)
{
    while (PQisBusy(c)) {
        if (pg_wait_io(c, false, deadline) <= 0 || !PQconsumeInput(c)) {
            *lost = true;
            return NULL;
        }
    }
    return PQgetResult(c);
}

/* One answered append: its id into ids, its message into out. */
static int pipe_take(pg_store *s, const cs_append_req *q, PGresult *r,
                     cs_msglist *out, int64_t *id)
{
    int64_t prev = 0;
    *id = 0;
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_TUPLES_OK) {
        const char *e = PQresultErrorMessage(r);
        pg_fail(s, CS_EBACKEND, "append failed", e && *e ? e : NULL);
        return CS_EBACKEND;
    }
    if (PQntuples(r) != 1)
        return pg_no_chat(s, q->chat_id);
    if (!pg_col_id(r, 0, 0, id) || !pg_col_id(r, 0, 1, &prev)) {
        *id = 0;
        return pg_fail(s, CS_EBACKEND, "bad message id returned", NULL);
    }
    const cs_msg_in *m = &q->msg;
    cs_msg *msg =
        cs_msg_new(*id, q->chat_id, prev, m->role, m->content ? m->content : "",
                   m->content_len, m->tool ? m->tool : "");
    if (!msg || cs_msglist_push(out, msg) < 0) {
        cs_msg_unref(msg);
        return CS_ENOMEM; /* committed: *id says so */
    }
    return CS_OK;
}

/* One chunk in one round trip: each append its own autocommit statement
 * followed by a Sync, so each is its own transaction and one that fails
 * leaves the others; all are sent before any answer is read. False when
 * the connection was lost (and dropped). */
static bool pipe_chunk(pg_store *s, PGconn *c, const cs_append_req *reqs,
                       size_t n, int mode, pipe_req *p, cs_msglist *out,
                       int64_t *ids, int *rcs)
{
    size_t sent = 0, answered = 0;
    bool lost = false;
    for (size_t i = 0; i < n; i++) {
        rcs[i] = CS_EBACKEND; /* not sent */
        ids[i] = 0;
        pipe_params(s, &reqs[i], mode, &p[i]);
    }
    if (!PQenterPipelineMode(c)) {
        pg_conn_fail(s, c, "cannot enter pipeline mode");
    } else {
        for (; sent < n; sent++)
            if (!PQsendQueryPrepared(c, s->prep_name[p[sent].k], p[sent].nvals,
                                     p[sent].vals, NULL, NULL, 0) ||
                !PQpipelineSync(c))
                break;
        double deadline = pg_now() + s->query_timeout;
        int f;
        while ((f = PQflush(c)) == 1)
            if (pg_wait_io(c, true, deadline) <= 0)
                break;
        lost = f != 0; /* part of it may have gone: unknown from here */
        for (; answered < sent && !lost; answered++) {
            PGresult *r = pipe_result(c, deadline, &lost);
            if (lost)
                break;
            size_t base = out->n;
            rcs[answered] =
                r ? pipe_take(s, &reqs[answered], r, out, &ids[answered])
                  : CS_EBACKEND;
            if (out->n == base)
                cs_msglist_push(out, NULL); /* out keeps request order */
            /* the rest of the statement's results up to its end (NULL),
             * then its Sync */
            while (r && !lost) {
                PQclear(r);
                r = pipe_result(c, deadline, &lost);
            }
            if (!lost) {
                r = pipe_result(c, deadline, &lost);
                if (!lost && PQresultStatus(r) != PGRES_PIPELINE_SYNC)
                    lost = true; /* out of step: give the connection up */
                PQclear(r);
            }
        }
        if (!lost)
            PQexitPipelineMode(c);
    }
    for (size_t i = answered; i < n; i++) {
        if (i < sent)
            rcs[i] = CS_EUNKNOWN; /* sent, no answer: it may have committed */
        cs_msglist_push(out, NULL);
    }
    if (lost) {
        pg_fail(s, CS_EUNKNOWN,
                "the connection broke or timed out under a "
                "pipeline of appends",
                NULL);
        pg_drop_conn(s, c);
    }
    return !lost;
}

/* The notifications of a chunk's committed appends (out's entries from
 * base, n of them; NULL: none), in one statement of their own after them:
 * one notifying transaction for the chunk, not one per append, which is
 * what PostgreSQL's delivery costs most for (a commit that notifies takes
 * the server's notification lock and wakes every listener). Each hint
 * carries its message when mode says so and it fits. A failure is counted
 * nowhere but costs no message: readers find them through the next DB pass
 * or the backstop poll. */
/* A message's hint carries it when mode says so and it fits a
 * notification; *room receives the bytes the hint needs (with its NUL). */
static bool hint_body(const cs_msg *m, int mode, size_t *room)
{
    size_t need = CS_BODY_HEAD + strlen(m->tool) + m->content_len;
    bool body = mode == CS_APPEND_BODY && need <= CS_PAYLOAD_MAX;
    *room = body ? need + 1 : 64;
    return body;
}

static void pipe_notify(pg_store *s, PGconn *c, const cs_msglist *out,
                        size_t base, size_t n, int mode)
{
    size_t k = 0, room = 0, cap;
    for (size_t i = 0; i < n; i++)
        if (out->items[base + i]) {
            k++;
            hint_body(out->items[base + i], mode, &cap);
            room += cap;
        }
    if (k == 0)
        return;
    char *sql = malloc(32 + k * 40);
    const char **vals = malloc(2 * k * sizeof *vals);
    char *chan = malloc(k * 128);
    char *pay = malloc(room); /* each hint what it needs, not 8 KB each */
    if (!sql || !vals || !chan || !pay)
        goto done;
    size_t o = (size_t)snprintf(sql, 32, "SELECT "), at = 0;
    for (size_t i = 0, j = 0; i < n; i++) {
        const cs_msg *m = out->items[base + i];
        if (!m)
            continue;
        char *ch = chan + j * 128, *pl = pay + at;
        bool body = hint_body(m, mode, &cap);
        at += cap;
        pg_channel_of(s, m->chat_id, ch, 128);
        cs_hint h = {.kind = CS_HINT_MESSAGE, .after = m->prev_id, .id = m->id};
        if (body) {
            h.body = true;
            h.role = m->role;
            h.tool = m->tool;
            h.tool_len = strlen(m->tool);
            h.text = m->content;
            h.text_len = m->content_len;
        }
        if (cs_payload_encode(&h, pl, cap) < 0) {
            h.body = false; /* the plain hint always fits */
            cs_payload_encode(&h, pl, cap);
        }
        vals[2 * j] = ch;
        vals[2 * j + 1] = pl;
        o += (size_t)snprintf(sql + o, 40, "%spg_notify($%zu, $%zu)",
                              j ? ", " : "", 2 * j + 1, 2 * j + 2);
        j++;
    }
    if (pg_exec(s, c, sql, (int)(2 * k), vals) < 0)
        s->err[0] = '\0'; /* the appends succeeded: not their error */
done:
    free(sql);
    free(vals);
    free(chan);
    free(pay);
}

int pg_append1_many(void *st, const cs_append_req *reqs, size_t n, int mode,
                    cs_msglist *out, int64_t *ids, int *rcs)
{
    pg_store *s = st;
    int rc = pg_claim_q(s);
    if (rc < 0)
        return rc;
    pipe_req *p = malloc((n < PIPE_CHUNK ? n : PIPE_CHUNK) * sizeof *p);
    if (!p || cs_msglist_reserve(out, n) < 0) {
        free(p);
        return CS_ENOMEM;
    }
    for (size_t at = 0; at < n; at += PIPE_CHUNK) {
        size_t k = n - at < PIPE_CHUNK ? n - at : PIPE_CHUNK;
        PGconn *c = pg_live_qconn(s);
        if (!c || !pg_prepare(s, c, PREP_APPEND, 5)) {
            for (size_t i = at; i < n; i++) {
                rcs[i] = CS_EBACKEND;
                ids[i] = 0;
                cs_msglist_push(out, NULL);
            }
            break;
        }
        /* The appends without their notifications, then those of the ones
         * that committed, together (pipe_notify). */
        size_t base = out->n;
        if (pipe_chunk(s, c, reqs + at, k, CS_APPEND_SILENT, p, out, ids + at,
                       rcs + at) &&
            mode != CS_APPEND_SILENT)
            pipe_notify(s, c, out, base, k, mode);
    }
    free(p);
    return CS_OK;
}
