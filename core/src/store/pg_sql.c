/* pg_sql.c - the PostgreSQL store's statements: the prepared ones (the hot
 * paths) and the ops on chats, messages and the queue, acquire, the state
 * read of the backstop poll, and notify. */
#include "pg_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SQL_MAX 4096

/* ---- the prepared statements -------------------------------------------- */

static const char *const prep_kind[PREP_COUNT] = {
    "cs_append",   "cs_append_notify", "cs_append_body", "cs_after",
    "cs_snapshot", "cs_chats_state",   "cs_after_many"};

/* The columns every chat row is read with: id, owner, title, status,
 * version, worker, heartbeat age (microseconds, NULL: none),
 * last_message_id. clock_timestamp(), not now(): a transaction that waited
 * for the row lock must not see a heartbeat written after its own start as
 * negative (a negative age would read as "no heartbeat"). */
#define CHAT_COLS                                                              \
    "id, owner, title, status, version, coalesce(worker_id, ''), "             \
    "(extract(epoch FROM clock_timestamp() - heartbeat_at) * 1000000)"         \
    "::bigint, last_message_id"

/* The texts of the PREP_* statements for the store's schema (one call at
 * open): false on ENOMEM. */
bool pg_build_prepared(pg_store *s)
{
    /* One message: lock the chat row, take the id under that lock
     * (invariant 1), insert, move the chat's last message; then, by
     * variant, nothing, the plain hint, or the hint with the message. */
    static const char *const notify[3] = {
        [PREP_APPEND] = "",
        [PREP_APPEND_NOTIFY] =
            ", pg_notify($6::text, $7::text || prev_id || ':' || id)",
        [PREP_APPEND_BODY] = (", pg_notify($6::text, $7::text || prev_id || "
                              "':' || id || ':' || $8::text || $3::text)"),
    };
    char sql[SQL_MAX];
    for (int k = 0; k < PREP_COUNT; k++) {
        if (k == PREP_SNAPSHOT)
            /* A snapshot, one statement (one view): the chat's row
             * (columns 0-7, its last_error 20, archived 21, history 22 and
             * the cut a stale cursor reads from 23), its queue (13-16), the
             * first page of its live messages (8-12) and the parts of its
             * turn in progress (seq 8, after 9, text 11), told apart by k
             * and sorted by it. */
            snprintf(
                sql, sizeof sql,
                "SELECT " CHAT_COLS ", NULL::bigint, NULL::bigint, "
                "NULL::text, NULL::text, NULL::text, NULL::bigint, "
                "NULL::text, NULL::text, NULL::bigint, 0 AS k, 0::bigint AS "
                "o1, 0::bigint AS o2, last_error, archived, history, (SELECT "
                "min(after) FROM %1$s.cuts WHERE chat_id = $1::bigint AND "
                "after < $2::bigint AND id > $2::bigint) FROM %1$s.chats "
                "WHERE id = "
                "$1::bigint "
                "UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
                "NULL, NULL, NULL, NULL, NULL, NULL, q.id, q.content, "
                "coalesce(q.actor, ''), (extract(epoch FROM q.created_at) * "
                "1000000)::bigint, 1, q.position, q.id, NULL, NULL, NULL, NULL "
                "FROM "
                "%1$s.queued_messages q WHERE q.chat_id = $1::bigint "
                "UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
                "NULL, m.id, m.prev_id, m.role, m.content, m.tool, NULL, "
                "NULL, NULL, NULL, 2, m.id, 0, NULL, NULL, NULL, NULL FROM "
                "(SELECT "
                "id, prev_id, role, content, tool FROM %1$s.messages WHERE "
                "chat_id = $1::bigint AND NOT deleted AND id > "
                "coalesce((SELECT min(after) FROM %1$s.cuts WHERE chat_id = "
                "$1::bigint AND after < $2::bigint AND id > $2::bigint), "
                "$2::bigint) ORDER BY id LIMIT $3::bigint) m "
                "UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
                "NULL, p.seq, p.after, NULL, p.text, NULL, NULL, NULL, NULL, "
                "NULL, 3, p.seq, 0, NULL, NULL, NULL, NULL FROM %1$s.parts p "
                "JOIN "
                "%1$s.chats c ON c.id = p.chat_id AND p.after = "
                "c.last_message_id WHERE p.chat_id = $1::bigint "
                "ORDER BY k, o1, o2",
                s->schema);
        else if (k == PREP_STATE)
            /* The backstop poll: per chat, where its messages end, its
             * status and version, its queue's item ids in order (the
             * signature is hashed from them as they are read) and its
             * history. */
            snprintf(
                sql, sizeof sql,
                "SELECT c.id, c.last_message_id, c.version, c.status, "
                "(SELECT array_agg(q.id ORDER BY q.position, q.id) "
                "FROM %1$s.queued_messages q WHERE q.chat_id = c.id), "
                "c.history FROM %1$s.chats c WHERE c.id = ANY($1::bigint[])",
                s->schema);
        else if (k == PREP_AFTER_MANY)
            /* A resync of many chats in one statement (one view): per
             * chat, its live messages after its own position, a page of
             * them, with the chat's history. */
            snprintf(sql, sizeof sql,
                     "SELECT m.chat_id, m.id, m.prev_id, m.role, m.content, "
                     "m.tool, c.history FROM unnest($1::bigint[], "
                     "$2::bigint[]) AS w(chat_id, after) JOIN %1$s.chats c ON "
                     "c.id = w.chat_id CROSS JOIN LATERAL (SELECT chat_id, "
                     "id, prev_id, role, content, tool FROM %1$s.messages "
                     "WHERE chat_id = w.chat_id AND NOT deleted AND id > "
                     "w.after ORDER BY id LIMIT $3::bigint) m ORDER BY "
                     "m.chat_id, m.id",
                     s->schema);
        else if (k == PREP_AFTER)
            /* The LEFT JOIN tells a chat with no new messages (one NULL row)
             * from a missing chat (no row) in one round trip; every row
             * carries the chat's history. */
            snprintf(sql, sizeof sql,
                     "SELECT m.id, m.prev_id, m.role, m.content, m.tool, "
                     "c.history FROM %1$s.chats c "
                     "LEFT JOIN %1$s.messages m ON m.chat_id = c.id AND "
                     "m.id > $2 AND NOT m.deleted WHERE c.id = $1 ORDER BY "
                     "m.id LIMIT $3",
                     s->schema);
        else
            snprintf(sql, sizeof sql,
                     "WITH c AS (SELECT id, last_message_id FROM %1$s.chats "
                     "WHERE id = $1 AND ($5::text = '' OR (status IN "
                     "('running', 'waiting') AND worker_id = $5::text)) FOR "
                     "UPDATE), "
                     "m AS (INSERT INTO %1$s.messages (chat_id, role, "
                     "content, prev_id, tool) SELECT c.id, $2, $3, "
                     "c.last_message_id, $4 FROM c RETURNING id, prev_id), "
                     "u AS (UPDATE %1$s.chats SET last_message_id = m.id, "
                     "updated_at = now() FROM m WHERE %1$s.chats.id = $1) "
                     "SELECT id, prev_id%2$s FROM m",
                     s->schema, notify[k]);
        if (!(s->prep_sql[k] = strdup(sql)))
            return false;
        snprintf(s->prep_name[k], sizeof s->prep_name[k], "%s_%016" PRIx64,
                 prep_kind[k], pg_fnv1a(sql, strlen(sql), FNV_OFFSET));
    }
    return true;
}

