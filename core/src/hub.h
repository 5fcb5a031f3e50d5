/* hub.h - the hub's private structures, shared by hub.c and chat.c. */
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

/* What a publish sends after its messages: the chat's new status and/or a
 * "the queue changed" hint. */
typedef struct pub_extras {
    bool status, queue; /* still to send */
    int64_t version;
    cs_status st;
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
    int64_t qid;    /* promote: the queue item */
    char *worker;   /* append: only while the chat runs on it, or NULL */
    char *key;      /* append: its idempotency key, or NULL */
    bool oneshot;   /* committed and published in one go (not stepped) */
    cs_msglist committed;
    int64_t *ids;
    unsigned char *cached, *notified;
    pub_extras extras;
};

/* A publish whose commit runs `run` (lifecycle operations). */
int cs_pub_new(cs_hub *hub, int64_t chat_id, pub_run_fn run, void *arg,
               cs_publish **out);
/* Cache + notify everything (after a commit): failures are counted in
 * publish_errors, since the data is durable already. */
void cs_pub_publish_all(cs_publish *p);
/* NULL actor: OK. Else checks actor against the chat's owner or the
 * authorizer: CS_OK, CS_EAUTH (message in hub->err) or another error. */
int cs_hub_authorize(cs_hub *hub, int64_t chat_id, const char *actor,
                     const char *op);
/* Sends a status hint for the chat (counted in publish_errors on failure). */
int cs_hub_notify_status(cs_hub *hub, int64_t chat_id, int64_t version,
                         cs_status st);
/* The chat's messages of ids (n, ascending), read from the store into out
 * (a retry's replay publishes them again). CS_ENOTFOUND if one is gone. */
int cs_pub_load(cs_hub *hub, int64_t chat_id, const int64_t *ids, size_t n,
                cs_msglist *out);
/* An idempotency key: 1 to CS_KEY_MAX bytes of UTF-8; CS_EINVAL. */
int cs_check_key(cs_hub *hub, const char *key);
/* Checks a message list (count, roles, content, tool fields). */
int cs_check_msgs(cs_hub *hub, const cs_msg_in *msgs, size_t n);

/* The hub's state for a chat, created on first use (NULL on ENOMEM). */
hub_chat *cs_hub_chat(cs_hub *hub, int64_t chat_id);
hub_chat *cs_hub_chat_find(const cs_hub *hub, int64_t chat_id);
/* Records rc with the store's detail (or msg) in hub->err; returns rc. */
int cs_hub_fail(cs_hub *hub, int rc, const char *msg);
/* Detaches every subscription (hub close). */
void cs_hub_detach_subs(cs_hub *hub);

/* Publishes still open when the hub closes are detached. */
void cs_pub_detach_all(cs_hub *hub);

/* The poll's rounds (poll.c). Starts one over the chats followed now
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
