/* store.c - chatstream.Store: core.open and its options, the authorizer
 * bridge, close, create_chat, append, stats, the listener's fd and pid,
 * step, kind and migrate. The chat lifecycle methods are in lifecycle.c,
 * prepare in publish.c, subscribe in sub.c. */
#include "binding.h"

#include <stdio.h>

/* The store's hub; records the calling thread for the authorizer. */
cs_hub *check_store(lua_State *L, int i)
{
    cs_hub *hub = check_open(L, i, STORE_MT, "store");
    lstore *u = lua_touserdata(L, i);
    if (store_busy(u, 0))
        luaL_error(L, "store is busy: a call of it is under way on its "
                      "engine (another coroutine's); calls through an "
                      "event-loop adapter wait their turn");
    u->L = L;
    return hub;
}

cs_hub *peek_store(lua_State *L, int i)
{
    return check_open(L, i, STORE_MT, "store");
}

static const char *const open_keys[] = {
    "memory",        "dsn",           "schema",         "cache_size",
    "queue_size",    "poll_interval", "authorize",      "max_chats",
    "query_timeout", "stale_after",   "notify_bodies",  "page_size",
    "share_events",  "max_queue",     "action_timeout", NULL};

/* The chat as the authorizer sees it: metadata only. */
static void push_chat_meta(lua_State *L, const cs_chat_info *c)
{
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, (lua_Integer)c->id);
    lua_setfield(L, -2, "id");
    lua_pushstring(L, c->owner);
    lua_setfield(L, -2, "owner");
    lua_pushstring(L, c->title);
    lua_setfield(L, -2, "title");
}

typedef struct {
    lstore *u;
    const char *actor, *op;
    const cs_chat_info *chat;
} auth_call;

/* Everything that can raise (allocations too) runs in here, protected. */
static int call_authorize(lua_State *L)
{
    auth_call *a = lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, a->u->auth_ref);
    lua_pushstring(L, a->actor);
    push_chat_meta(L, a->chat);
    lua_pushstring(L, a->op);
    lua_call(L, 3, 2);
    return 2;
}

/* The authorizer of a store opened with `authorize`: calls
 * authorize(actor, {id, owner, title}, op). A true result allows; false or
 * nil refuses (a second result, a string, is the reason); an error refuses
 * too, with the error as the reason (fail closed). */
static int lua_authorize(void *ud, const char *actor, const cs_chat_info *chat,
                         const char *op, char *why, size_t whylen)
{
    lstore *u = ud;
    lua_State *L = u->L;
    if (!L || !lua_checkstack(L, 10)) {
        snprintf(why, whylen, "the authorizer cannot run here");
        return 0;
    }
    auth_call a = {u, actor, op, chat};
    lua_pushcfunction(L, call_authorize);
    lua_pushlightuserdata(L, &a);
    /* The store is on the caller's stack, so no collection can close it;
     * an explicit close from the authorizer raises (see store_gc). */
    u->in_auth++;
    int st = lua_pcall(L, 1, 2, 0);
    u->in_auth--;
    if (st != LUA_OK) {
        const char *e = lua_tostring(L, -1);
        snprintf(why, whylen, "the authorizer raised: %s", e ? e : "?");
        lua_pop(L, 1);
        return 0;
    }
    int ok = lua_toboolean(L, -2);
    if (!ok && lua_type(L, -1) == LUA_TSTRING)
        snprintf(why, whylen, "%s", lua_tostring(L, -1));
    lua_pop(L, 2);
    return ok;
}

/* The size options of the table at 1: at least 1, at most the core's limit. */
static void read_sizes(lua_State *L, cs_hub_options *o)
{
    o->cache_size = (size_t)opt_int_field(L, 1, "cache_size", 0, 1);
    o->queue_size = (size_t)opt_int_field(L, 1, "queue_size", 0, 1);
    o->max_chats = (size_t)opt_int_field(L, 1, "max_chats", 0, 1);
    o->page_size = (size_t)opt_int_field(L, 1, "page_size", 0, 1);
    o->max_queue = (size_t)opt_int_field(L, 1, "max_queue", 0, 1);
    if (o->cache_size > CS_MAX_CACHE_SIZE ||
        o->queue_size > CS_MAX_QUEUE_SIZE || o->max_chats > CS_MAX_CACHE_SIZE ||
        o->page_size > CS_MAX_PAGE_SIZE)
        luaL_error(L,
                   "cache_size, queue_size, max_chats and "
                   "page_size are at most %d",
                   (int)CS_MAX_CACHE_SIZE);
    if (o->max_queue > CS_MAX_MAX_QUEUE)
        luaL_error(L, "max_queue is at most %d", (int)CS_MAX_MAX_QUEUE);
}

