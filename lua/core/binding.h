/* binding.h - what the files of the Lua 5.4 binding of the chatstream core
 * ("chatstream.core") share: the handles, their metatables, the argument and
 * result helpers, and the methods luaopen_chatstream_core registers. */
#ifndef CHATSTREAM_BINDING_H
#define CHATSTREAM_BINDING_H

#include "chatstream.h"

#include <lauxlib.h>
#include <lua.h>

#define MEMDB_MT "chatstream.MemoryDB"
#define STORE_MT "chatstream.Store"
#define PUB_MT "chatstream.Publish"
#define SUB_MT "chatstream.Subscription"
#define ENGINE_MT "chatstream.Engine"

/* A call on an engine (loop.c): the engine, made on first use, and the Lua
 * thread T the call runs in (anchored at T_ref) while it is under way. */
typedef struct ljob {
    cs_engine *eng;
    lua_State *T;
    int T_ref, nargs, status;
    int shared; /* the call only writes: reads of what the hub holds
                   (sub:try, try_step) may run while it waits */
} ljob;

typedef struct {
    cs_memdb *db;
} lmemdb;
typedef struct {
    cs_hub *hub;  /* first: the generic accessors read it */
    int in_auth;  /* inside the authorizer: the store cannot close */
    lua_State *L; /* the thread of the call in progress (authorizer) */
    int auth_ref; /* the authorize function in the registry, or 0 */
    cs_authorizer auth;
    ljob job;              /* the store's engine (loop.c) */
    struct evshare *share; /* open{share_events = true}: sub.c's cache of
                              recent message events, or NULL */
    /* Closes that came while a call was under way on the engine (a
     * finalizer cannot touch the hub then): done when it returns. */
    cs_sub **dsubs;
    size_t ndsubs, capdsubs;
    cs_publish **dpubs;
    size_t ndpubs, capdpubs;
} lstore;
typedef struct {
    cs_publish *pub;
    int committed; /* a second commit is misuse (raises) */
} lpub;
typedef struct {
    cs_sub *sub;       /* first: the generic accessors read it */
    int busy;          /* inside next: a close must wait (finalizers) */
    int close_pending; /* closed while busy: done when next returns */
    lstore *store;     /* its store (kept alive by the handle's uservalue) */
} lsub;

/* ---- handles and failures (module.c) ---------------------------------- */

int push_fail(lua_State *L, int rc, const char *detail);
int hub_fail(lua_State *L, cs_hub *hub, int rc);
void *check_open(lua_State *L, int idx, const char *mt, const char *what);
void *new_handle(lua_State *L, size_t size, const char *mt, int nuv);
int handle_tostring(lua_State *L, const char *mt, const char *name);

#define check_memdb(L, i)                                                      \
    ((cs_memdb *)check_open(L, i, MEMDB_MT, "memory database"))
#define check_pub(L, i) ((cs_publish *)check_open(L, i, PUB_MT, "publish"))
#define check_sub(L, i) ((cs_sub *)check_open(L, i, SUB_MT, "subscription"))
/* The store's hub; records the calling thread for the authorizer (store.c).
 * Raises while a call of the store is under way on its engine (another
 * coroutine's): the hub is that call's until it returns. */
cs_hub *check_store(lua_State *L, int i);
/* The same for methods that only read (stats, fds, the ready list): no
 * busy check. */
cs_hub *peek_store(lua_State *L, int i);
/* Raises if the store at the handle's uservalue 1 is busy (as above);
 * shared_ok: unless the call under way is a write (store:job_write). */
void check_not_busy(lua_State *L, int idx, int shared_ok);
/* True while the store's engine runs a call for another thread; with
 * shared_ok, only when that call is not a write. */
int store_busy(const lstore *u, int shared_ok);
/* Closes that had to wait for the engine's call (loop.c). */
void defer_sub_close(lstore *u, cs_sub *s);
void defer_pub_close(lstore *u, cs_publish *p);
void run_deferred(lstore *u);
/* Registry key of the weak map cs_sub pointer -> Subscription (ready()). */
#define SUBS_MAP "chatstream.subs"