/* ---- chats and messages ---------------------------------------------------
 */

int pg_create_chat(void *st, const char *owner, const char *title,
                   const char *key, int64_t *chat_id)
{
    pg_store *s = st;
    char sql[SQL_MAX];
    /* With a key, a chat the owner made with it already is the answer: the
     * conflict on the unique index locks and returns its row (a concurrent
     * twin waits for the first to commit, then gets its id). */
    snprintf(sql, sizeof sql,
             "INSERT INTO %1$s.chats (owner, title, idempotency_key) VALUES"
             " ($1, $2, nullif($3, '')) ON CONFLICT (owner, idempotency_key)"
             " WHERE idempotency_key IS NOT NULL DO UPDATE SET"
             " idempotency_key = EXCLUDED.idempotency_key RETURNING id",
             s->schema);
    const char *vals[3] = {owner ? owner : "", title ? title : "",
                           key ? key : ""};
    /* In a transaction whose BEGIN may be retried on a fresh connection: an
     * INSERT alone could not be sent twice safely. */
    int rc = pg_exec_retry(s, "BEGIN", 0, NULL);
    PGresult *r = rc == CS_OK ? pg_run(s, s->q, sql, 3, vals) : NULL;
    if (rc == CS_OK && !r)
        rc = CS_EBACKEND;
    if (rc == CS_OK && !(PQntuples(r) == 1 && pg_col_id(r, 0, 0, chat_id)))
        rc = pg_fail(s, CS_EBACKEND, "bad chat id returned", NULL);
    PQclear(r);
    if (rc == CS_OK)
        rc = pg_commit_tx(s);
    if (rc < 0)
        pg_rollback(s);
    return rc;
}

/* An integer column as a number of microseconds, in seconds (integers: no
 * locale-dependent decimal point on either side). */
static bool col_usec(PGresult *r, int row, int col, double *out)
{
    if (PQgetisnull(r, row, col))
        return false;
    const char *v = PQgetvalue(r, row, col);
    char *end;
    errno = 0;
    long long us = strtoll(v, &end, 10);
    if (end == v || *end || errno)
        return false;
    *out = (double)us / 1e6;
    return true;
}

/* Row i of r, read with CHAT_COLS (and last_error in column err, archived
 * in err + 1, history in err + 2, or none of them: err -1). */
static int chat_row(pg_store *s, PGresult *r, int i, cs_chat_row *row, int err)
{
    memset(row, 0, sizeof *row);
    if (err >= 0) /* archived and history: the columns after last_error */
        row->archived = PQgetvalue(r, i, err + 1)[0] == 't';
    if (err >= 0 && !pg_col_id(r, i, err + 2, &row->history))
        return pg_fail(s, CS_EBACKEND, "bad chat row", NULL);
    if (err >= 0 && !PQgetisnull(r, i, err)) {
        if (PQgetlength(r, i, err) > CS_ERROR_MAX)
            return pg_fail(s, CS_EBACKEND, "bad chat row", NULL);
        snprintf(row->last_error, sizeof row->last_error, "%s",
                 PQgetvalue(r, i, err));
    }
    const char *status = PQgetvalue(r, i, 3);
    int st = cs_status_parse(status, strlen(status));
    if (!pg_col_id(r, i, 0, &row->id) || !pg_col_id(r, i, 4, &row->version) ||
        !pg_col_id(r, i, 7, &row->last_message_id) || st < 0 ||
        PQgetisnull(r, i, 1) || PQgetisnull(r, i, 2) || PQgetisnull(r, i, 5) ||
        PQgetlength(r, i, 1) > CS_NAME_MAX ||
        PQgetlength(r, i, 2) > CS_TITLE_MAX ||
        PQgetlength(r, i, 5) > CS_NAME_MAX)
        /* Never cut a name short: a prefix of the owner is not the owner. */
        return pg_fail(s, CS_EBACKEND, "bad chat row", NULL);
    row->status = (cs_status)st;
    if (PQgetisnull(r, i, 6))
        row->heartbeat_age = -1;
    else if (!col_usec(r, i, 6, &row->heartbeat_age))
        return pg_fail(s, CS_EBACKEND, "bad chat row", NULL);
    else if (row->heartbeat_age < 0)
        row->heartbeat_age = 0; /* the server's clock stepped back */
    snprintf(row->owner, sizeof row->owner, "%s", PQgetvalue(r, i, 1));
    snprintf(row->title, sizeof row->title, "%s", PQgetvalue(r, i, 2));
    snprintf(row->worker, sizeof row->worker, "%s", PQgetvalue(r, i, 5));
    return CS_OK;
}

int pg_no_chat(pg_store *s, int64_t chat_id)
{
    snprintf(s->err, sizeof s->err, "no chat %" PRId64, chat_id);
    return CS_ENOTFOUND;
}

/* A message row (columns from col: id, prev_id, role, content, tool) pushed
 * to out. */
static int push_msg(pg_store *s, PGresult *r, int i, int col, int64_t chat_id,
                    cs_msglist *out)
{
    int64_t id, prev;
    const char *role = PQgetvalue(r, i, col + 2);
    int ro = cs_role_parse(role, strlen(role));
    if (!pg_col_id(r, i, col, &id) || !pg_col_id(r, i, col + 1, &prev) ||
        ro < 0 || PQgetisnull(r, i, col + 3))
        return pg_fail(s, CS_EBACKEND, "bad message row", NULL);
    cs_msg *m = cs_msg_new(
        id, chat_id, prev, (cs_role)ro, PQgetvalue(r, i, col + 3),
        (size_t)PQgetlength(r, i, col + 3), PQgetvalue(r, i, col + 4));
    if (!m || cs_msglist_push(out, m) < 0) {
        cs_msg_unref(m);
        return CS_ENOMEM;
    }
    return CS_OK;
}

static void unpush_msgs(cs_msglist *out, size_t base)
{
    while (out->n > base)
        cs_msg_unref(out->items[--out->n]);
}

/* Checks that the open transaction is on chat_id and still there: a
 * statement on a connection reset since tx_begin would run outside it. */
