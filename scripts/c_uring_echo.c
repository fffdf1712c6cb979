/* An io_uring echo server in C, built to find the least server CPU per round trip that
 * io_uring can reach on this machine: everything the literature recommends for small
 * request/response traffic, and nothing else.
 *   - one ring, SINGLE_ISSUER | DEFER_TASKRUN (completions run only when we wait);
 *   - multishot accept into direct descriptors (no fget/fput per operation);
 *   - one multishot recv per connection with a provided-buffer ring (no submission per
 *     message, no poll re-arming);
 *   - the echo is a send from the received buffer, which goes back to the ring once sent;
 *   - one io_uring_enter per loop turn both submits and waits.
 * It is a measuring instrument, not a server: no limits, no backpressure (a client that does
 * not read can take every buffer), at most 4096 connections, loopback only. Built and run by
 * scripts/benchmarks.sh (needs liburing-dev).
 * usage: c_uring_echo PORT */
#define _GNU_SOURCE
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define FILES 4096
#define BUFS 1024
#define BUF_SIZE 16384
#define BGID 0

enum { ACCEPT = 1, RECV = 2, SEND = 3 };
/* user_data: kind (4 bits) | direct descriptor (16) | buffer id (12) | bytes already sent (15)
 * | length (15) */
static unsigned long long pack(int kind, int fd, int bid, int sent, int len) {
    return (unsigned long long)kind << 58 | (unsigned long long)fd << 42 |
           (unsigned long long)bid << 30 | (unsigned long long)sent << 15 | (unsigned)len;
}

static struct io_uring ring;
static struct io_uring_buf_ring *br;
static char *bufs;

static struct io_uring_sqe *sqe(void) {
    struct io_uring_sqe *s = io_uring_get_sqe(&ring);
    if (!s) { io_uring_submit(&ring); s = io_uring_get_sqe(&ring); }
    return s;
}

static void arm_recv(int fd) {
    struct io_uring_sqe *s = sqe();
    io_uring_prep_recv_multishot(s, fd, NULL, 0, 0);
    s->flags |= IOSQE_FIXED_FILE | IOSQE_BUFFER_SELECT;
    s->buf_group = BGID;
    io_uring_sqe_set_data64(s, pack(RECV, fd, 0, 0, 0));
}

static void send_buf(int fd, int bid, int off, int len) {
    struct io_uring_sqe *s = sqe();
    io_uring_prep_send(s, fd, bufs + (size_t)bid * BUF_SIZE + off, len - off, MSG_NOSIGNAL);
    s->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(s, pack(SEND, fd, bid, off, len));
}

static void give_back(int bid) {
    io_uring_buf_ring_add(br, bufs + (size_t)bid * BUF_SIZE, BUF_SIZE, bid,
                          io_uring_buf_ring_mask(BUFS), 0);
    io_uring_buf_ring_advance(br, 1);
}

static void close_direct(int fd) {
    struct io_uring_sqe *s = sqe();
    io_uring_prep_close_direct(s, fd);
    io_uring_sqe_set_data64(s, pack(0, 0, 0, 0, 0));
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s PORT\n", argv[0]); return 2; }
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* accepted sockets inherit TCP_NODELAY from the listener */
    setsockopt(ls, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) { perror("bind/listen"); return 1; }

    struct io_uring_params p = { .flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
                                          IORING_SETUP_CQSIZE, .cq_entries = 16384 };
    int ret = io_uring_queue_init_params(4096, &ring, &p);
    if (ret) { fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-ret)); return 1; }
    if ((ret = io_uring_register_files_sparse(&ring, FILES))) {
        fprintf(stderr, "register files: %s\n", strerror(-ret)); return 1;
    }
    br = aligned_alloc(4096, BUFS * sizeof(struct io_uring_buf));
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = { .ring_addr = (unsigned long)br, .ring_entries = BUFS, .bgid = BGID };
    if ((ret = io_uring_register_buf_ring(&ring, &reg, 0))) {
        fprintf(stderr, "buf ring: %s\n", strerror(-ret)); return 1;
    }
    bufs = aligned_alloc(4096, (size_t)BUFS * BUF_SIZE);
    for (int i = 0; i < BUFS; i++)
        io_uring_buf_ring_add(br, bufs + (size_t)i * BUF_SIZE, BUF_SIZE, i, io_uring_buf_ring_mask(BUFS), i);
    io_uring_buf_ring_advance(br, BUFS);

    struct io_uring_sqe *s = sqe();
    io_uring_prep_multishot_accept_direct(s, ls, NULL, NULL, 0);
    io_uring_sqe_set_data64(s, pack(ACCEPT, 0, 0, 0, 0));

    for (;;) {
        ret = io_uring_submit_and_wait(&ring, 1);
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
            fprintf(stderr, "enter: %s\n", strerror(-ret)); return 1;
        }
        struct io_uring_cqe *c;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, c) {
            seen++;
            unsigned long long ud = c->user_data;
            int kind = ud >> 58, fd = (ud >> 42) & 0xffff, bid = (ud >> 30) & 0xfff;
            int res = c->res;
            if (kind == ACCEPT) {
                if (res >= 0) arm_recv(res);
                if (!(c->flags & IORING_CQE_F_MORE)) {
                    s = sqe();
                    io_uring_prep_multishot_accept_direct(s, ls, NULL, NULL, 0);
                    io_uring_sqe_set_data64(s, pack(ACCEPT, 0, 0, 0, 0));
                }
            } else if (kind == RECV) {
                if (res > 0 && (c->flags & IORING_CQE_F_BUFFER)) {
                    send_buf(fd, c->flags >> IORING_CQE_BUFFER_SHIFT, 0, res);
                    if (!(c->flags & IORING_CQE_F_MORE)) arm_recv(fd);
                } else if (res == -ENOBUFS) {
                    arm_recv(fd); /* a prototype: retry at once */
                } else {
                    if (c->flags & IORING_CQE_F_BUFFER) give_back(c->flags >> IORING_CQE_BUFFER_SHIFT);
                    close_direct(fd);
                }
            } else if (kind == SEND) {
                int len = ud & 0x7fff, sent_before = (ud >> 15) & 0x7fff;
                if (res > 0 && sent_before + res < len) send_buf(fd, bid, sent_before + res, len);
                else give_back(bid);
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
}
