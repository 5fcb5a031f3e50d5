/* chatstream.h - public C API of the chatstream core: stores, hubs,
 * subscriptions. */
#ifndef CHATSTREAM_H
#define CHATSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CS_VERSION "0.1.0"

/* Return codes. 0 is success, negative values are errors, positive values
 * are non-error states. */
enum {
    CS_OK = 0,
    CS_ENOMEM = -1,    /* out of memory; the object is left as it was */
    CS_EINVAL = -2,    /* bad argument (the caller's mistake) */
    CS_ECLOSED = -3,   /* the handle (or its hub) is closed */
    CS_EBACKEND = -4,  /* the store failed (query error, connection lost) */
    CS_EPROTO = -5,    /* malformed notification payload */
    CS_EAUTH = -6,     /* the actor may not do this */
    CS_ENOTFOUND = -7, /* no such chat */
    CS_ESTATE = -8,    /* the chat's state does not allow it (not running on
                          this worker, an invalid transition): nothing was
                          written */
    CS_ETIMEDOUT = -9, /* nothing arrived within the timeout */
    CS_EUNKNOWN = -10, /* a write was sent but its outcome is unknown (the
                          connection broke or the deadline passed after the
                          send): it may have committed. Retry with the same
                          idempotency key. */
    CS_EBUSY = -11,    /* a call on this handle is in progress on its engine
                          (see cs_engine): one call at a time */
    CS_EFULL = -12     /* the chat's queue holds max_queue items: a send that
                          would queue one more wrote nothing */
};
/* CS_AGAIN: the call has work that needs the store's server; run it where
 * it may wait (cs_sub_try). */
enum { CS_EVENT = 1, CS_IDLE = 2, CS_AGAIN = 3 };

const char *cs_strerror(int rc); /* static string, never NULL */
const char *cs_errname(int rc);  /* "ENOMEM", "EINVAL", ...; "OK" for 0 */

typedef struct cs_memdb cs_memdb; /* an embedded in-memory database */
typedef struct cs_hub cs_hub;     /* a store handle: caches, subscriptions */
typedef struct cs_sub cs_sub;     /* one reader of one chat */
typedef struct cs_publish cs_publish; /* a stepped publish */

/* ---- memory database ----------------------------------------------------
 * Reference counted: every hub opened on it holds a reference, so closing
 * the caller's handle while hubs still use it is safe. */
int cs_memdb_open(cs_memdb **out);
void cs_memdb_close(cs_memdb *db); /* drops the caller's reference; NULL ok */
/* Fault knobs: the next n queries fail with CS_EBACKEND / the next n
 * notifications are dropped. 0 clears. */
void cs_memdb_fail_queries(cs_memdb *db, int64_t n); /* reads: messages,
                                                        status, queue */
void cs_memdb_drop_notifies(cs_memdb *db, int64_t n);

/* ---- hub ---------------------------------------------------------------- */
typedef struct cs_hub_options {
    cs_memdb *memory;   /* the memory database to use; NULL: a private one */
    const char *dsn;    /* PostgreSQL URI or conninfo: the pg store */
    const char *schema; /* pg: the schema; NULL: "chatstream" */
    size_t cache_size;  /* messages cached per chat; 0: default 256 */
    size_t queue_size;  /* pending notifications per subscription; 0: 1024 */
    /* Chats whose cache the hub keeps; beyond it the least recently used
     * cache of a chat without subscriptions is dropped. 0: 1024. */
    size_t max_chats;
    /* Backstop poll: this often (seconds) the hub reads the state of every
     * chat it follows (one statement per 1000 chats, one per step), and each
     * subscription of a chat that moved catches up from W. 0: off. A
     * negative value: the store's default (10 s on PostgreSQL, off on the
     * memory store). */
    double poll_interval;
    /* pg: the longest one statement may take (seconds) before it is
     * cancelled and the call fails with CS_EBACKEND. 0: 30. */
    double query_timeout;
    /* Authorisation of an actor's operation on a chat (see cs_authorize_fn);
     * NULL: the actor must be the chat's owner. */
    struct cs_authorizer *authorizer;
    /* Seconds after which a worker's heartbeat is stale: acquire may take
     * its chat over, and promote no longer waits for it. 0: 30. */
    double stale_after;
    /* pg: a plain append's notification carries only the message's ids, not
     * the message (readers then query for it). By default it carries the
     * message when it fits; any role that can connect to the database can
     * LISTEN and read notifications, so a database shared with untrusted
     * roles wants this set. */
    int plain_notifications; /* 0 or 1 */
    /* A DB pass (a snapshot, a catch-up) reads at most this many messages;
     * the next page is read when the reader has taken this one, so memory
     * stays bounded however far a reader fell behind. 0: 500. (rescan, the
     * reference fix, always reads everything.) */
    size_t page_size;
    /* A chat's queue holds at most this many items: a send that would queue
     * one more fails with CS_EFULL and writes nothing. 0: 20. */
    size_t max_queue;
    /* A chat left in requires_action longer than this (seconds) is moved to
     * error by acquire and cs_hub_recover (its error recorded). 0: 300;
     * negative: never. */
    double action_timeout;
} cs_hub_options;

