/* sub.c - chatstream.Subscription: store:subscribe and its options, next,
 * events, cursor and delivered_bytes, and the close that waits for a next
 * in progress. */
#include "binding.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const char *const sub_keys[] = {"after", "strategy", "ordered", "actor",
                                       NULL};

int store_subscribe(lua_State *L)
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
    u->store = lua_touserdata(L, 1);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1); /* the subscription keeps its store alive */
    int rc = cs_sub_open(hub, chat, &o, &u->sub);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    /* store:ready() finds the handle of a cs_sub here. */
    lua_getfield(L, LUA_REGISTRYINDEX, SUBS_MAP);
    lua_pushvalue(L, -2);
    lua_rawsetp(L, -2, u->sub);
    lua_pop(L, 1);
    return 1;
}

/* Forgets the handle of s in the ready() map (an explicit close; a
 * collected handle is gone from the weak map already). */
static void unmap(lua_State *L, cs_sub *s)
{
    if (lua_getfield(L, LUA_REGISTRYINDEX, SUBS_MAP) == LUA_TTABLE) {
        lua_pushnil(L);
        lua_rawsetp(L, -2, s);
    }
    lua_pop(L, 1);
}

int sub_gc(lua_State *L)
{
    lsub *u = luaL_checkudata(L, 1, SUB_MT);
    if (u->busy) {
        /* A finalizer run by an allocation inside this subscription's own
         * next: the event being built still points into it. */
        u->close_pending = 1;
        return 0;
    }
    if (!u->sub)
        return 0;
    unmap(L, u->sub);
    lua_getiuservalue(L, 1, 1);
    lstore *st = luaL_testudata(L, -1, STORE_MT);
    lua_pop(L, 1);
    if (st && store_busy(st, 0))
        defer_sub_close(st, u->sub); /* the engine's call has the hub */
    else
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

int sub_tostring(lua_State *L)
{
    return handle_tostring(L, SUB_MT, "chatstream.Subscription");
}

/* open{share_events = true}: the subscriptions of a store that get the same
 * message at the same cursor get the same event table (a fan-out of one
 * chat to many subscriptions builds one table per message, not one per
 * subscription). The recent ones live in a registry table, slot by (chat,
 * id); a slot matches only the same chat, id and cursor. Tables of at most
 * SHARE_BYTES of text in all are kept. */
#define SHARE_SLOTS 512
#define SHARE_BYTES ((size_t)4 << 20)

typedef struct evshare {
    int ref; /* the registry table of the slots' event tables */
    size_t bytes;
    struct {
        int64_t chat_id, id, cursor; /* id 0: empty */
        size_t len;
    } key[SHARE_SLOTS];
} evshare;

void evshare_open(lua_State *L, lstore *u)
{
    evshare *sh = calloc(1, sizeof *sh);
    if (!sh)
        luaL_error(L, "not enough memory");
    lua_createtable(L, SHARE_SLOTS, 0);
    sh->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    u->share = sh;
}

void evshare_close(lua_State *L, lstore *u)
{
    if (!u->share)
        return;
    luaL_unref(L, LUA_REGISTRYINDEX, u->share->ref);
    free(u->share);
    u->share = NULL;
}

static size_t share_slot(const cs_event *e)
{
    uint64_t h = (uint64_t)e->id * 0x9E3779B97F4A7C15u ^ (uint64_t)e->chat_id;
    return (size_t)(h >> 32) % SHARE_SLOTS;
}

/* Pushes the shared table of e and returns 1, or returns 0 (none kept). */
static int share_get(lua_State *L, const evshare *sh, const cs_event *e)
{
    size_t i = share_slot(e);
    if (sh->key[i].id != e->id || sh->key[i].chat_id != e->chat_id ||
        sh->key[i].cursor != e->cursor)
        return 0;
    lua_rawgeti(L, LUA_REGISTRYINDEX, sh->ref);
    lua_rawgeti(L, -1, (lua_Integer)i + 1);
    lua_remove(L, -2);
    return 1;
}

/* Keeps the event table on top of the stack as e's (it stays there). */
static void share_put(lua_State *L, evshare *sh, const cs_event *e)
{
    size_t i = share_slot(e);
    size_t bytes = sh->bytes - (sh->key[i].id ? sh->key[i].len : 0);
    if (bytes + e->text_len > SHARE_BYTES)
        return; /* built for this subscription only */
    lua_rawgeti(L, LUA_REGISTRYINDEX, sh->ref);
    lua_pushvalue(L, -2);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
    lua_pop(L, 1);
    sh->key[i].chat_id = e->chat_id;
    sh->key[i].id = e->id;
    sh->key[i].cursor = e->cursor;
    sh->key[i].len = e->text_len;
    sh->bytes = bytes + e->text_len;
}

/* Pushes the next event, or nil, "timeout", "ETIMEDOUT", or nil, msg, code.
 * The event is
 * consumed only once its table exists: if building it raises (out of
 * memory), the event is put back and the next call returns it. */
static int sub_result(lua_State *L, lsub *u, int rc, const cs_event *e);
static lsub *check_lsub(lua_State *L, int idx);

static int sub_next_impl(lua_State *L, lsub *u, double timeout)
{
    cs_event ev;
    u->busy = 1;
    int rc = cs_sub_wait(u->sub, timeout, &ev); /* runs no Lua code */
    return sub_result(L, u, rc, &ev);
}

/* sub:try() -> event | nil (nothing now) | false (it needs the server: call
 * next, on the engine): next without asking the store's server. */
int sub_try(lua_State *L)
{
    check_not_busy(L, 1, 1);
    lsub *u = check_lsub(L, 1);
    cs_event ev;
    u->busy = 1;
    int rc = cs_sub_try(u->sub, &ev);
    if (rc == CS_IDLE || rc == CS_AGAIN) {
        sub_done(u);
        if (rc == CS_IDLE)
            lua_pushnil(L);
        else
            lua_pushboolean(L, 0);
        return 1;
    }
    return sub_result(L, u, rc, &ev);
}

static int sub_result(lua_State *L, lsub *u, int rc, const cs_event *e)
{
    cs_sub *s = u->sub;
    evshare *sh = u->store ? u->store->share : NULL;
    if (rc == CS_EVENT && sh && e->kind == CS_EV_MESSAGE) {
        if (share_get(L, sh, e)) {
            sub_done(u);
            return 1;
        }
    }
    if (rc == CS_EVENT) {
        lua_pushcfunction(L, push_event_protected);
        lua_pushlightuserdata(L, (void *)e); /* an argument, not a handle */
        int ok = lua_pcall(L, 1, 1, 0) == LUA_OK;
        if (!ok && !u->close_pending)
            cs_sub_unread(s);
        if (ok && sh && e->kind == CS_EV_MESSAGE)
            share_put(L, sh, e); /* cannot raise: the slots exist */
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

int sub_next(lua_State *L)
{
    check_not_busy(L, 1, 0);
    lsub *u = check_lsub(L, 1);
    return sub_next_impl(L, u, opt_timeout(L, 2));
}

static int sub_iter(lua_State *L)
{
    check_not_busy(L, 1, 0);
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
int sub_events(lua_State *L)
{
    check_sub(L, 1);
    lua_pushnumber(L, opt_timeout(L, 2));
    lua_pushcclosure(L, sub_iter, 1);
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    return 3;
}

int sub_cursor(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)cs_sub_cursor(check_sub(L, 1)));
    return 1;
}

int sub_delivered_bytes(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)cs_sub_delivered_bytes(check_sub(L, 1)));
    return 1;
}
