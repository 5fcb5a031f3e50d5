/* hub.h - the hub's private structures and functions, shared by the core's
 * files. A file calls only into files below it in this order:
 *
 *   lifecycle.c   status, queue, promote, workers, parts
 *   batch.c       appends in a batch (calls chat.c's checks and appends)
 *   chat.c        create, append, the stepped publish
 *   sub.c         a subscription: snapshot, merge, events, next/try/wait
 *   auth.c        the actor check (it records refusals with cs_hub_fail)
 *   hub.c         open and close, errors, stats, the pollfd, step and wait
 *   route.c       routing notifications, the ready list
 *   chats.c       the chat table and its eviction
 *   poll.c        the backstop poll's rounds
 *   store/        the stores (memory.c, pg*.c)
 *   engine.c, merge.c, cache.c, idset.c, payload.c, msg.c
 */
#ifndef CS_HUB_H
#define CS_HUB_H

#include "internal.h"

typedef struct hub_chat {
    int64_t id;
    cs_cache cache;
    cs_sub *subs; /* doubly linked through cs_sub.next/prev */
    size_t nsubs;
    bool listening;
    uint64_t used; /* the hub's tick when last used (eviction order) */
    /* The last DB pass of the chat in this hub: every message in
     * (memo_after, last row] as of that pass, a consistent prefix
     * (invariant 1). Watermark subscriptions of the chat reuse it instead of
     * querying again when it reaches what they were notified of. */
    cs_msglist memo;
    int64_t memo_after;
    int64_t memo_history; /* the chat's history when the memo was read */
    /* Edits this hub knows of: the chat's history, and the newest edit's
     * new message. The cache takes no message below it (a publish that
     * committed before the edit and came late would bring one back). */
    int64_t history, dead_upto;
} hub_chat;

/* A round of the backstop poll (poll.c): the chats followed when it began,
 * their states read a chunk per step. */
typedef struct hub_round {
    int64_t *ids; /* chats to read: [pos, n) still to go */
    size_t n, pos, cap;
    double retry_at;     /* after a failed read: not before (monotonic) */
    cs_chat_state *rows; /* room for CS_POLL_CHUNK */
} hub_round;

struct cs_hub {
    cs_store store;
    size_t cache_size, queue_size, max_chats, page_size;
    uint64_t tick;
    size_t busy_chats; /* chats with subscriptions: never evicted */
    hub_chat **chats;  /* open addressing by chat id, linear probing */
    size_t nchats, capchats;
    cs_publish *pubs;                /* open stepped publishes, for detaching */
    double poll_interval, next_poll; /* backstop poll; 0: off */
    hub_round round;   /* the poll's (or a listener reconnect's) round */
    double last_step;  /* when the store was last read (monotonic seconds) */
    double next_usage; /* when the queue usage is read next */
    char last_warning[256];
    cs_stats stats;
    cs_merge_counts counts;   /* merge counters, folded into stats */
    cs_authorizer auth;       /* fn NULL: the actor must be the owner */
    double stale_after;       /* a worker's heartbeat older than this is dead */
    size_t max_queue;         /* a send that would queue past it: CS_EFULL */
    double action_timeout;    /* requires_action longer than this: error */
    bool plain_notifications; /* appends never carry the message */
    /* The event-loop contract: pollfd (an epoll set of the store's fd and
     * wakefd) is readable while the store has notifications or the ready
     * list is not empty (wakefd is kept set then). */
    int pollfd, wakefd;
    bool woken;
    cs_sub *ready_head, *ready_tail; /* subscriptions with work */
    size_t nready;
    cs_sub *stalled; /* with work a failed read left: ready at stall_at */
    double stall_at;
    bool nodb;      /* cs_sub_try: reads of the store are refused */
    bool wanted_db; /* ... and one was wanted */
    char err[512];
};

/* A read refused under hub->nodb (never returned by the public API). */
#define CS_EWOULDBLOCK (-100)
/* A DB pass found the chat's history moved (an edit): its rows are not
 * used, the subscription catches up with the cut first. Internal too. */
#define CS_EHISTORY (-101)

/* A pending notification for one subscription. */
#define CS_ARCHIVED_BIT                                                        \
    0x100 /* or'ed into a status hint's or event's status                      \
           */

typedef struct qhint {
    cs_hint_kind kind;
    int64_t a, b; /* message: after, id; status: version, status (with
                     CS_ARCHIVED_BIT when archived); part: after, seq;
                     truncate: after, the edit's new message */
    int64_t h;    /* truncate: the chat's history */
    char *text;   /* part; status: the recorded error, or NULL: owned */
    size_t len;
} qhint;