#define CS_DEFAULT_STALE_AFTER 30.0
#define CS_DEFAULT_MAX_QUEUE 20
#define CS_DEFAULT_ACTION_TIMEOUT 300.0
#define CS_MAX_MAX_QUEUE 1000000

#define CS_DEFAULT_PG_POLL_INTERVAL 10.0

#define CS_DEFAULT_CACHE_SIZE 256
#define CS_DEFAULT_QUEUE_SIZE 1024
#define CS_MAX_CACHE_SIZE (1u << 20)
#define CS_MAX_QUEUE_SIZE (1u << 20)
#define CS_DEFAULT_MAX_CHATS 1024
#define CS_DEFAULT_PAGE_SIZE 500
#define CS_MAX_PAGE_SIZE (1u << 20)

/* Opens a hub on the memory store, or on PostgreSQL when opts->dsn is set.
 * On failure with an errbuf, a detail (never containing the password) is
 * copied there. */
int cs_hub_open(const cs_hub_options *opts, cs_hub **out);
int cs_hub_open_err(const cs_hub_options *opts, cs_hub **out, char *errbuf,
                    size_t errlen);
/* Creates or upgrades the store's schema (idempotent; safe when several
 * processes run it at once). Nothing to do on the memory store. */
int cs_hub_migrate(cs_hub *hub);
/* The store's name: "memory" or "postgresql". */
const char *cs_hub_store_name(const cs_hub *hub);
/* pg: the server process ID of the listener connection (for tests that
 * terminate it); -1 when there is none. */
int cs_hub_listener_pid(const cs_hub *hub);
/* Closes the hub. Subscriptions and publishes still open on it become
 * detached: their calls return CS_ECLOSED, and they must still be closed. */
void cs_hub_close(cs_hub *hub);
/* Detail of the last CS_EBACKEND/CS_EINVAL on this hub; valid until the next
 * call on the hub. Never NULL. */
const char *cs_hub_errmsg(const cs_hub *hub);
/* Receives pending notifications and routes them to subscriptions. Never
 * blocks. Returns the number of notifications received, or an error. */
int cs_hub_step(cs_hub *hub);
/* Waits up to timeout seconds for the store to have notifications (not at
 * all on the memory store), then runs cs_hub_step. */
int cs_hub_wait(cs_hub *hub, double timeout);
/* The event-loop contract. One file descriptor for the hub's whole life
 * (never closed or reused while the hub is open, whatever happens to the
 * connections behind it), readable whenever cs_hub_step has work or a
 * subscription has work (events buffered, hints to merge: see
 * cs_hub_ready). Level-triggered: wait for it to be readable, step, serve
 * the ready subscriptions until none is left. -1 only if the hub could not
 * get one (it then behaves as before: cs_hub_wait still works). */
int cs_hub_fd(const cs_hub *hub);
/* Seconds until the hub next needs a step although its fd stays quiet (the
 * backstop poll, a retry after a failed read), 0 if now, or -1 for never. */
double cs_hub_timeout(const cs_hub *hub);
/* cs_hub_step without asking the store's server anything: what the
 * listener buffered is routed; *again says a step that may wait is due
 * (the backstop poll). */
int cs_hub_try_step(cs_hub *hub, bool *again);
/* The store's own fd: readable while notifications wait to be routed
 * (stable for the hub's life too). A call waiting for one subscription
 * waits on this one, not on cs_hub_fd, which other subscriptions' events
 * keep readable. */