static int tx_check(pg_store *s, int64_t chat_id)
{
    if (!s->in_tx || s->tx_chat != chat_id) {
        snprintf(s->err, sizeof s->err,
                 "no transaction is open on chat %" PRId64, chat_id);
        return CS_EINVAL;
    }
    PGconn *c = s->q;
    if (!c || PQstatus(c) != CONNECTION_OK)
        return pg_conn_fail(s, c, "transaction lost");
    if (PQtransactionStatus(c) == PQTRANS_IDLE)
        return pg_fail(s, CS_EBACKEND,
                       "transaction lost (the connection was reset)", NULL);
    return CS_OK;
}

/* 1 when the command changed one row, else 0. */
static int one_row(PGresult *r)
{
    return strcmp(PQcmdTuples(r), "1") == 0 ? 1 : 0;
}

int pg_chat_get(void *st, int64_t chat_id, cs_chat_row *row)
{
    pg_store *s = st;
    char sql[SQL_MAX], chat[24];
    snprintf(sql, sizeof sql,
             "SELECT " CHAT_COLS
             ", last_error, archived, history FROM %1$s.chats WHERE id = $1",
             s->schema);
    pg_i64s(chat, chat_id);
    const char *vals[1] = {chat};
    PGresult *r = pg_run_retry(s, sql, 1, vals);
    if (!r)
        return CS_EBACKEND;
    int rc =
        PQntuples(r) == 1 ? chat_row(s, r, 0, row, 8) : pg_no_chat(s, chat_id);
    PQclear(r);
    return rc;
}

/* Every write to a chat runs in a transaction that locks its row first
 * (invariant 1): ids taken inside it follow the chat's commit order. */
int pg_tx_begin(void *st, int64_t chat_id, cs_chat_row *row)
{
    pg_store *s = st;
    char sql[SQL_MAX], chat[24];
    snprintf(sql, sizeof sql,
             "SELECT " CHAT_COLS
             ", last_error, archived, history FROM %1$s.chats WHERE id = $1 "
             "FOR UPDATE",
             s->schema);
    pg_i64s(chat, chat_id);
    const char *vals[1] = {chat};
    int rc = pg_begin_tx(s);
    if (rc == CS_EINVAL)
        return rc;
    if (rc == CS_OK) {
        PGresult *r = pg_run(s, s->q, sql, 1, vals);
        if (!r)
            rc = CS_EBACKEND;
        else if (PQntuples(r) != 1)
            rc = pg_no_chat(s, chat_id);
        else
            rc = chat_row(s, r, 0, row, 8);
        PQclear(r);
    }
    if (rc < 0) {
        pg_rollback(s);
        return rc;
    }
    s->in_tx = true;
    s->tx_chat = chat_id;
    return CS_OK;
}

int pg_tx_end(void *st, bool commit)
{
    pg_store *s = st;
    if (!s->in_tx) {
        pg_rollback(s);
        return pg_fail(s, CS_EINVAL, "no transaction is open", NULL);
    }
    /* Not a COMMIT on a connection reset since BEGIN: it would "succeed",
     * and not on an aborted transaction: it would roll back and say OK. */
    int rc = commit ? tx_check(s, s->tx_chat) : CS_OK;
    s->in_tx = false;
    s->tx_chat = 0;
    if (!commit) {
        pg_rollback(s);
        return CS_OK;
    }
    if (rc < 0) {
        pg_rollback(s);
        return rc;
    }
    return pg_commit_tx(s);
}

int pg_tx_insert(void *st, cs_chat_row *row, const cs_msg_in *msgs, size_t n,
                 cs_msglist *out)
{
    pg_store *s = st;
    int rc = tx_check(s, row->id);
    if (rc < 0 || n == 0)
        return rc;
    char sql[SQL_MAX], chat[24], prev[24], last[24];
    size_t base = out->n;
    int64_t prev_id = row->last_message_id;
    pg_i64s(chat, row->id);
    snprintf(sql, sizeof sql,
             "INSERT INTO %1$s.messages (chat_id, role, content, prev_id, tool)"
             " VALUES ($1, $2, $3, $4, $5) RETURNING id",
             s->schema);
    for (size_t i = 0; rc == CS_OK && i < n; i++) {
        pg_i64s(prev, prev_id);
        const char *content = msgs[i].content ? msgs[i].content : "";
        const char *tool = msgs[i].tool ? msgs[i].tool : "";
        const char *vals[5] = {chat, cs_role_name(msgs[i].role), content, prev,
                               tool};
        PGresult *r = pg_run(s, s->q, sql, 5, vals);
        int64_t id;
        if (!r) {
            rc = CS_EBACKEND;
        } else if (PQntuples(r) != 1 || !pg_col_id(r, 0, 0, &id)) {
            rc = pg_fail(s, CS_EBACKEND, "bad message id returned", NULL);
        } else {
            cs_msg *m = cs_msg_new(id, row->id, prev_id, msgs[i].role, content,
                                   msgs[i].content_len, tool);
            if (!m || cs_msglist_push(out, m) < 0) {
                cs_msg_unref(m);
                rc = CS_ENOMEM;
            }
            prev_id = id;
        }
        PQclear(r);
    }
    if (rc == CS_OK) {
        snprintf(sql, sizeof sql,
                 "UPDATE %1$s.chats SET last_message_id = $2, "
                 "updated_at = now() WHERE id = $1",
                 s->schema);
        pg_i64s(last, prev_id);
        const char *vals[2] = {chat, last};
        rc = pg_exec(s, s->q, sql, 2, vals);
    }
    if (rc < 0) {
        unpush_msgs(out, base); /* the caller rolls back */
        return rc;
    }
    row->last_message_id = prev_id;
    return CS_OK;
}

/* The result recorded under key for the chat (in its transaction): 1 and
 * *out filled (out->ids malloc'd), or 0 when there is none. */
int pg_tx_key_get(void *st, int64_t chat_id, const char *key, cs_keyed *out)
{
    pg_store *s = st;
    int rc = tx_check(s, chat_id);
    if (rc < 0)
        return rc;
    char sql[SQL_MAX], chat[24];
    snprintf(sql, sizeof sql,
             "SELECT i.id, k.queued, k.request FROM %s.idempotency_keys k, "
             "unnest(k.ids) WITH ORDINALITY AS i(id, n) "
             "WHERE k.chat_id = $1 AND k.key = $2 ORDER BY i.n",
             s->schema);
    pg_i64s(chat, chat_id);
    const char *vals[2] = {chat, key};
    PGresult *r = pg_run(s, s->q, sql, 2, vals);
    if (!r)
        return CS_EBACKEND;
    int n = PQntuples(r);
    *out = (cs_keyed){0};
    if (n > 0 && !(out->ids = malloc((size_t)n * sizeof *out->ids)))
        rc = CS_ENOMEM;
    for (int i = 0; rc == CS_OK && i < n; i++)
        if (!pg_col_id(r, i, 0, &out->ids[i]))
            rc = pg_fail(s, CS_EBACKEND, "bad idempotency row", NULL);
    out->n = (size_t)n;
    out->queued = n > 0 && PQgetvalue(r, 0, 1)[0] == 't';
    if (n > 0) {
        errno = 0;
        char *end;
        long long v = strtoll(PQgetvalue(r, 0, 2), &end, 10);
        if (errno || *end)
            rc = pg_fail(s, CS_EBACKEND, "bad idempotency row", NULL);
        out->request = (uint64_t)v;
    }
    PQclear(r);
    if (rc < 0) {
        free(out->ids);
        *out = (cs_keyed){0};
        return rc;
    }
    return n > 0;
}

