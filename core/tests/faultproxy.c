/* faultproxy.c - a loopback TCP proxy for the fault specs: cut, stall, drop. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/*
 * usage: faultproxy LISTEN_PORT TARGET_HOST TARGET_PORT PIDFILE
 *
 * Listens on 127.0.0.1:LISTEN_PORT (0: a free port) and forwards every
 * connection to a new connection to TARGET_HOST:TARGET_PORT. Once listening
 * it writes its pid to PIDFILE, then prints "port N" on stdout. Signals:
 *   SIGUSR1  cut after reply: the first connection that forwards bytes to
 *            the target after the signal and then gets bytes back loses
 *            those bytes and is closed on both sides; then disarmed
 *   SIGUSR2  stall / resume (toggle): nothing is forwarded while stalled
 *   SIGHUP   drop every open connection, keep listening
 *   SIGTERM, SIGINT  close everything, remove PIDFILE, exit 0
 * It exits by itself after FAULTPROXY_LIFETIME seconds (default 600). With
 * FAULTPROXY_CUT_MATCH set, only bytes to the target that contain that text
 * (e.g. "COMMIT": the reply to a commit is the one cut) arm the cut.
 */

#define BUFSZ 65536
#define DEFAULT_LIFETIME 600

struct buf {
    size_t off, len;
    char data[BUFSZ];
};

struct pair {
    int id;
    int cfd, sfd;       /* client side, server (target) side; -1 closed */
    int connecting;     /* the connect to the target is in progress */
    int c_eof, s_eof;   /* that side sent EOF */
    int c_shut, s_shut; /* we shut down writing to that side */
    int sent_epoch;     /* arm_epoch when bytes last went to the target */
    int hup_gen;        /* hup_count when the connection was accepted */
    int cidx, sidx;     /* index in the pollfd array, -1 not polled */
    struct buf c2s, s2c;
};

/* Set by the signal handlers only; read by the loop. */
static volatile sig_atomic_t arm_epoch;   /* SIGUSR1 count */
static volatile sig_atomic_t stall_count; /* SIGUSR2 count: odd = stalled */
static volatile sig_atomic_t hup_count;   /* SIGHUP count */
static volatile sig_atomic_t term_sig;    /* SIGTERM or SIGINT received */

static int wake_pipe[2] = {-1, -1};

static struct pair **pairs;
static size_t npairs, cap_pairs;
static int next_id = 1;
static int cut_epoch;         /* arm_epoch already used by a cut */
static int seen_arm;          /* arm_epoch already logged */
static int seen_stall;        /* stall_count already logged */
static int hup_done;          /* hup_count already acted on */
static const char *cut_match; /* FAULTPROXY_CUT_MATCH, or NULL */
static struct sockaddr_storage target;
static socklen_t target_len;

static void on_signal(int sig)
{
    int saved = errno;
    char c = 0;
    switch (sig) {
    case SIGUSR1: arm_epoch++; break;
    case SIGUSR2: stall_count++; break;
    case SIGHUP: hup_count++; break;
    default: term_sig = sig; break;
    }
    if (write(wake_pipe[1], &c, 1) < 0) {
        /* the pipe is full: the loop wakes up anyway */
    }
    errno = saved;
}

