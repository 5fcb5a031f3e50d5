/* chatstream_core.c - the Lua 5.4 binding of the chatstream core
 * ("chatstream.core"). */
#include "chatstream.h"

#include <lauxlib.h>
#include <lua.h>

#include <stdio.h>
#include <string.h>
#include <time.h>

#define MEMDB_MT "chatstream.MemoryDB"
#define STORE_MT "chatstream.Store"
#define PUB_MT "chatstream.Publish"
#define SUB_MT "chatstream.Subscription"

typedef struct {
    cs_memdb *db;
} lmemdb;
typedef struct {
    cs_hub *hub;  /* first: the generic accessors read it */
    int in_auth;  /* inside the authorizer: the store cannot close */
    lua_State *L; /* the thread of the call in progress (authorizer) */
    int auth_ref; /* the authorize function in the registry, or 0 */
    cs_authorizer auth;
} lstore;
typedef struct {
    cs_publish *pub;
    int committed; /* a second commit is misuse (raises) */
} lpub;
typedef struct {
    cs_sub *sub;       /* first: the generic accessors read it */
    int busy;          /* inside next: a close must wait (finalizers) */
    int close_pending; /* closed while busy: done when next returns */
} lsub;

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

/* ---- helpers --------------------------------------------------------- */

/* Runtime failure: nil, "CODE: detail", "CODE". */
static int push_fail(lua_State *L, int rc, const char *detail)
{
    lua_pushnil(L);
    if (detail && *detail)
        lua_pushfstring(L, "%s: %s", cs_errname(rc), detail);
    else
        lua_pushfstring(L, "%s: %s", cs_errname(rc), cs_strerror(rc));
    lua_pushstring(L, cs_errname(rc));
    return 3;
}

static int hub_fail(lua_State *L, cs_hub *hub, int rc)
{
    if (rc == CS_ENOMEM)
        return luaL_error(L, "not enough memory");
    return push_fail(L, rc, cs_hub_errmsg(hub));
}

/* Strict accessors raise on a closed handle; lenient ones return NULL. */
static void *check_open(lua_State *L, int idx, const char *mt, const char *what)
{
    void **p = luaL_checkudata(L, idx, mt);
    if (!*p)
        luaL_error(L, "attempt to use a closed %s", what);
    return *p;
}

#define check_memdb(L, i)                                                      \
    ((cs_memdb *)check_open(L, i, MEMDB_MT, "memory database"))
/* The store's hub; records the calling thread for the authorizer. */
static cs_hub *check_store(lua_State *L, int i)
{
    cs_hub *hub = check_open(L, i, STORE_MT, "store");
    ((lstore *)lua_touserdata(L, i))->L = L;
    return hub;
}
#define check_pub(L, i) ((cs_publish *)check_open(L, i, PUB_MT, "publish"))
#define check_sub(L, i) ((cs_sub *)check_open(L, i, SUB_MT, "subscription"))

static int64_t check_id(lua_State *L, int idx, const char *what)
{
    lua_Integer v = luaL_checkinteger(L, idx);
    if (v < 1)
        luaL_argerror(
            L, idx, lua_pushfstring(L, "%s must be a positive integer", what));
    return (int64_t)v;
}

/* Reads an optional integer field of the table at idx. */
static lua_Integer opt_int_field(lua_State *L, int idx, const char *k,
                                 lua_Integer def, lua_Integer min)
{
    lua_Integer v = def;
    int t = lua_getfield(L, idx, k);
    if (t != LUA_TNIL) {
        int isint = 0;
        if (t == LUA_TNUMBER) /* no string coercion */
            v = lua_tointegerx(L, -1, &isint);
        if (!isint || v < min)
            luaL_error(L, "option '%s' must be an integer >= %d", k, (int)min);
    }
    lua_pop(L, 1);
    return v;
}

/* Reads an optional string field of the table at idx. The value is LEFT ON
 * THE STACK: it may come from an __index metamethod, so only the stack keeps
 * the returned pointer valid until the caller is done with it. */
static const char *opt_str_field(lua_State *L, int idx, const char *k)
{
    int t = lua_getfield(L, idx, k);
    if (t == LUA_TNIL)
        return NULL;
    if (t != LUA_TSTRING)
        luaL_error(L, "option '%s' must be a string", k);
    return lua_tostring(L, -1);
}

/* Raises on keys of the options table at idx that are not in allowed. */
static void check_keys(lua_State *L, int idx, const char *const allowed[])
{
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        const char *k =
            lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        int ok = 0;
        for (int i = 0; k && allowed[i]; i++)
            ok |= strcmp(k, allowed[i]) == 0;
        if (!ok)
            luaL_error(L, "unknown option '%s'", k ? k : luaL_typename(L, -1));
    }
}

