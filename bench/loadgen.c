/*
 * loadgen: a lean WebSocket receiving client for bench/bench_bridge.py.
 *
 * One process, one epoll loop, N connections to ws://HOST:PORT/PATH. It performs the
 * RFC 6455 handshake by hand, then only parses frame headers and counts frames, so that
 * the server under test, not the client, is the bottleneck. Written in C because a Python
 * client would need more CPU per frame than the server it measures.
 *
 * Usage: loadgen HOST PORT PATH CONNECTIONS LATENCY_CONNECTIONS [MAX_CONNECTING [NAP_US]]
 *
 * NAP_US > 0 makes the loop sleep that long after each round of ready connections, so
 * that frames accumulate and one read() takes many: a fan-out client then costs far less
 * CPU per frame (on 2 cores the client competes with the server) at the price of up to
 * NAP_US of added latency. Latency runs use 0.
 *
 * Frames are classified by the prefix of their text payload:
 *   {"type":"market_data"   a measured event; its payload ends with ,"seq":N} and its data
 *                          holds "pub_ns":<publish time, ns since the Unix epoch>
 *   {"type":"bench_warmup"  a warm-up event (proves the path is live for a connection)
 *   anything else           a control message of the server (counted, otherwise ignored)
 * Latency (CLOCK_REALTIME now - pub_ns) is sampled on the first LATENCY_CONNECTIONS
 * connections only, so its cost stays out of the fan-out figures.
 *
 * Commands on stdin, one per line, answers on stdout, one line each:
 *   EXPECT n first_seq  start a trial: count events with seq >= first_seq; print
 *                       "DONE" once every open connection has n of them
 *   REPORT              print the trial's figures as one JSON object
 *   STAT                print "STAT frames events stale warm open closed"
 *   WARM                reset warm-up counters; print "WARMED" once every open
 *                       connection has received a warm-up event since
 *   QUIT                close everything and exit
 * On start it prints "READY open failed" when every connection is open or has failed.
 * Server pings are answered with pongs so that heartbeats do not close idle connections.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { CONNECTING, HANDSHAKING, OPEN, CLOSED };

struct conn {
    int fd;
    int index;
    enum state state;
    unsigned char *left; /* bytes of an incomplete frame (or handshake) kept between reads */
    size_t left_len, left_cap;
    uint64_t events, warm;
    int done, warmed;
};

static const char EVENT_PREFIX[] = "{\"type\":\"market_data\"";
static const char WARM_PREFIX[] = "{\"type\":\"bench_warmup\"";
static const char PUB_NS_KEY[] = "\"pub_ns\":";
static const char SEQ_KEY[] = "\"seq\":";

#define READ_SIZE (256 * 1024)
#define MAX_CLOSE_CODES 16

static struct conn *conns;
static int n_conns, latency_conns, max_connecting, nap_us;
static int epfd;
static struct sockaddr_in server;
static char request[1024];
static size_t request_len;
static unsigned char *work;
static size_t work_cap;

static int next_to_start, connecting, open_count, failed_count, closed_count, ready_printed;
static int first_error;
static uint64_t frames_total, control_frames, stale_events, warm_total, events_total;

