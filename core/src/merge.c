/* merge.c - the per-subscription merge: last_id, rescan and watermark
 * strategies. */
#include "internal.h"

void cs_merge_init(cs_merge *m, cs_strategy s, bool ordered, int64_t floor,
                   cs_merge_counts *counts)
{
    m->strategy = s;
    m->ordered = ordered && s == CS_STRATEGY_WATERMARK;
    m->floor = floor;
    m->last = floor;
    cs_idset_init(&m->delivered, floor);
    m->scratch = (cs_msglist){0};
    m->own = (cs_merge_counts){0};
    m->counts = counts ? counts : &m->own;
}

void cs_merge_free(cs_merge *m)
{
    cs_idset_free(&m->delivered);
    cs_msglist_free(&m->scratch);
}

int64_t cs_merge_cursor(const cs_merge *m)
{
    return m->strategy == CS_STRATEGY_WATERMARK ? m->delivered.watermark
                                                : m->last;
}

void cs_merge_cut(cs_merge *m, int64_t after)
{
    if (m->floor > after)
        m->floor = after;
    if (m->last > after)
        m->last = after;
    cs_idset_cut(&m->delivered, after);
}

/* Hands msg over: appends it to out and records it. */
static int deliver(cs_merge *m, cs_msg *msg, cs_msglist *out)
{
    int rc = cs_msglist_push(out, msg);
    if (rc < 0)
        return rc;
    if (m->strategy != CS_STRATEGY_LAST_ID) {
        rc = cs_idset_add(&m->delivered, msg->id);
        if (rc < 0) {
            out->n--; /* undo the push; the caller still owns msg */
            return rc;
        }
    }
    cs_msg_ref(msg);
    if (m->strategy == CS_STRATEGY_LAST_ID || msg->id > m->last)
        m->last = msg->id;
    return CS_OK;
}

int cs_merge_snapshot(cs_merge *m, const cs_msglist *rows, cs_msglist *out)
{
    for (size_t i = 0; i < rows->n; i++) {
        cs_msg *r = rows->items[i];
        if (r->id <= m->floor || cs_idset_has(&m->delivered, r->id))
            continue;
        int rc = deliver(m, r, out);
        if (rc < 0)
            return rc;
    }
    if (m->strategy == CS_STRATEGY_WATERMARK)
        cs_idset_advance(&m->delivered, m->last); /* a consistent prefix */
    return CS_OK;
}

/* Runs the DB query from after into m->scratch. */
static int db_pass(cs_merge *m, const cs_merge_source *src, int64_t after)
{
    cs_msglist_clear(&m->scratch);
    m->counts->db_passes++;
    m->counts->queries++;
    int rc = src->query(src->ud, after, &m->scratch);
    if (rc < 0) {
        if (rc == CS_EBACKEND)
            m->counts->query_errors++;
        cs_msglist_clear(&m->scratch);
    }
    return rc;
}

/* The cache's entries above after; false on a miss or without a cache. */
static bool cache_pass(cs_merge *m, const cs_merge_source *src, int64_t after,
                       size_t *first, size_t *count)
{
    *first = *count = 0;
    if (!src->cache)
        return false;
    if (!cs_cache_after(src->cache, after, first, count)) {
        m->counts->cache_misses++;
        return false;
    }
    m->counts->cache_hits++;
    return true;
}

static bool full_page(const cs_merge_source *src, const cs_msglist *rows)
{
    return src->limit > 0 && rows->n >= src->limit;
}

/* Before the reference fix: one cursor for everything. Lossy. */
static int notify_last_id(cs_merge *m, const cs_merge_source *src,
                          bool force_db, cs_msglist *out)
{
    size_t first, count;
    bool gave = false;
    if (!force_db && cache_pass(m, src, m->last, &first, &count)) {
        for (size_t i = 0; i < count; i++) {
            int rc = deliver(m, cs_cache_at(src->cache, first + i), out);
            if (rc < 0)
                return rc;
            gave = true;
        }
    }
    if (gave)
        return CS_OK; /* the cache gave something: the DB is skipped */
    int rc = db_pass(m, src, m->last);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < m->scratch.n; i++) {
        if (m->scratch.items[i]->id <= m->last)
            continue;
        rc = deliver(m, m->scratch.items[i], out);
        if (rc < 0)
            return rc;
    }
    return full_page(src, &m->scratch) ? CS_MERGE_MORE : CS_OK;
}