static void *new_handle(lua_State *L, size_t size, const char *mt, int nuv)
{
    void *p = lua_newuserdatauv(L, size, nuv);
    memset(p, 0, size); /* created closed, before the core is called */
    luaL_setmetatable(L, mt);
    return p;
}

static int handle_tostring(lua_State *L, const char *mt, const char *name)
{
    void **p = luaL_checkudata(L, 1, mt);
    if (*p)
        lua_pushfstring(L, "%s (%p)", name, *p);
    else
        lua_pushfstring(L, "%s (closed)", name);
    return 1;
}

static double opt_timeout(lua_State *L, int idx);
static int push_queue_protected(lua_State *L);
static void set_int(lua_State *L, const char *k, int64_t v);

/* ---- memory database ---------------------------------------------------- */

static int l_memory(lua_State *L)
{
    lmemdb *u = new_handle(L, sizeof *u, MEMDB_MT, 0);
    int rc = cs_memdb_open(&u->db);
    if (rc < 0)
        return luaL_error(L, "not enough memory");
    return 1;
}

static int memdb_gc(lua_State *L)
{
    lmemdb *u = luaL_checkudata(L, 1, MEMDB_MT);
    cs_memdb_close(u->db);
    u->db = NULL;
    return 0;
}

static lua_Integer check_count(lua_State *L, int idx)
{
    lua_Integer n = luaL_checkinteger(L, idx);
    luaL_argcheck(L, n >= 0, idx, "count must be >= 0");
    return n;
}

static int memdb_fail_queries(lua_State *L)
{
    cs_memdb_fail_queries(check_memdb(L, 1), check_count(L, 2));
    lua_settop(L, 1);
    return 1;
}

static int memdb_drop_notifies(lua_State *L)
{
    cs_memdb_drop_notifies(check_memdb(L, 1), check_count(L, 2));
    lua_settop(L, 1);
    return 1;
}

static int memdb_tostring(lua_State *L)
{
    return handle_tostring(L, MEMDB_MT, "chatstream.MemoryDB");
}

/* ---- store -----------------------------------------------------------------
 */

static const char *const open_keys[] = {
    "memory",        "dsn",       "schema",    "cache_size",    "queue_size",
    "poll_interval", "authorize", "max_chats", "query_timeout", "stale_after",
    "notify_bodies", "page_size", NULL};

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

/* core.open(options): a store on PostgreSQL (options.dsn), on the memory
 * database of options.memory, or on a private memory database. */
static int l_open(lua_State *L)
{
    cs_hub_options o = {0};
    o.poll_interval = -1; /* the store's default */
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        check_keys(L, 1, open_keys);
        o.cache_size = (size_t)opt_int_field(L, 1, "cache_size", 0, 1);
        o.queue_size = (size_t)opt_int_field(L, 1, "queue_size", 0, 1);
        o.max_chats = (size_t)opt_int_field(L, 1, "max_chats", 0, 1);
        o.page_size = (size_t)opt_int_field(L, 1, "page_size", 0, 1);
        if (o.cache_size > CS_MAX_CACHE_SIZE ||
            o.queue_size > CS_MAX_QUEUE_SIZE ||
            o.max_chats > CS_MAX_CACHE_SIZE || o.page_size > CS_MAX_PAGE_SIZE)
            return luaL_error(L,
                              "cache_size, queue_size, max_chats and "
                              "page_size are at most %d",
                              (int)CS_MAX_CACHE_SIZE);
        if (lua_getfield(L, 1, "poll_interval") != LUA_TNIL) {
            if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) >= 0))
                return luaL_error(
                    L, "option 'poll_interval' must be a number >= 0");
            o.poll_interval = (double)lua_tonumber(L, -1);
        }
        lua_pop(L, 1);
        if (lua_getfield(L, 1, "query_timeout") != LUA_TNIL) {
            if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0) ||
                !(lua_tonumber(L, -1) <= 86400))
                return luaL_error(L, "option 'query_timeout' must be a number "
                                     "> 0 and <= 86400 (seconds)");
            o.query_timeout = (double)lua_tonumber(L, -1);
        }
        lua_pop(L, 1);
        o.dsn = opt_str_field(L, 1, "dsn");
        o.schema = opt_str_field(L, 1, "schema");
        if (o.schema && !o.dsn)
            return luaL_error(L, "option 'schema' needs a dsn");
        if (lua_getfield(L, 1, "authorize") != LUA_TNIL &&
            lua_type(L, -1) != LUA_TFUNCTION)
            return luaL_error(L, "option 'authorize' must be a function");
        lua_pop(L, 1);
        if (lua_getfield(L, 1, "stale_after") != LUA_TNIL) {
            if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0))
                return luaL_error(L,
                                  "option 'stale_after' must be a number > 0");
            o.stale_after = (double)lua_tonumber(L, -1);
        }
        lua_pop(L, 1);
        if (lua_getfield(L, 1, "notify_bodies") != LUA_TNIL) {
            if (lua_type(L, -1) != LUA_TBOOLEAN)
                return luaL_error(L,
                                  "option 'notify_bodies' must be a boolean");
            o.plain_notifications = !lua_toboolean(L, -1);
        }
        lua_pop(L, 1);
        if (lua_getfield(L, 1, "memory") != LUA_TNIL) {
            lmemdb *m = luaL_testudata(L, -1, MEMDB_MT);
            if (!m)
                return luaL_error(
                    L, "option 'memory' must be a chatstream.MemoryDB "
                       "(from chatstream.memory())");
            if (!m->db)
                return luaL_error(L, "attempt to use a closed memory database");
            o.memory = m->db;
        }
        lua_pop(L, 1);
    }
    if (o.dsn && o.memory)
        return luaL_error(L, "options 'dsn' and 'memory' exclude each other");
    lstore *u = new_handle(L, sizeof *u, STORE_MT, 0);
    if (lua_istable(L, 1) && lua_getfield(L, 1, "authorize") == LUA_TFUNCTION) {
        u->auth_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        u->auth = (cs_authorizer){lua_authorize, u};
        o.authorizer = &u->auth;
    } else if (lua_istable(L, 1)) {
        lua_pop(L, 1);
    }
    u->L = L;
    char err[512];
    int rc = cs_hub_open_err(&o, &u->hub, err, sizeof err);
    if (rc == CS_ENOMEM)
        return luaL_error(L, "not enough memory");
    if (rc < 0)
        return push_fail(L, rc, err);
    return 1;
}