int cs_hub_notify_fd(const cs_hub *hub);
/* The subscriptions with work, in the order they got it: up to cap of them
 * into out; returns how many there are in all (so a caller with too small
 * an array can see it). A subscription leaves the list as soon as a call
 * on it took its last event with nothing else pending, or found nothing to
 * do; so a loop may take one event per ready subscription per round (fair
 * to every reader) without a call that returns nothing. */
size_t cs_hub_ready(const cs_hub *hub, cs_sub **out, size_t cap);

/* ---- the engine: calls that never block the caller's thread -------------
 * A call is run on the engine's own thread; where the store would wait for
 * the server (a statement's answer, a connection, a sleep), the engine
 * hands control back to the caller with what it waits for, and the caller
 * (an event loop) resumes it once that is ready. Only one of the two
 * threads runs at any time, so the call may use anything the caller's
 * thread could (a Lua state included). The blocking API is the same code
 * with the wait done in place. One call at a time per engine. */
typedef struct cs_engine cs_engine;
enum { CS_WAIT_READ = 1, CS_WAIT_WRITE = 2 };
typedef struct cs_wait {
    int fd;         /* wait for it to be ready (the engine's fd) */
    int events;     /* CS_WAIT_READ or CS_WAIT_WRITE */
    double timeout; /* seconds from now to resume even if fd is quiet; -1:
                       none */
} cs_wait;
int cs_engine_new(cs_engine **out);
/* Finishes a call still under way (its waits then block), then frees. */
void cs_engine_free(cs_engine *e);
/* Runs fn(arg) on the engine: CS_OK when it returned, CS_AGAIN when it
 * waits (*w says for what: call cs_engine_resume when that is ready; a
 * resume before is harmless and says CS_AGAIN again), CS_EBUSY if a call
 * is under way, CS_ENOMEM. */
int cs_engine_start(cs_engine *e, void (*fn)(void *arg), void *arg, cs_wait *w);
/* Lets the call go on: CS_OK (it returned) or CS_AGAIN; CS_EINVAL when no
 * call waits. */
int cs_engine_resume(cs_engine *e, cs_wait *w);
/* The engine's fd: readable when a parked call's wait is over (resume it
 * then). The same for the engine's life. */
int cs_engine_fd(const cs_engine *e);
/* True while a call is under way on e and the calling thread is not e's. */
bool cs_engine_busy(const cs_engine *e);
/* For stores: waits until fd is ready for events (CS_WAIT_READ/WRITE; -1:
 * just the time) or the deadline (monotonic seconds) passes: 1 ready, 0
 * deadline, -1 error. On an engine's thread it hands control back to the
 * caller instead of blocking. */
int cs_engine_wait(int fd, int events, double deadline);
/* Monotonic seconds. */
double cs_now(void);

typedef struct cs_stats {
    int64_t notifications;   /* notifications received and parsed */
    int64_t malformed;       /* notifications ignored as malformed */
    int64_t queries;         /* read queries sent to the store */
    int64_t query_errors;    /* queries that failed */
    int64_t writes;          /* write transactions committed */
    int64_t publish_errors;  /* publish steps of cs_hub_append that failed */
    int64_t cache_hits;      /* cache lookups answered by the cache */
    int64_t cache_misses;    /* cache lookups below the eviction mark */
    int64_t db_passes;       /* merge DB passes (snapshots not counted) */
    int64_t delivered;       /* message events handed to readers */
    int64_t resyncs;         /* subscription resyncs (queue overflow, reconnect,
                                backstop poll) */
    int64_t reconnects;      /* store reconnections */
    int64_t polls;           /* backstop polls run */
    int64_t cached_chats;    /* chats the hub holds a cache for now */
    int64_t parts;           /* part events handed to readers */
    int64_t parts_dropped;   /* parts a slow reader lost (queue full) */
    int64_t auth_checks;     /* actor checks run (owner lookups) */
    int64_t auth_refusals;   /* actor checks refused */
    int64_t shared_passes;   /* merge DB passes answered by another
                                subscription's pass of the same chat (not
                                counted in db_passes or queries) */
    int64_t bodies;          /* messages cached from notifications that carried
                                them (PostgreSQL store, plain appends) */
    int64_t steps;           /* times the hub read its store's notifications */
    int64_t cached_messages; /* messages in the hub's chat caches now */
    int64_t warnings;        /* WARNINGs the server sent (PostgreSQL), among
                                them "NOTIFY queue is N% full" */
    int64_t truncates;       /* truncate events handed to readers */
    int64_t cut_reads;       /* edits' cuts read from the store (a truncate
                                notification missed, or several edits) */
    int64_t cut_refused;     /* messages an edit removed that a late publish
                                offered to the cache (not taken) */
    int64_t listener_deaf;   /* times the listener stopped listening because
                                nobody read its buffer (PostgreSQL: every
                                subscription resyncs when the hub is back) */
    /* PostgreSQL's notification queue usage, 0 to 1, as last read (at most
     * once per poll interval, 10 s without a poll); -1: not known (yet, or
     * the memory store). */
    double notify_queue_usage;
} cs_stats;
/* The text of the last WARNING the server sent ("" when none); valid until
 * the next call on the hub. */