/* Records the result under key (in the chat's transaction). */
int pg_tx_key_put(void *st, int64_t chat_id, const char *key,
                  const cs_keyed *res)
{
    pg_store *s = st;
    int rc = tx_check(s, chat_id);
    if (rc < 0)
        return rc;
    char sql[SQL_MAX], chat[24];
    size_t cap = res->n * 21 + 3;
    char *arr = malloc(cap);
    if (!arr)
        return CS_ENOMEM;
    size_t o = 0;
    arr[o++] = '{';
    for (size_t i = 0; i < res->n; i++)
        o += (size_t)snprintf(arr + o, cap - o, "%s%" PRId64, i ? "," : "",
                              res->ids[i]);
    arr[o++] = '}';
    arr[o] = '\0';
    snprintf(sql, sizeof sql,
             "INSERT INTO %s.idempotency_keys (chat_id, key, ids, queued, "
             "request) VALUES ($1, $2, $3::bigint[], $4::boolean, $5)",
             s->schema);
    pg_i64s(chat, chat_id);
    char req[24];
    snprintf(req, sizeof req, "%lld", (long long)(int64_t)res->request);
    const char *vals[5] = {chat, key, arr, res->queued ? "true" : "false", req};
    rc = pg_exec(s, s->q, sql, 5, vals);
    free(arr);
    return rc;
}

/* Why a worker's append found no chat running on it: CS_ENOTFOUND, or
 * CS_ESTATE naming the chat's status (nothing was written). */
static int not_on_worker(pg_store *s, int64_t chat_id, const char *worker)
{
    cs_chat_row row;
    int rc = pg_chat_get(s, chat_id, &row);
    if (rc < 0)
        return rc;
    snprintf(s->err, sizeof s->err,
             "chat %" PRId64 " is %s, not running on "
             "worker %s",
             chat_id, cs_status_name(row.status), worker);
    return CS_ESTATE;
}

/* One message in one round trip: one autocommit statement, prepared, that
 * locks the chat row (with a worker: only while the chat runs on it), takes the
 * id under that lock (invariant 1), inserts, moves the chat's last message and,
 * with notify, queues the message's notification, which PostgreSQL sends at the
 * commit: never for a message that did not commit, and the commit is the
 * statement's own end. When the message fits in a notification, the
 * notification carries it (a "1:M" hint, built by the statement from the row it
 * inserted): readers in other processes then cache it and need no query for it.
 */
int pg_append1(void *st, int64_t chat_id, const cs_msg_in *msg, int mode,
               const char *worker, cs_msglist *out, int64_t *committed)
{
    pg_store *s = st;
    *committed = 0;
    int rc = pg_claim_q(s);
    if (rc < 0)
        return rc;
    const char *content = msg->content ? msg->content : "";
    const char *tool = msg->tool ? msg->tool : "";
    size_t tool_len = strlen(tool);
    bool notify = mode != CS_APPEND_SILENT;
    bool body = mode == CS_APPEND_BODY &&
                CS_BODY_HEAD + tool_len + msg->content_len <= CS_PAYLOAD_MAX;
    int k = !notify ? PREP_APPEND
            : body  ? PREP_APPEND_BODY
                    : PREP_APPEND_NOTIFY;
    char chat[24], channel[128], head[16], rest[40 + CS_MAX_TOOL];
    pg_i64s(chat, chat_id);
    pg_channel_of(s, chat_id, channel, sizeof channel);
    /* The hint's head and, for a body, what follows the ids, exactly as
     * cs_payload_encode writes them (a spec compares the two). */
    snprintf(head, sizeof head, "%d:%c:", CS_PAYLOAD_VERSION, body ? 'M' : 'm');
    rest[0] = '\0';
    if (body)
        snprintf(rest, sizeof rest, "%s:%zu:%s", cs_role_name(msg->role),
                 tool_len, tool);
    const char *vals[8] = {chat,
                           cs_role_name(msg->role),
                           content,
                           tool,
                           worker ? worker : "",
                           channel,
                           head,
                           rest};
    PGconn *c = pg_live_qconn(s);
    if (!c)
        return CS_EBACKEND;
    PGresult *r = pg_run_prepared(s, c, k, !notify ? 5 : body ? 8 : 7, vals);
    int64_t id = 0, prev = 0;
    if (!r)
        rc = pg_write_failed(s);
    else if (PQntuples(r) != 1 && worker && *worker)
        rc = not_on_worker(s, chat_id, worker);
    else if (PQntuples(r) != 1)
        rc = pg_no_chat(s, chat_id);
    else if (!pg_col_id(r, 0, 0, &id) || !pg_col_id(r, 0, 1, &prev))
        rc = pg_fail(s, CS_EBACKEND, "bad message id returned", NULL);
    PQclear(r);
    if (rc < 0)
        return rc;
    *committed = id;
    cs_msg *m = cs_msg_new(id, chat_id, prev, msg->role, content,
                           msg->content_len, tool);
    if (!m || cs_msglist_push(out, m) < 0) {
        cs_msg_unref(m);
        return CS_ENOMEM; /* committed: see cs_pub_commit */
    }
    return CS_OK;
}

int pg_tx_update(void *st, const cs_chat_row *row, bool heartbeat)
{
    pg_store *s = st;
    int rc = tx_check(s, row->id);
    if (rc < 0)
        return rc;
    char sql[SQL_MAX], chat[24], version[24];
    snprintf(sql, sizeof sql,
             "UPDATE %1$s.chats SET status = $2::text, version = $3::bigint, "
             "worker_id = nullif($4::text, ''), "
             "heartbeat_at = CASE WHEN $4::text = '' THEN NULL "
             "WHEN $5::boolean THEN clock_timestamp() ELSE heartbeat_at END, "
             "last_error = $6::text, archived = $7::boolean, updated_at = "
             "now() WHERE id = $1::bigint",
             s->schema);
    pg_i64s(chat, row->id);
    pg_i64s(version, row->version);
    const char *vals[7] = {chat,
                           cs_status_name(row->status),
                           version,
                           row->worker,
                           heartbeat ? "t" : "f",
                           row->last_error,
                           row->archived ? "t" : "f"};
    PGresult *r = pg_run(s, s->q, sql, 7, vals);
    if (!r)
        return CS_EBACKEND;
    rc = one_row(r) ? CS_OK : pg_no_chat(s, row->id);
    PQclear(r);
    return rc;
}

