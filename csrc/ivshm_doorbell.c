/* ivshm_doorbell.c - eventfd doorbells and the epoll wait loop (see ivshm_doorbell.h).
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
#define _GNU_SOURCE
#include "ivshm_doorbell.h"
#include "ivshm_time.h"

#include <errno.h>
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
