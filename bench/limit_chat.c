/*
 * limit_chat.c -- the C reference server that `chat.py bench` is measured
 * against: about as fast as one thread can serve this protocol here.
 *
 * It speaks the registration and broadcast part of version 1 of the chat
 * protocol (docs/protocol.md) and nothing more:
 *   - on connect: two notice lines, the last asking for a nickname;
 *   - the first non-empty line (or "/nick NAME") is the nickname; an invalid
 *     or taken one gets a "!!! " line and the server waits for another;
 *   - then every registered client, the newcomer included, gets
 *     "*** NICK joined (N online)";
 *   - each line a member sends reaches every member, the sender included,
 *     as "<NICK> TEXT" ("//TEXT" is sent as "/TEXT"; any other "/..." is
 *     answered "!!! unknown command");
 *   - a member whose connection closes is announced to the others as
 *     "*** NICK left (connection closed)".
 * Text is cleaned as the protocol says (invalid UTF-8 becomes U+FFFD;
 * control and invisible format characters are removed) and lines longer
 * than 4096 bytes are refused, so that it does the same work per line as
 * chat.py. Not here: /me /msg /who /ping /quit, rooms, history, --rate,
 * telnet filtering, the registration timeout, a client limit.
 *
 * How it is fast: one thread, epoll (level-triggered), non-blocking
 * sockets. A readable client gets one recv() of up to 64 KiB per loop pass.
 * A broadcast line is formatted once and appended to each member's output
 * buffer; at the end of the pass every client whose buffer changed (a
 * "dirty" client) gets exactly one send(), so the many lines a client is
 * owed from one pass cost one system call. Output that a send leaves over
 * waits for EPOLLOUT.
 *
 * DELIBERATE SHORTCUT: output buffers are unbounded and nobody is ever
 * evicted as too slow. A client that stops reading makes the server's
 * memory grow without limit. That is fine for a benchmark reference, whose
 * runs are short, and it is not fine for anything else.
 *
 * Build: gcc -O2 -Wall -o /tmp/limit_chat bench/limit_chat.c
 * Run:   /tmp/limit_chat --host 127.0.0.1 --port 9999   (--port 0: any free port)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

/* --- Settings ------------------------------------------------------------ */

#define DEFAULT_HOST "127.0.0.1"
#define DEFAULT_PORT "9999"
#define MAX_LINE_BYTES 4096        /* longer lines are refused (docs/protocol.md) */
#define MAX_NICK_CHARS 24
#define MAX_NICK_BYTES (MAX_NICK_CHARS * 4)   /* UTF-8: at most 4 bytes a character */
#define READ_BYTES (1 << 16)       /* one recv() of at most this per client per pass */
#define MAX_EVENTS 1024            /* epoll events taken per pass */
#define LISTEN_BACKLOG 4096
#define FIRST_OUTBUF 4096          /* an output buffer's first size; it doubles */
#define KEEP_OUTBUF (1 << 16)      /* an emptied output buffer bigger than this is freed */
#define NICK_BUCKETS (1 << 15)     /* hash table of nicks in use */
#define REPLACEMENT 0xFFFD         /* U+FFFD, for bytes that are not UTF-8 */

/* --- Clients and lists ----------------------------------------------------- */

typedef struct Client Client;
struct Client {
    int fd;
    int member;                 /* index in members, or -1 while unregistered */
    int dirty;                  /* on the dirty list: owed a send() this pass */
    int dropping;               /* on the drop list: ignored until reaped */
    int watching_out;           /* EPOLLOUT is on: only while output is left over */
    int skipping;               /* discarding the rest of an overlong line */
    const char *reason;         /* why it is dropped, for the left line */
    char nick[MAX_NICK_BYTES + 1];
    char key[MAX_NICK_BYTES + 1];   /* the nick, ASCII letters lowercased */
    Client *next_in_bucket;
    char *inbuf;                /* an unfinished line (allocated when first needed) */
    size_t inlen;
    char *outbuf;               /* unsent output is outbuf[outstart..outend) */
    size_t outstart, outend, outcap;
};

typedef struct {
    Client **items;
    size_t len, cap;
} List;

static int epfd = -1;
static int listen_fd = -1;
static int spare_fd = -1;        /* closed to accept-and-refuse when out of fds */
static List members;             /* registered clients, in no particular order */
static List dirty;               /* clients owed a send() at the end of this pass */
static List drops;               /* clients to close at the end of this pass */
static Client *nick_buckets[NICK_BUCKETS];
static volatile sig_atomic_t stopping;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void *grow(void *block, size_t bytes)
{
    void *bigger = realloc(block, bytes);
    if (bigger == NULL)
        die("realloc");
    return bigger;
}