/* poll_interval and query_timeout (seconds) of the table at 1. */
static void read_intervals(lua_State *L, cs_hub_options *o)
{
    if (lua_getfield(L, 1, "poll_interval") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) >= 0))
            luaL_error(L, "option 'poll_interval' must be a number >= 0");
        o->poll_interval = (double)lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "query_timeout") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0) ||
            !(lua_tonumber(L, -1) <= 86400))
            luaL_error(L, "option 'query_timeout' must be a number "
                          "> 0 and <= 86400 (seconds)");
        o->query_timeout = (double)lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
}

/* The memory option of the table at 1: an open chatstream.MemoryDB. */
static void read_memory(lua_State *L, cs_hub_options *o)
{
    if (lua_getfield(L, 1, "memory") != LUA_TNIL) {
        lmemdb *m = luaL_testudata(L, -1, MEMDB_MT);
        if (!m)
            luaL_error(L, "option 'memory' must be a chatstream.MemoryDB "
                          "(from chatstream.memory())");
        if (!m->db)
            luaL_error(L, "attempt to use a closed memory database");
        o->memory = m->db;
    }
    lua_pop(L, 1);
}

/* Reads the options table at 1 into o, in the order its errors are raised.
 * The dsn and schema strings are LEFT ON THE STACK (see opt_str_field). */
static void read_open_options(lua_State *L, cs_hub_options *o)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    check_keys(L, 1, open_keys);
    read_sizes(L, o);
    read_intervals(L, o);
    o->dsn = opt_str_field(L, 1, "dsn");
    o->schema = opt_str_field(L, 1, "schema");
    if (o->schema && !o->dsn)
        luaL_error(L, "option 'schema' needs a dsn");
    if (lua_getfield(L, 1, "authorize") != LUA_TNIL &&
        lua_type(L, -1) != LUA_TFUNCTION)
        luaL_error(L, "option 'authorize' must be a function");
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "action_timeout") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0))
            luaL_error(L, "option 'action_timeout' must be a number > 0");
        o->action_timeout = (double)lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "stale_after") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0))
            luaL_error(L, "option 'stale_after' must be a number > 0");
        o->stale_after = (double)lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 1, "notify_bodies") != LUA_TNIL) {
        if (lua_type(L, -1) != LUA_TBOOLEAN)
            luaL_error(L, "option 'notify_bodies' must be a boolean");
        o->plain_notifications = !lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    read_memory(L, o);
}

/* The authorize option of the store being opened, bridged to the core: the
 * function is kept in the registry until the store closes. */
static void set_authorizer(lua_State *L, lstore *u, cs_hub_options *o)
{
    if (lua_istable(L, 1) && lua_getfield(L, 1, "authorize") == LUA_TFUNCTION) {
        u->auth_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        u->auth = (cs_authorizer){lua_authorize, u};
        o->authorizer = &u->auth;
    } else if (lua_istable(L, 1)) {
        lua_pop(L, 1);
    }
}

/* core.open(options): a store on PostgreSQL (options.dsn), on the memory
 * database of options.memory, or on a private memory database. */
