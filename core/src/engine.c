/* engine.c - calls that never block the caller's thread.
 *
 * A call runs on the engine's thread. Where the store would wait for the
 * server it parks instead: the caller's thread, which was waiting for the
 * call to return or park, gets control back with the engine's fd to hand
 * to its event loop. The parked engine thread waits for the socket (or the
 * time) itself, touching nothing but that descriptor, then makes its fd
 * readable; the loop sees it and the caller resumes the call. Control
 * passes like a baton under one mutex: apart from that wait, exactly one of
 * the two threads runs at any time, and each hand-over is a mutex release
 * and acquire, so everything the call touches is seen whole by the other
 * side. The engine's fd is the same for its whole life, whatever
 * connections the calls open and close. */
#include "internal.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

typedef enum {
    E_IDLE,   /* no call */
    E_RUN,    /* the engine thread runs the call */
    E_PARKED, /* the call waits; the caller holds the baton */
    E_DONE,   /* the call returned; the caller collects it */
    E_QUIT
} engine_state;

struct cs_engine {
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    engine_state state;
    void (*fn)(void *);
    void *arg;
    bool finishing; /* freeing: waits block in place */
    bool ready;     /* the parked call's wait is over: resume it */
    int efd;        /* readable while ready */
};

/* The engine whose thread this is (NULL on every other thread). */
static _Thread_local cs_engine *current;