static void list_push(List *list, Client *c)
{
    if (list->len == list->cap) {
        list->cap = list->cap ? list->cap * 2 : 64;
        list->items = grow(list->items, list->cap * sizeof *list->items);
    }
    list->items[list->len++] = c;
}

/* --- Output ---------------------------------------------------------------- */
/* Everything a client is sent goes into its output buffer first; only
 * flush_dirty() writes to sockets. */

static void mark_dirty(Client *c)
{
    if (!c->dirty && !c->dropping) {
        c->dirty = 1;
        list_push(&dirty, c);
    }
}

static void append_output(Client *c, const char *data, size_t size)
{
    if (c->dropping)
        return;
    if (c->outend + size > c->outcap) {
        if (c->outstart > 0) {           /* first reuse the room already sent */
            memmove(c->outbuf, c->outbuf + c->outstart, c->outend - c->outstart);
            c->outend -= c->outstart;
            c->outstart = 0;
        }
        if (c->outend + size > c->outcap) {
            size_t cap = c->outcap ? c->outcap : FIRST_OUTBUF;
            while (cap < c->outend + size)
                cap *= 2;
            c->outbuf = grow(c->outbuf, cap);
            c->outcap = cap;
        }
    }
    memcpy(c->outbuf + c->outend, data, size);
    c->outend += size;
    mark_dirty(c);
}

static void broadcast(const char *data, size_t size)
{
    for (size_t i = 0; i < members.len; i++)
        append_output(members.items[i], data, size);
}

/* Format one line (the caller's format ends with \n) and send it to c, or to
 * every member when c is NULL. */
static void say(Client *c, const char *format, ...)
{
    char text[2 * MAX_NICK_BYTES + 256];
    va_list args;
    va_start(args, format);
    int size = vsnprintf(text, sizeof text, format, args);
    va_end(args);
    if (size < 0)
        return;
    if ((size_t)size >= sizeof text)
        size = sizeof text - 1;
    if (c == NULL)
        broadcast(text, (size_t)size);
    else
        append_output(c, text, (size_t)size);
}

static void drop(Client *c, const char *reason)
{
    if (c->dropping)
        return;
    c->dropping = 1;
    c->reason = reason;
    list_push(&drops, c);
}

static void watch_output(Client *c, int on)
{
    if (c->watching_out == on)
        return;
    struct epoll_event event = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &event) < 0)
        die("epoll_ctl");
    c->watching_out = on;
}

/* One send() per dirty client: whatever it owes from this whole pass. */
static void flush_dirty(void)
{
    for (size_t i = 0; i < dirty.len; i++) {
        Client *c = dirty.items[i];
        c->dirty = 0;
        if (c->dropping)
            continue;
        ssize_t sent = send(c->fd, c->outbuf + c->outstart, c->outend - c->outstart,
                            MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                drop(c, "connection closed");
                continue;
            }
            sent = 0;   /* the socket is full: EPOLLOUT tells when to go on */
        }
        c->outstart += (size_t)sent;
        if (c->outstart == c->outend) {
            c->outstart = c->outend = 0;
            if (c->outcap > KEEP_OUTBUF) {   /* a burst is over: give it back */
                free(c->outbuf);
                c->outbuf = NULL;
                c->outcap = 0;
            }
        }
        watch_output(c, c->outend > c->outstart);
    }
    dirty.len = 0;
}

/* --- Nicknames ------------------------------------------------------------- */

static Client **nick_bucket(const char *key)
{
    uint32_t hash = 2166136261u;   /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)key; *p; p++)
        hash = (hash ^ *p) * 16777619u;
    return &nick_buckets[hash % NICK_BUCKETS];
}

static int nick_taken(const char *key)
{
    for (Client *c = *nick_bucket(key); c != NULL; c = c->next_in_bucket)
        if (strcmp(c->key, key) == 0)
            return 1;
    return 0;
}

/* What is wrong with a nick (already cleaned and trimmed), or NULL. C has no
 * Unicode tables here: non-ASCII characters are all taken as letters, and
 * nicks clash when equal but for the case of ASCII letters. */
