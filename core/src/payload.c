/* payload.c - notification payloads: versioned text, strict parser. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

static bool known_status(const char *p, size_t len)
{
    return cs_status_parse(p, len) >= 0;
}

bool cs_parse_id(const char *p, size_t len, int64_t *out)
{
    if (len == 0 || len > 19 || (len > 1 && p[0] == '0'))
        return false;
    int64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9')
            return false;
        int d = p[i] - '0';
        if (v > (INT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

int cs_payload_encode(const cs_hint *h, char *buf, size_t cap)
{
    int n;
    if (cap > CS_PAYLOAD_MAX + 1)
        cap = CS_PAYLOAD_MAX + 1;
    switch (h->kind) {
    case CS_HINT_MESSAGE:
        if (h->after < 0 || h->id <= h->after)
            return CS_EINVAL;
        if (!h->body) {
            n = snprintf(buf, cap, "%d:m:%lld:%lld", CS_PAYLOAD_VERSION,
                         (long long)h->after, (long long)h->id);
            break;
        }
        /* The payload is NUL-terminated text: no NUL in tool or content. */
        if ((unsigned)h->role > CS_ROLE_TOOL || (h->tool_len && !h->tool) ||
            (h->text_len && !h->text) ||
            (h->tool_len && memchr(h->tool, '\0', h->tool_len)) ||
            (h->text_len && memchr(h->text, '\0', h->text_len)))
            return CS_EINVAL;
        n = snprintf(buf, cap, "%d:M:%lld:%lld:%s:%zu:", CS_PAYLOAD_VERSION,
                     (long long)h->after, (long long)h->id,
                     cs_role_name(h->role), h->tool_len);
        if (n < 0 || (size_t)n + h->tool_len + h->text_len >= cap)
            return CS_EINVAL;
        if (h->tool_len)
            memcpy(buf + n, h->tool, h->tool_len);
        n += (int)h->tool_len;
        if (h->text_len)
            memcpy(buf + n, h->text, h->text_len);
        n += (int)h->text_len;
        buf[n] = '\0';
        break;
    case CS_HINT_STATUS:
        if (h->version < 0 || !h->text || !known_status(h->text, h->text_len))
            return CS_EINVAL;
        /* "1:s:V:STATUS", then, when archived or an error was recorded,
         * ":FLAGS" ("a": archived, or empty) and ":ERROR". */
        if (h->error_len && (h->error_len > CS_ERROR_MAX ||
                             memchr(h->error, '\0', h->error_len)))
            return CS_EINVAL;
        n = snprintf(buf, cap, "%d:s:%lld:%.*s%s%s%s%.*s", CS_PAYLOAD_VERSION,
                     (long long)h->version, (int)h->text_len, h->text,
                     h->archived || h->error_len ? ":" : "",
                     h->archived ? "a" : "", h->error_len ? ":" : "",
                     (int)h->error_len, h->error_len ? h->error : "");
        break;
    case CS_HINT_QUEUE:
        n = snprintf(buf, cap, "%d:q", CS_PAYLOAD_VERSION);
        break;
    case CS_HINT_PART:
        /* The payload is NUL-terminated text: an embedded NUL cannot go. */
        if (h->after < 0 || !h->text || h->text_len > CS_PAYLOAD_MAX ||
            memchr(h->text, '\0', h->text_len))
            return CS_EINVAL;
        if (h->id < 1)
            return CS_EINVAL; /* its seq */
        n = snprintf(buf, cap, "%d:p:%lld:%lld:%.*s", CS_PAYLOAD_VERSION,
                     (long long)h->after, (long long)h->id, (int)h->text_len,
                     h->text);
        break;
    case CS_HINT_TRUNCATE:
        /* "1:t:HISTORY:AFTER:ID": the chat's history reached HISTORY by an
         * edit that removed every message above AFTER and appended ID. */
        if (h->version < 1 || h->after < 0 || h->id <= h->after)
            return CS_EINVAL;
        n = snprintf(buf, cap, "%d:t:%lld:%lld:%lld", CS_PAYLOAD_VERSION,
                     (long long)h->version, (long long)h->after,
                     (long long)h->id);
        break;
    default: return CS_EINVAL;
    }
    if (n < 0 || (size_t)n >= cap)
        return CS_EINVAL;
    return n;
}

/* Splits off the field at *p: up to the next ':' (which must exist), or, for
 * the last field, up to the end. *p never moves past end. */
static bool field(const char **p, const char *end, const char **f, size_t *flen,
                  bool last)
{
    const char *s = *p;
    const char *c = last ? end : memchr(s, ':', (size_t)(end - s));
    if (!c)
        return false;
    *f = s;
    *flen = (size_t)(c - s);
    *p = c < end ? c + 1 : end;
    return true;
}