const char *cs_hub_last_warning(const cs_hub *hub);
void cs_hub_stats(const cs_hub *hub, cs_stats *out);

/* ---- chats and messages ------------------------------------------------- */
typedef enum cs_role {
    CS_ROLE_SYSTEM = 0,
    CS_ROLE_USER,
    CS_ROLE_ASSISTANT,
    CS_ROLE_TOOL
} cs_role;
/* Parses "system"/"user"/"assistant"/"tool"; -1 for anything else. */
int cs_role_parse(const char *s, size_t len);
const char *cs_role_name(cs_role r);

/* A message to write: borrowed, copied by the core. `tool` links tool
 * calls to their results: on an assistant message, the IDs of the tool calls
 * it makes, separated by single spaces; on a tool message, the ID of the call
 * it answers; NULL or "" otherwise. An ID is 1 to 128 bytes of
 * [A-Za-z0-9_.:-]; at most 64 calls per message. */
typedef struct cs_msg_in {
    cs_role role;
    const char *content;
    size_t content_len;
    const char *tool;
} cs_msg_in;

#define CS_MAX_TOOL 8256 /* bytes of a message's tool field */

/* One message for one chat, in a batch of appends (cs_hub_append_many). */
typedef struct cs_append_req {
    int64_t chat_id;
    cs_msg_in msg;
} cs_append_req;
#define CS_MAX_APPENDS 4096 /* requests in one cs_hub_append_many */
/* CS_OK, or CS_EINVAL with a static reason in *why: the tool field of a
 * message of this role. */
int cs_tool_check(cs_role role, const char *tool, const char **why);
#define CS_NAME_MAX 255   /* bytes of an owner, actor or worker name */
#define CS_TITLE_MAX 1023 /* bytes of a chat title */

/* ---- chat lifecycle ------------------------------------------------------ */
typedef enum cs_status {
    CS_STATUS_WAITING = 0,
    CS_STATUS_PENDING,
    CS_STATUS_RUNNING,
    CS_STATUS_PAUSED,
    CS_STATUS_COMPLETED,
    CS_STATUS_ERROR,
    CS_STATUS_REQUIRES_ACTION
} cs_status;
int cs_status_parse(const char *s, size_t len); /* -1 if unknown */
const char *cs_status_name(cs_status s);

/* What a chat is now. */
#define CS_ERROR_MAX 1024 /* bytes of a recorded error (finish with error) */
typedef struct cs_chat_info {
    int64_t id, version, last_message_id;
    cs_status status;
    double heartbeat_age; /* seconds since the worker's heartbeat; -1: none */
    char owner[CS_NAME_MAX + 1];
    char title[CS_TITLE_MAX + 1];
    char worker[CS_NAME_MAX + 1]; /* "" when no worker holds it */
    /* The error the last turn recorded (finish with error and an error
     * text), "" when none: the next turn that finishes otherwise clears it. */
    char last_error[CS_ERROR_MAX + 1];
    bool archived; /* archived: refuses send and promote_queued */
    /* How many edits cut the chat's history (cs_hub_edit): 0 until one. */
    int64_t history;
} cs_chat_info;

/* Authorisation: may `actor` do `op` ("subscribe", "send", "queued",
 * "promote_queued", "delete_queued", "move_queued", "append", "finish",
 * "interrupt", "submit_tool_results", "archive", "unarchive",
 * "publish_part", "edit", "chat") on chat? Called
 * with the chat's metadata only, before any of its messages, status or queue is
 * read. Returns 1 to allow, 0 to refuse (a reason may be written to why), or a
 * CS_E* error. */
