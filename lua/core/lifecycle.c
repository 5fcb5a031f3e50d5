/* lifecycle.c - the Store's chat lifecycle methods: chat, send, the queue
 * (queued, delete_queued, move_queued, promote_queued), acquire, heartbeat,
 * finish and publish_part. */
#include "binding.h"

#include <string.h>

int store_chat(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    const char *actor = opt_actor(L, 3, NULL);
    cs_chat_info *c = lua_newuserdatauv(L, sizeof *c, 0);
    int rc = cs_hub_chat_info(hub, chat, actor, c);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_createtable(L, 0, 8);
    set_int(L, "id", c->id);
    lua_pushstring(L, c->owner);
    lua_setfield(L, -2, "owner");
    lua_pushstring(L, c->title);
    lua_setfield(L, -2, "title");
    lua_pushstring(L, cs_status_name(c->status));
    lua_setfield(L, -2, "status");
    set_int(L, "version", c->version);
    set_int(L, "last_message_id", c->last_message_id);
    if (c->worker[0]) {
        /* A waiting chat has no worker: one named there was interrupted
         * (it may still append its partial output and finish). */
        lua_pushstring(L, c->worker);
        lua_setfield(L, -2,
                     c->status == CS_STATUS_WAITING ? "interrupted_worker"
                                                    : "worker");
        lua_pushnumber(L, c->heartbeat_age);
        lua_setfield(L, -2, "heartbeat_age");
    }
    if (c->last_error[0]) {
        lua_pushstring(L, c->last_error);
        lua_setfield(L, -2, "last_error");
    }
    lua_pushboolean(L, c->archived);
    lua_setfield(L, -2, "archived");
    set_int(L, "history", c->history);
    return 1;
}

/* store:archive(chat_id, {actor = ...}) / store:unarchive(...) -> the chat
 * (as store:chat) */
static int archive(lua_State *L, bool archived)
{
    static const char *const keys[] = {"actor", NULL};
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    const char *actor = opt_actor(L, 3, keys);
    int rc = cs_hub_archive(hub, chat, actor, archived, NULL);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_settop(L, 2);
    return store_chat(L);
}

int store_archive(lua_State *L)
{
    return archive(L, true);
}

int store_unarchive(lua_State *L)
{
    return archive(L, false);
}

/* store:submit_tool_results(chat_id, {{tool_call_id = ..., content = ...},
 * ...}, {actor = ...}) -> ids */
int store_submit_tool_results(lua_State *L)
{
    static const char *const keys[] = {"tool_call_id", "content", NULL};
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    luaL_checktype(L, 3, LUA_TTABLE);
    const char *actor = opt_actor(L, 4, NULL);
    lua_Integer count = luaL_len(L, 3);
    if (count < 1 || count > CS_MAX_BATCH)
        return luaL_argerror(L, 3, "expected a list of 1 to 4096 tool results");
    /* As messages: {role = "tool", tool_call_id = ..., content = ...}. */
    lua_createtable(L, (int)count, 0);
    int list = lua_gettop(L);
    for (lua_Integer i = 1; i <= count; i++) {
        if (lua_geti(L, 3, i) != LUA_TTABLE)
            return luaL_argerror(
                L, 3, "a tool result is {tool_call_id = ..., content = ...}");
        check_keys(L, lua_gettop(L), keys);
        lua_createtable(L, 0, 3);
        lua_pushliteral(L, "tool");
        lua_setfield(L, -2, "role");
        if (lua_getfield(L, -2, "tool_call_id") != LUA_TSTRING)
            return luaL_argerror(L, 3, "tool_call_id must be a string");
        lua_setfield(L, -2, "tool_call_id");
        lua_getfield(L, -2, "content");
        lua_setfield(L, -2, "content");
        lua_rawseti(L, list, i);
        lua_pop(L, 1);
    }
    size_t n;
    cs_msg_in *msgs = read_msgs(L, list, &n);
    int64_t *ids = lua_newuserdatauv(L, n * sizeof *ids, 0);
    lua_createtable(L, (int)n, 0);
    int rc = cs_hub_submit_tool_results(hub, chat, actor, msgs, n, ids);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    fill_ids(L, ids, n);
    return 1;
}

/* store:recover({limit = n}) -> {expired =, revived =, released =,
 * promoted =} */
int store_recover(lua_State *L)
{
    static const char *const keys[] = {"limit", NULL};
    cs_hub *hub = check_store(L, 1);
    lua_Integer limit = 0;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        check_keys(L, 2, keys);
        limit = opt_int_field(L, 2, "limit", 0, 1);
        if (limit > 1024)
            return luaL_error(L, "limit must be 1 to 1024");
    }
    cs_recovered r;
    int rc = cs_hub_recover(hub, (size_t)limit, &r);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_createtable(L, 0, 4);
    set_int(L, "expired", (int64_t)r.expired);
    set_int(L, "revived", (int64_t)r.revived);
    set_int(L, "released", (int64_t)r.released);
    set_int(L, "promoted", (int64_t)r.promoted);
    return 1;
}