static int store_gc(lua_State *L)
{
    lstore *u = luaL_checkudata(L, 1, STORE_MT);
    if (u->in_auth)
        return luaL_error(L, "attempt to close a store inside its authorizer");
    cs_hub_close(u->hub);
    u->hub = NULL;
    if (u->auth_ref) {
        luaL_unref(L, LUA_REGISTRYINDEX, u->auth_ref);
        u->auth_ref = 0;
    }
    return 0;
}

static int store_tostring(lua_State *L)
{
    return handle_tostring(L, STORE_MT, "chatstream.Store");
}

static int store_create_chat(lua_State *L)
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

/* The tool field of a message table: tool_calls = {ids} on an assistant
 * message, tool_call_id = id on a tool message. Leaves the field's string
 * (or nil) on the stack and returns it (NULL: none). */
#define BAD_CALL_ID "a tool call ID is 1 to 128 bytes of [A-Za-z0-9_.:-]"

static const char *read_tool(lua_State *L, int idx, int argn, cs_role role)
{
    int tc = lua_getfield(L, idx, "tool_calls");
    int ti = lua_getfield(L, idx, "tool_call_id");
    if (tc != LUA_TNIL && role != CS_ROLE_ASSISTANT)
        luaL_argerror(L, argn, "only an assistant message has tool_calls");
    if (ti != LUA_TNIL && role != CS_ROLE_TOOL)
        luaL_argerror(L, argn, "only a tool message has a tool_call_id");
    const char *tool = NULL;
    if (ti != LUA_TNIL) {
        if (ti != LUA_TSTRING)
            luaL_argerror(L, argn, "tool_call_id must be a string");
        lua_remove(L, -2);
        size_t len;
        tool = lua_tolstring(L, -1, &len);
        if (!len || strchr(tool, ' ') || memchr(tool, '\0', len))
            luaL_argerror(L, argn, BAD_CALL_ID);
    } else if (tc != LUA_TNIL) {
        lua_pop(L, 1);
        if (tc != LUA_TTABLE)
            luaL_argerror(L, argn, "tool_calls must be a list of call IDs");
        luaL_Buffer b;
        int t = lua_gettop(L);
        lua_Integer n = luaL_len(L, t);
        if (n > 64)
            luaL_argerror(L, argn, "at most 64 tool calls per message");
        luaL_buffinit(L, &b);
        for (lua_Integer i = 1; i <= n; i++) {
            /* The separator first: the buffer may use the stack top as its
             * storage, so nothing else may sit there while it grows. */
            if (i > 1)
                luaL_addchar(&b, ' ');
            if (lua_geti(L, t, i) != LUA_TSTRING)
                luaL_argerror(L, argn, "tool_calls must be a list of strings");
            size_t len;
            const char *id = lua_tolstring(L, -1, &len);
            if (!len || strchr(id, ' ') || memchr(id, '\0', len))
                luaL_argerror(L, argn, BAD_CALL_ID);
            luaL_addvalue(&b);
        }
        luaL_pushresult(&b);
        lua_remove(L, -2); /* the list */
        tool = lua_tostring(L, -1);
    } else {
        lua_pop(L, 1); /* leaves one nil */
    }
    const char *why;
    if (tool && cs_tool_check(role, tool, &why) < 0)
        luaL_argerror(L, argn, why);
    return tool;
}

