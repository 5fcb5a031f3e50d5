/* msg.c - reference-counted immutable messages, message lists, error names. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

cs_msg *cs_msg_new(int64_t id, int64_t chat_id, int64_t prev_id, cs_role role,
                   const char *content, size_t len, const char *tool)
{
    return cs_msg_new_n(id, chat_id, prev_id, role, content, len, tool,
                        tool ? strlen(tool) : 0);
}

cs_msg *cs_msg_new_n(int64_t id, int64_t chat_id, int64_t prev_id, cs_role role,
                     const char *content, size_t len, const char *tool,
                     size_t tlen)
{
    cs_msg *m = malloc(sizeof *m + len + 1 + tlen + 1);
    if (!m)
        return NULL;
    char *t = m->content + len + 1;
    if (tlen)
        memcpy(t, tool, tlen);
    t[tlen] = '\0';
    m->tool = t;
    m->refs = 1;
    m->role = role;
    m->id = id;
    m->chat_id = chat_id;
    m->prev_id = prev_id;
    m->content_len = len;
    if (len)
        memcpy(m->content, content, len);
    m->content[len] = '\0';
    return m;
}

bool cs_utf8_text(const char *p, size_t len)
{
    const unsigned char *s = (const unsigned char *)p, *e = s + len;
    while (s < e) {
        unsigned c = *s;
        if (c < 0x80) {
            if (c == 0)
                return false;
            s++;
            continue;
        }
        size_t n;
        unsigned lo = 0x80, hi = 0xBF; /* the second byte's range */
        if (c >= 0xC2 && c <= 0xDF)
            n = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            if (c == 0xE0)
                lo = 0xA0; /* overlong */
            else if (c == 0xED)
                hi = 0x9F; /* surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            if (c == 0xF0)
                lo = 0x90; /* overlong */
            else if (c == 0xF4)
                hi = 0x8F; /* past U+10FFFF */
        } else
            return false;
        if ((size_t)(e - s) <= n || s[1] < lo || s[1] > hi)
            return false;
        for (size_t i = 2; i <= n; i++)
            if ((s[i] & 0xC0) != 0x80)
                return false;
        s += n + 1;
    }
    return true;
}

static uint64_t fnv(const void *p, size_t n, uint64_t h)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * UINT64_C(1099511628211);
    return h;
}

uint64_t cs_key_request(char kind, const cs_msg_in *msgs, size_t n)
{
    uint64_t h = fnv(&kind, 1, UINT64_C(14695981039346656037));
    for (size_t i = 0; i < n; i++) {
        unsigned char role = (unsigned char)msgs[i].role;
        uint64_t len = msgs[i].content_len;
        const char *tool = msgs[i].tool ? msgs[i].tool : "";
        h = fnv(&role, 1, h);
        h = fnv(&len, sizeof len, h);
        h = fnv(msgs[i].content, msgs[i].content_len, h);
        h = fnv(tool, strlen(tool) + 1, h);
    }
    return h;
}

cs_msg *cs_msg_ref(cs_msg *m)
{
    m->refs++;
    return m;
}

void cs_msg_unref(cs_msg *m)
{
    if (m && --m->refs == 0)
        free(m);
}

int cs_msglist_grow(cs_msglist *l, size_t extra)
{
    if (extra <= l->cap - l->n)
        return CS_OK;
    if (extra > SIZE_MAX / sizeof *l->items - l->n)
        return CS_ENOMEM;
    size_t cap = l->cap ? l->cap : 16;
    while (cap < l->n + extra)
        cap = cap > SIZE_MAX / 2 / sizeof *l->items ? l->n + extra : cap * 2;
    cs_msg **items = realloc(l->items, cap * sizeof *items);
    if (!items)
        return CS_ENOMEM;
    l->items = items;
    l->cap = cap;
    return CS_OK;
}

int cs_msglist_push(cs_msglist *l, cs_msg *m)
{
    int rc = cs_msglist_reserve(l, 1);
    if (rc < 0)
        return rc;
    l->items[l->n++] = m;
    return CS_OK;
}

void cs_msglist_clear(cs_msglist *l)
{
    for (size_t i = 0; i < l->n; i++)
        cs_msg_unref(l->items[i]);
    l->n = 0;
}

void cs_msglist_free(cs_msglist *l)
{
    cs_msglist_clear(l);
    free(l->items);
    l->items = NULL;
    l->cap = 0;
}

static bool tool_id_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c >= '0' && c <= '9') || c == '_' || c == '.' || c == ':' ||
           c == '-';
}

int cs_tool_check(cs_role role, const char *tool, const char **why)
{
    const char *w = NULL;
    size_t ids = 0, len = 0;
    if (!tool || !*tool)
        return CS_OK;
    if (strlen(tool) > CS_MAX_TOOL)
        w = "tool field too long";
    for (const char *p = tool; !w && *p; p++) {
        if (tool_id_char(*p)) {
            if (len++ == 0)
                ids++;
            if (len > 128)
                w = "a tool call ID is longer than 128 bytes";
        } else if (*p == ' ' && len > 0 && p[1]) {
            len = 0;
        } else {
            w = "a tool call ID is 1 to 128 bytes of [A-Za-z0-9_.:-], "
                "separated by single spaces";
        }
    }
    if (!w && role == CS_ROLE_TOOL && ids != 1)
        w = "a tool message answers exactly one tool call";
    if (!w && role == CS_ROLE_ASSISTANT && ids > 64)
        w = "at most 64 tool calls per message";
    if (!w && role != CS_ROLE_TOOL && role != CS_ROLE_ASSISTANT)
        w = "only assistant and tool messages have tool calls";
    if (w && why)
        *why = w;
    return w ? CS_EINVAL : CS_OK;
}