typedef struct cs_authorizer {
    int (*fn)(void *ud, const char *actor, const cs_chat_info *chat,
              const char *op, char *why, size_t whylen);
    void *ud;
} cs_authorizer;

/* A queued user message. */
typedef struct cs_queue_item {
    int64_t id;
    char *content;
    size_t content_len;
    char *actor;       /* "" when sent without one */
    double created_at; /* seconds since the Unix epoch */
} cs_queue_item;

typedef struct cs_queue {
    cs_queue_item *items;
    size_t n, cap;
} cs_queue;
void cs_queue_free(cs_queue *q); /* frees the items; q may be reused */

/* Every lifecycle call takes an actor: NULL for trusted code (a worker, a
 * service that checked its caller), or a name checked against the chat's
 * owner (or the hub's authorizer) before anything else: CS_EAUTH. */

/* The chat's metadata and state. */
int cs_hub_chat_info(cs_hub *hub, int64_t chat_id, const char *actor,
                     cs_chat_info *out);
/* A user message: on an idle chat (waiting, completed, error) it is appended
 * and the chat set pending, in one transaction (*queued = 0, *id the message
 * ID); on a busy one (pending, running, requires_action, paused) it is
 * queued (*queued = 1, *id the queue item's ID). */
int cs_hub_send(cs_hub *hub, int64_t chat_id, const char *actor,
                const char *content, size_t len, int64_t *id, int *queued);
/* The chat's queue, in order (cs_queue_free it). */
int cs_hub_queued(cs_hub *hub, int64_t chat_id, const char *actor,
                  cs_queue *out);
/* Deletes a queue item / moves it to the front: CS_ENOTFOUND if the chat has
 * no such item. */
int cs_hub_queue_delete(cs_hub *hub, int64_t chat_id, const char *actor,
                        int64_t queued_id);
int cs_hub_queue_front(cs_hub *hub, int64_t chat_id, const char *actor,
                       int64_t queued_id);
/* Promotes a queue item (see DESIGN.md section 8). The stepped form: the
 * publish's commit runs the promote transaction; cs_pub_size is the number
 * of messages it inserted (0 when it only moved the item to the front of a
 * running chat). The status and queue notifications go out with the last
 * notify step (or at once after a commit that inserted nothing). */
int cs_promote_prepare(cs_hub *hub, int64_t chat_id, const char *actor,
                       int64_t queued_id, cs_publish **out);
/* Takes up to limit chats that are pending, or running on a worker whose
 * heartbeat is older than stale_after seconds (0: the hub's stale_after;
 * < 0: never), and sets them
 * running on worker. ids (limit entries) receives them; *n how many. */
int cs_hub_acquire(cs_hub *hub, const char *worker, size_t limit,
                   double stale_after, int64_t *ids, size_t *n);
/* The worker's heartbeat: 1 if the chat still runs on worker (heartbeat
 * recorded), 0 if not (interrupted, finished, taken over); *status (may be
 * NULL) receives the chat's status. */
int cs_hub_heartbeat(cs_hub *hub, int64_t chat_id, const char *worker,
                     cs_status *status);
/* Ends a worker's turn: the chat must be running (on worker, when worker is
 * not NULL) or interrupted (waiting, still held by the worker). status is
 * waiting, completed, error, paused or requires_action. When the queue has
 * items and the chat was interrupted or ends waiting or completed, its head
 * is promoted (the chat ends pending). *final (may be NULL) receives the
 * status set. */
int cs_hub_finish(cs_hub *hub, int64_t chat_id, const char *worker,
                  const char *actor, cs_status status, cs_status *final);
/* cs_hub_finish recording error (status CS_STATUS_ERROR only; at most
 * CS_ERROR_MAX bytes of UTF-8 without NUL; NULL or "": none) as the chat's
 * last_error; status events for it carry it. A finish with another status
 * clears the chat's last_error. */
int cs_hub_finish_error(cs_hub *hub, int64_t chat_id, const char *worker,
                        const char *actor, cs_status status, const char *error,
                        cs_status *final);
