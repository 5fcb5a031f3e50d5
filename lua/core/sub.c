/* sub.c - chatstream.Subscription: store:subscribe and its options, next,
 * events, cursor and delivered_bytes, and the close that waits for a next
 * in progress. */
#include "binding.h"

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
    if (rc == CS_EVENT) {
        lua_pushcfunction(L, push_event_protected);
        lua_pushlightuserdata(L, (void *)e); /* an argument, not a handle */
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