/* An event waiting to be handed to the reader; owns what it points to. */
typedef struct oevent {
    cs_event_kind kind; /* 0: empty */
    cs_msg *msg;        /* message */
    int64_t a, b; /* status: version, status; part: after; truncate: after,
                     history */
    char *text;   /* part; status: the recorded error, or NULL */
    size_t len;
    cs_queue *queue; /* queue */
} oevent;

/* A subscription (sub.c); route.c queues its notifications and keeps the
 * ready list, hub.c detaches it when the hub closes. */
struct cs_sub {
    cs_hub *hub; /* NULL once detached */
    hub_chat *chat;
    cs_sub *next, *prev;
    int64_t chat_id;
    cs_merge merge;
    /* pending notifications: a ring buffer of queue_size entries */
    qhint *q;
    size_t qhead, qn, qcap;
    bool resync;
    int64_t resync_after, resync_id;
    bool status_dirty, queue_dirty; /* re-read them from the store */
    /* Found by the backstop poll: the chat's messages reach poll_id (a DB
     * pass is due while the merge's cursor is below it; 0: none). A status
     * it finds newer is read again (status_dirty): the row has its error
     * and whether it is archived. */
    int64_t poll_id;
    bool memo_ok;           /* the next DB pass may use the memo */
    int64_t need;           /* ... if the memo reaches this id */
    int64_t status_version; /* of the last status delivered; -1 */
    int64_t status_queued;  /* the newest status hint queued; -1: none */
    /* The seqs of the parts a snapshot handed over (as one part event),
     * ascending: the same parts notified live are repeats. */
    int64_t *snap_seqs;
    size_t snap_n;
    oevent snap_part;   /* that event, while the snapshot's pages are read */
    uint64_t queue_sig; /* of the last queue delivered */
    /* The chat's history as this subscription has it (its snapshot's, then
     * each cut it handed over); history_dirty: it moved, the cuts are read
     * from the store. Parts of turns before the last cut's new message
     * (parts_floor) are stale. */
    int64_t history, parts_floor;
    bool history_dirty;
    cs_msglist out; /* the merge's output */
    /* events ready for the reader, in order */
    oevent *ev;
    size_t evpos, evn, evcap;
    oevent current; /* the event last returned; released on the next call */
    /* What the reader was handed (a message counts once next returned it):
     * every message of the chat with id <= rw was returned (last_id: the
     * highest returned, its own rule). Messages returned above rw wait in
     * ret, sorted by id, until the prev_id chain reaches them; entries at or
     * below rw are stale and dropped on the next return. */
    int64_t rw;
    struct retd {
        int64_t id, prev;
    } * ret;
    size_t nret, capret;
    int64_t undo_rw; /* rw before the last return (cs_sub_unread) */
    bool undo_ret;   /* the last return added its message to ret */
    /* The hub's ready list (rstate 1) or its stalled list (2), or neither
     * (0). */
    cs_sub *rnext, *rprev;
    unsigned char rstate;
};

/* What a publish sends after its messages: the chat's new status and/or a
 * "the queue changed" hint. */
typedef struct pub_extras {
    bool status, queue; /* still to send */
    int64_t version;
    cs_status st;
    char error[CS_ERROR_MAX + 1]; /* an error status: what it recorded */
    bool archived;
    /* An edit's cut: sent before the messages (cut), applied to the cache
     * before they are cached (cut_cache). */
    bool cut, cut_cache;
    int64_t cut_history, cut_after, cut_id;
} pub_extras;

/* The transaction of a publish: fills p->committed (and p->extras), under
 * the chat's lock. */
typedef int (*pub_run_fn)(cs_publish *p, cs_chat_row *row);

struct cs_publish {
    cs_hub *hub; /* NULL once detached */
    cs_publish *next, *prev;
    int64_t chat_id;
    size_t n;        /* messages committed (or to commit, for an append) */
    cs_msg_in *msgs; /* copies, until commit (appends) */
    bool committed_done;
    pub_run_fn run; /* the transaction; NULL: append msgs */
    void *arg;      /* for run, valid until commit */
    int64_t qid;    /* promote: the queue item; edit: the edited message */
    char *worker;   /* append: only while the chat runs on it, or NULL */
    char *key;      /* append: its idempotency key, or NULL */
    bool oneshot;   /* committed and published in one go (not stepped) */
    cs_msglist committed;
    int64_t *ids;
    unsigned char *cached, *notified;
    pub_extras extras;
};

/* ---- chat.c ------------------------------------------------------------ */

/* A publish whose commit runs `run` (lifecycle operations). */
int cs_pub_new(cs_hub *hub, int64_t chat_id, pub_run_fn run, void *arg,
               cs_publish **out);
