/* pg_migrate.c - the PostgreSQL store's schema: versioned migrations,
 * applied in order under an advisory lock. */
#include "pg_internal.h"

#include <stdio.h>

/* Versioned DDL; %1$s is the schema. Applied in order, each once. */
static const char *const migrations[] = {
    /* 1: chats, messages, the queue */
    "CREATE TABLE %1$s.chats ("
    " id bigserial PRIMARY KEY,"
    " owner text NOT NULL DEFAULT '',"
    " title text NOT NULL DEFAULT '',"
    " status text NOT NULL DEFAULT 'waiting',"
    " version bigint NOT NULL DEFAULT 0,"
    " worker_id text,"
    " heartbeat_at timestamptz,"
    " last_message_id bigint NOT NULL DEFAULT 0,"
    " created_at timestamptz NOT NULL DEFAULT now(),"
    " updated_at timestamptz NOT NULL DEFAULT now());"
    "CREATE TABLE %1$s.messages ("
    " id bigserial PRIMARY KEY,"
    " chat_id bigint NOT NULL REFERENCES %1$s.chats (id) ON DELETE CASCADE,"
    " role text NOT NULL CHECK (role IN ('system','user','assistant','tool')),"
    " content text NOT NULL,"
    " prev_id bigint NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now());"
    "CREATE INDEX messages_chat_id_id ON %1$s.messages (chat_id, id);"
    "CREATE TABLE %1$s.queued_messages ("
    " id bigserial PRIMARY KEY,"
    " chat_id bigint NOT NULL REFERENCES %1$s.chats (id) ON DELETE CASCADE,"
    " content text NOT NULL,"
    " actor text,"
    " created_at timestamptz NOT NULL DEFAULT now());"
    "CREATE INDEX queued_messages_chat ON %1$s.queued_messages"
    " (chat_id, created_at, id);",
    /* 2: tool call IDs, the queue's own order, the acquire index */
    "ALTER TABLE %1$s.messages ADD COLUMN tool text NOT NULL DEFAULT '';"
    "ALTER TABLE %1$s.queued_messages"
    " ADD COLUMN position bigint NOT NULL DEFAULT 0;"
    "UPDATE %1$s.queued_messages q SET position = o.n FROM (SELECT id,"
    " row_number() OVER (PARTITION BY chat_id ORDER BY created_at, id) AS n"
    " FROM %1$s.queued_messages) o WHERE q.id = o.id;"
    "CREATE INDEX queued_messages_position ON %1$s.queued_messages"
    " (chat_id, position, id);"
    "DROP INDEX IF EXISTS %1$s.queued_messages_chat;"
    "CREATE INDEX chats_acquire ON %1$s.chats (updated_at, id)"
    " WHERE status IN ('pending', 'running');"
    "CREATE INDEX chats_interrupted ON %1$s.chats (updated_at, id)"
    " WHERE status = 'waiting' AND worker_id IS NOT NULL;",
    /* 3: idempotency keys: a write's result per chat and key (kept as long
     * as the chat), a chat per owner and key */
    "CREATE TABLE %1$s.idempotency_keys ("
    " chat_id bigint NOT NULL REFERENCES %1$s.chats (id) ON DELETE CASCADE,"
    " key text NOT NULL,"
    " ids bigint[] NOT NULL,"
    " queued boolean NOT NULL DEFAULT false,"
    " request bigint NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (chat_id, key));"
    "ALTER TABLE %1$s.chats ADD COLUMN idempotency_key text;"
    "CREATE UNIQUE INDEX chats_owner_key ON %1$s.chats (owner, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL;",
    /* 4: the error a turn recorded (finish with error) */
    "ALTER TABLE %1$s.chats ADD COLUMN last_error text NOT NULL DEFAULT '';",
    /* 5: archived chats */
    ("ALTER TABLE %1$s.chats ADD COLUMN archived boolean NOT NULL DEFAULT "
     "false;"),
    /* 6: the parts of turns in progress, for late joiners (not durable) */
    "CREATE UNLOGGED TABLE %1$s.parts ("
    " seq bigserial PRIMARY KEY,"
    " chat_id bigint NOT NULL REFERENCES %1$s.chats (id) ON DELETE CASCADE,"
    " after bigint NOT NULL,"
    " text text NOT NULL);"
    "CREATE INDEX parts_chat ON %1$s.parts (chat_id, after, seq);",
    /* 7: the requires_action deadline's look-up (acquire runs it) */
    ("CREATE INDEX chats_action ON %1$s.chats (updated_at, id) WHERE status = "
     "'requires_action';"),
    /* 8: edits: soft-deleted messages, the chat's history, its cuts */
    "ALTER TABLE %1$s.messages ADD COLUMN deleted boolean NOT NULL DEFAULT"
    " false;"
    "ALTER TABLE %1$s.chats ADD COLUMN history bigint NOT NULL DEFAULT 0;"
    "CREATE TABLE %1$s.cuts ("
    " chat_id bigint NOT NULL REFERENCES %1$s.chats (id) ON DELETE CASCADE,"
    " history bigint NOT NULL,"
    " after bigint NOT NULL,"
    " id bigint NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (chat_id, history));",
};