int pg_tx_tail(void *st, int64_t chat_id, cs_msglist *out)
{
    pg_store *s = st;
    int rc = tx_check(s, chat_id);
    if (rc < 0)
        return rc;
    char sql[SQL_MAX], chat[24];
    snprintf(sql, sizeof sql,
             "SELECT id, prev_id, role, content, tool FROM %1$s.messages "
             "WHERE chat_id = $1 AND NOT deleted AND id > coalesce((SELECT "
             "max(id) FROM %1$s.messages WHERE chat_id = $1 AND role = "
             "'user' AND NOT deleted), 0) ORDER BY id",
             s->schema);
    pg_i64s(chat, chat_id);
    const char *vals[1] = {chat};
    PGresult *r = pg_run(s, s->q, sql, 1, vals);
    if (!r)
        return CS_EBACKEND;
    size_t base = out->n;
    int rows = PQntuples(r);
    for (int i = 0; rc == CS_OK && i < rows; i++)
        rc = push_msg(s, r, i, 0, chat_id, out);
    PQclear(r);
    if (rc < 0)
        unpush_msgs(out, base);
    return rc;
}

int pg_tx_edit(void *st, cs_chat_row *row, int64_t message_id,
               const cs_msg_in *msg, cs_msglist *out, int64_t *after)
{
    pg_store *s = st;
    int rc = tx_check(s, row->id);
    if (rc < 0)
        return rc;
    char sql[SQL_MAX], chat[24], mid[24], aft[24], hist[24], nid[24];
    pg_i64s(chat, row->id);
    pg_i64s(mid, message_id);
    /* The edited message must be a live user message; it and every later
     * one are soft-deleted, the chat's history counts one more and its last
     * message becomes the edited one's prev_id. */
    snprintf(sql, sizeof sql,
             "WITH t AS (SELECT prev_id FROM %1$s.messages WHERE chat_id = $1 "
             "AND id = $2 AND role = 'user' AND NOT deleted), d AS (UPDATE "
             "%1$s.messages SET deleted = true WHERE chat_id = $1 AND id >= $2 "
             "AND NOT deleted AND EXISTS (SELECT 1 FROM t)), c AS (UPDATE "
             "%1$s.chats SET history = history + 1, last_message_id = "
             "t.prev_id, updated_at = now() FROM t WHERE id = $1 RETURNING "
             "history) SELECT t.prev_id, c.history FROM t, c",
             s->schema);
    const char *vals[2] = {chat, mid};
    PGresult *r = pg_run(s, s->q, sql, 2, vals);
    if (!r)
        return CS_EBACKEND;
    if (PQntuples(r) != 1) {
        PQclear(r);
        snprintf(s->err, sizeof s->err,
                 "no user message %" PRId64 " in chat %" PRId64 " (edit)",
                 message_id, row->id);
        return CS_EINVAL;
    }
    if (!pg_col_id(r, 0, 0, after) || !pg_col_id(r, 0, 1, &row->history))
        rc = pg_fail(s, CS_EBACKEND, "bad edit row", NULL);
    PQclear(r);
    if (rc < 0)
        return rc;
    row->last_message_id = *after;
    size_t base = out->n;
    if ((rc = pg_tx_insert(st, row, msg, 1, out)) < 0)
        return rc;
    snprintf(sql, sizeof sql,
             "INSERT INTO %1$s.cuts (chat_id, history, after, id) VALUES "
             "($1, $2, $3, $4)",
             s->schema);
    pg_i64s(hist, row->history);
    pg_i64s(aft, *after);
    pg_i64s(nid, out->items[base]->id);
    const char *cv[4] = {chat, hist, aft, nid};
    rc = pg_exec(s, s->q, sql, 4, cv);
    if (rc < 0)
        unpush_msgs(out, base); /* the caller rolls back */
    return rc;
}

int pg_cuts(void *st, int64_t chat_id, int64_t since, int64_t *after,
            int64_t *upto, int64_t *history)
{
    pg_store *s = st;
    char sql[SQL_MAX], chat[24], since_s[24];
    snprintf(sql, sizeof sql,
             "SELECT c.history, min(k.after), max(k.id) FROM %1$s.chats c "
             "LEFT JOIN %1$s.cuts k ON k.chat_id = c.id AND k.history > $2 "
             "WHERE c.id = $1 GROUP BY c.history",
             s->schema);
    pg_i64s(chat, chat_id);
    pg_i64s(since_s, since);
    const char *vals[2] = {chat, since_s};
    PGresult *r = pg_run_retry(s, sql, 2, vals);
    if (!r)
        return CS_EBACKEND;
    int rc = CS_OK;
    *after = -1;
    *upto = 0;
    if (PQntuples(r) != 1)
        rc = pg_no_chat(s, chat_id);
    else if (!pg_col_id(r, 0, 0, history) ||
             (!PQgetisnull(r, 0, 1) &&
              (!pg_col_id(r, 0, 1, after) || !pg_col_id(r, 0, 2, upto))))
        rc = pg_fail(s, CS_EBACKEND, "bad cuts row", NULL);
    PQclear(r);
    return rc;
}

static void unpush_queue(cs_queue *q, size_t base)
{
    while (q->n > base) {
        q->n--;
        free(q->items[q->n].content);
        free(q->items[q->n].actor);
    }
}

/* The LEFT JOIN tells an empty queue (one NULL row) from a missing chat (no
 * row). Inside a transaction on the transaction's connection, as it is. */
int pg_queue_list(void *st, int64_t chat_id, cs_queue *out)
{
    pg_store *s = st;
    char sql[SQL_MAX], chat[24];
    snprintf(sql, sizeof sql,
             "SELECT q.id, q.content, coalesce(q.actor, ''), "
             "(extract(epoch FROM q.created_at) * 1000000)::bigint "
             "FROM %1$s.chats c LEFT JOIN %1$s.queued_messages q "
             "ON q.chat_id = c.id WHERE c.id = $1 ORDER BY q.position, q.id",
             s->schema);
    pg_i64s(chat, chat_id);
    const char *vals[1] = {chat};
    PGresult *r;
    if (s->in_tx || (s->q && PQstatus(s->q) == CONNECTION_OK &&
                     PQtransactionStatus(s->q) != PQTRANS_IDLE)) {
        int rc = s->in_tx ? tx_check(s, s->tx_chat) : CS_OK;
        if (rc < 0)
            return rc;
        r = pg_run(s, s->q, sql, 1, vals);
    } else {
        r = pg_run_retry(s, sql, 1, vals);
    }
    if (!r)
        return CS_EBACKEND;
    int rows = PQntuples(r), rc = rows == 0 ? pg_no_chat(s, chat_id) : CS_OK;
    size_t base = out->n;
    for (int i = 0; rc == CS_OK && i < rows; i++) {
        int64_t id;
        double created;
        if (PQgetisnull(r, i, 0))
            continue; /* the chat exists, its queue is empty */
        if (!pg_col_id(r, i, 0, &id) || !col_usec(r, i, 3, &created)) {
            rc = pg_fail(s, CS_EBACKEND, "bad queue row", NULL);
            break;
        }
        rc = cs_queue_push(out, id, PQgetvalue(r, i, 1),
                           (size_t)PQgetlength(r, i, 1), PQgetvalue(r, i, 2),
                           created);
    }
    PQclear(r);
    if (rc < 0)
        unpush_queue(out, base);
    return rc;
}

