/* memdb.c - chatstream.MemoryDB: the embedded memory database (core.memory())
 * and its fault injection. */
#include "binding.h"

int l_memory(lua_State *L)
{
    lmemdb *u = new_handle(L, sizeof *u, MEMDB_MT, 0);
    int rc = cs_memdb_open(&u->db);
    if (rc < 0)
        return luaL_error(L, "not enough memory");
    return 1;
}

int memdb_gc(lua_State *L)
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

int memdb_fail_queries(lua_State *L)
{
    cs_memdb_fail_queries(check_memdb(L, 1), check_count(L, 2));
    lua_settop(L, 1);
    return 1;
}

int memdb_drop_notifies(lua_State *L)
{
    cs_memdb_drop_notifies(check_memdb(L, 1), check_count(L, 2));
    lua_settop(L, 1);
    return 1;
}

int memdb_tostring(lua_State *L)
{
    return handle_tostring(L, MEMDB_MT, "chatstream.MemoryDB");
}