/* Reads one message table at idx into m. Its content string is stored in
 * the anchor table at index anchor, slot, which keeps m->content valid (the
 * message table itself need not hold it: __index may have produced it). */
static void read_msg(lua_State *L, int idx, int argn, cs_msg_in *m, int anchor,
                     lua_Integer slot)
{
    if (lua_type(L, idx) != LUA_TTABLE)
        luaL_argerror(L, argn,
                      "message must be a table {role = ..., content = ...}");
    size_t len;
    lua_getfield(L, idx, "role");
    const char *role = lua_tolstring(L, -1, &len);
    int r = lua_type(L, -1) == LUA_TSTRING ? cs_role_parse(role, len) : -1;
    lua_pop(L, 1);
    if (r < 0)
        luaL_argerror(L, argn,
                      "message role must be system, user, assistant or tool");
    lua_getfield(L, idx, "content");
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_argerror(L, argn, "message content must be a string");
    m->content = lua_tolstring(L, -1, &m->content_len);
    lua_rawseti(L, anchor, 2 * slot - 1); /* pops it, keeps it alive */
    if (memchr(m->content, '\0', m->content_len))
        luaL_argerror(L, argn, "message content must not contain a NUL byte");
    if (m->content_len > CS_MAX_CONTENT)
        luaL_argerror(L, argn, "message content is too large");
    m->role = (cs_role)r;
    m->tool = read_tool(L, idx, argn, m->role);
    lua_rawseti(L, anchor, 2 * slot); /* the tool string (or nil) */
}

/* Reads a message or a list of messages at idx into a userdata array left on
 * the stack (so nothing leaks if a check raises). */
static cs_msg_in *read_msgs(lua_State *L, int idx, size_t *n)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    int single = lua_getfield(L, idx, "role") != LUA_TNIL;
    lua_pop(L, 1);
    size_t count = single ? 1 : (size_t)luaL_len(L, idx);
    if (count == 0 || count > CS_MAX_BATCH)
        luaL_argerror(L, idx,
                      "expected a message or a list of 1 to 4096 messages");
    cs_msg_in *msgs = lua_newuserdatauv(L, count * sizeof *msgs, 1);
    lua_createtable(L, 2 * (int)count, 0); /* anchors the strings */
    int anchor = lua_gettop(L);
    if (single) {
        read_msg(L, idx, idx, msgs, anchor, 1);
    } else {
        for (size_t i = 0; i < count; i++) {
            lua_geti(L, idx, (lua_Integer)i + 1);
            read_msg(L, lua_gettop(L), idx, &msgs[i], anchor,
                     (lua_Integer)i + 1);
            lua_pop(L, 1);
        }
    }
    lua_setiuservalue(L, -2, 1); /* the array keeps its strings alive */
    *n = count;
    return msgs;
}

/* Fills the table at the top (created with room for n before the write, so
 * that nothing can fail once the rows are durable). */