/* The reference fix: rescan from min(after, last), dedupe, DB always. */
static int notify_rescan(cs_merge *m, const cs_merge_source *src, int64_t after,
                         cs_msglist *out)
{
    int64_t from = after < m->last ? after : m->last;
    if (from < m->floor)
        from = m->floor;
    size_t first, count;
    if (cache_pass(m, src, from, &first, &count)) {
        for (size_t i = 0; i < count; i++) {
            cs_msg *c = cs_cache_at(src->cache, first + i);
            if (cs_idset_has(&m->delivered, c->id))
                continue;
            int rc = deliver(m, c, out);
            if (rc < 0)
                return rc;
        }
    }
    int rc = db_pass(m, src, from);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < m->scratch.n; i++) {
        cs_msg *r = m->scratch.items[i];
        if (r->id <= from || cs_idset_has(&m->delivered, r->id))
            continue;
        rc = deliver(m, r, out);
        if (rc < 0)
            return rc;
    }
    return CS_OK;
}

/* The default: the cache proves continuity through prev_id from W; the DB is
 * asked only when it cannot. */
static int notify_watermark(cs_merge *m, const cs_merge_source *src, int64_t id,
                            bool force_db, cs_msglist *out)
{
    int64_t w = m->delivered.watermark;
    if (id <= w && !force_db)
        return CS_OK;
    size_t first, count;
    bool moved = false; /* the chain skips what was delivered: an edit */
    if (cache_pass(m, src, w, &first, &count)) {
        for (size_t i = 0; i < count; i++) {
            cs_msg *c = cs_cache_at(src->cache, first + i);
            bool chain = c->prev_id == w;
            if (chain && cs_idset_any_in(&m->delivered, w, c->id)) {
                /* c follows W, yet a message delivered out of order lies
                 * between them: it is no longer in the chat's history (an
                 * edit cut it, and its truncate has not come). The DB pass
                 * finds the history moved (the caller then cuts). */
                moved = true;
                break;
            }
            if (!chain && m->ordered)
                break; /* held until W reaches it */
            if (chain && m->delivered.n == 0) {
                /* The common case: the next message of the chain with
                 * nothing out of order held. W moves onto it directly; the
                 * set has nothing to add and nothing to drop. */
                int rc = cs_msglist_push(out, c);
                if (rc < 0)
                    return rc; /* W is already where the chain reached */
                cs_msg_ref(c);
                if (c->id > m->last)
                    m->last = c->id;
                w = c->id;
                /* inline: the set is empty */
                cs_idset_advance(&m->delivered, w);
                continue;
            }
            if (!cs_idset_has(&m->delivered, c->id)) {
                int rc = deliver(m, c, out);
                if (rc < 0) {
                    cs_idset_advance(&m->delivered, w);
                    return rc;
                }
            }
            if (chain)
                w = c->id;
        }
        cs_idset_advance(&m->delivered, w);
    }
    if (w >= id && !force_db && !moved)
        return CS_OK;
    int rc = db_pass(m, src, w);
    if (rc < 0)
        return rc;
    /* A consistent prefix of the chat (invariant 1): W moves to its end,
     * so the rows handed over here are not added to the set (W covers
     * them). Room for all of them first, so the pass is handed over whole
     * or, on ENOMEM, not at all (W unchanged: the next pass reads again). */
    rc = cs_msglist_reserve(out, m->scratch.n);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < m->scratch.n; i++) {
        cs_msg *r = m->scratch.items[i];
        if (r->id <= w || cs_idset_has(&m->delivered, r->id))
            continue;
        out->items[out->n++] = cs_msg_ref(r); /* reserved above */
        if (r->id > m->last)
            m->last = r->id;
    }
    if (m->scratch.n > 0)
        cs_idset_advance(&m->delivered, m->scratch.items[m->scratch.n - 1]->id);
    /* A page: a consistent prefix too; the rest comes with the next call. */
    return full_page(src, &m->scratch) ? CS_MERGE_MORE : CS_OK;
}

int cs_merge_notify(cs_merge *m, const cs_merge_source *src, int64_t after,
                    int64_t id, bool force_db, cs_msglist *out)
{
    int rc;
    switch (m->strategy) {
    case CS_STRATEGY_LAST_ID: rc = notify_last_id(m, src, force_db, out); break;
    case CS_STRATEGY_RESCAN: rc = notify_rescan(m, src, after, out); break;
    default: rc = notify_watermark(m, src, id, force_db, out); break;
    }
    cs_msglist_clear(&m->scratch);
    return rc;
}