static const char *nick_problem(const char *nick, size_t size)
{
    size_t chars = 0;
    if (size > MAX_NICK_BYTES)
        return "nickname too long (max 24 characters)";
    for (size_t i = 0; i < size; i++) {
        unsigned char b = (unsigned char)nick[i];
        if ((b & 0xC0) != 0x80)
            chars++;
        if (b < 0x80 && !(b == '_' || b == '-' || (b >= '0' && b <= '9')
                          || (b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z')))
            return "invalid nickname: use letters, digits, _ or -";
    }
    if (chars > MAX_NICK_CHARS)
        return "nickname too long (max 24 characters)";
    if (nick[0] == '-')
        return "invalid nickname: it may not start with -";
    return NULL;
}

static void register_nick(Client *c, const char *nick, size_t size)
{
    memcpy(c->nick, nick, size);
    c->nick[size] = '\0';
    for (size_t i = 0; i <= size; i++)
        c->key[i] = (c->nick[i] >= 'A' && c->nick[i] <= 'Z') ? c->nick[i] + 32 : c->nick[i];
    if (nick_taken(c->key)) {
        say(c, "!!! nickname %s is taken\n", c->nick);
        return;
    }
    Client **bucket = nick_bucket(c->key);
    c->next_in_bucket = *bucket;
    *bucket = c;
    c->member = (int)members.len;
    list_push(&members, c);
    say(NULL, "*** %s joined (%zu online)\n", c->nick, members.len);
}

static void unregister_nick(Client *c)
{
    Client **link = nick_bucket(c->key);
    while (*link != c)
        link = &(*link)->next_in_bucket;
    *link = c->next_in_bucket;
    Client *last = members.items[--members.len];   /* swap the last into its place */
    members.items[c->member] = last;
    last->member = c->member;
    c->member = -1;
}

/* --- Text ------------------------------------------------------------------ */

/* Decode one UTF-8 character at s (n bytes left) into *cp; return the bytes
 * it takes. An invalid sequence is U+FFFD for its longest valid-looking
 * start, which is what Python's errors="replace" does. */
static size_t decode_utf8(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char lead = s[0], low = 0x80, high = 0xBF;
    size_t need;
    uint32_t value;
    if (lead < 0x80) {
        *cp = lead;
        return 1;
    }
    if (lead >= 0xC2 && lead <= 0xDF) {
        need = 2;
        value = lead & 0x1F;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
        need = 3;
        value = lead & 0x0F;
        if (lead == 0xE0) low = 0xA0;          /* no overlong forms */
        if (lead == 0xED) high = 0x9F;         /* no surrogates */
    } else if (lead >= 0xF0 && lead <= 0xF4) {
        need = 4;
        value = lead & 0x07;
        if (lead == 0xF0) low = 0x90;
        if (lead == 0xF4) high = 0x8F;         /* nothing past U+10FFFF */
    } else {
        *cp = REPLACEMENT;
        return 1;
    }
    for (size_t i = 1; i < need; i++) {
        if (i >= n || s[i] < low || s[i] > high) {
            *cp = REPLACEMENT;
            return i;
        }
        value = (value << 6) | (s[i] & 0x3F);
        low = 0x80;
        high = 0xBF;
    }
    *cp = value;
    return need;
}

static size_t encode_utf8(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Characters removed before a line is relayed: controls (C0, DEL, C1) and
 * the invisible format characters that can reorder or hide text. */
static int removed(uint32_t cp)
{
    return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cp == 0x061C || cp == 0x200B
        || cp == 0x200E || cp == 0x200F || (cp >= 0x202A && cp <= 0x202E)
        || (cp >= 0x2060 && cp <= 0x2064) || (cp >= 0x2066 && cp <= 0x2069)
        || cp == 0xFEFF;
}

/* Make a line safe for every terminal, into out (3 * size bytes at most:
 * the worst case is each byte becoming a 3-byte U+FFFD); return its size. */
static size_t clean_text(const char *line, size_t size, char *out)
{
    const unsigned char *s = (const unsigned char *)line;
    size_t i = 0, o = 0;
    while (i < size) {
        if (s[i] >= 0x20 && s[i] < 0x7F) {    /* printable ASCII: the usual case */
            out[o++] = (char)s[i++];
            continue;
        }
        uint32_t cp;
        i += decode_utf8(s + i, size - i, &cp);
        if (cp == '\t' || cp == 0x2028 || cp == 0x2029)
            out[o++] = ' ';
        else if (!removed(cp))
            o += encode_utf8(cp, out + o);
    }
    return o;
}

/* --- Lines from a client ----------------------------------------------------- */

static void choose_nick(Client *c, char *text, size_t size)
{
    while (size > 0 && text[0] == ' ') {
        text++;
        size--;
    }
    while (size > 0 && text[size - 1] == ' ')
        size--;
    if (size >= 6 && strncasecmp(text, "/nick ", 6) == 0) {
        text += 6;
        size -= 6;
        while (size > 0 && text[0] == ' ') {
            text++;
            size--;
        }
    } else if (size > 0 && text[0] == '/') {
        say(c, "!!! choose a nickname first\n");
        return;
    }
    if (size == 0)
        return;                        /* a blank line is ignored */
    const char *problem = nick_problem(text, size);
    if (problem != NULL)
        say(c, "!!! %s\n", problem);
    else
        register_nick(c, text, size);
}

static void speak(Client *c, char *text, size_t size)
{
    static char line[3 * MAX_LINE_BYTES + MAX_NICK_BYTES + 8];
    while (size > 0 && text[size - 1] == ' ')
        size--;                        /* trailing spaces go, leading ones stay */
    size_t start = 0;
    while (start < size && text[start] == ' ')
        start++;
    if (start == size)
        return;                        /* blank: nothing */
    if (text[0] == '/') {
        if (size < 2 || text[1] != '/') {
            size_t end = 1;
            while (end < size && end < 64 && text[end] != ' ')
                end++;
            say(c, "!!! unknown command %.*s\n", (int)end, text);
            return;
        }
        text++;                        /* "//TEXT" says "/TEXT" */
        size--;
    }
    size_t nick_size = strlen(c->nick), n = 0;
    line[n++] = '<';
    memcpy(line + n, c->nick, nick_size);
    n += nick_size;
    line[n++] = '>';
    line[n++] = ' ';
    memcpy(line + n, text, size);
    n += size;
    line[n++] = '\n';
    broadcast(line, n);
}

static void handle_line(Client *c, const char *line, size_t size)
{
    static char text[3 * MAX_LINE_BYTES];
    if (size > 0 && line[size - 1] == '\r')
        size--;                        /* telnet's CRLF */
    if (size > MAX_LINE_BYTES) {
        say(c, "!!! line too long (max %d bytes)\n", MAX_LINE_BYTES);
        return;
    }
    size_t text_size = clean_text(line, size, text);
    if (c->member < 0)
        choose_nick(c, text, text_size);
    else
        speak(c, text, text_size);
}

/* Split what one recv() brought into lines; keep an unfinished one. A line
 * past the limit is refused as soon as it is too long, and skipped up to its
 * end, so no client holds more than one line's worth. */
static void take_input(Client *c, const char *data, size_t size)
{
    while (size > 0 && !c->dropping) {
        const char *lf = memchr(data, '\n', size);
        size_t part = lf ? (size_t)(lf - data) : size;
        if (c->skipping) {
            c->skipping = lf == NULL;
        } else if (c->inlen + part > MAX_LINE_BYTES + 1) {   /* + 1: room for a CR */
            say(c, "!!! line too long (max %d bytes)\n", MAX_LINE_BYTES);
            c->inlen = 0;
            c->skipping = lf == NULL;
        } else if (lf == NULL) {
            if (c->inbuf == NULL)
                c->inbuf = grow(NULL, MAX_LINE_BYTES + 1);
            memcpy(c->inbuf + c->inlen, data, part);
            c->inlen += part;
        } else if (c->inlen == 0) {
            handle_line(c, data, part);    /* whole in this read: no copy */
        } else {
            memcpy(c->inbuf + c->inlen, data, part);
            handle_line(c, c->inbuf, c->inlen + part);
            c->inlen = 0;
        }
        if (lf == NULL)
            break;
        data += part + 1;
        size -= part + 1;
    }
}

/* --- Connections ----------------------------------------------------------- */

static void greet(Client *c)
{
    say(c, "*** welcome to limit_chat (%zu online)\n", members.len);
    say(c, "*** choose a nickname: 1-24 letters, digits, _ or -\n");
}

/* Out of file descriptors: accept with the spare one's slot and close at
 * once, so the listener does not stay readable and spin the loop. */
static void refuse_one(void)
{
    close(spare_fd);
    int fd = accept(listen_fd, NULL, NULL);
    if (fd >= 0)
        close(fd);
    spare_fd = open("/dev/null", O_RDONLY);
}

static void accept_clients(void)
{
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE)
                refuse_one();
            return;                    /* EAGAIN: all taken; others: try next pass */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        Client *c = calloc(1, sizeof *c);
        if (c == NULL)
            die("calloc");
        c->fd = fd;
        c->member = -1;
        struct epoll_event event = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &event) < 0)
            die("epoll_ctl");
        greet(c);
    }
}