static int stalled(void)
{
    return stall_count & 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    return 0;
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Closes a socket so the peer sees EOF (or a reset if data was unread). */
static void hard_close(int *fd)
{
    if (*fd >= 0) {
        shutdown(*fd, SHUT_RDWR);
        close(*fd);
        *fd = -1;
    }
}

static void close_pair(struct pair *p, const char *why)
{
    if (p->cfd < 0 && p->sfd < 0)
        return;
    if (why)
        fprintf(stderr, "faultproxy: connection %d closed (%s)\n", p->id, why);
    hard_close(&p->cfd);
    hard_close(&p->sfd);
}

static int is_open(const struct pair *p)
{
    return p->cfd >= 0 || p->sfd >= 0;
}

static void fail_pair(struct pair *p, const char *what, int err)
{
    char why[160];
    snprintf(why, sizeof why, "%s: %s", what, strerror(err));
    close_pair(p, why);
}

/* Starts the connect to the target; 0, or -1 when it failed at once. */
static int start_connect(struct pair *p)
{
    int fd = socket(target.ss_family, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (set_nonblock(fd) < 0) {
        close(fd);
        return -1;
    }
    set_nodelay(fd);
    p->sfd = fd;
    if (connect(fd, (struct sockaddr *)&target, target_len) == 0) {
        p->connecting = 0;
        return 0;
    }
    if (errno == EINPROGRESS || errno == EINTR) {
        p->connecting = 1;
        return 0;
    }
    return -1;
}

static void accept_all(int lfd)
{
    for (;;) {
        struct pair *p;
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK &&
                errno != ECONNABORTED)
                fprintf(stderr, "faultproxy: accept: %s\n", strerror(errno));
            if (errno == ECONNABORTED)
                continue;
            return;
        }
        if (set_nonblock(fd) < 0) {
            close(fd);
            continue;
        }
        set_nodelay(fd);
        if (npairs == cap_pairs) {
            size_t ncap = cap_pairs ? cap_pairs * 2 : 16;
            struct pair **np = realloc(pairs, ncap * sizeof *np);
            if (!np) {
                fprintf(stderr, "faultproxy: out of memory\n");
                close(fd);
                return;
            }
            pairs = np;
            cap_pairs = ncap;
        }
        p = calloc(1, sizeof *p);
        if (!p) {
            fprintf(stderr, "faultproxy: out of memory\n");
            close(fd);
            return;
        }
        p->id = next_id++;
        p->cfd = fd;
        p->sfd = -1;
        p->hup_gen = hup_count;
        p->sent_epoch = -1;
        p->cidx = p->sidx = -1;
        pairs[npairs++] = p;
        if (start_connect(p) < 0) {
            int err = errno;
            fprintf(stderr, "faultproxy: connection %d opened\n", p->id);
            fail_pair(p, "connect to target", err);
            continue;
        }
        fprintf(stderr, "faultproxy: connection %d opened\n", p->id);
    }
}

/* Removes the closed pairs from the table. */
static void reap_pairs(void)
{
    size_t i, j = 0;
    for (i = 0; i < npairs; i++) {
        if (is_open(pairs[i]))
            pairs[j++] = pairs[i];
        else
            free(pairs[i]);
    }
    npairs = j;
}

static void close_all(const char *why)
{
    size_t i;
    for (i = 0; i < npairs; i++)
        close_pair(pairs[i], why);
    reap_pairs();
}

/* Acts on the signals received since the last call. */
static void handle_signals(void)
{
    char drain[64];
    while (read(wake_pipe[0], drain, sizeof drain) > 0)
        ;
    if (arm_epoch != seen_arm) {
        seen_arm = arm_epoch;
        fprintf(stderr, "faultproxy: cut armed (the next reply to a request "
                        "is dropped)\n");
    }
    if (stall_count != seen_stall) {
        seen_stall = stall_count;
        fprintf(stderr, "faultproxy: %s\n",
                stalled() ? "stalled (forwarding nothing)" : "resumed");
    }
    if (hup_count != hup_done) {
        int h = hup_count;
        size_t i, n = 0;
        for (i = 0; i < npairs; i++) {
            struct pair *p = pairs[i];
            if (is_open(p) && p->hup_gen < h) {
                close_pair(p, NULL);
                n++;
            }
        }
        hup_done = h;
        reap_pairs();
        fprintf(stderr, "faultproxy: dropped %zu connection%s\n", n,
                n == 1 ? "" : "s");
    }
}

/* Reads from fd into b while there is room; returns 0, or -1 with errno
 * (the caller closes the pair). Sets *eof on EOF. */