int pg_tx_queue_add(void *st, int64_t chat_id, const char *actor,
                    const char *content, size_t len, int64_t *qid)
{
    pg_store *s = st;
    (void)len; /* content is NUL-terminated */
    int rc = tx_check(s, chat_id);
    if (rc < 0)
        return rc;
    char sql[SQL_MAX], chat[24];
    snprintf(sql, sizeof sql,
             "INSERT INTO %1$s.queued_messages "
             "(chat_id, content, actor, position) "
             "VALUES ($1::bigint, $2::text, nullif($3::text, ''), "
             "(SELECT coalesce(max(position), 0) + 1 FROM %1$s.queued_messages "
             "WHERE chat_id = $1::bigint)) RETURNING id",
             s->schema);
    pg_i64s(chat, chat_id);
    const char *vals[3] = {chat, content ? content : "", actor ? actor : ""};
    PGresult *r = pg_run(s, s->q, sql, 3, vals);
    if (!r)
        return CS_EBACKEND;
    if (PQntuples(r) != 1 || !pg_col_id(r, 0, 0, qid))
        rc = pg_fail(s, CS_EBACKEND, "bad queue id returned", NULL);
    PQclear(r);
    return rc;
}

/* A queue statement on one item of the chat: 1 if it changed the item, 0 if
 * the chat has no such item. */
static int queue_item_cmd(pg_store *s, const char *fmt, int64_t chat_id,
                          int64_t qid)
{
    int rc = tx_check(s, chat_id);
    if (rc < 0)
        return rc;
    char sql[SQL_MAX], chat[24], item[24];
    snprintf(sql, sizeof sql, fmt, s->schema);
    pg_i64s(chat, chat_id);
    pg_i64s(item, qid);
    const char *vals[2] = {chat, item};
    PGresult *r = pg_run(s, s->q, sql, 2, vals);
    if (!r)
        return CS_EBACKEND;
    rc = one_row(r);
    PQclear(r);
    return rc;
}

int pg_tx_queue_del(void *st, int64_t chat_id, int64_t qid)
{
    return queue_item_cmd(st,
                          "DELETE FROM %1$s.queued_messages "
                          "WHERE id = $2 AND chat_id = $1",
                          chat_id, qid);
}

int pg_tx_queue_front(void *st, int64_t chat_id, int64_t qid)
{
    return queue_item_cmd(st,
                          "UPDATE %1$s.queued_messages SET position = "
                          "(SELECT min(position) - 1 FROM %1$s.queued_messages "
                          "WHERE chat_id = $1) WHERE id = $2 AND chat_id = $1",
                          chat_id, qid);
}

/* Its own transaction. Rows another transaction holds (a chat being written,
 * another worker's acquire) are skipped, not waited for. The rows come back
 * in the order they were picked: by the update time before this one. */
/* Seconds as whole microseconds (no decimal point to localise); beyond
 * about 31 years nothing is that stale anyway; < 0 (never): -1. */
static int64_t stale_usec(double stale_after)
{
    return !(stale_after >= 0) ? -1
           : stale_after > 1e9 ? (int64_t)1e15
                               : (int64_t)(stale_after * 1e6);
}

int pg_stuck(void *st, int kind, double age, size_t limit, int64_t *ids,
             int64_t *versions, size_t *n)
{
    pg_store *s = st;
    *n = 0;
    if (limit == 0)
        return CS_OK;
    if (age < 0 && kind != CS_STUCK_QUEUE)
        return CS_OK;
    char sql[SQL_MAX], lim[24], old[24];
    if (kind == CS_STUCK_QUEUE)
        snprintf(sql, sizeof sql,
                 "SELECT id, version FROM %1$s.chats c WHERE status IN "
                 "('waiting', 'completed', 'error') AND worker_id IS NULL AND "
                 "NOT archived AND "
                 "$2::bigint >= 0 AND EXISTS (SELECT 1 FROM "
                 "%1$s.queued_messages q WHERE q.chat_id = c.id) ORDER BY "
                 "updated_at, id LIMIT $1::bigint",
                 s->schema);
    else
        snprintf(sql, sizeof sql,
                 "SELECT id, version FROM %1$s.chats c WHERE %2$s < "
                 "clock_timestamp() - $2::bigint * interval '1 microsecond' "
                 "ORDER BY updated_at, id LIMIT $1::bigint",
                 s->schema,
                 kind == CS_STUCK_ACTION
                     ? "status = 'requires_action' AND updated_at"
                 : kind == CS_STUCK_RUNNING
                     ? "status = 'running' AND coalesce(heartbeat_at, "
                       "'-infinity')"
                     : "status = 'waiting' AND worker_id IS NOT NULL AND "
                       "coalesce(heartbeat_at, '-infinity')");
    pg_i64s(lim, (int64_t)limit);
    pg_i64s(old, stale_usec(age));
    const char *vals[2] = {lim, old};
    if (s->in_tx)
        return pg_fail(s, CS_EINVAL, "a transaction is open", NULL);
    PGresult *r = pg_run_retry(s, sql, 2, vals);
    if (!r)
        return CS_EBACKEND;
    int rows = PQntuples(r), rc = CS_OK;
    for (int i = 0; i < rows && (size_t)i < limit; i++) {
        if (!pg_col_id(r, i, 0, &ids[i]) || !pg_col_id(r, i, 1, &versions[i])) {
            rc = pg_fail(s, CS_EBACKEND, "bad chat id", NULL);
            break;
        }
        *n = (size_t)i + 1;
    }
    PQclear(r);
    if (rc < 0)
        *n = 0;
    return rc;
}

