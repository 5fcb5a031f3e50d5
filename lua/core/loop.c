/* loop.c - the event-loop contract of chatstream.Store (pollfd, events,
 * timeout, ready, notify_fd, try_step) and its engine (job, resume,
 * job_fd): a call started with store:job(fn, ...) runs fn on the store's
 * engine thread, in a Lua thread of its own, and where it would wait for
 * the server it comes back here so the caller's loop can wait on job_fd.
 * Also Subscription:try and the closes that wait for the engine's call. */
#include "binding.h"

#include <stdlib.h>

static lstore *store_of(lua_State *L, int idx)
{
    peek_store(L, idx);
    return lua_touserdata(L, idx);
}

int store_busy(const lstore *u, int shared_ok)
{
    const ljob *j = &u->job;
    return j->eng && cs_engine_busy(j->eng) && !(shared_ok && j->shared);
}

void check_not_busy(lua_State *L, int idx, int shared_ok)
{
    lua_getiuservalue(L, idx, 1);
    lstore *u = luaL_testudata(L, -1, STORE_MT);
    lua_pop(L, 1);
    if (u && store_busy(u, shared_ok))
        luaL_error(L, "store is busy: a call of it is under way on its "
                      "engine (another coroutine's); calls through an "
                      "event-loop adapter wait their turn");
}

/* ---- the contract -------------------------------------------------------- */

/* store:pollfd() (and store:fd()) -> fd, the same for the store's life. */
int store_pollfd(lua_State *L)
{
    return push_id_or_nil(L, cs_hub_fd(peek_store(L, 1)));
}

/* store:events() -> "r": what a loop polls pollfd for (cqueues' protocol). */
int store_events(lua_State *L)
{
    peek_store(L, 1);
    lua_pushliteral(L, "r");
    return 1;
}

/* store:timeout() -> seconds until the store needs a step anyway, or nil. */
int store_timeout(lua_State *L)
{
    double t = cs_hub_timeout(peek_store(L, 1));
    if (t < 0)
        lua_pushnil(L);
    else
        lua_pushnumber(L, t);
    return 1;
}

/* store:notify_fd() -> the store's own fd: readable while notifications wait
 * to be routed (what one reader waits on). */
int store_notify_fd(lua_State *L)
{
    return push_id_or_nil(L, cs_hub_notify_fd(peek_store(L, 1)));
}

/* store:ready() -> {sub, ...}: the subscriptions with work, in order. */
int store_ready(lua_State *L)
{
    cs_hub *hub = peek_store(L, 1);
    size_t n = cs_hub_ready(hub, NULL, 0);
    cs_sub **list = n ? lua_newuserdatauv(L, n * sizeof *list, 0) : NULL;
    if (n)
        cs_hub_ready(hub, list, n);
    lua_getfield(L, LUA_REGISTRYINDEX, SUBS_MAP);
    lua_createtable(L, (int)n, 0);
    lua_Integer k = 0;
    for (size_t i = 0; i < n; i++) {
        /* A subscription being collected is not in the map any more. */
        if (lua_rawgetp(L, -2, list[i]) == LUA_TNIL)
            lua_pop(L, 1);
        else
            lua_rawseti(L, -2, ++k);
    }
    return 1;
}

/* store:try_step() -> n routed, or false when a step that may wait for the
 * server is due (run store:step then, on the engine). */
int store_try_step(lua_State *L)
{
    cs_hub *hub = peek_store(L, 1);
    if (store_busy(lua_touserdata(L, 1), 1))
        return luaL_error(L, "store is busy: a call of it is under way on "
                             "its engine (another coroutine's)");
    bool again = false;
    int rc = cs_hub_try_step(hub, &again);
    if (rc < 0)
        return hub_fail(L, hub, rc);
    if (again)
        lua_pushboolean(L, 0);
    else
        lua_pushinteger(L, rc);
    return 1;
}

/* ---- the engine ---------------------------------------------------------- */

static cs_engine *job_engine(lua_State *L, ljob *j)
{
    if (!j->eng && cs_engine_new(&j->eng) < 0)
        luaL_error(L, "cannot start an engine (out of memory or descriptors)");
    return j->eng;
}

static void run_job(void *arg)
{
    ljob *j = arg;
    j->status = lua_pcall(j->T, j->nargs, LUA_MULTRET, 0);
}

static void release_thread(lua_State *L, ljob *j)
{
    luaL_unref(L, LUA_REGISTRYINDEX, j->T_ref);
    j->T = NULL;
    j->T_ref = LUA_NOREF;
}

/* false while the call waits; true and its results once it returned; its
 * error raised again if it raised. st: the store whose deferred closes run
 * once the call is over (NULL for an Engine). */
static int job_report(lua_State *L, ljob *j, int rc, lstore *st)
{
    if (rc == CS_AGAIN) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (rc < 0) {
        release_thread(L, j);
        return luaL_error(L, "job: %s", cs_strerror(rc));
    }
    lua_State *T = j->T;
    int n = lua_gettop(T), status = j->status;
    if (!lua_checkstack(L, n + 1)) {
        release_thread(L, j);
        if (st)
            run_deferred(st);
        return luaL_error(L, "job: too many results");
    }
    if (status == LUA_OK)
        lua_pushboolean(L, 1);
    lua_xmove(T, L, n);
    release_thread(L, j);
    if (st)
        run_deferred(st);
    if (status != LUA_OK)
        return lua_error(L); /* the call's own error */
    return n + 1;
}