/* trial state */
static int expecting;
static uint64_t expect_n, first_seq;
static int done_count, done_printed;
static int warming, warmed_count;
static int64_t first_event_ns, last_event_ns, trial_start_ns;
static struct rusage trial_usage;
static int64_t *samples;
static size_t n_samples, samples_cap;
static int close_codes[MAX_CLOSE_CODES], close_code_counts[MAX_CLOSE_CODES], n_close_codes;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void say(const char *line) {
    fputs(line, stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

static void check_ready(void) {
    if (!ready_printed && open_count + failed_count + closed_count == n_conns) {
        ready_printed = 1;
        printf("READY %d %d", open_count, failed_count);
        if (failed_count)
            printf(" errno=%d", first_error);
        printf("\n");
        fflush(stdout);
    }
}

static void check_done(void) {
    if (expecting && !done_printed && open_count > 0 && done_count >= open_count) {
        done_printed = 1;
        say("DONE");
    }
}

static void check_warmed(void) {
    if (warming && open_count > 0 && warmed_count >= open_count) {
        warming = 0;
        say("WARMED");
    }
}

static void record_close_code(int code) {
    for (int i = 0; i < n_close_codes; i++) {
        if (close_codes[i] == code) {
            close_code_counts[i]++;
            return;
        }
    }
    if (n_close_codes < MAX_CLOSE_CODES) {
        close_codes[n_close_codes] = code;
        close_code_counts[n_close_codes++] = 1;
    }
}

static void start_connections(void);

static void drop(struct conn *c, int failed, int err) {
    if (c->state == CLOSED)
        return;
    if (c->state == OPEN) {
        open_count--;
        closed_count++;
        if (c->done)
            done_count--;
        if (c->warmed)
            warmed_count--;
    } else {
        connecting--;
        if (failed) {
            failed_count++;
            if (!first_error)
                first_error = err;
        } else {
            closed_count++;
        }
    }
    c->state = CLOSED;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->left);
    c->left = NULL;
    c->left_len = c->left_cap = 0;
    start_connections();
    check_ready();
    check_done();
    check_warmed();
}

static void start_connections(void) {
    while (next_to_start < n_conns && connecting < max_connecting) {
        struct conn *c = &conns[next_to_start];
        c->index = next_to_start++;
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (c->fd < 0) {
            c->state = CLOSED;
            failed_count++;
            if (!first_error)
                first_error = errno;
            continue;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->state = CONNECTING;
        connecting++;
        struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
        if (connect(c->fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS)
            drop(c, 1, errno);
    }
}

static void on_writable(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        drop(c, 1, err);
        return;
    }
    /* the request is far below the socket buffer: one write sends it whole */
    if (write(c->fd, request, request_len) != (ssize_t)request_len) {
        drop(c, 1, errno);
        return;
    }
    c->state = HANDSHAKING;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void send_pong(struct conn *c, const unsigned char *payload, size_t len) {
    unsigned char frame[2 + 4 + 125];
    if (len > 125)
        len = 125;
    frame[0] = 0x8A;
    frame[1] = 0x80 | (unsigned char)len; /* client frames must be masked; key 0 keeps bytes */
    memset(frame + 2, 0, 4);
    memcpy(frame + 6, payload, len);
    if (write(c->fd, frame, 6 + len) < 0 && errno != EAGAIN)
        drop(c, 0, errno);
}

static uint64_t parse_seq(const unsigned char *p, size_t len) {
    /* the payload ends with ,"seq":N} : walk back from the brace over the digits */
    size_t end = len;
    while (end > 0 && p[end - 1] != '}')
        end--;
    if (end == 0)
        return 0;
    size_t i = end - 1;
    while (i > 0 && p[i - 1] >= '0' && p[i - 1] <= '9')
        i--;
    if (i < sizeof SEQ_KEY - 1 || memcmp(p + i - (sizeof SEQ_KEY - 1), SEQ_KEY, sizeof SEQ_KEY - 1))
        return 0;
    uint64_t seq = 0;
    for (size_t k = i; k < end - 1; k++)
        seq = seq * 10 + (uint64_t)(p[k] - '0');
    return seq;
}

static void add_sample(int64_t value) {
    if (n_samples == samples_cap) {
        samples_cap = samples_cap ? samples_cap * 2 : 1 << 16;
        samples = realloc(samples, samples_cap * sizeof *samples);
        if (!samples) {
            perror("realloc");
            exit(1);
        }
    }
    samples[n_samples++] = value;
}

static void on_event(struct conn *c, const unsigned char *p, size_t len) {
    uint64_t seq = parse_seq(p, len);
    if (!expecting || seq < first_seq) {
        stale_events++;
        return;
    }
    int64_t now = now_ns();
    events_total++;
    if (!first_event_ns)
        first_event_ns = now;
    last_event_ns = now;
    if (c->index < latency_conns) {
        const unsigned char *key = memmem(p, len, PUB_NS_KEY, sizeof PUB_NS_KEY - 1);
        if (key) {
            int64_t published = strtoll((const char *)key + sizeof PUB_NS_KEY - 1, NULL, 10);
            add_sample(now - published);
        }
    }
    if (++c->events == expect_n) {
        c->done = 1;
        done_count++;
        check_done();
    }
}

/* Parses every complete frame in buf; returns the number of bytes consumed. */
static size_t parse_frames(struct conn *c, unsigned char *buf, size_t avail) {
    size_t pos = 0;
    while (avail - pos >= 2 && c->state == OPEN) {
        unsigned char *p = buf + pos;
        unsigned opcode = p[0] & 0x0f;
        uint64_t len = p[1] & 0x7f;
        size_t header = 2;
        if (len == 126) {
            if (avail - pos < 4)
                break;
            len = ((uint64_t)p[2] << 8) | p[3];
            header = 4;
        } else if (len == 127) {
            if (avail - pos < 10)
                break;
            len = 0;
            for (int i = 2; i < 10; i++)
                len = (len << 8) | p[i];
            header = 10;
        }
        if (p[1] & 0x80)
            header += 4; /* servers must not mask; tolerate it, the payload is not read */
        if (avail - pos < header + len)
            break;
        const unsigned char *payload = p + header;
        frames_total++;
        if (opcode == 0x1) {
            if (len >= sizeof EVENT_PREFIX - 1 &&
                memcmp(payload, EVENT_PREFIX, sizeof EVENT_PREFIX - 1) == 0) {
                on_event(c, payload, len);
            } else if (len >= sizeof WARM_PREFIX - 1 &&
                       memcmp(payload, WARM_PREFIX, sizeof WARM_PREFIX - 1) == 0) {
                warm_total++;
                c->warm++;
                if (warming && !c->warmed) {
                    c->warmed = 1;
                    warmed_count++;
                    check_warmed();
                }
            } else {
                control_frames++;
            }
        } else if (opcode == 0x9) {
            send_pong(c, payload, len);
        } else if (opcode == 0x8) {
            record_close_code(len >= 2 ? (payload[0] << 8) | payload[1] : 1005);
            drop(c, 0, 0);
            return avail;
        } else {
            control_frames++;
        }
        pos += header + len;
    }
    return pos;
}

static size_t on_handshake(struct conn *c, unsigned char *buf, size_t avail) {
    unsigned char *end = memmem(buf, avail, "\r\n\r\n", 4);
    if (!end)
        return 0;
    if (avail < 12 || memcmp(buf, "HTTP/1.1 101", 12) != 0) {
        int status = avail >= 12 ? atoi((const char *)buf + 9) : 0;
        drop(c, 1, status ? 10000 + status : EPROTO); /* errno above 10000 = HTTP status */
        return avail;
    }
    c->state = OPEN;
    connecting--;
    open_count++;
    start_connections();
    check_ready();
    return (size_t)(end + 4 - buf);
}

static void on_readable(struct conn *c) {
    size_t need = c->left_len + READ_SIZE;
    if (need > work_cap) {
        work_cap = need;
        work = realloc(work, work_cap);
        if (!work) {
            perror("realloc");
            exit(1);
        }
    }
    if (c->left_len)
        memcpy(work, c->left, c->left_len);
    ssize_t n = read(c->fd, work + c->left_len, READ_SIZE);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        if (c->state == OPEN)
            record_close_code(1006);
        drop(c, c->state != OPEN, n == 0 ? ECONNRESET : errno);
        return;
    }
    if (n < 0)
        return;
    size_t avail = c->left_len + (size_t)n, used = 0;
    if (c->state == HANDSHAKING)
        used = on_handshake(c, work, avail);
    if (c->state == OPEN)
        used += parse_frames(c, work + used, avail - used);
    if (c->state == CLOSED)
        return;
    size_t rest = avail - used;
    if (rest > c->left_cap) {
        c->left_cap = rest;
        c->left = realloc(c->left, c->left_cap);
        if (!c->left) {
            perror("realloc");
            exit(1);
        }
    }
    memmove(c->left, work + used, rest);
    c->left_len = rest;
}

static int compare_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double percentile_us(double q) {
    if (!n_samples)
        return -1;
    size_t i = (size_t)(q * (double)(n_samples - 1) + 0.5);
    return (double)samples[i] / 1000.0;
}

static double seconds(struct timeval t) { return (double)t.tv_sec + (double)t.tv_usec / 1e6; }

static void report(void) {
    struct rusage now_usage;
    getrusage(RUSAGE_SELF, &now_usage);
    uint64_t min_events = UINT64_MAX, max_events = 0;
    for (int i = 0; i < n_conns; i++) {
        if (conns[i].state != OPEN)
            continue;
        if (conns[i].events < min_events)
            min_events = conns[i].events;
        if (conns[i].events > max_events)
            max_events = conns[i].events;
    }
    if (min_events == UINT64_MAX)
        min_events = 0;
    qsort(samples, n_samples, sizeof *samples, compare_i64);
    printf("{\"open\":%d,\"closed\":%d,\"failed\":%d,\"events\":%llu,\"min_per_conn\":%llu,"
           "\"max_per_conn\":%llu,\"stale\":%llu,\"control\":%llu,\"frames\":%llu,"
           "\"first_event_ns\":%lld,\"last_event_ns\":%lld,\"trial_start_ns\":%lld,"
           "\"cpu_user_s\":%.4f,\"cpu_sys_s\":%.4f,\"samples\":%zu,"
           "\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f,"
           "\"close_codes\":{",
           open_count, closed_count, failed_count, (unsigned long long)events_total,
           (unsigned long long)min_events, (unsigned long long)max_events,
           (unsigned long long)stale_events, (unsigned long long)control_frames,
           (unsigned long long)frames_total, (long long)first_event_ns, (long long)last_event_ns,
           (long long)trial_start_ns,
           seconds(now_usage.ru_utime) - seconds(trial_usage.ru_utime),
           seconds(now_usage.ru_stime) - seconds(trial_usage.ru_stime), n_samples,
           percentile_us(0.50), percentile_us(0.90), percentile_us(0.99), percentile_us(0.999),
           n_samples ? (double)samples[n_samples - 1] / 1000.0 : -1.0);
    for (int i = 0; i < n_close_codes; i++)
        printf("%s\"%d\":%d", i ? "," : "", close_codes[i], close_code_counts[i]);
    printf("}}\n");
    fflush(stdout);
}

static void on_command(char *line) {
    unsigned long long n, seq;
    if (sscanf(line, "EXPECT %llu %llu", &n, &seq) == 2) {
        expecting = 1;
        expect_n = n;
        first_seq = seq;
        done_count = done_printed = 0;
        events_total = stale_events = control_frames = frames_total = 0;
        first_event_ns = last_event_ns = 0;
        trial_start_ns = now_ns();
        n_samples = 0;
        n_close_codes = 0;
        for (int i = 0; i < n_conns; i++)
            conns[i].events = conns[i].done = 0;
        getrusage(RUSAGE_SELF, &trial_usage);
        if (expect_n == 0)
            check_done();
    } else if (strncmp(line, "REPORT", 6) == 0) {
        report();
    } else if (strncmp(line, "STAT", 4) == 0) {
        printf("STAT %llu %llu %llu %llu %d %d\n", (unsigned long long)frames_total,
               (unsigned long long)events_total, (unsigned long long)stale_events,
               (unsigned long long)warm_total, open_count, closed_count);
        fflush(stdout);
    } else if (strncmp(line, "WARM", 4) == 0) {
        warming = 1;
        warmed_count = 0;
        for (int i = 0; i < n_conns; i++)
            conns[i].warmed = 0;
        check_warmed();
    } else if (strncmp(line, "QUIT", 4) == 0) {
        exit(0);
    } else {
        fprintf(stderr, "loadgen: unknown command: %s\n", line);
    }
}

static void on_stdin(void) {
    static char line[256];
    static size_t used;
    ssize_t n = read(0, line + used, sizeof line - 1 - used);
    if (n <= 0)
        exit(0); /* the bench went away: nothing left to report to */
    used += (size_t)n;
    char *start = line, *nl;
    while ((nl = memchr(start, '\n', used - (size_t)(start - line)))) {
        *nl = 0;
        on_command(start);
        start = nl + 1;
    }
    used -= (size_t)(start - line);
    memmove(line, start, used);
    if (used == sizeof line - 1)
        used = 0; /* an overlong line is garbage: drop it */
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr,
                "usage: %s HOST PORT PATH CONNECTIONS LATENCY_CONNECTIONS [MAX_CONNECTING "
                "[NAP_US]]\n",
                argv[0]);
        return 2;
    }
    n_conns = atoi(argv[4]);
    latency_conns = atoi(argv[5]);
    max_connecting = argc > 6 ? atoi(argv[6]) : 64;
    nap_us = argc > 7 ? atoi(argv[7]) : 0;
    struct rlimit limit;
    getrlimit(RLIMIT_NOFILE, &limit);
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
    if ((rlim_t)n_conns + 16 > limit.rlim_cur) {
        fprintf(stderr, "loadgen: %d connections need more than the %llu file descriptors allowed\n",
                n_conns, (unsigned long long)limit.rlim_cur);
        return 2;
    }
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad IPv4 address %s\n", argv[1]);
        return 2;
    }
    request_len = (size_t)snprintf(request, sizeof request,
                                   "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                                   "Connection: Upgrade\r\n"
                                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                   "Sec-WebSocket-Version: 13\r\n\r\n",
                                   argv[3], argv[1], argv[2]);
    conns = calloc((size_t)n_conns, sizeof *conns);
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev);
    start_connections();
    check_ready();
    struct epoll_event events[512];
    for (;;) {
        int n = epoll_wait(epfd, events, 512, -1);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c) {
                on_stdin();
                continue;
            }
            if (c->state == CLOSED)
                continue;
            if (c->state == CONNECTING && (events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
                on_writable(c);
            else if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
        }
        if (nap_us > 0 && n > 0 && ready_printed) {
            struct timespec nap = {.tv_sec = 0, .tv_nsec = (long)nap_us * 1000};
            nanosleep(&nap, NULL);
        }
    }
}