int cs_payload_parse(const char *p, size_t len, cs_hint *out)
{
    if (!p || len < 3 || len > CS_PAYLOAD_MAX)
        return CS_EPROTO;
    if (p[0] != '1' || p[1] != ':')
        return CS_EPROTO; /* unknown version */
    const char *end = p + len, *f;
    size_t flen;
    int64_t a, b;
    cs_hint h = {0};
    char kind = p[2];

    if (len == 3) {
        if (kind != 'q')
            return CS_EPROTO;
        h.kind = CS_HINT_QUEUE;
        *out = h;
        return CS_OK;
    }
    if (p[3] != ':')
        return CS_EPROTO;
    const char *cur = p + 4;
    switch (kind) {
    case 'm':
    case 'M': {
        /* "m": after and id, the end; "M": then role, tool length, tool
         * and the content to the end. */
        bool body = kind == 'M';
        if (!field(&cur, end, &f, &flen, false) || !cs_parse_id(f, flen, &a))
            return CS_EPROTO;
        if (!field(&cur, end, &f, &flen, !body) || !cs_parse_id(f, flen, &b))
            return CS_EPROTO;
        if (b <= a)
            return CS_EPROTO;
        h.kind = CS_HINT_MESSAGE;
        h.after = a;
        h.id = b;
        if (!body)
            break;
        int64_t tlen;
        int role;
        if (!field(&cur, end, &f, &flen, false) ||
            (role = cs_role_parse(f, flen)) < 0)
            return CS_EPROTO;
        if (!field(&cur, end, &f, &flen, false) ||
            !cs_parse_id(f, flen, &tlen) || tlen > CS_MAX_TOOL ||
            tlen > end - cur)
            return CS_EPROTO;
        h.body = true;
        h.role = (cs_role)role;
        h.tool = cur;
        h.tool_len = (size_t)tlen;
        h.text = cur + tlen;
        h.text_len = (size_t)(end - cur - tlen);
        break;
    }
    case 's':
        if (!field(&cur, end, &f, &flen, false) || !cs_parse_id(f, flen, &a))
            return CS_EPROTO;
        /* The status; then its flags ("a": archived) and (an error status
         * only, not empty) the error it recorded. Only the canonical form
         * parses: a payload has one encoding. */
        bool more = memchr(cur, ':', (size_t)(end - cur)) != NULL;
        if (!field(&cur, end, &f, &flen, !more) || !known_status(f, flen))
            return CS_EPROTO;
        h.kind = CS_HINT_STATUS;
        h.version = a;
        h.text = f;
        h.text_len = flen;
        if (more) {
            const char *fl;
            size_t fllen;
            bool err = memchr(cur, ':', (size_t)(end - cur)) != NULL;
            field(&cur, end, &fl, &fllen, !err);
            if (fllen > 1 || (fllen == 1 && fl[0] != 'a'))
                return CS_EPROTO;
            h.archived = fllen == 1;
            if (err) {
                if (cur == end || flen != 5 || memcmp(f, "error", 5) != 0 ||
                    (size_t)(end - cur) > CS_ERROR_MAX)
                    return CS_EPROTO;
                h.error = cur;
                h.error_len = (size_t)(end - cur);
            } else if (!h.archived) {
                return CS_EPROTO; /* ":" with nothing after it */
            }
        }
        break;
    case 'p':
        if (!field(&cur, end, &f, &flen, false) || !cs_parse_id(f, flen, &a))
            return CS_EPROTO;
        if (!field(&cur, end, &f, &flen, false) || !cs_parse_id(f, flen, &b) ||
            b < 1)
            return CS_EPROTO;
        field(&cur, end, &f, &flen, true);
        h.kind = CS_HINT_PART;
        h.after = a;
        h.id = b; /* its seq */
        h.text = f;
        h.text_len = flen;
        break;
    case 't': {
        int64_t v;
        if (!field(&cur, end, &f, &flen, false) || !cs_parse_id(f, flen, &v) ||
            v < 1)
            return CS_EPROTO;
        if (!field(&cur, end, &f, &flen, false) || !cs_parse_id(f, flen, &a))
            return CS_EPROTO;
        if (!field(&cur, end, &f, &flen, true) || !cs_parse_id(f, flen, &b) ||
            b <= a)
            return CS_EPROTO;
        h.kind = CS_HINT_TRUNCATE;
        h.version = v;
        h.after = a;
        h.id = b;
        break;
    }
    default: return CS_EPROTO;
    }
    *out = h;
    return CS_OK;
}
