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
} hub_chat;

struct cs_hub {
    cs_store store;
    size_t cache_size, queue_size, max_chats;
    uint64_t tick;
    size_t busy_chats; /* chats with subscriptions: never evicted */
    hub_chat **chats;  /* open addressing by chat id, linear probing */
    size_t nchats, capchats;
    cs_publish *pubs;                /* open stepped publishes, for detaching */
    double poll_interval, next_poll; /* backstop poll; 0: off */
    cs_stats stats;
    cs_merge_counts counts; /* merge counters, folded into stats */
    char err[512];
};

/* The hub's state for a chat, created on first use (NULL on ENOMEM). */
hub_chat *cs_hub_chat(cs_hub *hub, int64_t chat_id);
hub_chat *cs_hub_chat_find(const cs_hub *hub, int64_t chat_id);
/* Records rc with the store's detail (or msg) in hub->err; returns rc. */
int cs_hub_fail(cs_hub *hub, int rc, const char *msg);
/* Detaches every subscription (hub close). */
void cs_hub_detach_subs(cs_hub *hub);

/* Publishes still open when the hub closes are detached. */
void cs_pub_detach_all(cs_hub *hub);

#endif