/* What a recovery pass did (cs_hub_recover). */
typedef struct cs_recovered {
    size_t expired;  /* requires_action past action_timeout: now error */
    size_t revived;  /* interrupted, their worker silent: head promoted or
                        released */
    size_t released; /* running, their worker silent for stale_after: now
                        pending for any worker */
    size_t promoted; /* idle with a queue: its head promoted */
} cs_recovered;
/* The periodic recovery pass a service runs (at most limit chats of each
 * kind; 0: 1024): chats left in requires_action past action_timeout go to
 * error, with "requires_action for more than N s" recorded; interrupted
 * chats whose worker went silent are revived; running chats whose worker
 * went silent (stale_after) go pending; idle chats with a queue get its
 * head promoted. Each under the chat's lock, re-checked there: a chat that
 * moved on meanwhile is left alone. *out (may be NULL) counts them. */
int cs_hub_recover(cs_hub *hub, size_t limit, cs_recovered *out);
/* Submits the results of a requires_action chat's client tool calls: msgs
 * (n of them, role CS_ROLE_TOOL, tool = the call's ID) are appended and the
 * chat set pending, in one transaction; ids (n entries) receives their IDs.
 * A call ID that is not an open call of the chat's last turn (a call of its
 * assistant messages after the last user message, without a result yet,
 * given once) is CS_EINVAL, a chat in another status CS_ESTATE: nothing is
 * written. */
int cs_hub_submit_tool_results(cs_hub *hub, int64_t chat_id, const char *actor,
                               const cs_msg_in *msgs, size_t n, int64_t *ids);
/* Archives (archived true) or unarchives the chat: version + 1 and a status
 * event saying so. An archived chat refuses send and promote_queued
 * (CS_ESTATE) and keeps its queue; archiving interrupts its turn as
 * cs_hub_interrupt does. The same state again changes nothing. *out (may be
 * NULL) receives the chat afterwards. */
int cs_hub_archive(cs_hub *hub, int64_t chat_id, const char *actor,
                   bool archived, cs_chat_info *out);
/* Edits user message message_id of the chat: in one transaction it and
 * every later message leave the history (kept as soft-deleted rows, never
 * read again), content is appended as a new user message after the edited
 * one's prev_id, the queue is cleared, a worker on the chat is let go (its
 * appends are refused from then on: CS_ESTATE) and the chat goes pending;
 * its history counts one more. Subscribers get a truncate event (after =
 * the edited message's prev_id), then the new message. *id receives it.
 * CS_EINVAL: no such live user message in the chat; CS_ESTATE: archived. */
int cs_hub_edit(cs_hub *hub, int64_t chat_id, int64_t message_id,
                const char *actor, const char *content, size_t len,
                int64_t *id);
/* The same as a stepped publish (as cs_promote_prepare): its commit is the
 * edit's transaction; its notify step sends the truncate hint, then the new
 * message's. */
int cs_edit_prepare(cs_hub *hub, int64_t chat_id, int64_t message_id,
                    const char *actor, const char *content, size_t len,
                    cs_publish **out);
/* Interrupts the chat's turn: a running chat goes waiting (version + 1)
 * with its worker kept as the interrupted one (its heartbeat then returns 0
 * with status waiting; it may still append what it had produced, with its
 * worker name, and finish, until another worker acquires the chat); a
 * pending chat goes waiting. Other statuses: nothing changes. *out (may be
 * NULL) receives the chat afterwards. */
int cs_hub_interrupt(cs_hub *hub, int64_t chat_id, const char *actor,
                     cs_chat_info *out);
/* A non-durable streaming delta to every subscriber of the chat, in every
 * process; text longer than one notification is split (on UTF-8 character
 * boundaries) into several parts. */
int cs_hub_publish_part(cs_hub *hub, int64_t chat_id, const char *actor,
                        const char *text, size_t len);
/* The same with a worker (or NULL): only while the chat runs on it, or was
 * interrupted while it did (CS_ESTATE otherwise, nothing sent), so a worker
 * an edit or a takeover let go streams nothing into the next turn. */
int cs_hub_publish_part_as(cs_hub *hub, int64_t chat_id, const char *actor,
                           const char *worker, const char *text, size_t len);

#define CS_MAX_CONTENT (64u << 20)
#define CS_MAX_BATCH 4096

/* owner: at most CS_NAME_MAX bytes; title: CS_TITLE_MAX. The chat starts
 * waiting, version 0. */