static int fill(int fd, struct buf *b, int *eof)
{
    for (;;) {
        ssize_t n;
        if (b->len == 0)
            b->off = 0;
        if (b->off + b->len == BUFSZ && b->off > 0) {
            memmove(b->data, b->data + b->off, b->len);
            b->off = 0;
        }
        if (b->off + b->len == BUFSZ)
            return 0;
        n = recv(fd, b->data + b->off + b->len, BUFSZ - b->off - b->len, 0);
        if (n > 0) {
            b->len += (size_t)n;
            return 0;
        }
        if (n == 0) {
            *eof = 1;
            return 0;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return -1;
    }
}

/* Writes what b holds to fd; returns the bytes written, or -1 with errno. */
/* Whether the n bytes at p contain the text t. */
static int contains(const char *p, size_t n, const char *t)
{
    size_t k = strlen(t);
    for (size_t i = 0; k && i + k <= n; i++)
        if (memcmp(p + i, t, k) == 0)
            return 1;
    return 0;
}

static ssize_t drain(int fd, struct buf *b)
{
    ssize_t total = 0;
    while (b->len > 0) {
        ssize_t n = send(fd, b->data + b->off, b->len, MSG_NOSIGNAL);
        if (n > 0) {
            b->off += (size_t)n;
            b->len -= (size_t)n;
            total += n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        return -1;
    }
    if (b->len == 0)
        b->off = 0;
    return total;
}

/* The cut: reads what the target sent, discards it, closes the pair. Returns
 * 1 if the pair was cut, 0 if the target sent nothing (or EOF). */
static int try_cut(struct pair *p, int epoch)
{
    char scratch[BUFSZ];
    ssize_t n;
    do {
        n = recv(p->sfd, scratch, sizeof scratch, 0);
    } while (n < 0 && errno == EINTR);
    if (n == 0) {
        p->s_eof = 1;
        return 0;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        fail_pair(p, "read from target", errno);
        return 1;
    }
    cut_epoch = epoch;
    fprintf(stderr, "faultproxy: cut connection %d after %zd reply bytes\n",
            p->id, n);
    close_pair(p, "cut");
    return 1;
}

/* One pair's I/O after poll: revents of its client and server sockets. */
static void service(struct pair *p, short crev, short srev)
{
    short readable = POLLIN | POLLHUP | POLLERR;
    if (p->connecting && (srev & (POLLOUT | POLLERR | POLLHUP))) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(p->sfd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err) {
            fail_pair(p, "connect to target", err);
            return;
        }
        p->connecting = 0;
        srev = 0;
    }
    if (p->connecting || stalled())
        return;
    /* client -> target */
    if ((crev & readable) && !p->c_eof) {
        if (fill(p->cfd, &p->c2s, &p->c_eof) < 0) {
            fail_pair(p, "read from client", errno);
            return;
        }
    }
    if (stalled())
        return;
    if (p->c2s.len > 0 && !p->s_shut) {
        int epoch = arm_epoch;
        size_t from = p->c2s.off;
        ssize_t n = drain(p->sfd, &p->c2s);
        if (n < 0) {
            fail_pair(p, "write to target", errno);
            return;
        }
        if (n > 0 &&
            (!cut_match || contains(p->c2s.data + from, (size_t)n, cut_match)))
            p->sent_epoch = epoch;
    }
    /* target -> client */
    if ((srev & readable) && !p->s_eof) {
        int epoch = arm_epoch;
        if (epoch != cut_epoch && p->sent_epoch == epoch) {
            if (try_cut(p, epoch))
                return;
        } else if (fill(p->sfd, &p->s2c, &p->s_eof) < 0) {
            fail_pair(p, "read from target", errno);
            return;
        }
    }
    if (stalled())
        return;
    if (p->s2c.len > 0 && !p->c_shut) {
        if (drain(p->cfd, &p->s2c) < 0) {
            fail_pair(p, "write to client", errno);
            return;
        }
    }
    /* half close: pass an EOF on once its direction is drained */
    if (p->c_eof && p->c2s.len == 0 && !p->s_shut) {
        shutdown(p->sfd, SHUT_WR);
        p->s_shut = 1;
    }
    if (p->s_eof && p->s2c.len == 0 && !p->c_shut) {
        shutdown(p->cfd, SHUT_WR);
        p->c_shut = 1;
    }
    if (p->c_shut && p->s_shut)
        close_pair(p, "EOF both ways");
}

static short client_events(const struct pair *p)
{
    short ev = 0;
    if (p->connecting || stalled())
        return 0;
    if (!p->c_eof && p->c2s.len < BUFSZ)
        ev |= POLLIN;
    if (p->s2c.len > 0)
        ev |= POLLOUT;
    return ev;
}

static short server_events(const struct pair *p)
{
    short ev = 0;
    if (p->connecting)
        return POLLOUT;
    if (stalled())
        return 0;
    if (!p->s_eof && p->s2c.len < BUFSZ)
        ev |= POLLIN;
    if (p->c2s.len > 0)
        ev |= POLLOUT;
    return ev;
}

static int resolve_target(const char *host, const char *port)
{
    struct addrinfo hints, *res, *ai, *pick = NULL;
    int rc;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "faultproxy: %s:%s: %s\n", host, port,
                gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET) {
            pick = ai;
            break;
        }
    }
    if (!pick)
        pick = res;
    memcpy(&target, pick->ai_addr, pick->ai_addrlen);
    target_len = pick->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static int parse_port(const char *s, long *out)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 0 || v > 65535)
        return -1;
    *out = v;
    return 0;
}

static int listen_on(long port, int *bound)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        listen(fd, 128) < 0 || set_nonblock(fd) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    *bound = ntohs(sa.sin_port);
    return fd;
}

static int write_pidfile(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "%ld\n", (long)getpid());
    return fclose(f);
}