/* store:interrupt(chat_id, {actor = ...}) -> the chat (as store:chat) */
int store_interrupt(lua_State *L)
{
    static const char *const keys[] = {"actor", NULL};
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    const char *actor = NULL;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        check_keys(L, 3, keys);
        actor = opt_str_field(L, 3, "actor");
    }
    int rc = cs_hub_interrupt(hub, chat, actor, NULL);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_settop(L, 2);
    return store_chat(L);
}

/* store:edit(chat_id, message_id, {content = ..., actor = ..., prepare =})
 * -> the new message's id, or a stepped publish with prepare = true */
int store_edit(lua_State *L)
{
    static const char *const keys[] = {"content", "actor", "prepare", NULL};
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    int64_t mid = check_id(L, 3, "message id");
    luaL_checktype(L, 4, LUA_TTABLE);
    check_keys(L, 4, keys);
    size_t len;
    if (lua_getfield(L, 4, "content") != LUA_TSTRING)
        return luaL_argerror(L, 4, "the edited content must be a string");
    const char *content = lua_tolstring(L, -1, &len);
    const char *actor = opt_str_field(L, 4, "actor");
    int t = lua_getfield(L, 4, "prepare");
    if (t != LUA_TNIL && t != LUA_TBOOLEAN)
        return luaL_error(L, "option 'prepare' must be a boolean");
    int prepare = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (!prepare) {
        int64_t id;
        int rc = cs_hub_edit(hub, chat, mid, actor, content, len, &id);
        if (rc < 0)
            return hub_fail(L, hub, rc);
        lua_pushinteger(L, (lua_Integer)id);
        return 1;
    }
    lpub *u = new_handle(L, sizeof *u, PUB_MT, 1);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    int rc = cs_edit_prepare(hub, chat, mid, actor, content, len, &u->pub);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    return 1;
}

/* store:send(chat_id, {content = ..., role = "user", actor = ...}) ->
 * id, queued */
int store_send(lua_State *L)
{
    static const char *const keys[] = {"role", "content", "actor",
                                       "idempotency_key", NULL};
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    luaL_checktype(L, 3, LUA_TTABLE);
    check_keys(L, 3, keys);
    const char *role = opt_str_field(L, 3, "role");
    if (role && strcmp(role, "user") != 0)
        return luaL_argerror(L, 3, "send takes a user message");
    size_t len;
    if (lua_getfield(L, 3, "content") != LUA_TSTRING)
        return luaL_argerror(L, 3, "message content must be a string");
    const char *content = lua_tolstring(L, -1, &len);
    const char *actor = opt_str_field(L, 3, "actor");
    if (!actor)
        lua_pushnil(L);
    const char *key = opt_str_field(L, 3, "idempotency_key");
    int64_t id;
    int queued;
    int rc = cs_hub_send_key(hub, chat, actor, key, content, len, &id, &queued);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushinteger(L, (lua_Integer)id);
    lua_pushboolean(L, queued);
    return 2;
}

int store_queued(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    const char *actor = opt_actor(L, 3, NULL);
    cs_queue q = {0};
    int rc = cs_hub_queued(hub, chat, actor, &q);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    /* Built under a protected call: the queue must be freed either way. */
    lua_pushcfunction(L, push_queue_protected);
    lua_pushlightuserdata(L, &q);
    rc = lua_pcall(L, 1, 1, 0);
    cs_queue_free(&q);
    if (rc != LUA_OK)
        return lua_error(L);
    return 1;
}

static int queue_change(lua_State *L, int front)
{
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    int64_t qid = check_id(L, 3, "queued id");
    const char *actor = opt_actor(L, 4, NULL);
    int rc = front ? cs_hub_queue_front(hub, chat, actor, qid)
                   : cs_hub_queue_delete(hub, chat, actor, qid);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushboolean(L, 1);
    return 1;
}

int store_delete_queued(lua_State *L)
{
    return queue_change(L, 0);
}

int store_move_queued(lua_State *L)
{
    return queue_change(L, 1);
}

/* store:promote_queued(chat_id, queued_id, {actor =, prepare =}) -> ids, or
 * a stepped publish with prepare = true. */
