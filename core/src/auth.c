/* auth.c - the actor check in front of every read and write of a chat:
 * the chat's owner, or the hub's authorizer, says whether the actor may. */
#include "hub.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cs_check_name(cs_hub *hub, const char *name, const char *what)
{
    if (!name || !*name || strlen(name) > CS_NAME_MAX) {
        char buf[96];
        snprintf(buf, sizeof buf, "%s must be 1 to %d bytes", what,
                 CS_NAME_MAX);
        return cs_hub_fail(hub, CS_EINVAL, buf);
    }
    if (!cs_utf8_text(name, strlen(name))) {
        char buf[96];
        snprintf(buf, sizeof buf, "%s is not valid UTF-8", what);
        return cs_hub_fail(hub, CS_EINVAL, buf);
    }
    return CS_OK;
}

int cs_hub_authorize(cs_hub *hub, int64_t chat_id, const char *actor,
                     const char *op)
{
    if (!actor)
        return CS_OK; /* trusted code */
    int rc = cs_check_name(hub, actor, "actor");
    if (rc < 0)
        return rc;
    if (chat_id < 1)
        return cs_hub_fail(hub, CS_EINVAL, "bad chat id");
    hub->stats.auth_checks++;
    cs_chat_info *row = malloc(sizeof *row);
    if (!row)
        return CS_ENOMEM;
    /* The chat's metadata only: nothing of its messages, status or queue is
     * read before the answer. */
    rc = hub->store.ops->chat_get(hub->store.st, chat_id, row);
    if (rc == CS_ENOTFOUND) {
        /* Said as a refusal: an actor cannot probe which chats exist. */
        free(row);
        char buf[300];
        hub->stats.auth_refusals++;
        snprintf(buf, sizeof buf, "%.*s may not %s (chat %lld)", 200, actor, op,
                 (long long)chat_id);
        return cs_hub_fail(hub, CS_EAUTH, buf);
    }
    if (rc < 0) {
        free(row);
        return cs_hub_fail(hub, rc, NULL);
    }
    char why[256] = "";
    int ok;
    if (hub->auth.fn) {
        ok = hub->auth.fn(hub->auth.ud, actor, row, op, why, sizeof why);
    } else {
        ok = strcmp(actor, row->owner) == 0;
        if (!ok)
            snprintf(why, sizeof why, "not the owner of the chat");
    }
    free(row);
    if (ok < 0)
        return cs_hub_fail(hub, ok,
                           ok == CS_EAUTH ? "refused by the authorizer"
                                          : "the authorizer failed");
    if (ok == 0) {
        char buf[512];
        hub->stats.auth_refusals++;
        snprintf(buf, sizeof buf, "%.*s may not %s (chat %lld)%s%s", 200, actor,
                 op, (long long)chat_id, why[0] ? ": " : "", why);
        return cs_hub_fail(hub, CS_EAUTH, buf);
    }
    return CS_OK;
}