int pg_acquire(void *st, const char *worker, size_t limit, double stale_after,
               cs_chat_row *rows, size_t *n)
{
    pg_store *s = st;
    *n = 0;
    if (limit == 0)
        return CS_OK;
    /* In whole microseconds (no decimal point to localise); beyond about 31
     * years nothing is that stale anyway. */
    int64_t stale_us = stale_usec(stale_after);
    char sql[SQL_MAX], lim[24], stale[24];
    snprintf(
        sql, sizeof sql,
        "WITH p AS (SELECT id, updated_at FROM %1$s.chats "
        "WHERE status = 'pending' OR (status = 'running' AND $3::bigint >= 0 "
        "AND (heartbeat_at IS NULL OR heartbeat_at < clock_timestamp() - "
        "$3::bigint * "
        "interval '1 microsecond')) "
        "ORDER BY updated_at, id LIMIT $2::bigint FOR UPDATE SKIP LOCKED), "
        "u AS (UPDATE %1$s.chats c SET status = 'running', "
        "worker_id = $1::text, heartbeat_at = clock_timestamp(), version = "
        "c.version + 1, "
        "updated_at = now() FROM p WHERE c.id = p.id "
        "RETURNING c.id, c.owner, c.title, c.status, c.version, c.worker_id, "
        "c.last_message_id, p.updated_at AS picked) "
        "SELECT id, owner, title, status, version, worker_id, 0::bigint, "
        "last_message_id FROM u ORDER BY picked, id",
        s->schema);
    pg_i64s(lim, (int64_t)limit);
    pg_i64s(stale, stale_us);
    const char *vals[3] = {worker ? worker : "", lim, stale};
    int rc = pg_begin_tx(s);
    if (rc == CS_EINVAL)
        return rc;
    size_t got = 0;
    if (rc == CS_OK) {
        PGresult *r = pg_run(s, s->q, sql, 3, vals);
        if (!r) {
            rc = CS_EBACKEND;
        } else if ((size_t)PQntuples(r) > limit) {
            rc = pg_fail(s, CS_EBACKEND, "too many chats acquired", NULL);
        } else {
            got = (size_t)PQntuples(r);
            for (size_t i = 0; rc == CS_OK && i < got; i++)
                rc = chat_row(s, r, (int)i, &rows[i], -1);
        }
        PQclear(r);
    }
    rc = rc == CS_OK ? pg_commit_tx(s) : rc;
    if (rc < 0) {
        pg_rollback(s);
        return rc;
    }
    *n = got;
    return CS_OK;
}

int pg_messages_after(void *st, int64_t chat_id, int64_t after, size_t limit,
                      cs_msglist *out, int64_t *history)
{
    pg_store *s = st;
    PGconn *c = pg_qconn(s);
    if (!c)
        return CS_EBACKEND;
    char chat[24], aft[24], lim[24];
    pg_i64s(chat, chat_id);
    pg_i64s(aft, after);
    pg_i64s(lim, limit ? (int64_t)limit : INT64_MAX);
    const char *vals[3] = {chat, aft, lim};
    PGresult *r = pg_run_retry_k(s, PREP_AFTER, NULL, 3, vals);
    if (!r)
        return CS_EBACKEND;
    int rows = PQntuples(r), rc = rows == 0 ? pg_no_chat(s, chat_id) : CS_OK;
    size_t base = out->n;
    if (rc == CS_OK && history && !pg_col_id(r, 0, 5, history))
        rc = pg_fail(s, CS_EBACKEND, "bad chat history", NULL);
    for (int i = 0; rc == CS_OK && i < rows; i++) {
        if (PQgetisnull(r, i, 0))
            continue; /* the chat exists, no message after */
        rc = push_msg(s, r, i, 0, chat_id, out);
    }
    PQclear(r);
    if (rc < 0)
        unpush_msgs(out, base);
    return rc;
}

/* The snapshot in one round trip (PREP_SNAPSHOT): one statement, so the
 * row, the queue and the messages are one view of the chat. */
int pg_snapshot(void *st, int64_t chat_id, int64_t after, size_t limit,
                cs_chat_row *row, cs_queue *queue, cs_msglist *msgs,
                cs_parts *parts, int64_t *cut)
{
    pg_store *s = st;
    *cut = -1;
    int rc = pg_claim_q(s);
    if (rc < 0)
        return rc;
    char chat[24], aft[24], lim[24];
    pg_i64s(chat, chat_id);
    pg_i64s(aft, after);
    pg_i64s(lim, limit ? (int64_t)limit : INT64_MAX);
    const char *vals[3] = {chat, aft, lim};
    PGresult *r = pg_run_retry_k(s, PREP_SNAPSHOT, NULL, 3, vals);
    if (!r)
        return CS_EBACKEND;
    int rows = PQntuples(r);
    size_t qbase = queue->n, mbase = msgs->n, pbase = parts->n;
    bool found = false;
    for (int i = 0; rc == CS_OK && i < rows; i++) {
        const char *k = PQgetvalue(r, i, 17);
        if (k[0] == '0') {
            rc = chat_row(s, r, i, row, 20);
            found = rc == CS_OK;
            if (found && !PQgetisnull(r, i, 23) && !pg_col_id(r, i, 23, cut))
                rc = pg_fail(s, CS_EBACKEND, "bad chat cut", NULL);
        } else if (k[0] == '1') {
            int64_t id;
            double created;
            if (!pg_col_id(r, i, 13, &id) || !col_usec(r, i, 16, &created))
                rc = pg_fail(s, CS_EBACKEND, "bad queue row", NULL);
            else
                rc = cs_queue_push(queue, id, PQgetvalue(r, i, 14),
                                   (size_t)PQgetlength(r, i, 14),
                                   PQgetvalue(r, i, 15), created);
        } else if (k[0] == '3') {
            int64_t seq, pafter;
            if (!pg_col_id(r, i, 8, &seq) || !pg_col_id(r, i, 9, &pafter))
                rc = pg_fail(s, CS_EBACKEND, "bad part row", NULL);
            else
                rc = cs_parts_push(parts, seq, pafter, PQgetvalue(r, i, 11),
                                   (size_t)PQgetlength(r, i, 11));
        } else {
            rc = push_msg(s, r, i, 8, chat_id, msgs);
        }
    }
    PQclear(r);
    if (rc == CS_OK && !found)
        rc = pg_no_chat(s, chat_id);
    if (rc < 0) {
        unpush_queue(queue, qbase);
        unpush_msgs(msgs, mbase);
        while (parts->n > pbase)
            free(parts->items[--parts->n].text);
    }
    return rc;
}

/* "{1,2,3}" (or NULL: none) -> the queue's signature. */
static bool queue_sig_of(PGresult *r, int i, int col, uint64_t *out)
{
    uint64_t h = CS_QUEUE_SIG_START;
    size_t n = 0;
    if (!PQgetisnull(r, i, col)) {
        const char *p = PQgetvalue(r, i, col);
        if (*p++ != '{')
            return false;
        while (*p && *p != '}') {
            const char *e = p;
            while (*e >= '0' && *e <= '9')
                e++;
            int64_t id;
            if (!cs_parse_id(p, (size_t)(e - p), &id))
                return false;
            h = cs_queue_sig_add(h, id);
            n++;
            p = *e == ',' ? e + 1 : e;
        }
        if (*p != '}')
            return false;
    }
    *out = cs_queue_sig_end(h, n);
    return true;
}

/* "{a,b,...}": an int64 array literal (malloc'd), NULL on ENOMEM. */
static char *i64_array(const int64_t *v, size_t n)
{
    size_t cap = n * 21 + 3, o = 0;
    char *arr = malloc(cap);
    if (!arr)
        return NULL;
    arr[o++] = '{';
    for (size_t i = 0; i < n; i++)
        o += (size_t)snprintf(arr + o, cap - o, "%s%" PRId64, i ? "," : "",
                              v[i]);
    arr[o++] = '}';
    arr[o] = '\0';
    return arr;
}