int cs_hub_create_chat(cs_hub *hub, const char *owner, const char *title,
                       int64_t *chat_id);
/* Commits n messages to the chat in one transaction and publishes them.
 * ids (n entries, may be NULL) receives the assigned IDs. */
int cs_hub_append(cs_hub *hub, int64_t chat_id, const cs_msg_in *msgs, size_t n,
                  int64_t *ids);
/* The same, with the actor checked first (NULL: trusted). */
int cs_hub_append_as(cs_hub *hub, int64_t chat_id, const char *actor,
                     const cs_msg_in *msgs, size_t n, int64_t *ids);
/* A worker's append: committed only while the chat runs on worker (checked
 * under the chat's lock), CS_ESTATE otherwise, so a worker that was
 * interrupted or taken over cannot write after the fact. */
int cs_hub_append_worker(cs_hub *hub, int64_t chat_id, const char *worker,
                         const cs_msg_in *msgs, size_t n, int64_t *ids);

/* Idempotency: a write with a key (1 to CS_KEY_MAX bytes of UTF-8) records
 * its result under it, per chat (per owner for create_chat), as long as the
 * chat lives. A retry with the same key returns the first call's result and
 * writes nothing: so a call that failed with CS_EUNKNOWN (or any failure)
 * can be retried safely. */
#define CS_KEY_MAX 255

typedef struct cs_append_options {
    const char *actor;           /* checked first; NULL: trusted */
    const char *worker;          /* see cs_hub_append_worker; NULL: none */
    const char *idempotency_key; /* NULL: none */
} cs_append_options;
/* cs_hub_append with options. A key used before on the chat by another
 * kind of write or another number of messages is CS_EINVAL. */
/* n single-message appends, each its own transaction (one failing leaves
 * the others), with several in flight on the connection at once: the
 * PostgreSQL store sends them in pipeline mode, up to a chunk per round
 * trip; the memory store appends them one by one. Trusted (no actor). For
 * each request rcs[i] is CS_OK with ids[i] its message's id, or an error
 * (CS_EUNKNOWN: sent, its answer lost: it may have committed). Returns
 * CS_OK when every request was tried, or an error of the call itself
 * (CS_EINVAL for a bad count). */
int cs_hub_append_many(cs_hub *hub, const cs_append_req *reqs, size_t n,
                       int64_t *ids, int *rcs);
int cs_hub_append_opts(cs_hub *hub, int64_t chat_id,
                       const cs_append_options *opts, const cs_msg_in *msgs,
                       size_t n, int64_t *ids);
/* cs_hub_create_chat with a key: the owner's chat made with it, if any. */
int cs_hub_create_chat_key(cs_hub *hub, const char *owner, const char *title,
                           const char *key, int64_t *chat_id);
/* cs_hub_send with a key (NULL: none): a retry returns the first call's id
 * and queued flag. */
int cs_hub_send_key(cs_hub *hub, int64_t chat_id, const char *actor,
                    const char *key, const char *content, size_t len,
                    int64_t *id, int *queued);

/* ---- stepped publish -----------------------------------------------------
 * prepare -> commit -> cache(i) / notify(i) in any order. Index i is 0-based;
 * CS_ALL means every message not yet done, in order. */
#define CS_ALL ((size_t)-1)
int cs_pub_prepare(cs_hub *hub, int64_t chat_id, const cs_msg_in *msgs,
                   size_t n, cs_publish **out);
/* The same, with the actor checked first (NULL: trusted). */
int cs_pub_prepare_as(cs_hub *hub, int64_t chat_id, const char *actor,
                      const cs_msg_in *msgs, size_t n, cs_publish **out);
/* Before the commit: commit only while the chat runs on worker (see
 * cs_hub_append_worker). */
int cs_pub_set_worker(cs_publish *pub, const char *worker);
/* Before the commit: the append's idempotency key. */
int cs_pub_set_key(cs_publish *pub, const char *key);
/* The transaction. On success *ids (borrowed, valid until cs_pub_close) holds
 * n IDs. A second commit is CS_EINVAL. */
int cs_pub_commit(cs_publish *pub, const int64_t **ids, size_t *n);
int cs_pub_cache(cs_publish *pub, size_t i);
/* The number of messages of the publish (0 for NULL). */
size_t cs_pub_size(const cs_publish *pub);
int cs_pub_notify(cs_publish *pub, size_t i);
void cs_pub_close(cs_publish *pub);

