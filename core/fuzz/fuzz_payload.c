/* fuzz_payload.c - libFuzzer target: the notification payload parser. */
#include "internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size copy, no terminator: any over-read is caught by ASan. */
    char *p = malloc(size ? size : 1);
    if (!p)
        return 0;
    memcpy(p, data, size);
    cs_hint h;
    if (cs_payload_parse(p, size, &h) == CS_OK) {
        /* Whatever parses re-encodes to a payload that parses the same. */
        char buf[CS_PAYLOAD_MAX + 1];
        int n = cs_payload_encode(&h, buf, sizeof buf);
        if (n < 0) {
            /* Only a part, a message body or a status's error carrying a
             * NUL byte cannot be re-encoded. */
            bool nul = (h.text_len && memchr(h.text, '\0', h.text_len)) ||
                       (h.tool_len && memchr(h.tool, '\0', h.tool_len)) ||
                       (h.error_len && memchr(h.error, '\0', h.error_len));
            if (!((h.kind == CS_HINT_PART || h.body || h.error_len) && nul))
                abort();
        } else {
            cs_hint h2;
            if (cs_payload_parse(buf, (size_t)n, &h2) != CS_OK ||
                h2.kind != h.kind || h2.after != h.after || h2.id != h.id ||
                h2.version != h.version || h2.text_len != h.text_len ||
                (h.text_len && memcmp(h.text, h2.text, h.text_len) != 0) ||
                h2.body != h.body || h2.role != h.role ||
                h2.tool_len != h.tool_len ||
                (h.tool_len && memcmp(h.tool, h2.tool, h.tool_len) != 0) ||
                h2.error_len != h.error_len || h2.archived != h.archived ||
                (h.error_len && memcmp(h.error, h2.error, h.error_len) != 0))
                abort();
        }
    }
    free(p);
    return 0;
}