static void fill_ids(lua_State *L, const int64_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        lua_pushinteger(L, (lua_Integer)ids[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
}

static const char *const actor_keys[] = {"actor", NULL};

/* The actor of an optional {actor = ...} table at idx (left on the stack). */
static const char *opt_actor(lua_State *L, int idx, const char *const keys[])
{
    if (lua_isnoneornil(L, idx)) {
        lua_pushnil(L);
        return NULL;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    check_keys(L, idx, keys ? keys : actor_keys);
    const char *a = opt_str_field(L, idx, "actor");
    if (!a)
        lua_pushnil(L);
    return a;
}

static const char *const append_keys[] = {"actor", "worker", "idempotency_key",
                                          NULL};
static const char *const prepare_keys[] = {"actor", "worker", NULL};

/* The worker of an append's options at idx (left on the stack): a worker's
 * append commits only while the chat runs on it. */
static const char *opt_worker(lua_State *L, int idx, const char *actor)
{
    if (!lua_istable(L, idx)) {
        lua_pushnil(L);
        return NULL;
    }
    const char *w = opt_str_field(L, idx, "worker");
    if (!w)
        lua_pushnil(L);
    if (w && actor)
        luaL_error(L, "options 'actor' and 'worker' exclude each other");
    return w;
}

static int store_append(lua_State *L)
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

static int store_prepare(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    const char *actor = opt_actor(L, 4, prepare_keys);
    const char *worker = opt_worker(L, 4, actor);
    size_t n;
    cs_msg_in *msgs = read_msgs(L, 3, &n);
    lpub *u = new_handle(L, sizeof *u, PUB_MT, 1);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1); /* the publish keeps its store alive */
    int rc = cs_pub_prepare_as(hub, chat, actor, msgs, n, &u->pub);
    if (rc == CS_OK && worker)
        rc = cs_pub_set_worker(u->pub, worker);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    return 1;
}

static const char *const sub_keys[] = {"after", "strategy", "ordered", "actor",
                                       NULL};

static int store_subscribe(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    cs_sub_options o = {0};
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        check_keys(L, 3, sub_keys);
        o.after = opt_int_field(L, 3, "after", 0, 0);
        const char *s = opt_str_field(L, 3, "strategy");
        if (s) {
            int st = cs_strategy_parse(s);
            if (st < 0)
                return luaL_error(
                    L, "unknown strategy '%s' (watermark, rescan or last_id)",
                    s);
            o.strategy = (cs_strategy)st;
        }
        /* ordered: the watermark's default; other strategies never are. */
        int t = lua_getfield(L, 3, "ordered");
        if (t != LUA_TNIL && t != LUA_TBOOLEAN)
            return luaL_error(L, "option 'ordered' must be a boolean");
        int ordered = t == LUA_TNIL ? o.strategy == CS_STRATEGY_WATERMARK
                                    : lua_toboolean(L, -1);
        lua_pop(L, 1);
        if (ordered && o.strategy != CS_STRATEGY_WATERMARK)
            return luaL_error(L,
                              "option 'ordered' needs the watermark strategy");
        o.unordered = !ordered;
        o.actor = opt_str_field(L, 3, "actor");
    }
    lsub *u = new_handle(L, sizeof *u, SUB_MT, 1);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1); /* the subscription keeps its store alive */
    int rc = cs_sub_open(hub, chat, &o, &u->sub);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    return 1;
}

static void set_int(lua_State *L, const char *k, int64_t v)
{
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, k);
}

static int store_stats(lua_State *L)
{
    cs_stats s;
    cs_hub_stats(check_store(L, 1), &s);
    lua_createtable(L, 0, 12);
    set_int(L, "notifications", s.notifications);
    set_int(L, "malformed", s.malformed);
    set_int(L, "parts", s.parts);
    set_int(L, "parts_dropped", s.parts_dropped);
    set_int(L, "auth_checks", s.auth_checks);
    set_int(L, "auth_refusals", s.auth_refusals);
    set_int(L, "shared_passes", s.shared_passes);
    set_int(L, "bodies", s.bodies);
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

static int store_fd(lua_State *L)
{
    int fd = cs_hub_fd(check_store(L, 1));
    if (fd < 0)
        lua_pushnil(L);
    else
        lua_pushinteger(L, fd);
    return 1;
}

/* Creates or upgrades the schema; nothing to do on the memory store. */
static int store_migrate(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int rc = cs_hub_migrate(hub);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushboolean(L, 1);
    return 1;
}

/* pg: the listener connection's server PID (nil without one). */
static int store_listener_pid(lua_State *L)
{
    int pid = cs_hub_listener_pid(check_store(L, 1));
    if (pid < 0)
        lua_pushnil(L);
    else
        lua_pushinteger(L, pid);
    return 1;
}

static int store_kind(lua_State *L)
{
    lua_pushstring(L, cs_hub_store_name(check_store(L, 1)));
    return 1;
}

/* store:step([timeout]): receives and routes notifications; with a timeout,
 * first waits up to that long for the listener to have some. */
static int store_step(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int rc = cs_hub_wait(hub, opt_timeout(L, 2));
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushinteger(L, rc);
    return 1;
}

/* ---- chat lifecycle -------------------------------------------------------
 */

static int store_chat(lua_State *L)
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
        lua_pushstring(L, c->worker);
        lua_setfield(L, -2, "worker");
        lua_pushnumber(L, c->heartbeat_age);
        lua_setfield(L, -2, "heartbeat_age");
    }
    return 1;
}

/* store:send(chat_id, {content = ..., role = "user", actor = ...}) ->
 * id, queued */
static int store_send(lua_State *L)
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

static int store_queued(lua_State *L)
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

static int store_delete_queued(lua_State *L)
{
    return queue_change(L, 0);
}

static int store_move_queued(lua_State *L)
{
    return queue_change(L, 1);
}

/* store:promote_queued(chat_id, queued_id, {actor =, prepare =}) -> ids, or
 * a stepped publish with prepare = true. */
