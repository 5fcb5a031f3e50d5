/* marshal.c - the binding's traffic with Lua tables: argument and option
 * checks, messages and actors read from tables, ids, queues and events
 * pushed as tables. */
#include "binding.h"

#include <string.h>

int64_t check_id(lua_State *L, int idx, const char *what)
{
    lua_Integer v = luaL_checkinteger(L, idx);
    if (v < 1)
        luaL_argerror(
            L, idx, lua_pushfstring(L, "%s must be a positive integer", what));
    return (int64_t)v;
}

/* Reads an optional integer field of the table at idx. */
lua_Integer opt_int_field(lua_State *L, int idx, const char *k, lua_Integer def,
                          lua_Integer min)
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
const char *opt_str_field(lua_State *L, int idx, const char *k)
{
    int t = lua_getfield(L, idx, k);
    if (t == LUA_TNIL)
        return NULL;
    if (t != LUA_TSTRING)
        luaL_error(L, "option '%s' must be a string", k);
    return lua_tostring(L, -1);
}

/* Raises on keys of the options table at idx that are not in allowed. */
void check_keys(lua_State *L, int idx, const char *const allowed[])
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
cs_msg_in *read_msgs(lua_State *L, int idx, size_t *n)
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
void fill_ids(lua_State *L, const int64_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        lua_pushinteger(L, (lua_Integer)ids[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
}

static const char *const actor_keys[] = {"actor", NULL};

/* The actor of an optional {actor = ...} table at idx (left on the stack). */
const char *opt_actor(lua_State *L, int idx, const char *const keys[])
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

/* The worker of an append's options at idx (left on the stack): a worker's
 * append commits only while the chat runs on it. */
const char *opt_worker(lua_State *L, int idx, const char *actor)
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

void set_int(lua_State *L, const char *k, int64_t v)
{
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, k);
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
        if (ev->error) {
            lua_pushlstring(L, ev->error, ev->error_len);
            lua_setfield(L, -2, "error");
        }
        if (ev->archived) {
            lua_pushboolean(L, 1);
            lua_setfield(L, -2, "archived");
        }
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
    case CS_EV_TRUNCATE:
        lua_pushliteral(L, "truncate");
        lua_setfield(L, -2, "kind");
        set_int(L, "after", ev->prev_id);
        set_int(L, "history", ev->version);
        set_int(L, "cursor", ev->cursor);
        break;
    }
    set_int(L, "chat_id", ev->chat_id);
}

int push_id_or_nil(lua_State *L, int v)
{
    if (v < 0)
        lua_pushnil(L);
    else
        lua_pushinteger(L, v);
    return 1;
}

double opt_timeout(lua_State *L, int idx)
{
    lua_Number t = luaL_optnumber(L, idx, 0);
    luaL_argcheck(L, t >= 0 && t == t, idx, "timeout must be a number >= 0");
    return (double)t;
}

int push_queue_protected(lua_State *L)
{
    push_queue(L, lua_touserdata(L, 1));
    return 1;
}

int push_event_protected(lua_State *L)
{
    push_event(L, lua_touserdata(L, 1));
    return 1;
}