static void read_client(Client *c)
{
    static char data[READ_BYTES];
    ssize_t got = recv(c->fd, data, sizeof data, 0);
    if (got > 0)
        take_input(c, data, (size_t)got);
    else if (got == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
        drop(c, "connection closed");
}

/* Close the clients dropped this pass. Their left lines go to the members
 * that remain; those are flushed in the next pass. */
static void reap_drops(void)
{
    for (size_t i = 0; i < drops.len; i++) {
        Client *c = drops.items[i];
        int was_member = c->member >= 0;
        if (was_member)
            unregister_nick(c);
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        if (was_member)
            say(NULL, "*** %s left (%s)\n", c->nick, c->reason);
        free(c->inbuf);
        free(c->outbuf);
        free(c);
    }
    drops.len = 0;
}

/* --- Start and loop ---------------------------------------------------------- */

static void on_signal(int signum)
{
    (void)signum;
    stopping = 1;
}

/* Many clients need many descriptors: take all the hard limit allows. */
static void raise_open_files_limit(void)
{
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

static void print_address(void)
{
    struct sockaddr_storage addr;
    socklen_t size = sizeof addr;
    char host[NI_MAXHOST], port[NI_MAXSERV];
    if (getsockname(listen_fd, (struct sockaddr *)&addr, &size) < 0
        || getnameinfo((struct sockaddr *)&addr, size, host, sizeof host, port, sizeof port,
                       NI_NUMERICHOST | NI_NUMERICSERV) != 0)
        die("getsockname");
    if (addr.ss_family == AF_INET6)
        printf("limit_chat listening on [%s]:%s\n", host, port);
    else
        printf("limit_chat listening on %s:%s\n", host, port);
    fflush(stdout);
}

static void listen_on(const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE}, *found;
    int err = getaddrinfo(host, port, &hints, &found);
    if (err != 0) {
        fprintf(stderr, "limit_chat: cannot listen on %s port %s: %s\n", host, port,
                gai_strerror(err));
        exit(2);
    }
    listen_fd = socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listen_fd < 0)
        die("socket");
    int one = 1, zero = 0;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (found->ai_family == AF_INET6)   /* "::" takes IPv4 too */
        setsockopt(listen_fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(listen_fd, found->ai_addr, found->ai_addrlen) < 0) {
        fprintf(stderr, "limit_chat: cannot listen on %s port %s: %s\n", host, port,
                strerror(errno));
        exit(2);
    }
    freeaddrinfo(found);
    if (listen(listen_fd, LISTEN_BACKLOG) < 0)
        die("listen");
}