static int store_promote_queued(lua_State *L)
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
static int store_acquire(lua_State *L)
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
static int store_heartbeat(lua_State *L)
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
static int store_finish(lua_State *L)
{
    static const char *const keys[] = {"worker", "actor", NULL};
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    cs_status st = check_status(L, 3);
    const char *actor = opt_actor(L, 4, keys);
    const char *worker =
        lua_istable(L, 4) ? opt_str_field(L, 4, "worker") : NULL;
    cs_status final;
    int rc = cs_hub_finish(hub, chat, worker, actor, st, &final);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushboolean(L, 1);
    lua_pushstring(L, cs_status_name(final));
    return 2;
}

static int store_publish_part(lua_State *L)
{
    cs_hub *hub = check_store(L, 1);
    int64_t chat = check_id(L, 2, "chat id");
    size_t len;
    const char *text = luaL_checklstring(L, 3, &len);
    const char *actor = opt_actor(L, 4, NULL);
    int rc = cs_hub_publish_part(hub, chat, actor, text, len);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- stepped publish ------------------------------------------------------
 */

static int pub_gc(lua_State *L)
{
    lpub *u = luaL_checkudata(L, 1, PUB_MT);
    cs_pub_close(u->pub);
    u->pub = NULL;
    return 0;
}

static int pub_tostring(lua_State *L)
{
    return handle_tostring(L, PUB_MT, "chatstream.Publish");
}

static cs_hub *pub_store(lua_State *L)
{
    lua_getiuservalue(L, 1, 1);
    lstore *s = luaL_checkudata(L, -1, STORE_MT);
    lua_pop(L, 1);
    if (!s->hub)
        luaL_error(L, "attempt to use a closed store");
    return s->hub;
}

/* A failed step: misuse (wrong order, repeated step) raises; a store failure
 * returns nil, msg, code. */
static int step_result(lua_State *L, cs_hub *hub, int rc)
{
    if (rc == CS_EINVAL)
        return luaL_error(L, "%s", cs_hub_errmsg(hub));
    if (rc < 0)
        return hub_fail(L, hub, rc);
    lua_pushboolean(L, 1);
    return 1;
}

static int pub_commit(lua_State *L)
{
    cs_publish *p = check_pub(L, 1);
    lpub *u = lua_touserdata(L, 1);
    cs_hub *hub = pub_store(L);
    if (u->committed)
        return luaL_error(L, "already committed");
    const int64_t *ids;
    size_t n = cs_pub_size(p);
    lua_createtable(L, (int)n, 0);
    int rc = cs_pub_commit(p, &ids, &n);
    /* A state the chat is in (ESTATE: not held by the worker) is a runtime
     * failure of the transaction, not misuse: returned. */
    if (rc < 0)
        return hub_fail(L, hub, rc);
    u->committed = 1;
    fill_ids(L, ids, n);
    return 1;
}

static size_t opt_index(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx))
        return CS_ALL;
    lua_Integer i = luaL_checkinteger(L, idx);
    luaL_argcheck(L, i >= 1, idx, "message index starts at 1");
    return (size_t)(i - 1);
}

static int pub_cache(lua_State *L)
{
    cs_publish *p = check_pub(L, 1);
    cs_hub *hub = pub_store(L);
    return step_result(L, hub, cs_pub_cache(p, opt_index(L, 2)));
}

static int pub_notify(lua_State *L)
{
    cs_publish *p = check_pub(L, 1);
    cs_hub *hub = pub_store(L);
    return step_result(L, hub, cs_pub_notify(p, opt_index(L, 2)));
}

static int pub_publish(lua_State *L)
{
    cs_publish *p = check_pub(L, 1);
    cs_hub *hub = pub_store(L);
    int rc = cs_pub_cache(p, CS_ALL);
    if (rc == CS_OK)
        rc = cs_pub_notify(p, CS_ALL);
    return step_result(L, hub, rc);
}

/* ---- subscription ---------------------------------------------------------
 */

static int sub_gc(lua_State *L)
{
    lsub *u = luaL_checkudata(L, 1, SUB_MT);
    if (u->busy) {
        /* A finalizer run by an allocation inside this subscription's own
         * next: the event being built still points into it. */
        u->close_pending = 1;
        return 0;
    }
    cs_sub_close(u->sub);
    u->sub = NULL;
    return 0;
}

/* Ends a next: a close that came meanwhile happens now. */
static void sub_done(lsub *u)
{
    u->busy = 0;
    if (u->close_pending) {
        u->close_pending = 0;
        cs_sub_close(u->sub);
        u->sub = NULL;
    }
}

static int sub_tostring(lua_State *L)
{
    return handle_tostring(L, SUB_MT, "chatstream.Subscription");
}