int pg_chats_state(void *st, const int64_t *ids, size_t n, cs_chat_state *out,
                   size_t *nout)
{
    pg_store *s = st;
    *nout = 0;
    int rc = pg_claim_q(s);
    if (rc < 0)
        return rc;
    if (n == 0)
        return CS_OK;
    if (n > CS_POLL_CHUNK)
        return pg_fail(s, CS_EINVAL, "too many chats for one state read", NULL);
    char *arr = i64_array(ids, n);
    if (!arr)
        return CS_ENOMEM;
    const char *vals[1] = {arr};
    PGresult *r = pg_run_retry_k(s, PREP_STATE, NULL, 1, vals);
    free(arr);
    if (!r)
        return CS_EBACKEND;
    int rows = PQntuples(r);
    if ((size_t)rows > n)
        rc = pg_fail(s, CS_EBACKEND, "too many chat states returned", NULL);
    for (int i = 0; rc == CS_OK && i < rows; i++) {
        cs_chat_state *c = &out[i];
        const char *status = PQgetvalue(r, i, 3);
        int sv = cs_status_parse(status, strlen(status));
        if (!pg_col_id(r, i, 0, &c->id) ||
            !pg_col_id(r, i, 1, &c->last_message_id) ||
            !pg_col_id(r, i, 2, &c->version) || sv < 0 ||
            !queue_sig_of(r, i, 4, &c->queue_sig) ||
            !pg_col_id(r, i, 5, &c->history))
            rc = pg_fail(s, CS_EBACKEND, "bad chat state row", NULL);
        c->status = (cs_status)sv;
    }
    PQclear(r);
    if (rc == CS_OK)
        *nout = (size_t)rows;
    return rc;
}

/* ---- notifications --------------------------------------------------------
 */

/* A separate autocommit statement, after the commit (invariant 2). */
int pg_notify(void *st, int64_t chat_id, const char *payload, size_t len)
{
    pg_store *s = st;
    PGconn *c = pg_qconn(s);
    if (!c)
        return CS_EBACKEND;
    (void)len;
    char channel[128];
    pg_channel_of(s, chat_id, channel, sizeof channel);
    const char *vals[2] = {channel, payload};
    return pg_exec_retry(s, "SELECT pg_notify($1, $2)", 2, vals);
}

/* "1:p:<last_message_id>:" takes at most 4 + 19 + 1 bytes. */
#define PART_HEAD 46

/* The chat's last message ID is read in the same statement that notifies. */
int pg_notify_part(void *st, int64_t chat_id, const char *worker,
                   const char *text, size_t len)
{
    pg_store *s = st;
    if (len > CS_PAYLOAD_MAX - PART_HEAD) {
        snprintf(s->err, sizeof s->err, "part too long (chat %" PRId64 ")",
                 chat_id);
        return CS_EINVAL;
    }
    char sql[SQL_MAX], channel[128], chat[24];
    /* Kept for late joiners (a snapshot reads the parts since the chat's
     * last message; those of turns that ended go here), then notified with
     * its seq. */
    snprintf(sql, sizeof sql,
             "WITH c AS (SELECT id, last_message_id FROM %1$s.chats WHERE id = "
             "$3::bigint AND ($4::text = '' OR (status IN ('running', "
             "'waiting') AND worker_id = $4::text))), d AS (DELETE FROM "
             "%1$s.parts p USING c WHERE "
             "p.chat_id = c.id AND p.after < c.last_message_id), i AS (INSERT "
             "INTO %1$s.parts (chat_id, after, text) SELECT id, "
             "last_message_id, $2::text FROM c RETURNING seq, after) SELECT "
             "pg_notify($1, '1:p:' || after || ':' || seq || ':' || $2::text) "
             "FROM i",
             s->schema);
    pg_channel_of(s, chat_id, channel, sizeof channel);
    pg_i64s(chat, chat_id);
    const char *vals[4] = {channel, text ? text : "", chat,
                           worker ? worker : ""};
    /* Not retried: a part that went out before the connection broke would
     * go out twice (a lost part is acceptable, a repeated one is not). */
    PGconn *c = pg_qconn(s);
    PGresult *r = c ? pg_run(s, c, sql, 4, vals) : NULL;
    if (!r)
        return CS_EBACKEND;
    int rc = PQntuples(r) == 1 ? CS_OK : pg_no_chat(s, chat_id);
    PQclear(r);
    if (rc == CS_ENOTFOUND && worker && *worker) {
        /* No row: no chat, or not this worker's any more. */
        cs_chat_row row;
        if (pg_chat_get(st, chat_id, &row) == CS_OK) {
            snprintf(s->err, sizeof s->err,
                     "chat %" PRId64 " does not run on that worker", chat_id);
            rc = CS_ESTATE;
        }
    }
    return rc;
}

/* The messages of n chats, each after its own position (a page each, limit
 * 0: all), in one statement: ordered by chat, then id. */
int pg_messages_after_many(void *st, const int64_t *chats,
                           const int64_t *afters, size_t n, size_t limit,
                           cs_msglist *out, int64_t *histories)
{
    pg_store *s = st;
    int rc = pg_claim_q(s);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < n; i++)
        histories[i] = -1;
    char *a = i64_array(chats, n), *b = i64_array(afters, n), lim[24];
    pg_i64s(lim, limit ? (int64_t)limit : INT64_MAX);
    const char *vals[3] = {a, b, lim};
    PGresult *r =
        a && b ? pg_run_retry_k(s, PREP_AFTER_MANY, NULL, 3, vals) : NULL;
    rc = !a || !b ? CS_ENOMEM : r ? CS_OK : CS_EBACKEND;
    free(a);
    free(b);
    size_t base = out->n, at = 0;
    for (int i = 0, rows = r ? PQntuples(r) : 0; rc == CS_OK && i < rows; i++) {
        int64_t chat, history;
        if (!pg_col_id(r, i, 0, &chat) || !pg_col_id(r, i, 6, &history)) {
            rc = pg_fail(s, CS_EBACKEND, "bad message row", NULL);
            break;
        }
        /* The chat's history goes to its entry (found once per chat: the
         * rows come by chat). */
        if (at >= n || chats[at] != chat) {
            size_t from = at < n ? at : 0;
            for (at = from; at < n && chats[at] != chat; at++)
                ; /* forward first: the hub's list is sorted too */
            if (at == n)
                for (at = 0; at < from && chats[at] != chat; at++)
                    ;
            if (at == from && from < n && chats[at] != chat)
                at = n;
        }
        if (at < n)
            histories[at] = history;
        rc = push_msg(s, r, i, 1, chat, out);
    }
    PQclear(r);
    if (rc < 0)
        unpush_msgs(out, base);
    return rc;
}