int pg_migrate(void *st)
{
    pg_store *s = st;
    PGconn *c = pg_qconn(s);
    if (!c)
        return CS_EBACKEND;
    char sql[4096], key[96];
    const char *vals[1] = {key};
    snprintf(key, sizeof key, "chatstream.migrate:%s", s->schema);
    int rc = pg_exec_retry(s, "BEGIN", 0, NULL);
    c = s->q;
    /* One migrator per schema at a time, across processes. */
    if (rc == CS_OK)
        rc = pg_exec(s, c, "SELECT pg_advisory_xact_lock(hashtext($1))", 1,
                     vals);
    if (rc == CS_OK) {
        snprintf(sql, sizeof sql,
                 "CREATE SCHEMA IF NOT EXISTS %s;"
                 "CREATE TABLE IF NOT EXISTS %s.schema_migrations ("
                 " version int PRIMARY KEY,"
                 " applied_at timestamptz NOT NULL DEFAULT now())",
                 s->schema, s->schema);
        rc = pg_exec(s, c, sql, 0, NULL);
    }
    int64_t have = 0;
    if (rc == CS_OK) {
        snprintf(sql, sizeof sql,
                 "SELECT coalesce(max(version), 0) FROM %s.schema_migrations",
                 s->schema);
        PGresult *r = pg_run(s, c, sql, 0, NULL);
        if (!r || PQntuples(r) != 1 || !pg_col_id(r, 0, 0, &have))
            rc = r ? pg_fail(s, CS_EBACKEND, "bad schema_migrations", NULL)
                   : CS_EBACKEND;
        PQclear(r);
    }
    int64_t n = (int64_t)(sizeof migrations / sizeof *migrations);
    if (rc == CS_OK && have > n)
        rc = pg_fail(s, CS_EBACKEND, "the schema is newer than this chatstream",
                     NULL);
    for (int64_t v = have + 1; rc == CS_OK && v <= n; v++) {
        snprintf(sql, sizeof sql, migrations[v - 1], s->schema);
        rc = pg_exec(s, c, sql, 0, NULL);
        if (rc == CS_OK) {
            char ver[24];
            const char *vv[1] = {ver};
            pg_i64s(ver, v);
            snprintf(sql, sizeof sql,
                     "INSERT INTO %s.schema_migrations (version) VALUES ($1)",
                     s->schema);
            rc = pg_exec(s, c, sql, 1, vv);
        }
    }
    if (rc == CS_OK)
        rc = pg_exec(s, c, "COMMIT", 0, NULL);
    if (rc < 0)
        pg_rollback(s);
    return rc;
}