/* tool_calls = {ids} (assistant) or tool_call_id = id (tool). */
static void push_tool(lua_State *L, const char *role, const char *tool)
{
    if (strcmp(role, "tool") == 0) {
        lua_pushstring(L, tool);
        lua_setfield(L, -2, "tool_call_id");
        return;
    }
    lua_newtable(L);
    lua_Integer i = 0;
    for (const char *p = tool; *p;) {
        const char *e = strchr(p, ' ');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        lua_pushlstring(L, p, n);
        lua_rawseti(L, -2, ++i);
        p += n;
        if (*p == ' ')
            p++;
    }
    lua_setfield(L, -2, "tool_calls");
}

/* An array of {id, content, actor, created_at}; actor absent when none. */
static void push_queue(lua_State *L, const cs_queue *q)
{
    lua_createtable(L, q ? (int)q->n : 0, 0);
    for (size_t i = 0; q && i < q->n; i++) {
        const cs_queue_item *it = &q->items[i];
        lua_createtable(L, 0, 4);
        set_int(L, "id", it->id);
        lua_pushlstring(L, it->content, it->content_len);
        lua_setfield(L, -2, "content");
        if (it->actor && *it->actor) {
            lua_pushstring(L, it->actor);
            lua_setfield(L, -2, "actor");
        }
        lua_pushnumber(L, it->created_at);
        lua_setfield(L, -2, "created_at");
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
}

static void push_event(lua_State *L, const cs_event *ev)
{
    lua_createtable(L, 0, 7);
    switch (ev->kind) {
    case CS_EV_MESSAGE:
        lua_pushliteral(L, "message");
        lua_setfield(L, -2, "kind");
        set_int(L, "id", ev->id);
        set_int(L, "prev_id", ev->prev_id);
        lua_pushstring(L, ev->role);
        lua_setfield(L, -2, "role");
        lua_pushlstring(L, ev->text, ev->text_len);
        lua_setfield(L, -2, "content");
        if (ev->tool && *ev->tool)
            push_tool(L, ev->role, ev->tool);
        set_int(L, "cursor", ev->cursor);
        break;
    case CS_EV_STATUS:
        lua_pushliteral(L, "status");
        lua_setfield(L, -2, "kind");
        lua_pushlstring(L, ev->text, ev->text_len);
        lua_setfield(L, -2, "status");
        set_int(L, "version", ev->version);
        break;
    case CS_EV_QUEUE:
        lua_pushliteral(L, "queue");
        lua_setfield(L, -2, "kind");
        push_queue(L, ev->queue);
        lua_setfield(L, -2, "items");
        break;
    case CS_EV_PART:
        lua_pushliteral(L, "part");
        lua_setfield(L, -2, "kind");
        lua_pushlstring(L, ev->text, ev->text_len);
        lua_setfield(L, -2, "text");
        set_int(L, "after", ev->prev_id);
        break;
    }
    set_int(L, "chat_id", ev->chat_id);
}

static double opt_timeout(lua_State *L, int idx)
{
    lua_Number t = luaL_optnumber(L, idx, 0);
    luaL_argcheck(L, t >= 0 && t == t, idx, "timeout must be a number >= 0");
    return (double)t;
}

static int push_queue_protected(lua_State *L)
{
    push_queue(L, lua_touserdata(L, 1));
    return 1;
}

static int push_event_protected(lua_State *L)
{
    push_event(L, lua_touserdata(L, 1));
    return 1;
}

/* Pushes the next event, or nil, "timeout", "ETIMEDOUT", or nil, msg, code.
 * The event is
 * consumed only once its table exists: if building it raises (out of
 * memory), the event is put back and the next call returns it. */
static int sub_next_impl(lua_State *L, lsub *u, double timeout)
{
    cs_sub *s = u->sub;
    cs_event ev;
    u->busy = 1;
    int rc = cs_sub_wait(s, timeout, &ev); /* runs no Lua code */
    if (rc == CS_EVENT) {
        lua_pushcfunction(L, push_event_protected);
        lua_pushlightuserdata(L, &ev); /* an argument, not a handle */
        int ok = lua_pcall(L, 1, 1, 0) == LUA_OK;
        if (!ok && !u->close_pending)
            cs_sub_unread(s);
        sub_done(u);
        if (!ok)
            return lua_error(L);
        return 1;
    }
    sub_done(u);
    if (rc == CS_IDLE) {
        lua_pushnil(L);
        lua_pushliteral(L, "timeout");
        lua_pushliteral(L, "ETIMEDOUT");
        return 3;
    }
    if (rc == CS_ECLOSED)
        return luaL_error(L, "attempt to use a subscription of a closed store");
    if (rc == CS_ENOMEM)
        return luaL_error(L, "not enough memory");
    return push_fail(L, rc, NULL);
}

/* The subscription at idx, open and not inside another next. */
static lsub *check_lsub(lua_State *L, int idx)
{
    check_sub(L, idx);
    lsub *u = lua_touserdata(L, idx);
    if (u->busy)
        luaL_error(L, "subscription is already inside next");
    return u;
}

static int sub_next(lua_State *L)
{
    lsub *u = check_lsub(L, 1);
    return sub_next_impl(L, u, opt_timeout(L, 2));
}

static int sub_iter(lua_State *L)
{
    lsub *u = check_lsub(L, 1);
    double timeout = lua_tonumber(L, lua_upvalueindex(1));
    int n = sub_next_impl(L, u, timeout);
    if (n == 1)
        return 1;
    if (strcmp(lua_tostring(L, -1), "ETIMEDOUT") == 0)
        return 0; /* idle for the whole timeout: the loop ends */
    return luaL_error(L, "%s", lua_tostring(L, -2)); /* raised in a for */
}

/* sub:events(timeout) -> iter, sub, nil */
static int sub_events(lua_State *L)
{
    check_sub(L, 1);
    lua_pushnumber(L, opt_timeout(L, 2));
    lua_pushcclosure(L, sub_iter, 1);
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    return 3;
}

static int sub_cursor(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)cs_sub_cursor(check_sub(L, 1)));
    return 1;
}

