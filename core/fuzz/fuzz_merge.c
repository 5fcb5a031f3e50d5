/* fuzz_merge.c - libFuzzer target: random publish interleavings on the memory
 * store, every reader checked against the database. The input bytes drive the
 * steps: which writer steps (commit, then cache and notify of each message),
 * which reader drains, lost notifications, failing queries, cache and queue
 * sizes, replicas, and edits (a cut of a chat's history: readers drop what
 * a truncate removes, as a page does). watermark must be exact always;
 * rescan must be exact when no notification was lost; last_id is not
 * checked (it is the lossy one). */
#include "chatstream.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_WRITERS 8
#define MAX_READERS 12
#define MAX_IDS 256

typedef struct {
    const uint8_t *p;
    size_t n;
} input;

static unsigned next_byte(input *in)
{
    if (in->n == 0)
        return 0;
    in->n--;
    return *in->p++;
}

typedef struct {
    cs_publish *pub;
    int chat;
    size_t nmsg, step; /* step 0: commit; then cache i / notify i */
} writer;

typedef struct {
    cs_sub *sub;
    int chat;
    cs_strategy strategy;
    int ordered;
    int64_t after;
    int64_t got[MAX_IDS];
    size_t ngot;
    int overflow;
} reader;

static void drain(reader *r)
{
    cs_event ev;
    while (cs_sub_next(r->sub, &ev) == CS_EVENT) {
        if (ev.kind == CS_EV_TRUNCATE) {
            /* an edit: what is above its cut is gone from the view */
            size_t k = 0;
            for (size_t i = 0; i < r->ngot; i++)
                if (r->got[i] <= ev.prev_id)
                    r->got[k++] = r->got[i];
            r->ngot = k;
            continue;
        }
        if (ev.kind != CS_EV_MESSAGE)
            continue; /* the snapshot's status */
        if (r->ngot < MAX_IDS)
            r->got[r->ngot++] = ev.id;
        else
            r->overflow = 1;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    input in = {data, size};
    cs_memdb *db;
    if (cs_memdb_open(&db) < 0)
        return 0;
    cs_hub *hubs[3] = {0};
    size_t nhubs = 1 + next_byte(&in) % 3;
    for (size_t i = 0; i < nhubs; i++) {
        cs_hub_options o = {.memory = db,
                            .cache_size = 1 + next_byte(&in) % 8,
                            .queue_size = 1 + next_byte(&in) % 8,
                            .page_size = next_byte(&in) % 5}; /* 0: 500 */
        if (cs_hub_open(&o, &hubs[i]) < 0)
            abort();
    }
    int64_t chats[2];
    for (int i = 0; i < 2; i++)
        if (cs_hub_create_chat(hubs[0], "f", "f", &chats[i]) < 0)
            abort();
    writer w[MAX_WRITERS];
    reader r[MAX_READERS];
    size_t nw = 0, nr = 0;
    int lost = 0;
    cs_msg_in msgs[3] = {{CS_ROLE_USER, "a", 1, NULL},
                         {CS_ROLE_ASSISTANT, "b", 1, NULL},
                         {CS_ROLE_TOOL, "c", 1, NULL}};
    int64_t users[2][MAX_IDS]; /* user messages committed, per chat */
    size_t nusers[2] = {0, 0};

    while (in.n > 0) {
        unsigned op = next_byte(&in) % 9, arg = next_byte(&in);
        if (op <= 2 && nw < MAX_WRITERS) { /* a new writer */
            writer *x = &w[nw];
            x->chat = arg % 2;
            x->nmsg = 1 + (arg / 2) % 3;
            x->step = 0;
            if (cs_pub_prepare(hubs[(arg / 8) % nhubs], chats[x->chat], msgs,
                               x->nmsg, &x->pub) < 0)
                abort();
            nw++;
        } else if (op <= 4 && nw > 0) { /* a writer's next step */
            writer *x = &w[arg % nw];
            size_t total = 1 + 2 * x->nmsg;
            if (x->step >= total)
                continue;
            if (x->step == 0) {
                const int64_t *ids;
                if (cs_pub_commit(x->pub, &ids, NULL) < 0)
                    abort();
                if (nusers[x->chat] < MAX_IDS) /* its first is a user's */
                    users[x->chat][nusers[x->chat]++] = ids[0];
            } else if (x->step % 2 == 1) {
                cs_pub_cache(x->pub, (x->step - 1) / 2);
            } else {
                cs_pub_notify(x->pub, (x->step - 1) / 2);
            }
            x->step++;
        } else if (op == 5 && nr < MAX_READERS) { /* a new reader */
            reader *x = &r[nr];
            memset(x, 0, sizeof *x);
            x->chat = arg % 2;
            x->strategy = (cs_strategy)((arg / 2) % 3);
            x->ordered = x->strategy == CS_STRATEGY_WATERMARK && (arg / 8) % 2;
            cs_sub_options so = {0, x->strategy, !x->ordered, NULL};
            if (cs_sub_open(hubs[(arg / 16) % nhubs], chats[x->chat], &so,
                            &x->sub) < 0)
                continue; /* an injected query failure */
            nr++;
        } else if (op == 6 && nr > 0) {
            drain(&r[arg % nr]);
        } else if (op == 7) {
            if (arg % 2) {
                cs_memdb_drop_notifies(db, 1);
                lost = 1;
            } else {
                cs_memdb_fail_queries(db, 1 + arg % 3);
            }
        } else if (op == 8 && nusers[arg % 2] > 0) {
            /* an edit of a user message (one an earlier edit removed is
             * refused: EINVAL, nothing written) */
            int c = arg % 2;
            int64_t id;
            int rc =
                cs_hub_edit(hubs[(arg / 2) % nhubs], chats[c],
                            users[c][(arg / 8) % nusers[c]], NULL, "e", 1, &id);
            if (rc == CS_OK && nusers[c] < MAX_IDS)
                users[c][nusers[c]++] = id;
            else if (rc < 0 && rc != CS_EINVAL && rc != CS_EBACKEND)
                abort();
        }
    }
    /* Clear the faults, finish every writer, publish a last message per chat
     * so every reader has a notification after any lost one, then drain. */
    cs_memdb_drop_notifies(db, 0);
    cs_memdb_fail_queries(db, 0);
    for (size_t i = 0; i < nw; i++) {
        if (w[i].step == 0 && cs_pub_commit(w[i].pub, NULL, NULL) < 0)
            abort();
        cs_pub_cache(w[i].pub, CS_ALL);
        cs_pub_notify(w[i].pub, CS_ALL);
    }
    for (int c = 0; c < 2; c++)
        if (cs_hub_append(hubs[0], chats[c], msgs, 1, NULL) < 0)
            abort();
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < nr; i++)
            drain(&r[i]);

    /* The oracle: a fresh subscription's snapshot is the chat. */
    for (size_t i = 0; i < nr; i++) {
        reader *x = &r[i];
        if (x->overflow || x->strategy == CS_STRATEGY_LAST_ID ||
            (x->strategy == CS_STRATEGY_RESCAN && lost))
            continue;
        cs_sub *t;
        cs_sub_options so = {0};
        if (cs_sub_open(hubs[0], chats[x->chat], &so, &t) < 0)
            abort();
        cs_event ev;
        size_t k = 0;
        while (cs_sub_next(t, &ev) == CS_EVENT) {
            if (ev.kind != CS_EV_MESSAGE)
                continue;
            int found = 0;
            for (size_t j = 0; j < x->ngot; j++)
                found += x->got[j] == ev.id;
            if (found != 1)
                abort(); /* lost (0) or delivered twice (2+) */
            if (x->ordered && (k >= x->ngot || x->got[k] != ev.id))
                abort(); /* ordered: exactly the chat's order */
            k++;
        }
        if (k != x->ngot)
            abort(); /* got something that is not in the chat */
        cs_sub_close(t);
    }
    for (size_t i = 0; i < nr; i++)
        cs_sub_close(r[i].sub);
    for (size_t i = 0; i < nw; i++)
        cs_pub_close(w[i].pub);
    for (size_t i = 0; i < nhubs; i++)
        cs_hub_close(hubs[i]);
    cs_memdb_close(db);
    return 0;
}
