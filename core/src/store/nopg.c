/* nopg.c - stands in for the PostgreSQL store in builds without libpq. */
#include "../internal.h"

#include <stdio.h>

bool cs_valid_identifier(const char *s)
{
    (void)s;
    return false;
}

int cs_pg_store_open(const char *dsn, const char *schema, double query_timeout,
                     cs_store *out, char *errbuf, size_t errlen)
{
    (void)dsn;
    (void)query_timeout;
    (void)schema;
    (void)out;
    if (errbuf && errlen)
        snprintf(errbuf, errlen, "chatstream was built without PostgreSQL");
    return CS_EINVAL;
}