static int sub_delivered_bytes(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)cs_sub_delivered_bytes(check_sub(L, 1)));
    return 1;
}

/* core.now(): the wall clock in seconds, with sub-microsecond resolution
 * (os.time has whole seconds; os.clock is CPU time). */
static int l_now(lua_State *L)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

/* core.sleep(seconds): sleeps (nanosleep), whatever the stores have. */
static int l_sleep(lua_State *L)
{
    lua_Number t = luaL_checknumber(L, 1);
    luaL_argcheck(L, t >= 0 && t <= 86400, 1, "seconds must be 0 to 86400");
    struct timespec ts = {(time_t)t, (long)((t - (lua_Number)(time_t)t) * 1e9)};
    while (nanosleep(&ts, &ts) != 0)
        ; /* interrupted: sleep the rest */
    return 0;
}

/* ---- module
 * ------------------------------------------------------------------ */

static void new_class(lua_State *L, const char *mt, const luaL_Reg *methods,
                      lua_CFunction gc, lua_CFunction tostring)
{
    luaL_newmetatable(L, mt);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "close");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
}

EXPORT int luaopen_chatstream_core(lua_State *L);

EXPORT int luaopen_chatstream_core(lua_State *L)
{
    static const luaL_Reg memdb_m[] = {{"fail_queries", memdb_fail_queries},
                                       {"drop_notifies", memdb_drop_notifies},
                                       {NULL, NULL}};
    static const luaL_Reg store_m[] = {{"create_chat", store_create_chat},
                                       {"append", store_append},
                                       {"prepare", store_prepare},
                                       {"subscribe", store_subscribe},
                                       {"stats", store_stats},
                                       {"fd", store_fd},
                                       {"step", store_step},
                                       {"migrate", store_migrate},
                                       {"listener_pid", store_listener_pid},
                                       {"kind", store_kind},
                                       {"chat", store_chat},
                                       {"send", store_send},
                                       {"queued", store_queued},
                                       {"delete_queued", store_delete_queued},
                                       {"move_queued", store_move_queued},
                                       {"promote_queued", store_promote_queued},
                                       {"acquire", store_acquire},
                                       {"heartbeat", store_heartbeat},
                                       {"finish", store_finish},
                                       {"publish_part", store_publish_part},
                                       {NULL, NULL}};
    static const luaL_Reg pub_m[] = {{"commit", pub_commit},
                                     {"cache", pub_cache},
                                     {"notify", pub_notify},
                                     {"publish", pub_publish},
                                     {NULL, NULL}};
    static const luaL_Reg sub_m[] = {{"next", sub_next},
                                     {"events", sub_events},
                                     {"cursor", sub_cursor},
                                     {"delivered_bytes", sub_delivered_bytes},
                                     {NULL, NULL}};
    static const luaL_Reg funcs[] = {{"open", l_open},
                                     {"memory", l_memory},
                                     {"now", l_now},
                                     {"sleep", l_sleep},
                                     {NULL, NULL}};

    new_class(L, MEMDB_MT, memdb_m, memdb_gc, memdb_tostring);
    new_class(L, STORE_MT, store_m, store_gc, store_tostring);
    new_class(L, PUB_MT, pub_m, pub_gc, pub_tostring);
    new_class(L, SUB_MT, sub_m, sub_gc, sub_tostring);
    luaL_newlib(L, funcs);
    lua_pushliteral(L, CS_VERSION);
    lua_setfield(L, -2, "_VERSION");
    /* The Store method table, for methods written in Lua (init.lua). */
    luaL_getmetatable(L, STORE_MT);
    lua_getfield(L, -1, "__index");
    lua_setfield(L, -3, "Store");
    lua_pop(L, 1);
    return 1;
}