double cs_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *engine_main(void *arg)
{
    cs_engine *e = arg;
    current = e;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (e->state != E_RUN && e->state != E_QUIT)
            pthread_cond_wait(&e->cv, &e->mu);
        if (e->state == E_QUIT)
            break;
        pthread_mutex_unlock(&e->mu);
        e->fn(e->arg);
        pthread_mutex_lock(&e->mu);
        e->state = E_DONE;
        pthread_cond_broadcast(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

int cs_engine_new(cs_engine **out)
{
    cs_engine *e = calloc(1, sizeof *e);
    if (!e)
        return CS_ENOMEM;
    if (pthread_mutex_init(&e->mu, NULL) != 0) {
        free(e);
        return CS_ENOMEM;
    }
    if (pthread_cond_init(&e->cv, NULL) != 0) {
        pthread_mutex_destroy(&e->mu);
        free(e);
        return CS_ENOMEM;
    }
    e->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->efd < 0) {
        pthread_cond_destroy(&e->cv);
        pthread_mutex_destroy(&e->mu);
        free(e);
        return CS_ENOMEM;
    }
    *out = e;
    return CS_OK;
}

/* With e->mu held: waits while the engine runs, then reports. */
static int engine_report(cs_engine *e, cs_wait *w)
{
    while (e->state == E_RUN)
        pthread_cond_wait(&e->cv, &e->mu);
    if (e->state == E_DONE) {
        e->state = E_IDLE;
        return CS_OK;
    }
    if (w) {
        /* The engine's fd turns readable when the wait is over, the
         * deadline included: no timeout of its own. */
        w->fd = e->efd;
        w->events = CS_WAIT_READ;
        w->timeout = -1;
    }
    return CS_AGAIN;
}

int cs_engine_start(cs_engine *e, void (*fn)(void *), void *arg, cs_wait *w)
{
    if (current == e)
        return CS_EBUSY; /* a call from inside a call: not nested */
    pthread_mutex_lock(&e->mu);
    if (e->state != E_IDLE) {
        pthread_mutex_unlock(&e->mu);
        return CS_EBUSY;
    }
    if (!e->started) {
        if (pthread_create(&e->thread, NULL, engine_main, e) != 0) {
            pthread_mutex_unlock(&e->mu);
            return CS_ENOMEM;
        }
        e->started = true;
    }
    e->fn = fn;
    e->arg = arg;
    e->state = E_RUN;
    pthread_cond_broadcast(&e->cv);
    int rc = engine_report(e, w);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

int cs_engine_resume(cs_engine *e, cs_wait *w)
{
    pthread_mutex_lock(&e->mu);
    if (e->state != E_PARKED) {
        pthread_mutex_unlock(&e->mu);
        return CS_EINVAL;
    }
    if (!e->ready) {
        /* Woken early (a loop's spurious wake-up): still waiting. */
        int rc = engine_report(e, w);
        pthread_mutex_unlock(&e->mu);
        return rc;
    }
    e->state = E_RUN;
    pthread_cond_broadcast(&e->cv);
    int rc = engine_report(e, w);
    pthread_mutex_unlock(&e->mu);
    return rc;
}

bool cs_engine_busy(const cs_engine *e)
{
    if (!e || current == e)
        return false;
    cs_engine *m = (cs_engine *)e;
    pthread_mutex_lock(&m->mu);
    bool busy = m->state != E_IDLE;
    pthread_mutex_unlock(&m->mu);
    return busy;
}

void cs_engine_free(cs_engine *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->mu);
    if (e->state == E_PARKED) {
        /* An abandoned call (its caller went away): it finishes here, its
         * later waits blocking in place; the one under way is bounded. */
        e->finishing = true;
        while (!e->ready)
            pthread_cond_wait(&e->cv, &e->mu);
        e->state = E_RUN;
        pthread_cond_broadcast(&e->cv);
        while (e->state != E_DONE)
            pthread_cond_wait(&e->cv, &e->mu);
        e->state = E_IDLE;
    }
    if (e->started) {
        e->state = E_QUIT;
        pthread_cond_broadcast(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    if (e->started)
        pthread_join(e->thread, NULL);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
    close(e->efd);
    free(e);
}

int cs_engine_fd(const cs_engine *e)
{
    return e->efd;
}

/* One poll of fd for at most ms milliseconds (-1: no limit). */
static int poll_once(int fd, int events, int ms)
{
    struct pollfd p = {
        .fd = fd, .events = (short)(events & CS_WAIT_WRITE ? POLLOUT : POLLIN)};
    int r = poll(&p, fd < 0 ? 0 : 1, ms);
    if (r < 0)
        return errno == EINTR ? 1 : -1; /* a signal: the caller looks again */
    return fd < 0 ? 0 : r > 0;
}

static int ms_until(double deadline)
{
    if (deadline < 0)
        return -1;
    double left = deadline - cs_now();
    return left <= 0 ? 0 : left > 3600 ? 3600000 : (int)(left * 1000) + 1;
}

int cs_engine_wait(int fd, int events, double deadline)
{
    cs_engine *e = current;
    int r = poll_once(fd, events, 0);
    if (!e || r != 0) {
        if (r == 0)
            r = poll_once(fd, events, ms_until(deadline));
        return r != 0 ? r : deadline >= 0 && cs_now() < deadline ? 1 : 0;
    }
    /* Park: the caller runs again while this thread waits for fd, which
     * is all it touches until the caller resumes it. */
    pthread_mutex_lock(&e->mu);
    bool finishing = e->finishing;
    if (!finishing) {
        e->ready = false;
        e->state = E_PARKED;
        pthread_cond_broadcast(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    r = poll_once(fd, events, ms_until(deadline));
    if (finishing)
        return r != 0 ? r : deadline >= 0 && cs_now() < deadline ? 1 : 0;
    uint64_t one = 1;
    pthread_mutex_lock(&e->mu);
    e->ready = true;
    if (write(e->efd, &one, sizeof one) < 0)
        r = r ? r : 1; /* cannot fail on an eventfd below its limit */
    pthread_cond_broadcast(&e->cv);
    while (e->state == E_PARKED)
        pthread_cond_wait(&e->cv, &e->mu);
    e->ready = false;
    if (read(e->efd, &one, sizeof one) < 0)
        one = 0;
    pthread_mutex_unlock(&e->mu);
    /* r == 1 with the fd not ready yet (a signal, an early return) makes
     * the store look again, as a wake-up in place would. */
    return r != 0 ? r : deadline >= 0 && cs_now() < deadline ? 1 : 0;
}