static void usage(FILE *to, int code)
{
    fprintf(to, "usage: limit_chat [--host H] [--port P]   (defaults %s, %s; 0 picks a port)\n",
            DEFAULT_HOST, DEFAULT_PORT);
    exit(code);
}

int main(int argc, char **argv)
{
    const char *host = DEFAULT_HOST, *port = DEFAULT_PORT;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--host") == 0 && i + 1 < argc)
            host = argv[++i];
        else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc)
            port = argv[++i];
        else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            usage(stdout, 0);
        else
            usage(stderr, 2);
    }
    signal(SIGPIPE, SIG_IGN);          /* a closed peer is an error from send() */
    struct sigaction action = {.sa_handler = on_signal};
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    raise_open_files_limit();
    spare_fd = open("/dev/null", O_RDONLY);
    listen_on(host, port);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct epoll_event event = {.events = EPOLLIN, .data.ptr = NULL};   /* NULL: the listener */
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, listen_fd, &event) < 0)
        die("epoll_ctl");
    print_address();

    static struct epoll_event events[MAX_EVENTS];
    while (!stopping) {
        /* Clients made dirty by the last pass's left lines are sent at once. */
        int count = epoll_wait(epfd, events, MAX_EVENTS, dirty.len ? 0 : -1);
        if (count < 0) {
            if (errno == EINTR)
                continue;              /* a signal: the loop's test decides */
            die("epoll_wait");
        }
        for (int i = 0; i < count; i++) {
            Client *c = events[i].data.ptr;
            if (c == NULL) {
                accept_clients();
                continue;
            }
            if (c->dropping)
                continue;
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                read_client(c);
            if (events[i].events & EPOLLOUT)
                mark_dirty(c);
        }
        flush_dirty();
        reap_drops();
    }
    return 0;
}