/* ---- reading arguments, pushing results (marshal.c) ------------------- */

int64_t check_id(lua_State *L, int idx, const char *what);
lua_Integer opt_int_field(lua_State *L, int idx, const char *k, lua_Integer def,
                          lua_Integer min);
const char *opt_str_field(lua_State *L, int idx, const char *k);
void check_keys(lua_State *L, int idx, const char *const allowed[]);
double opt_timeout(lua_State *L, int idx);
/* v (an fd, a pid), or nil when it is negative (none): 1 result. */
int push_id_or_nil(lua_State *L, int v);
const char *opt_actor(lua_State *L, int idx, const char *const keys[]);
const char *opt_worker(lua_State *L, int idx, const char *actor);
cs_msg_in *read_msgs(lua_State *L, int idx, size_t *n);
void fill_ids(lua_State *L, const int64_t *ids, size_t n);
void set_int(lua_State *L, const char *k, int64_t v);
int push_queue_protected(lua_State *L);
int push_event_protected(lua_State *L);

/* ---- the methods, by file --------------------------------------------- */

/* memdb.c */
int l_memory(lua_State *L);
int memdb_gc(lua_State *L);
int memdb_tostring(lua_State *L);
int memdb_fail_queries(lua_State *L);
int memdb_drop_notifies(lua_State *L);

/* store.c */
int l_open(lua_State *L);
int store_gc(lua_State *L);
int store_tostring(lua_State *L);
int store_create_chat(lua_State *L);
int store_append(lua_State *L);
int store_append_many(lua_State *L);
int store_stats(lua_State *L);
int store_migrate(lua_State *L);
int store_listener_pid(lua_State *L);
int store_kind(lua_State *L);
int store_step(lua_State *L);

/* loop.c: the event-loop contract and the engine */
int store_pollfd(lua_State *L);
int store_events(lua_State *L);
int store_timeout(lua_State *L);
int store_ready(lua_State *L);
int store_notify_fd(lua_State *L);
int store_try_step(lua_State *L);
int store_job(lua_State *L);
int store_job_write(lua_State *L);
int store_resume(lua_State *L);
int store_job_fd(lua_State *L);
int sub_try(lua_State *L);
int sub_store(lua_State *L);
int pub_get_store(lua_State *L);
void store_engine_close(lua_State *L, lstore *u);
/* chatstream.Engine: an engine of its own (core.engine()), for calls made
 * before there is a store (open). */
int l_engine(lua_State *L);
int engine_job(lua_State *L);
int engine_resume(lua_State *L);
int engine_fd(lua_State *L);
int engine_gc(lua_State *L);
int engine_tostring(lua_State *L);
/* lifecycle.c */
int store_chat(lua_State *L);
int store_send(lua_State *L);
int store_queued(lua_State *L);
int store_delete_queued(lua_State *L);
int store_move_queued(lua_State *L);
int store_promote_queued(lua_State *L);
int store_acquire(lua_State *L);
int store_heartbeat(lua_State *L);
int store_finish(lua_State *L);
int store_interrupt(lua_State *L);
int store_edit(lua_State *L);
int store_submit_tool_results(lua_State *L);
int store_recover(lua_State *L);
int store_archive(lua_State *L);
int store_unarchive(lua_State *L);
int store_publish_part(lua_State *L);

/* publish.c */
int store_prepare(lua_State *L);
int pub_gc(lua_State *L);
int pub_tostring(lua_State *L);
int pub_commit(lua_State *L);
int pub_cache(lua_State *L);
int pub_notify(lua_State *L);
int pub_publish(lua_State *L);

/* sub.c */
int store_subscribe(lua_State *L);
/* share_events: a store's cache of message event tables (sub.c) */
void evshare_open(lua_State *L, lstore *u);
void evshare_close(lua_State *L, lstore *u);
int sub_gc(lua_State *L);
int sub_tostring(lua_State *L);
int sub_next(lua_State *L);
int sub_events(lua_State *L);
int sub_cursor(lua_State *L);
int sub_delivered_bytes(lua_State *L);

#endif