/* ---- subscriptions ------------------------------------------------------ */
typedef enum cs_strategy {
    CS_STRATEGY_WATERMARK = 0, /* default: bounded, exact resume cursor */
    CS_STRATEGY_RESCAN,        /* the reference fix */
    CS_STRATEGY_LAST_ID        /* before the fix: lossy, for demos and specs */
} cs_strategy;
int cs_strategy_parse(const char *s); /* -1 if unknown */
const char *cs_strategy_name(cs_strategy s);

typedef struct cs_sub_options {
    int64_t after; /* deliver messages with id > after */
    cs_strategy strategy;
    /* watermark: 0 (the default) hands messages over in ascending ID order,
     * holding one back until every earlier message was handed over; 1 hands
     * them over as they are found (the reader sorts). Other strategies are
     * never ordered. */
    int unordered;
    const char *actor; /* checked before anything is read; NULL: trusted */
} cs_sub_options;

typedef enum cs_event_kind {
    CS_EV_MESSAGE = 1,
    CS_EV_STATUS,
    CS_EV_QUEUE,
    CS_EV_PART,
    /* The chat's history was cut by an edit: every message with id > after
     * (prev_id) is gone; what follows continues from there. */
    CS_EV_TRUNCATE
} cs_event_kind;

/* An event; every pointer is borrowed and valid until the next cs_sub_next
 * or cs_sub_close on the same subscription. */
typedef struct cs_event {
    cs_event_kind kind;
    int64_t chat_id;
    int64_t id, prev_id; /* message; part: after (the message it follows);
                            truncate: after (prev_id) */
    const char *role;    /* message */
    const char *text;    /* message content, part text, status name */
    size_t text_len;
    const char *tool;      /* message: tool call IDs or the answered one */
    int64_t version;       /* status; truncate: the chat's history */
    cs_status status;      /* status */
    const cs_queue *queue; /* queue: the whole queue, in order */
    const char *error;     /* status error: the recorded error, or NULL */
    size_t error_len;
    bool archived; /* status: the chat is archived */
    /* The resume point just after this event: every message of the chat
     * with id <= cursor has been returned, this one included (see
     * cs_sub_cursor). */
    int64_t cursor;
} cs_event;

/* Checks the actor, registers the subscription on the hub (listening
 * first), then reads the snapshot: the chat's status, its queue when not
 * empty, then its messages after opts->after. Status events carry the chat's
 * version; one older than the last delivered is dropped. */
int cs_sub_open(cs_hub *hub, int64_t chat_id, const cs_sub_options *opts,
                cs_sub **out);
/* Non-blocking: CS_EVENT with *ev filled, CS_IDLE, or an error. A failed DB
 * pass is retried on the next call and is not an error of this call. */
int cs_sub_next(cs_sub *sub, cs_event *ev);
/* Like cs_sub_next, waiting up to timeout seconds for the store to have
 * something (returns at once on stores that cannot receive from elsewhere). */
int cs_sub_wait(cs_sub *sub, double timeout, cs_event *ev);
/* Like cs_sub_next without talking to the server: CS_EVENT, CS_IDLE, or
 * CS_AGAIN when the subscription has work that needs the store (a DB pass,
 * a status or queue read, the backstop poll): then run cs_sub_next where it
 * may wait (on an engine). An event loop serves most events this way
 * without a thread switch. */
int cs_sub_try(cs_sub *sub, cs_event *ev);
/* Puts back the event last returned by cs_sub_next, so the next call returns
 * it again (for a caller that could not hand it over, e.g. out of memory). */
void cs_sub_unread(cs_sub *sub);
/* The resume cursor: every message of the chat with id <= cursor has been
 * returned by cs_sub_next (events still waiting inside the subscription do
 * not count). Reopening with after = cursor loses nothing; when the
 * subscription was ordered it also repeats nothing. last_id: the highest
 * returned ID (its own, lossy, rule). */
int64_t cs_sub_cursor(const cs_sub *sub);
/* Bytes held by the delivered set (for benchmarks). */
size_t cs_sub_delivered_bytes(const cs_sub *sub);
void cs_sub_close(cs_sub *sub);

#ifdef __cplusplus
}
#endif
#endif