static void install_signals(void)
{
    struct sigaction sa;
    int sigs[] = {SIGUSR1, SIGUSR2, SIGHUP, SIGTERM, SIGINT};
    size_t i;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaddset(&sa.sa_mask, sigs[i]);
    sa.sa_handler = on_signal;
    for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaction(sigs[i], &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
}

int main(int argc, char **argv)
{
    long lport;
    int lfd, bound;
    double lifetime = DEFAULT_LIFETIME, deadline;
    cut_match = getenv("FAULTPROXY_CUT_MATCH");
    if (cut_match && !*cut_match)
        cut_match = NULL;
    const char *env = getenv("FAULTPROXY_LIFETIME");
    struct pollfd *pfds = NULL;
    size_t cap_pfds = 0;
    int status = 0;

    if (argc != 5 || parse_port(argv[1], &lport) < 0) {
        fprintf(stderr, "usage: faultproxy LISTEN_PORT TARGET_HOST "
                        "TARGET_PORT PIDFILE\n");
        return 2;
    }
    if (env && *env) {
        char *end;
        double v = strtod(env, &end);
        if (*end == '\0' && v > 0)
            lifetime = v;
    }
    if (resolve_target(argv[2], argv[3]) < 0)
        return 2;
    if (pipe(wake_pipe) < 0 || set_nonblock(wake_pipe[0]) < 0 ||
        set_nonblock(wake_pipe[1]) < 0) {
        fprintf(stderr, "faultproxy: pipe: %s\n", strerror(errno));
        return 2;
    }
    install_signals();
    lfd = listen_on(lport, &bound);
    if (lfd < 0) {
        fprintf(stderr, "faultproxy: listen on 127.0.0.1:%ld: %s\n", lport,
                strerror(errno));
        return 2;
    }
    if (write_pidfile(argv[4]) < 0) {
        fprintf(stderr, "faultproxy: %s: %s\n", argv[4], strerror(errno));
        close(lfd);
        return 2;
    }
    printf("port %d\n", bound);
    fflush(stdout);
    fprintf(stderr, "faultproxy: pid %ld listening on 127.0.0.1:%d -> %s:%s\n",
            (long)getpid(), bound, argv[2], argv[3]);
    deadline = now() + lifetime;

    while (!term_sig) {
        size_t i, n;
        double left;
        int rc, timeout;

        handle_signals();
        if (term_sig)
            break;
        left = deadline - now();
        if (left <= 0) {
            fprintf(stderr, "faultproxy: lifetime of %g s over, exiting\n",
                    lifetime);
            break;
        }
        timeout = left > 1.0 ? 1000 : (int)(left * 1000) + 1;

        if (cap_pfds < 2 + 2 * npairs) {
            size_t ncap = 2 + 2 * (npairs > 16 ? npairs * 2 : 16);
            struct pollfd *np = realloc(pfds, ncap * sizeof *np);
            if (!np) {
                fprintf(stderr, "faultproxy: out of memory\n");
                status = 1;
                break;
            }
            pfds = np;
            cap_pfds = ncap;
        }
        pfds[0].fd = wake_pipe[0];
        pfds[0].events = POLLIN;
        pfds[1].fd = lfd;
        pfds[1].events = POLLIN;
        n = 2;
        for (i = 0; i < npairs; i++) {
            struct pair *p = pairs[i];
            short ce = client_events(p), se = server_events(p);
            p->cidx = p->sidx = -1;
            if (ce) {
                p->cidx = (int)n;
                pfds[n].fd = p->cfd;
                pfds[n].events = ce;
                n++;
            }
            if (se) {
                p->sidx = (int)n;
                pfds[n].fd = p->sfd;
                pfds[n].events = se;
                n++;
            }
        }
        for (i = 0; i < n; i++)
            pfds[i].revents = 0;
        rc = poll(pfds, (nfds_t)n, timeout);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "faultproxy: poll: %s\n", strerror(errno));
            status = 1;
            break;
        }
        /* A drop or a stall received during poll comes first. */
        handle_signals();
        if (term_sig)
            break;
        for (i = 0; i < npairs; i++) {
            struct pair *p = pairs[i];
            short crev = p->cidx >= 0 ? pfds[p->cidx].revents : 0;
            short srev = p->sidx >= 0 ? pfds[p->sidx].revents : 0;
            if (is_open(p) && (crev || srev))
                service(p, crev, srev);
        }
        reap_pairs();
        if (pfds[1].revents & POLLIN)
            accept_all(lfd);
    }

    if (term_sig)
        fprintf(stderr, "faultproxy: %s, exiting\n",
                term_sig == SIGINT ? "SIGINT" : "SIGTERM");
    close_all(NULL);
    free(pairs);
    free(pfds);
    close(lfd);
    close(wake_pipe[0]);
    close(wake_pipe[1]);
    unlink(argv[4]);
    return status;
}
