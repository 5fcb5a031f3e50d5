/* module.c - the Lua 5.4 binding of the chatstream core ("chatstream.core"):
 * luaopen_chatstream_core, the classes' metatables, the module functions
 * now and sleep, and the helpers every handle and failure goes through. */
#include "binding.h"

#include <string.h>
#include <time.h>

#if defined(__GNUC__)
#define EXPORT __attribute__((visibility("default")))
#else
#define EXPORT
#endif

/* Runtime failure: nil, "CODE: detail", "CODE". */
int push_fail(lua_State *L, int rc, const char *detail)
{
    lua_pushnil(L);
    if (detail && *detail)
        lua_pushfstring(L, "%s: %s", cs_errname(rc), detail);
    else
        lua_pushfstring(L, "%s: %s", cs_errname(rc), cs_strerror(rc));
    lua_pushstring(L, cs_errname(rc));
    return 3;
}

int hub_fail(lua_State *L, cs_hub *hub, int rc)
{
    if (rc == CS_ENOMEM)
        return luaL_error(L, "not enough memory");
    return push_fail(L, rc, cs_hub_errmsg(hub));
}

/* Strict accessors raise on a closed handle; lenient ones return NULL. */
void *check_open(lua_State *L, int idx, const char *mt, const char *what)
{
    void **p = luaL_checkudata(L, idx, mt);
    if (!*p)
        luaL_error(L, "attempt to use a closed %s", what);
    return *p;
}

void *new_handle(lua_State *L, size_t size, const char *mt, int nuv)
{
    void *p = lua_newuserdatauv(L, size, nuv);
    memset(p, 0, size); /* created closed, before the core is called */
    luaL_setmetatable(L, mt);
    return p;
}

int handle_tostring(lua_State *L, const char *mt, const char *name)
{
    void **p = luaL_checkudata(L, 1, mt);
    if (*p)
        lua_pushfstring(L, "%s (%p)", name, *p);
    else
        lua_pushfstring(L, "%s (closed)", name);
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
    static const luaL_Reg store_m[] = {
        {"create_chat", store_create_chat},
        {"append", store_append},
        {"append_many", store_append_many},
        {"prepare", store_prepare},
        {"subscribe", store_subscribe},
        {"stats", store_stats},
        {"fd", store_pollfd},
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
        {"interrupt", store_interrupt},
        {"edit", store_edit},
        {"recover", store_recover},
        {"archive", store_archive},
        {"unarchive", store_unarchive},
        {"submit_tool_results", store_submit_tool_results},
        {"publish_part", store_publish_part},
        {"pollfd", store_pollfd},
        {"events", store_events},
        {"timeout", store_timeout},
        {"ready", store_ready},
        {"notify_fd", store_notify_fd},
        {"try_step", store_try_step},
        {"job", store_job},
        {"job_write", store_job_write},
        {"resume", store_resume},
        {"job_fd", store_job_fd},
        {NULL, NULL}};
    static const luaL_Reg pub_m[] = {
        {"commit", pub_commit},   {"cache", pub_cache},
        {"notify", pub_notify},   {"publish", pub_publish},
        {"store", pub_get_store}, {NULL, NULL}};
    static const luaL_Reg sub_m[] = {{"next", sub_next},
                                     {"events", sub_events},
                                     {"cursor", sub_cursor},
                                     {"delivered_bytes", sub_delivered_bytes},
                                     {"try", sub_try},
                                     {"store", sub_store},
                                     {NULL, NULL}};
    static const luaL_Reg engine_m[] = {{"job", engine_job},
                                        {"resume", engine_resume},
                                        {"fd", engine_fd},
                                        {NULL, NULL}};
    static const luaL_Reg funcs[] = {{"open", l_open},     {"engine", l_engine},
                                     {"memory", l_memory}, {"now", l_now},
                                     {"sleep", l_sleep},   {NULL, NULL}};

    new_class(L, MEMDB_MT, memdb_m, memdb_gc, memdb_tostring);
    new_class(L, STORE_MT, store_m, store_gc, store_tostring);
    new_class(L, PUB_MT, pub_m, pub_gc, pub_tostring);
    new_class(L, SUB_MT, sub_m, sub_gc, sub_tostring);
    new_class(L, ENGINE_MT, engine_m, engine_gc, engine_tostring);
    luaL_newlib(L, funcs);
    lua_pushliteral(L, CS_VERSION);
    lua_setfield(L, -2, "_VERSION");
    /* The method tables, for methods written in Lua (init.lua, the
     * event-loop adapters). */
    static const char *const classes[][2] = {
        {STORE_MT, "Store"}, {SUB_MT, "Subscription"}, {PUB_MT, "Publish"}};
    for (size_t i = 0; i < sizeof classes / sizeof *classes; i++) {
        luaL_getmetatable(L, classes[i][0]);
        lua_getfield(L, -1, "__index");
        lua_setfield(L, -3, classes[i][1]);
        lua_pop(L, 1);
    }
    /* cs_sub -> its Subscription, weak (store:ready()). */
    if (lua_getfield(L, LUA_REGISTRYINDEX, SUBS_MAP) != LUA_TTABLE) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_createtable(L, 0, 1);
        lua_pushliteral(L, "v");
        lua_setfield(L, -2, "__mode");
        lua_setmetatable(L, -2);
        lua_setfield(L, LUA_REGISTRYINDEX, SUBS_MAP);
    } else
        lua_pop(L, 1);
    return 1;
}
