/* ivshm_doorbell.h - eventfd doorbells and the epoll wait loop over a set of them.
 *
 * A doorbell is an eventfd: ringing writes the 64-bit value 1, draining reads the
 * accumulated count (rings coalesce).  A wait set is an epoll instance holding
 * eventfds (and possibly other fds, e.g. a server socket), each registered with a small
 * caller-chosen tag.  ivshm_waitset_wait() blocks until at least one fd is readable or
 * the timeout expires, drains the eventfds registered with IVSHM_WS_DRAIN, and reports
 * which tags fired.  It never busy-loops.
 *
 * Signals: by default a wait interrupted by a signal returns -EINTR and reports the time
 * left, so that a language runtime (Python) can run its signal handlers (Ctrl-C) and
 * then resume with the remaining time.  With IVSHM_WAIT_RESTART the C loop resumes by
 * itself with the remaining time, which is what a plain C program usually wants.
 *
 * Every function returns 0 (or a count / fd) on success and -errno on failure.
 */
#ifndef IVSHM_DOORBELL_H
#define IVSHM_DOORBELL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Registration flags for ivshm_waitset_add(). */
#define IVSHM_WS_DRAIN 1u      /* the fd is an eventfd: drain it when it fires */

/* Flags for ivshm_waitset_wait(). */
#define IVSHM_WAIT_RESTART 1u  /* on EINTR resume with the remaining timeout */

/* Largest tag a registration may carry (tags are 31-bit). */
#define IVSHM_WS_TAG_MAX 0x7fffffffu

/* One readable fd reported by ivshm_waitset_wait(). */
struct ivshm_fired {
    uint32_t tag;      /* the tag given to ivshm_waitset_add() */
    uint32_t flags;    /* the registration flags (IVSHM_WS_DRAIN) */
    uint64_t count;    /* drained eventfd count; 0 for fds that are not drained */
};

/* Create an eventfd (close-on-exec; non-blocking when nonblock != 0).  Returns fd or -errno. */
int ivshm_eventfd_create(int nonblock);

/* Ring: add 1 to the eventfd's counter.  A counter already at its maximum counts as rung. */
int ivshm_eventfd_ring(int fd);

/* Drain: read and reset the counter into *count (0 when nothing was pending).  Never blocks:
 * the fd is polled first, so it is safe on a blocking eventfd with a single reader, and on a
 * non-blocking one with any number of readers. */
int ivshm_eventfd_drain(int fd, uint64_t *count);

/* Create an empty wait set (an epoll fd, close-on-exec).  Returns fd or -errno. */
int ivshm_waitset_create(void);

/* Watch fd for readability, reported with tag (<= IVSHM_WS_TAG_MAX). */
int ivshm_waitset_add(int epfd, int fd, uint32_t tag, unsigned flags);

/* Stop watching fd. */
int ivshm_waitset_remove(int epfd, int fd);

/* Wait until a watched fd is readable or timeout_ms passes (negative: no limit).
 *
 * Fills out[0..n-1] and returns n >= 1, or 0 on timeout.  Eventfds registered with
 * IVSHM_WS_DRAIN are drained; one that turns out empty (another reader got there first) is not
 * reported and the wait goes on.  On a signal: returns -EINTR unless flags has
 * IVSHM_WAIT_RESTART, in which case it resumes with the remaining time.  When remaining_ms is
 * not NULL it receives the time left (ms, rounded up; -1 when there was no limit). */
int ivshm_waitset_wait(int epfd, int timeout_ms, unsigned flags, struct ivshm_fired *out,
                       int max_out, int *remaining_ms);

/* Wait for a single fd to become readable (poll).  1 = readable, 0 = timeout, -errno. Same EINTR
 * and remaining_ms rules as ivshm_waitset_wait(). */
int ivshm_wait_readable(int fd, int timeout_ms, unsigned flags, int *remaining_ms);

#ifdef __cplusplus
}
#endif

#endif /* IVSHM_DOORBELL_H */
