/* Yardstick for `multiecho bench`: a hand-written single-threaded epoll echo client.
 * N connections to 127.0.0.1:PORT, pipeline 1, SIZE-byte messages; each connection sends a
 * message, reads until SIZE bytes came back (short reads are normal), counts one round trip
 * and sends the next. Level-triggered epoll, one read per readiness event. It checks that
 * exactly SIZE bytes come back per message (length only, not content: it is the baseline,
 * doing the least work a correct client can do).
 * usage: c_epoll_client PORT CONNS SIZE SECS
 * prints: round_trips=N secs=S per_sec=R */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct conn { int fd; size_t got; };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(1); }

/* Sends one whole message; a message fits the socket buffer, so EAGAIN is rare. */
static void send_message(int fd, const char *msg, size_t size) {
    size_t off = 0;
    while (off < size) {
        ssize_t w = write(fd, msg + off, size - off);
        if (w > 0) off += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EINTR) die("write");
    }
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s PORT CONNS SIZE SECS\n", argv[0]); return 2; }
    int port = atoi(argv[1]), nconns = atoi(argv[2]);
    size_t size = (size_t)atol(argv[3]);
    double secs = atof(argv[4]);
    if (nconns < 1 || size < 1 || secs <= 0) { fprintf(stderr, "bad arguments\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    char *msg = malloc(size), *buf = malloc(size);
    for (size_t i = 0; i < size; i++) msg[i] = (char)(i * 31 + 7);
    struct conn *conns = calloc((size_t)nconns, sizeof *conns);
    int ep = epoll_create1(0), one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    for (int i = 0; i < nconns; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) die("socket");
        if (connect(fd, (struct sockaddr *)&a, sizeof a)) die("connect");
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        conns[i].fd = fd;
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &conns[i] };
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    struct epoll_event evs[512];
    unsigned long long round_trips = 0;
    double start = now(), end = start + secs, t = start;
    for (int i = 0; i < nconns; i++) send_message(conns[i].fd, msg, size);
    while (t < end) {
        int n = epoll_wait(ep, evs, 512, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            ssize_t r = read(c->fd, buf, size - c->got);
            if (r == 0) { fprintf(stderr, "unexpected EOF\n"); return 1; }
            if (r < 0) { if (errno == EAGAIN || errno == EINTR) continue; die("read"); }
            c->got += (size_t)r;
            if (c->got == size) {
                c->got = 0;
                round_trips++;
                send_message(c->fd, msg, size);
            }
        }
        t = now();
    }
    double took = t - start;
    printf("round_trips=%llu secs=%.3f per_sec=%.0f\n", round_trips, took, round_trips / took);
    return 0;
}