/* Cache + notify everything (after a commit): failures are counted in
 * publish_errors, since the data is durable already. */
void cs_pub_publish_all(cs_publish *p);
/* Sends a status hint for the chat (counted in publish_errors on failure). */
int cs_hub_notify_status(cs_hub *hub, int64_t chat_id, int64_t version,
                         cs_status st, const char *error, bool archived);
/* The chat's messages of ids (n, ascending), read from the store into out
 * (a retry's replay publishes them again). CS_ENOTFOUND if one is gone. */
int cs_pub_load(cs_hub *hub, int64_t chat_id, const int64_t *ids, size_t n,
                cs_msglist *out);
/* An idempotency key: 1 to CS_KEY_MAX bytes of UTF-8; CS_EINVAL. */
int cs_check_key(cs_hub *hub, const char *key);
/* Checks a message list (count, roles, content, tool fields). */
int cs_check_msgs(cs_hub *hub, const cs_msg_in *msgs, size_t n);

/* ---- auth.c ------------------------------------------------------------ */

/* NULL actor: OK. Else checks actor against the chat's owner or the
 * authorizer: CS_OK, CS_EAUTH (message in hub->err) or another error. */
int cs_hub_authorize(cs_hub *hub, int64_t chat_id, const char *actor,
                     const char *op);
/* A name (actor, worker; what says which): 1 to CS_NAME_MAX bytes of
 * UTF-8; CS_EINVAL. */
int cs_check_name(cs_hub *hub, const char *name, const char *what);

/* ---- hub.c ------------------------------------------------------------- */

/* Records rc with the store's detail (or msg) in hub->err; returns rc. */
int cs_hub_fail(cs_hub *hub, int rc, const char *msg);
/* Detaches every subscription (hub close). */
void cs_hub_detach_subs(cs_hub *hub);
/* Publishes still open when the hub closes are detached. */
void cs_pub_detach_all(cs_hub *hub);
/* Reads the store's notifications and routes them. */
int cs_hub_read(cs_hub *hub);
/* Sleeps until the store's fd is readable, at most `left` seconds (less
 * when the poll is due sooner): 0, 1 when nothing can ever arrive, or an
 * error. */
int cs_hub_sleep(cs_hub *hub, double left);

/* ---- route.c ----------------------------------------------------------- */

/* The store's poll callback: routes one notification (chat_id
 * CS_RESYNC_ALL, or no payload: a resync) to the chat's subscriptions. */
void cs_hub_route(void *ud, int64_t chat_id, const char *payload, size_t len);
/* Every subscription resyncs from its own position. */
void cs_hub_resync_all(cs_hub *hub);
/* What the poll read of the subscription's chat: its work, if any. */
void cs_sub_polled(cs_sub *s, const cs_chat_state *st);
/* The ready list: the subscription has work (at its end), has none (off
 * both lists), or has work a failed read left (stalled: ready again after
 * a delay, once cs_hub_stalled_wake finds it passed). */
void cs_sub_ready(cs_sub *s);
void cs_sub_unready(cs_sub *s);
void cs_sub_stall(cs_sub *s);
void cs_hub_stalled_wake(cs_hub *hub);

/* ---- chats.c ----------------------------------------------------------- */

/* The hub's state for a chat, created on first use (NULL on ENOMEM). */
hub_chat *cs_hub_chat(cs_hub *hub, int64_t chat_id);
hub_chat *cs_hub_chat_find(const cs_hub *hub, int64_t chat_id);
/* Into the chat's cache, unless an edit removed it (below dead_upto:
 * counted in cut_refused): 1 inserted, 0 not. */
int cs_chat_cache_put(cs_hub *hub, hub_chat *c, cs_msg *m);
/* An edit cut the chat at history `history`: messages in (after, upto)
 * leave the cache (every one below upto when the hub missed an earlier
 * edit: history skips one), which takes none below upto from now on, and
 * the memo is dropped. */
void cs_chat_cut(hub_chat *c, int64_t after, int64_t upto, int64_t history);

/* ---- poll.c ------------------------------------------------------------ */

/* The poll's rounds. Starts one over the chats followed now
 * (restart: even while one is under way, else that one goes on); CS_ENOMEM
 * leaves none under way. */
int cs_round_start(cs_hub *hub, bool restart);
/* True while a round has chats left to read; *at: not before then. */
bool cs_round_due(const cs_hub *hub, double *at);
/* Reads the next chunk's states (one statement): 1 and *rows (valid until
 * the next call), 0 when nothing is due, or an error (the same chunk is
 * retried a little later). */
int cs_round_next(cs_hub *hub, cs_chat_state **rows, size_t *n);
void cs_round_free(hub_round *r);

#endif
