/* ivshm_doorbell.c - doorbells: eventfds and BAR0 registers, the epoll wait loop, and the bell
 * table (see ivshm_doorbell.h).
 *
 * Only eventfd, epoll and poll (plus read/write on the eventfds) are used.  The wait loop
 * sleeps in epoll_wait()/poll(); the only reasons it goes around again are a signal (with
 * IVSHM_WAIT_RESTART) and an eventfd that another reader drained first, each of which
 * recomputes the remaining time from CLOCK_MONOTONIC, so it never spins and never waits
 * longer than asked.
 *
 * An epoll registration carries a single 64-bit word; it holds the fd (low 32 bits), the
 * caller's tag (bits 32..62) and the drain flag (bit 63).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "ivshm_doorbell.h"
#include "ivshm_atomic.h"
#include "ivshm_time.h"

#include <errno.h>
#include <stdlib.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define WS_DRAIN_BIT (UINT64_C(1) << 63)
#define WS_BATCH 64

int ivshm_eventfd_create(int nonblock)
{
    int fd = eventfd(0, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
    return fd < 0 ? -errno : fd;
}

int ivshm_eventfd_ring(int fd)
{
    uint64_t one = 1;
    for (;;) {
        ssize_t n = write(fd, &one, sizeof one);
        if (n == (ssize_t)sizeof one)
            return 0;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return 0;   /* counter saturated: the doorbell is rung already */
        return n < 0 ? -errno : -EIO;
    }
}

