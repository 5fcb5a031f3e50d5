/* publish.c - chatstream.Publish: a stepped publish (store:prepare, or
 * store:promote_queued with prepare = true), committed, cached and notified
 * step by step. */
#include "binding.h"

static const char *const prepare_keys[] = {"actor", "worker", NULL};

int store_prepare(lua_State *L)
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

int pub_gc(lua_State *L)
{
    lpub *u = luaL_checkudata(L, 1, PUB_MT);
    lua_getiuservalue(L, 1, 1);
    lstore *st = luaL_testudata(L, -1, STORE_MT);
    lua_pop(L, 1);
    if (u->pub && st && store_busy(st, 0))
        defer_pub_close(st, u->pub); /* the engine's call has the hub */
    else
        cs_pub_close(u->pub);
    u->pub = NULL;
    return 0;
}

int pub_tostring(lua_State *L)
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
    check_not_busy(L, 1, 0);
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

int pub_commit(lua_State *L)
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

int pub_cache(lua_State *L)
{
    cs_publish *p = check_pub(L, 1);
    cs_hub *hub = pub_store(L);
    return step_result(L, hub, cs_pub_cache(p, opt_index(L, 2)));
}

int pub_notify(lua_State *L)
{
    cs_publish *p = check_pub(L, 1);
    cs_hub *hub = pub_store(L);
    return step_result(L, hub, cs_pub_notify(p, opt_index(L, 2)));
}

int pub_publish(lua_State *L)
{
    cs_publish *p = check_pub(L, 1);
    cs_hub *hub = pub_store(L);
    int rc = cs_pub_cache(p, CS_ALL);
    if (rc == CS_OK)
        rc = cs_pub_notify(p, CS_ALL);
    return step_result(L, hub, rc);
}
