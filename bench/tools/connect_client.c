/* A minimal WebSocket crowd for measuring the server's cost per connect + join (issue 19).

   cc -O2 -o connect_client connect_client.c
   connect_client HOST PORT CLIENTS IN_FLIGHT ROOMS PATH

   One thread, epoll, no TLS, next to no work per connection, so that what a profiler of the
   server sees is the server's. Commands, one per line on stdin, each answered on stdout:

     connect  open CLIENTS connections, at most IN_FLIGHT handshakes in flight; each sends the
              upgrade request, waits for the 101 and the welcome (the first text frame), sends
              {"type":"join","room":"r<i % ROOMS>","id":"j"} and waits for its ack (a text frame
              with "ack" in it). Answers "joined <clients> <seconds>".
     close    every connection sends a close frame (1000), waits for the server's close frame and
              its FIN, then closes. Answers "closed <clients> <seconds>".
     drop     every connection is closed at once (FIN, no close frame). Answers "dropped <clients>".
     quit     exit.

   Any failure (a refused upgrade, an error reply, a reset) ends the program with exit code 1 and
   a line on stderr: this is a measuring tool, a failed connect would make the figure wrong.
   Client frames are masked with the all-zero key (RFC 6455 5.3 requires a mask, not a random
   one); the upgrade request's key is fixed (the answer's accept hash is not checked). */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, WAIT_101, WAIT_ACK, JOINED, CLOSING, DONE };

typedef struct {
    int fd;
    int state;
    int len;
    char buf[4096];
} conn_t;

static conn_t *conns;
static int n_clients, in_flight_max, n_rooms;
static struct sockaddr_in addr;
static char request[512];
static int request_len;
static int ep;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(int i, const char *what) {
    fprintf(stderr, "connect_client: connection %d: %s (errno %d: %s)\n", i, what, errno, strerror(errno));
    exit(1);
}

static void send_all(int i, const char *data, int n) {
    while (n > 0) {
        ssize_t w = write(conns[i].fd, data, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            die(i, "write");  /* requests and joins are tiny: the socket buffer always takes them */
        }
        data += w;
        n -= w;
    }
}

static void send_join(int i) {
    char payload[128], frame[160];
    int n = snprintf(payload, sizeof payload, "{\"type\":\"join\",\"room\":\"r%d\",\"id\":\"j\"}", i % n_rooms);
    frame[0] = (char)0x81;
    frame[1] = (char)(0x80 | n);
    memset(frame + 2, 0, 4);
    memcpy(frame + 6, payload, n);
    send_all(i, frame, n + 6);
}

static void start(int i) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die(i, "socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    conns[i].fd = fd;
    conns[i].len = 0;
    conns[i].state = CONNECTING;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) die(i, "connect");
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (unsigned)i};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die(i, "epoll_ctl add");
}

/* Parse whole frames in the buffer; returns 1 when the connection reached the state it waits for. */
static int frames(int i) {
    conn_t *c = &conns[i];
    int pos = 0, reached = 0;
    while (c->len - pos >= 2) {
        unsigned char *p = (unsigned char *)c->buf + pos;
        int op = p[0] & 0x0F, size = p[1] & 0x7F, head = 2;
        if (size == 126) {
            if (c->len - pos < 4) break;
            size = (p[2] << 8) | p[3];
            head = 4;
        } else if (size == 127) {
            die(i, "frame over 64 KiB");
        }
        if (c->len - pos < head + size) {
            if (head + size > (int)sizeof c->buf) die(i, "frame larger than the buffer");
            break;
        }
        char *payload = (char *)p + head;
        if (op == 1) {
            if (c->state == WAIT_ACK && memmem(payload, size, "\"ack\"", 5)) {
                c->state = JOINED;
                reached = 1;
            } else if (memmem(payload, size, "\"error\"", 7)) {
                fprintf(stderr, "%.*s\n", size, payload);
                die(i, "error reply");
            }
        } else if (op == 9) { /* ping: pong with its payload (under 126 bytes) */
            char pong[140] = {(char)0x8A, (char)(0x80 | size), 0, 0, 0, 0};
            memcpy(pong + 6, payload, size);
            send_all(i, pong, size + 6);
        } else if (op == 8) {
            if (c->state != CLOSING) die(i, "closed by the server");
            reached = 1; /* the server's close frame: its FIN follows */
        }
        pos += head + size;
    }
    memmove(c->buf, c->buf + pos, c->len - pos);
    c->len -= pos;
    return reached;
}