void cs_queue_clear(cs_queue *q)
{
    for (size_t i = 0; i < q->n; i++) {
        free(q->items[i].content);
        free(q->items[i].actor);
    }
    q->n = 0;
}

void cs_queue_free(cs_queue *q)
{
    if (!q)
        return;
    cs_queue_clear(q);
    free(q->items);
    q->items = NULL;
    q->cap = 0;
}

uint64_t cs_queue_sig_add(uint64_t h, int64_t id)
{
    uint64_t v = (uint64_t)id;
    for (int b = 0; b < 8; b++) {
        h ^= (v >> (8 * b)) & 0xff;
        h *= UINT64_C(1099511628211);
    }
    return h;
}

uint64_t cs_queue_sig(const cs_queue *q)
{
    uint64_t h = CS_QUEUE_SIG_START;
    for (size_t i = 0; i < q->n; i++)
        h = cs_queue_sig_add(h, q->items[i].id);
    return cs_queue_sig_end(h, q->n);
}

int cs_queue_push(cs_queue *q, int64_t id, const char *content, size_t len,
                  const char *actor, double created_at)
{
    if (q->n == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 8;
        cs_queue_item *items = realloc(q->items, cap * sizeof *items);
        if (!items)
            return CS_ENOMEM;
        q->items = items;
        q->cap = cap;
    }
    size_t alen = actor ? strlen(actor) : 0;
    char *c = malloc(len + 1), *a = malloc(alen + 1);
    if (!c || !a) {
        free(c);
        free(a);
        return CS_ENOMEM;
    }
    if (len)
        memcpy(c, content, len);
    c[len] = '\0';
    if (alen)
        memcpy(a, actor, alen);
    a[alen] = '\0';
    q->items[q->n++] = (cs_queue_item){id, c, len, a, created_at};
    return CS_OK;
}

static const char *const status_names[] = {
    "waiting",   "pending", "running",         "paused",
    "completed", "error",   "requires_action",
};

int cs_status_parse(const char *s, size_t len)
{
    for (int i = 0; s && i < 7; i++)
        if (strlen(status_names[i]) == len &&
            memcmp(status_names[i], s, len) == 0)
            return i;
    return -1;
}

const char *cs_status_name(cs_status st)
{
    return (unsigned)st < 7 ? status_names[st] : "?";
}

static const char *const role_names[] = {"system", "user", "assistant", "tool"};

int cs_role_parse(const char *s, size_t len)
{
    if (!s)
        return -1;
    for (int i = 0; i < 4; i++)
        if (strlen(role_names[i]) == len && memcmp(role_names[i], s, len) == 0)
            return i;
    return -1;
}

const char *cs_role_name(cs_role r)
{
    return (unsigned)r < 4 ? role_names[r] : "?";
}

static const char *const strategy_names[] = {"watermark", "rescan", "last_id"};

int cs_strategy_parse(const char *s)
{
    for (int i = 0; s && i < 3; i++)
        if (strcmp(strategy_names[i], s) == 0)
            return i;
    return -1;
}

const char *cs_strategy_name(cs_strategy s)
{
    return (unsigned)s < 3 ? strategy_names[s] : "?";
}

const char *cs_errname(int rc)
{
    switch (rc) {
    case CS_OK: return "OK";
    case CS_ENOMEM: return "ENOMEM";
    case CS_EINVAL: return "EINVAL";
    case CS_ECLOSED: return "ECLOSED";
    case CS_EBACKEND: return "EBACKEND";
    case CS_EPROTO: return "EPROTO";
    case CS_EAUTH: return "EAUTH";
    case CS_ENOTFOUND: return "ENOTFOUND";
    case CS_ESTATE: return "ESTATE";
    case CS_ETIMEDOUT: return "ETIMEDOUT";
    case CS_EUNKNOWN: return "EUNKNOWN";
    case CS_EBUSY: return "EBUSY";
    case CS_EFULL: return "EFULL";
    case CS_EVENT: return "EVENT";
    case CS_IDLE: return "IDLE";
    case CS_AGAIN: return "AGAIN";
    default: return "E?";
    }
}

const char *cs_strerror(int rc)
{
    switch (rc) {
    case CS_OK: return "success";
    case CS_ENOMEM: return "out of memory";
    case CS_EINVAL: return "invalid argument";
    case CS_ECLOSED: return "handle is closed";
    case CS_EBACKEND: return "store failure";
    case CS_EPROTO: return "malformed notification";
    case CS_EAUTH: return "not authorized";
    case CS_ENOTFOUND: return "no such chat";
    case CS_ESTATE: return "not allowed in the chat's state";
    case CS_ETIMEDOUT: return "timeout";
    case CS_EUNKNOWN: return "outcome unknown: it may have committed";
    case CS_EBUSY: return "busy: another call on this store is in progress";
    case CS_EFULL: return "the chat's queue is full";
    case CS_EVENT: return "event";
    case CS_IDLE: return "idle";
    case CS_AGAIN: return "needs the store";
    default: return "unknown error";
    }
}

int cs_parts_push(cs_parts *p, int64_t seq, int64_t after, const char *text,
                  size_t len)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 8;
        cs_part *items = realloc(p->items, cap * sizeof *items);
        if (!items)
            return CS_ENOMEM;
        p->items = items;
        p->cap = cap;
    }
    char *t = malloc(len + 1);
    if (!t)
        return CS_ENOMEM;
    if (len)
        memcpy(t, text, len);
    t[len] = '\0';
    p->items[p->n++] = (cs_part){seq, after, t, len};
    return CS_OK;
}

void cs_parts_free(cs_parts *p)
{
    for (size_t i = 0; i < p->n; i++)
        free(p->items[i].text);
    free(p->items);
    *p = (cs_parts){0};
}