int ivshm_eventfd_drain(int fd, uint64_t *count)
{
    *count = 0;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int r;
    do
        r = poll(&p, 1, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    if (r == 0)
        return 0;
    if (p.revents & POLLNVAL)
        return -EBADF;
    uint64_t v;
    for (;;) {
        ssize_t n = read(fd, &v, sizeof v);
        if (n == (ssize_t)sizeof v) {
            *count = v;
            return 0;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return 0;   /* another reader drained it between poll and read */
        return n < 0 ? -errno : -EINVAL;   /* a short read: not an eventfd */
    }
}

int ivshm_waitset_create(void)
{
    int fd = epoll_create1(EPOLL_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ivshm_waitset_add(int epfd, int fd, uint32_t tag, unsigned flags)
{
    if (fd < 0 || tag > IVSHM_WS_TAG_MAX || (flags & ~IVSHM_WS_DRAIN))
        return -EINVAL;
    struct epoll_event ev = { .events = EPOLLIN };
    ev.data.u64 = (uint64_t)(uint32_t)fd | ((uint64_t)tag << 32) |
                  ((flags & IVSHM_WS_DRAIN) ? WS_DRAIN_BIT : 0);
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

int ivshm_waitset_remove(int epfd, int fd)
{
    struct epoll_event ev = { 0 };   /* non-NULL for kernels before 2.6.9 */
    return epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev) < 0 ? -errno : 0;
}

int ivshm_waitset_wait(int epfd, int timeout_ms, unsigned flags, struct ivshm_fired *out,
                       int max_out, int *remaining_ms)
{
    if (max_out <= 0 || !out)
        return -EINVAL;
    int64_t deadline = ivshm_deadline_ms(timeout_ms);
    int timeout = timeout_ms < 0 ? -1 : timeout_ms;
    struct epoll_event evs[WS_BATCH];
    int want = max_out < WS_BATCH ? max_out : WS_BATCH;
    int rc;
    for (;;) {
        int n = epoll_wait(epfd, evs, want, timeout);
        if (n < 0) {
            if (errno == EINTR && (flags & IVSHM_WAIT_RESTART)) {
                timeout = ivshm_ms_left(deadline);
                continue;
            }
            rc = -errno;
            break;
        }
        int got = 0;
        for (int i = 0; i < n; i++) {
            uint64_t d = evs[i].data.u64;
            int fd = (int)(uint32_t)(d & 0xffffffffu);
            struct ivshm_fired f = {
                .tag = (uint32_t)((d >> 32) & IVSHM_WS_TAG_MAX),
                .flags = (d & WS_DRAIN_BIT) ? IVSHM_WS_DRAIN : 0,
                .count = 0,
            };
            if (f.flags & IVSHM_WS_DRAIN) {
                int r = ivshm_eventfd_drain(fd, &f.count);
                if (r < 0) {
                    rc = r;
                    goto done;
                }
                if (f.count == 0)
                    continue;   /* someone else drained it: not a wake-up for us */
            }
            out[got++] = f;
        }
        if (got > 0 || n == 0) {
            rc = got;   /* n == 0: timeout */
            break;
        }
        /* Only spurious wake-ups: sleep again for what is left. */
        timeout = ivshm_ms_left(deadline);
        if (timeout == 0) {
            rc = 0;
            break;
        }
    }
done:
    if (remaining_ms)
        *remaining_ms = ivshm_ms_left(deadline);
    return rc;
}

int ivshm_wait_readable(int fd, int timeout_ms, unsigned flags, int *remaining_ms)
{
    int64_t deadline = ivshm_deadline_ms(timeout_ms);
    int timeout = timeout_ms < 0 ? -1 : timeout_ms;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int rc;
    for (;;) {
        int n = poll(&p, 1, timeout);
        if (n < 0 && errno == EINTR && (flags & IVSHM_WAIT_RESTART)) {
            timeout = ivshm_ms_left(deadline);
            continue;
        }
        if (n < 0)
            rc = -errno;
        else if (n > 0 && (p.revents & POLLNVAL))
            rc = -EBADF;
        else
            rc = n > 0 ? 1 : 0;   /* POLLHUP/POLLERR count as readable: read() tells more */
        break;
    }
    if (remaining_ms)
        *remaining_ms = ivshm_ms_left(deadline);
    return rc;
}

int ivshm_eventfd_take(int fd, uint64_t *count)
{
    uint64_t v = 0;
    ssize_t n;
    do
        n = read(fd, &v, sizeof v);
    while (n < 0 && errno == EINTR);
    *count = 0;
    if (n == (ssize_t)sizeof v) {
        *count = v;
        return 0;
    }
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno; /* EAGAIN: nothing, or another reader was first */
    return -EINVAL;                          /* a short read: not an eventfd */
}

/* -- one doorbell ----------------------------------------------------------------------------------- */
int ivshm_bell_ring(const struct ivshm_bell *b)
{
    if (b->kind == IVSHM_BELL_EVENTFD)
        return ivshm_eventfd_ring(b->fd);
    if (b->kind == IVSHM_BELL_MMIO) {
        *b->reg = b->value; /* an aligned 32-bit store, as the ivshmem Doorbell register needs */
        return 0;
    }
    return 0;
}

int ivshm_bell_sleep(int fd, const int *cancel_fds, int ncancel, int timeout_ms)
{
    struct pollfd p[1 + 4];
    if (ncancel < 0 || ncancel > 4)
        return -EINVAL;
    p[0] = (struct pollfd){.fd = fd, .events = POLLIN, .revents = 0};
    for (int i = 0; i < ncancel; i++)
        p[1 + i] = (struct pollfd){.fd = cancel_fds[i], .events = POLLIN, .revents = 0};
    int n = poll(p, (nfds_t)(1 + ncancel), timeout_ms < 0 ? -1 : timeout_ms);
    if (n < 0)
        return -errno;
    for (int i = 1; i <= ncancel; i++)
        if (p[i].revents)
            return -ECANCELED;
    if (n == 0)
        return 0;
    if (p[0].revents & (POLLERR | POLLNVAL))
        return -EBADF;
    return 1;
}

/* -- the bell table ------------------------------------------------------------------------------------
 * rows[peer] is NULL until the first fd of that peer is set, then an array of max_vectors fds (-1
 * where none) followed by the number of set_fd and clear_peer calls on the row.  Publication: a row is filled with -1 before the release store of its pointer, and
 * lookups load the pointer with acquire (pairs with that store); entries are single int stores and
 * loads.  The register and the watch fd are single stores and loads too. */
struct ivshm_bell_table {
    int kind;
    uint32_t max_peer;
    uint32_t max_vectors;
    int watch_fd;
    uint64_t watch_ns;     /* the watch interval */
    int64_t next_look_ns;  /* CLOCK_MONOTONIC time of the next unforced look (a hint) */
    uintptr_t reg;
    int32_t **rows;        /* each: max_vectors fds, then the row's count of changes */
};

int ivshm_bell_table_create(int kind, uint32_t max_peer, uint32_t max_vectors,
                            struct ivshm_bell_table **out)
{
    *out = NULL;
    if ((kind != IVSHM_BELL_EVENTFD && kind != IVSHM_BELL_MMIO) || max_peer > 0xffffu ||
        max_vectors == 0 || max_vectors > 256)
        return -EINVAL;
    struct ivshm_bell_table *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return -ENOMEM;
    t->kind = kind;
    t->max_peer = max_peer;
    t->max_vectors = max_vectors;
    t->watch_fd = -1;
    if (kind == IVSHM_BELL_EVENTFD) {
        /* calloc of (max_peer + 1) pointers: untouched pages cost no memory */
        t->rows = calloc((size_t)max_peer + 1, sizeof(*t->rows));
        if (t->rows == NULL) {
            free(t);
            return -ENOMEM;
        }
    }
    *out = t;
    return 0;
}

void ivshm_bell_table_destroy(struct ivshm_bell_table *t)
{
    if (t == NULL)
        return;
    if (t->rows != NULL) {
        for (uint64_t p = 0; p <= t->max_peer; p++)
            free(t->rows[p]);
        free(t->rows);
    }
    free(t);
}

int ivshm_bell_table_set_fd(struct ivshm_bell_table *t, uint32_t peer, uint32_t vector, int fd)
{
    if (t->kind != IVSHM_BELL_EVENTFD || peer > t->max_peer || vector >= t->max_vectors || fd < -1)
        return -EINVAL;
    int32_t *row = IVSHM_LOAD_ACQUIRE(&t->rows[peer]); /* pairs with the release store below */
    if (row == NULL) {
        if (fd < 0)
            return 0;
        row = malloc(sizeof(*row) * ((size_t)t->max_vectors + 1));
        if (row == NULL)
            return -ENOMEM;
        for (uint32_t v = 0; v < t->max_vectors; v++)
            row[v] = -1;
        row[t->max_vectors] = 0;
        int32_t *expect = NULL;
        /* release: pairs with the acquire loads of rows[peer] (lookups, other setters) */
        if (!atomic_compare_exchange_strong_explicit(IVSHM_ATOMIC(&t->rows[peer]), &expect, row,
                                                     memory_order_acq_rel, memory_order_acquire)) {
            free(row); /* another setter was first: use its row */
            row = expect;
        }
    }
    IVSHM_STORE_RELEASE(&row[vector], (int32_t)fd); /* pairs with the acquire load in resolve */
    atomic_fetch_add_explicit(IVSHM_ATOMIC(&row[t->max_vectors]), 1, memory_order_relaxed);
    return 0;
}

int ivshm_bell_table_clear_peer(struct ivshm_bell_table *t, uint32_t peer)
{
    if (peer > t->max_peer)
        return -EINVAL;
    if (t->kind != IVSHM_BELL_EVENTFD)
        return 0;
    int32_t *row = IVSHM_LOAD_ACQUIRE(&t->rows[peer]);
    if (row == NULL)
        return 0;
    for (uint32_t v = 0; v < t->max_vectors; v++)
        IVSHM_STORE_RELEASE(&row[v], -1); /* pairs with the acquire load in resolve */
    atomic_fetch_add_explicit(IVSHM_ATOMIC(&row[t->max_vectors]), 1, memory_order_relaxed);
    return 0;
}

uint32_t ivshm_bell_table_changes(const struct ivshm_bell_table *t, uint32_t peer)
{
    if (t->kind != IVSHM_BELL_EVENTFD || peer > t->max_peer)
        return 0;
    int32_t *row = IVSHM_LOAD_ACQUIRE(&t->rows[peer]); /* pairs with set_fd's publication */
    return row == NULL ? 0 : (uint32_t)IVSHM_LOAD_RELAXED(&row[t->max_vectors]);
}

int ivshm_bell_table_set_mmio(struct ivshm_bell_table *t, uintptr_t reg)
{
    if (t->kind != IVSHM_BELL_MMIO || (reg & 3u))
        return -EINVAL;
    IVSHM_STORE_RELEASE(&t->reg, reg); /* pairs with the acquire load in resolve */
    return 0;
}

void ivshm_bell_table_clear(struct ivshm_bell_table *t)
{
    IVSHM_STORE_RELEASE(&t->watch_fd, -1);
    if (t->kind == IVSHM_BELL_MMIO) {
        IVSHM_STORE_RELEASE(&t->reg, (uintptr_t)0);
        return;
    }
    for (uint64_t p = 0; p <= t->max_peer; p++)
        ivshm_bell_table_clear_peer(t, (uint32_t)p);
}

void ivshm_bell_table_set_watch(struct ivshm_bell_table *t, int fd, uint64_t interval_ns)
{
    IVSHM_STORE_RELAXED(&t->watch_ns, interval_ns);
    IVSHM_STORE_RELAXED(&t->next_look_ns, (int64_t)0);
    IVSHM_STORE_RELEASE(&t->watch_fd, fd < 0 ? -1 : fd); /* pairs with the load in stale() */
}

int ivshm_bell_table_stale(struct ivshm_bell_table *t, int force)
{
    int fd = IVSHM_LOAD_ACQUIRE(&t->watch_fd); /* pairs with set_watch */
    if (fd < 0)
        return 0;
    uint64_t every = IVSHM_LOAD_RELAXED(&t->watch_ns);
    if (every > 0) {
        /* a hint shared by the table's wakers: at worst two of them look at once */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t now = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        if (!force && now < IVSHM_LOAD_RELAXED(&t->next_look_ns))
            return 0;
        IVSHM_STORE_RELAXED(&t->next_look_ns, now + (int64_t)every);
    }
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    /* readable, EOF (POLLHUP) or an error: the owner has something to take in either way */
    return poll(&p, 1, 0) > 0 && !(p.revents & POLLNVAL);
}

int ivshm_bell_table_resolve(void *table, uint32_t peer, uint32_t vector, struct ivshm_bell *out)
{
    const struct ivshm_bell_table *t = table;
    *out = (struct ivshm_bell){.kind = IVSHM_BELL_NONE, .fd = -1, .reg = NULL, .value = 0};
    if (peer > t->max_peer || vector >= t->max_vectors)
        return -ENOENT;
    if (t->kind == IVSHM_BELL_MMIO) {
        uintptr_t reg = IVSHM_LOAD_ACQUIRE(&t->reg); /* pairs with set_mmio */
        if (reg == 0)
            return -ENOENT;
        out->kind = IVSHM_BELL_MMIO;
        out->reg = (volatile uint32_t *)reg;
        out->value = (peer << 16) | vector;
        return 0;
    }
    int32_t *row = IVSHM_LOAD_ACQUIRE(&t->rows[peer]); /* pairs with set_fd's publication */
    if (row == NULL)
        return -ENOENT;
    int fd = IVSHM_LOAD_ACQUIRE(&row[vector]); /* pairs with set_fd / clear_peer */
    if (fd < 0)
        return -ENOENT;
    out->kind = IVSHM_BELL_EVENTFD;
    out->fd = fd;
    return 0;
}

int ivshm_bell_table_ring(const struct ivshm_bell_table *t, uint32_t peer, uint32_t vector)
{
    struct ivshm_bell b;
    int rc = ivshm_bell_table_resolve((void *)t, peer, vector, &b);
    return rc < 0 ? rc : ivshm_bell_ring(&b);
}