/* Starts fn (at idx 2) with the arguments after it on j's engine. */
static int job_start(lua_State *L, ljob *j, int shared, lstore *st)
{
    luaL_checktype(L, 2, LUA_TFUNCTION);
    cs_engine *e = job_engine(L, j);
    if (j->T)
        return luaL_error(L, "job: a call is under way (resume it)");
    int top = lua_gettop(L);
    lua_State *T = lua_newthread(L);
    j->T_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    j->T = T;
    if (!lua_checkstack(T, top)) {
        release_thread(L, j);
        return luaL_error(L, "job: too many arguments");
    }
    for (int i = 2; i <= top; i++)
        lua_pushvalue(L, i);
    lua_xmove(L, T, top - 1);
    j->nargs = top - 2;
    j->shared = shared;
    cs_wait w;
    return job_report(L, j, cs_engine_start(e, run_job, j, &w), st);
}

static int job_resume(lua_State *L, ljob *j, lstore *st)
{
    if (!j->T || !j->eng)
        return luaL_error(L, "resume: no call is under way");
    cs_wait w;
    return job_report(L, j, cs_engine_resume(j->eng, &w), st);
}

/* A call still under way finishes (blocking), then the engine goes. */
static void job_close(lua_State *L, ljob *j)
{
    if (j->eng) {
        cs_engine_free(j->eng);
        j->eng = NULL;
    }
    if (j->T)
        release_thread(L, j);
}

static lstore *open_store(lua_State *L, int idx)
{
    lstore *u = store_of(L, idx);
    if (!u->hub)
        luaL_error(L, "attempt to use a closed store");
    return u;
}

/* store:job(fn, ...) -> true, fn's results | false (it waits: resume when
 * job_fd is readable). Nothing else may touch the store meanwhile. */
int store_job(lua_State *L)
{
    lstore *u = open_store(L, 1);
    return job_start(L, &u->job, 0, u);
}

/* store:job_write(fn, ...): the same for a call that only writes (append,
 * send, the lifecycle): while it waits, sub:try and store:try_step may
 * run, so readers are served while a write waits on a lock. */
int store_job_write(lua_State *L)
{
    lstore *u = open_store(L, 1);
    return job_start(L, &u->job, 1, u);
}

/* store:resume() -> as job: the call goes on once its wait is over. */
int store_resume(lua_State *L)
{
    lstore *u = store_of(L, 1);
    return job_resume(L, &u->job, u);
}

/* store:job_fd() -> the engine's fd: readable when a waiting call can go on. */
int store_job_fd(lua_State *L)
{
    lstore *u = open_store(L, 1);
    lua_pushinteger(L, cs_engine_fd(job_engine(L, &u->job)));
    return 1;
}

/* Before the hub closes: a call still under way finishes (blocking). */
void store_engine_close(lua_State *L, lstore *u)
{
    job_close(L, &u->job);
    run_deferred(u);
}

/* core.engine() -> an Engine: job, resume and fd as a store's, for a call
 * made before there is a store (an event loop's open). */
int l_engine(lua_State *L)
{
    ljob *j = lua_newuserdatauv(L, sizeof *j, 0);
    *j = (ljob){.T_ref = LUA_NOREF};
    luaL_setmetatable(L, ENGINE_MT);
    return 1;
}

int engine_job(lua_State *L)
{
    return job_start(L, luaL_checkudata(L, 1, ENGINE_MT), 0, NULL);
}

int engine_resume(lua_State *L)
{
    return job_resume(L, luaL_checkudata(L, 1, ENGINE_MT), NULL);
}

int engine_fd(lua_State *L)
{
    ljob *j = luaL_checkudata(L, 1, ENGINE_MT);
    lua_pushinteger(L, cs_engine_fd(job_engine(L, j)));
    return 1;
}

int engine_gc(lua_State *L)
{
    job_close(L, luaL_checkudata(L, 1, ENGINE_MT));
    return 0;
}

int engine_tostring(lua_State *L)
{
    lua_pushfstring(L, "chatstream.Engine (%p)", lua_touserdata(L, 1));
    return 1;
}

/* ---- closes that wait for the engine ---------------------------------------
 */

static void *push_ptr(void **list, size_t *n, size_t *cap, void *p)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 8;
        void *l = realloc(*list, c * sizeof p);
        if (!l)
            return NULL;
        *list = l;
        *cap = c;
    }
    ((void **)*list)[(*n)++] = p;
    return p;
}

void defer_sub_close(lstore *u, cs_sub *s)
{
    if (!push_ptr((void **)&u->dsubs, &u->ndsubs, &u->capdsubs, s))
        cs_sub_close(s); /* out of memory: not later, now (rare) */
}

void defer_pub_close(lstore *u, cs_publish *p)
{
    if (!push_ptr((void **)&u->dpubs, &u->ndpubs, &u->capdpubs, p))
        cs_pub_close(p);
}

void run_deferred(lstore *u)
{
    for (size_t i = 0; i < u->ndsubs; i++)
        cs_sub_close(u->dsubs[i]);
    for (size_t i = 0; i < u->ndpubs; i++)
        cs_pub_close(u->dpubs[i]);
    free(u->dsubs);
    free(u->dpubs);
    u->dsubs = NULL;
    u->dpubs = NULL;
    u->ndsubs = u->capdsubs = u->ndpubs = u->capdpubs = 0;
}

/* sub:store() / pub:store() -> the store it belongs to. */
int sub_store(lua_State *L)
{
    luaL_checkudata(L, 1, SUB_MT);
    lua_getiuservalue(L, 1, 1);
    return 1;
}

int pub_get_store(lua_State *L)
{
    luaL_checkudata(L, 1, PUB_MT);
    lua_getiuservalue(L, 1, 1);
    return 1;
}
