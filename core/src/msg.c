/* msg.c - reference-counted immutable messages, message lists, error names. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

cs_msg *cs_msg_new(int64_t id, int64_t chat_id, int64_t prev_id, cs_role role,
                   const char *content, size_t len)
{
    cs_msg *m = malloc(sizeof *m + len + 1);
    if (!m)
        return NULL;
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

int cs_msglist_push(cs_msglist *l, cs_msg *m)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        cs_msg **items = realloc(l->items, cap * sizeof *items);
        if (!items)
            return CS_ENOMEM;
        l->items = items;
        l->cap = cap;
    }
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
    case CS_EVENT: return "EVENT";
    case CS_IDLE: return "IDLE";
    default: return "EUNKNOWN";
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
    case CS_EVENT: return "event";
    case CS_IDLE: return "idle";
    default: return "unknown error";
    }
}