int l_open(lua_State *L)
{
    cs_hub_options o = {0};
    o.poll_interval = -1; /* the store's default */
    if (!lua_isnoneornil(L, 1))
        read_open_options(L, &o);
    if (o.dsn && o.memory)
        return luaL_error(L, "options 'dsn' and 'memory' exclude each other");
    int share = 0;
    if (lua_istable(L, 1)) {
        int t = lua_getfield(L, 1, "share_events");
        if (t != LUA_TNIL && t != LUA_TBOOLEAN)
            return luaL_error(L, "option 'share_events' must be a boolean");
        share = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    lstore *u = new_handle(L, sizeof *u, STORE_MT, 0);
    set_authorizer(L, u, &o);
    u->L = L;
    char err[512];
    int rc = cs_hub_open_err(&o, &u->hub, err, sizeof err);
    if (rc == CS_ENOMEM)
        return luaL_error(L, "not enough memory");
    if (rc < 0)
        return push_fail(L, rc, err);
    if (share)
        evshare_open(L, u);
    return 1;
}

int store_gc(lua_State *L)
{
    lstore *u = luaL_checkudata(L, 1, STORE_MT);
    if (u->in_auth)
        return luaL_error(L, "attempt to close a store inside its authorizer");
    store_engine_close(L, u); /* a call under way finishes first */
    cs_hub_close(u->hub);
    u->hub = NULL;
    evshare_close(L, u);
    if (u->auth_ref) {
        luaL_unref(L, LUA_REGISTRYINDEX, u->auth_ref);
        u->auth_ref = 0;
    }
    return 0;
}

int store_tostring(lua_State *L)
{
    return handle_tostring(L, STORE_MT, "chatstream.Store");
}

int store_create_chat(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    const char *owner = NULL, *title = NULL, *key = NULL;
    if (!lua_isnoneornil(L, 2)) {
        static const char *const keys[] = {"owner", "title", "idempotency_key",
                                           NULL};
        luaL_checktype(L, 2, LUA_TTABLE);
        check_keys(L, 2, keys);
        owner = opt_str_field(L, 2, "owner");
        title = opt_str_field(L, 2, "title");
        key = opt_str_field(L, 2, "idempotency_key");
    }
    int64_t id;
    int rc = cs_hub_create_chat_key(hub, owner, title, key, &id);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushinteger(L, (lua_Integer)id);
    return 1;
}

static const char *const append_keys[] = {"actor", "worker", "idempotency_key",
                                          NULL};

int store_append(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    const char *actor = opt_actor(L, 4, append_keys);
    const char *worker = opt_worker(L, 4, actor);
    const char *key =
        lua_istable(L, 4) ? opt_str_field(L, 4, "idempotency_key") : NULL;
    if (!key)
        lua_pushnil(L); /* the stack keeps the same shape */
    size_t n;
    cs_msg_in *msgs = read_msgs(L, 3, &n);
    int64_t *ids = lua_newuserdatauv(L, n * sizeof *ids, 0);
    lua_createtable(L, (int)n, 0);
    cs_append_options o = {actor, worker, key};
    int rc = cs_hub_append_opts(hub, chat, &o, msgs, n, ids);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    fill_ids(L, ids, n);
    return 1;
}

/* store:append_many({{chat, msg}, ...}) -> ids, errors: one message per
 * chat each, each its own transaction, several in flight at once (pipeline
 * mode on PostgreSQL). ids[i] is the message's id or false; errors[i], for
 * the failed ones, is {message, code}. */
int store_append_many(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer n = luaL_len(L, 2);
    if (n < 1 || n > CS_MAX_APPENDS)
        return luaL_argerror(L, 2,
                             "expected a list of 1 to 4096 {chat, message}");
    cs_append_req *reqs = lua_newuserdatauv(L, (size_t)n * sizeof *reqs, 0);
    lua_createtable(L, (int)n, 0); /* anchors the messages' strings */
    int anchor = lua_gettop(L);
    for (lua_Integer i = 1; i <= n; i++) {
        if (lua_geti(L, 2, i) != LUA_TTABLE)
            return luaL_argerror(L, 2, "each entry must be {chat, message}");
        int e = lua_gettop(L);
        lua_geti(L, e, 1);
        int isint;
        lua_Integer chat = lua_tointegerx(L, -1, &isint);
        if (!isint || chat < 1)
            return luaL_argerror(L, 2,
                                 "an entry's chat id must be an integer >= 1");
        lua_pop(L, 1);
        lua_geti(L, e, 2);
        size_t one;
        cs_msg_in *m = read_msgs(L, lua_gettop(L), &one);
        if (one != 1)
            return luaL_argerror(L, 2, "an entry holds one message");
        reqs[i - 1].chat_id = (int64_t)chat;
        reqs[i - 1].msg = *m;
        lua_rawseti(L, anchor, i); /* the message array keeps its strings */
        lua_pop(L, 2);
    }
    int64_t *ids = lua_newuserdatauv(L, (size_t)n * sizeof *ids, 0);
    int *rcs = lua_newuserdatauv(L, (size_t)n * sizeof *rcs, 0);
    lua_createtable(L, (int)n, 0);
    lua_createtable(L, 0, 0);
    int rc = cs_hub_append_many(hub, reqs, (size_t)n, ids, rcs);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    for (lua_Integer i = 1; i <= n; i++) {
        if (rcs[i - 1] == CS_OK) {
            lua_pushinteger(L, (lua_Integer)ids[i - 1]);
        } else {
            lua_pushboolean(L, 0);
            lua_createtable(L, 2, 0);
            lua_pushstring(L, cs_strerror(rcs[i - 1]));
            lua_rawseti(L, -2, 1);
            lua_pushstring(L, cs_errname(rcs[i - 1]));
            lua_rawseti(L, -2, 2);
            lua_rawseti(L, -3, i);
        }
        lua_rawseti(L, -3, i);
    }
    return 2;
}

int store_stats(lua_State *L)
{
    cs_stats s;
    cs_hub_stats(peek_store(L, 1), &s);
    lua_createtable(L, 0, 12);
    set_int(L, "notifications", s.notifications);
    set_int(L, "malformed", s.malformed);
    set_int(L, "parts", s.parts);
    set_int(L, "parts_dropped", s.parts_dropped);
    set_int(L, "truncates", s.truncates);
    set_int(L, "cut_reads", s.cut_reads);
    set_int(L, "cut_refused", s.cut_refused);
    set_int(L, "auth_checks", s.auth_checks);
    set_int(L, "auth_refusals", s.auth_refusals);
    set_int(L, "shared_passes", s.shared_passes);
    set_int(L, "bodies", s.bodies);
    set_int(L, "listener_deaf", s.listener_deaf);
    set_int(L, "steps", s.steps);
    set_int(L, "cached_messages", s.cached_messages);
    set_int(L, "warnings", s.warnings);
    lua_pushstring(L, cs_hub_last_warning(check_store(L, 1)));
    lua_setfield(L, -2, "last_warning");
    if (s.notify_queue_usage >= 0) {
        lua_pushnumber(L, s.notify_queue_usage);
        lua_setfield(L, -2, "notify_queue_usage");
    }
    set_int(L, "queries", s.queries);
    set_int(L, "query_errors", s.query_errors);
    set_int(L, "writes", s.writes);
    set_int(L, "publish_errors", s.publish_errors);
    set_int(L, "cache_hits", s.cache_hits);
    set_int(L, "cache_misses", s.cache_misses);
    set_int(L, "db_passes", s.db_passes);
    set_int(L, "delivered", s.delivered);
    set_int(L, "resyncs", s.resyncs);
    set_int(L, "reconnects", s.reconnects);
    set_int(L, "polls", s.polls);
    set_int(L, "cached_chats", s.cached_chats);
    return 1;
}

/* Creates or upgrades the schema; nothing to do on the memory store. */
int store_migrate(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int rc = cs_hub_migrate(hub);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushboolean(L, 1);
    return 1;
}

/* pg: the listener connection's server PID (nil without one). */
int store_listener_pid(lua_State *L)
{
    return push_id_or_nil(L, cs_hub_listener_pid(peek_store(L, 1)));
}

int store_kind(lua_State *L)
{
    lua_pushstring(L, cs_hub_store_name(peek_store(L, 1)));
    return 1;
}

/* store:step([timeout]): receives and routes notifications; with a timeout,
 * first waits up to that long for the listener to have some. */
int store_step(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int rc = cs_hub_wait(hub, opt_timeout(L, 2));
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushinteger(L, rc);
    return 1;
}