int store_promote_queued(lua_State *L)
{
    static const char *const keys[] = {"actor", "prepare", NULL};
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    int64_t qid = check_id(L, 3, "queued id");
    const char *actor = opt_actor(L, 4, keys);
    int prepare = 0;
    if (lua_istable(L, 4)) {
        int t = lua_getfield(L, 4, "prepare");
        if (t != LUA_TNIL && t != LUA_TBOOLEAN)
            return luaL_error(L, "option 'prepare' must be a boolean");
        prepare = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lpub *u = new_handle(L, sizeof *u, PUB_MT, 1);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    int rc = cs_promote_prepare(hub, chat, actor, qid, &u->pub);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    if (prepare)
        return 1;
    const int64_t *ids;
    size_t n;
    rc = cs_pub_commit(u->pub, &ids, &n);
    if (rc < 0) {
        cs_pub_close(u->pub);
        u->pub = NULL;
        return hub_fail(L, hub, rc);
    }
    lua_createtable(L, (int)n, 0);
    fill_ids(L, ids, n);
    rc = cs_pub_cache(u->pub, CS_ALL);
    if (rc == CS_OK)
        rc = cs_pub_notify(u->pub, CS_ALL);
    cs_pub_close(u->pub);
    u->pub = NULL;
    (void)rc; /* durable: a failed publish costs readers a query */
    return 1;
}

/* store:acquire{worker = "w1", limit = 1, stale_after = seconds} -> ids */
int store_acquire(lua_State *L)
{
    static const char *const keys[] = {"worker", "limit", "stale_after", NULL};
    cs_hub *hub = check_store(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    check_keys(L, 2, keys);
    const char *worker = opt_str_field(L, 2, "worker");
    if (!worker)
        return luaL_error(L, "option 'worker' is required");
    lua_Integer limit = opt_int_field(L, 2, "limit", 1, 1);
    if (limit > 1024)
        return luaL_error(L, "option 'limit' must be 1 to 1024");
    double stale = 0;
    if (lua_getfield(L, 2, "stale_after") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) >= 0))
            return luaL_error(L, "option 'stale_after' must be a number >= 0");
        stale = lua_tonumber(L, -1);
        if (stale == 0)
            stale = 1e-9; /* 0 is the hub's default in the C API */
    }
    lua_pop(L, 1);
    int64_t *ids = lua_newuserdatauv(L, (size_t)limit * sizeof *ids, 0);
    size_t n = 0;
    int rc = cs_hub_acquire(hub, worker, (size_t)limit, stale, ids, &n);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_createtable(L, (int)n, 0);
    fill_ids(L, ids, n);
    return 1;
}

/* store:heartbeat(chat_id, worker) -> true, or false, status */
int store_heartbeat(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    const char *worker = luaL_checkstring(L, 3);
    cs_status st;
    int rc = cs_hub_heartbeat(hub, chat, worker, &st);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushboolean(L, rc == 1);
    if (rc == 1)
        return 1;
    lua_pushstring(L, cs_status_name(st));
    return 2;
}

static cs_status check_status(lua_State *L, int idx)
{
    size_t len;
    const char *s = luaL_checklstring(L, idx, &len);
    int st = cs_status_parse(s, len);
    if (st < 0)
        luaL_argerror(L, idx,
                      "status must be waiting, pending, running, paused, "
                      "completed, error or requires_action");
    return (cs_status)st;
}

/* store:finish(chat_id, status, {worker =, actor =}) -> true, final status */
int store_finish(lua_State *L)
{
    static const char *const keys[] = {"worker", "actor", "error", NULL};
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    cs_status st = check_status(L, 3);
    const char *actor = opt_actor(L, 4, keys);
    const char *worker =
        lua_istable(L, 4) ? opt_str_field(L, 4, "worker") : NULL;
    const char *error = NULL;
    if (lua_istable(L, 4) && (error = opt_str_field(L, 4, "error")) != NULL) {
        size_t len;
        lua_getfield(L, 4, "error");
        lua_tolstring(L, -1, &len);
        lua_pop(L, 1);
        if (len != strlen(error))
            return luaL_argerror(L, 4, "error must not contain a NUL byte");
    }
    cs_status final;
    int rc = cs_hub_finish_error(hub, chat, worker, actor, st, error, &final);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushboolean(L, 1);
    lua_pushstring(L, cs_status_name(final));
    return 2;
}

/* store:publish_part(chat_id, text, {actor = ... | worker = ...}) -> true */
int store_publish_part(lua_State *L)
{
    static const char *const keys[] = {"actor", "worker", NULL};
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    size_t len;
    const char *text = luaL_checklstring(L, 3, &len);
    const char *actor = opt_actor(L, 4, keys);
    const char *worker = opt_worker(L, 4, actor);
    int rc = cs_hub_publish_part_as(hub, chat, actor, worker, text, len);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushboolean(L, 1);
    return 1;
}