/* Read what is there; returns -1 at EOF, else 1 when the awaited state was reached. */
static int readable(int i) {
    conn_t *c = &conns[i];
    int reached = 0;
    for (;;) {
        ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
        if (r == 0) return -1;
        if (r < 0) {
            if (errno == EAGAIN) return reached;
            if (errno == EINTR) continue;
            die(i, "read");
        }
        c->len += r;
        if (c->state == WAIT_101) {
            char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
            if (end == NULL) {
                if (c->len == (int)sizeof c->buf) die(i, "response head too large");
                continue;
            }
            if (strncmp(c->buf, "HTTP/1.1 101", 12) != 0) {
                fprintf(stderr, "%.*s\n", (int)(end - c->buf), c->buf);
                die(i, "upgrade refused");
            }
            int head = (int)(end - c->buf) + 4;
            memmove(c->buf, c->buf + head, c->len - head);
            c->len -= head;
            c->state = WAIT_ACK;
            send_join(i);
        }
        if (c->state != WAIT_101) reached |= frames(i);
    }
}

static void connect_all(void) {
    double t0 = now();
    int started = 0, joined = 0, in_flight = 0;
    struct epoll_event evs[256];
    while (joined < n_clients) {
        while (in_flight < in_flight_max && started < n_clients) {
            start(started++);
            in_flight++;
        }
        int n = epoll_wait(ep, evs, 256, 10000);
        if (n == 0) die(-1, "no progress for 10 s");
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            conn_t *c = &conns[i];
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    errno = err;
                    die(i, "connect");
                }
                c->state = WAIT_101;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)i};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                send_all(i, request, request_len);
                continue;
            }
            int r = readable(i);
            if (r < 0) die(i, "closed by the server");
            if (r > 0 && c->state == JOINED) {
                joined++;
                in_flight--;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); /* idle from now on: not polled */
            }
        }
    }
    printf("joined %d %.6f\n", joined, now() - t0);
    fflush(stdout);
}

static void close_all(int graceful) {
    double t0 = now();
    if (!graceful) {
        for (int i = 0; i < n_clients; i++) close(conns[i].fd);
        printf("dropped %d\n", n_clients);
        fflush(stdout);
        return;
    }
    static const char close_frame[] = {(char)0x88, (char)0x82, 0, 0, 0, 0, 0x03, (char)0xE8};
    for (int i = 0; i < n_clients; i++) {
        conns[i].state = CLOSING;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (unsigned)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev) < 0) die(i, "epoll_ctl add");
        send_all(i, close_frame, sizeof close_frame);
    }
    int left = n_clients;
    struct epoll_event evs[256];
    while (left > 0) {
        int n = epoll_wait(ep, evs, 256, 10000);
        if (n == 0) die(-1, "close: no progress for 10 s");
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            if (conns[i].state == DONE) continue;
            if (readable(i) < 0) { /* the server's FIN after its close frame */
                conns[i].state = DONE;
                close(conns[i].fd);
                left--;
            }
        }
    }
    printf("closed %d %.6f\n", n_clients, now() - t0);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT CLIENTS IN_FLIGHT ROOMS PATH\n", argv[0]);
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "not an IPv4 address: %s\n", argv[1]);
        return 2;
    }
    n_clients = atoi(argv[3]);
    in_flight_max = atoi(argv[4]);
    n_rooms = atoi(argv[5]);
    if (n_clients < 1 || in_flight_max < 1 || n_rooms < 1) {
        fprintf(stderr, "CLIENTS, IN_FLIGHT and ROOMS must be positive\n");
        return 2;
    }
    request_len = snprintf(request, sizeof request,
                           "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                           argv[6], argv[1], argv[2]);
    conns = calloc((size_t)n_clients, sizeof *conns);
    ep = epoll_create1(0);
    if (conns == NULL || ep < 0) die(-1, "setup");
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "connect", 7) == 0) connect_all();
        else if (strncmp(line, "close", 5) == 0) close_all(1);
        else if (strncmp(line, "drop", 4) == 0) close_all(0);
        else if (strncmp(line, "quit", 4) == 0) break;
        else {
            fprintf(stderr, "unknown command: %s", line);
            return 2;
        }
    }
    return 0;
}
