/* ivshm_doorbell.h - doorbells, once: ring one (eventfd or BAR0 register), sleep on one, drain
 * one, wait on a set of them, and the table that says how to ring every peer's vectors.
 *
 * Every doorbell user goes through here: the wake-up protocol (ivshm_chan.c), the host peer
 * (Python's Peer through cffi, ivshm_hostpeer.c) and the guest device (Python's PciDevice).
 *
 * A host doorbell is an eventfd: ringing writes the 64-bit value 1, draining reads the
 * accumulated count (rings coalesce).  A guest rings through the ivshmem BAR0 Doorbell register
 * (a 32-bit store of peer << 16 | vector) and sleeps on VFIO MSI-X eventfds.  A wait set is an epoll instance holding
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

/* cffi:begin  (pyivshmem/_build reads the declarations up to cffi:end from here) */

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

/* Read a non-blocking eventfd's counter once into *count (0 when nothing was pending, or another
 * reader was first).  One system call, for callers that already know the fd is readable. */
int ivshm_eventfd_take(int fd, uint64_t *count);

/* -- one doorbell to ring -------------------------------------------------------------------- */
#define IVSHM_BELL_NONE 0    /* nothing to ring: the peer is unknown (it re-checks) */
#define IVSHM_BELL_EVENTFD 1 /* write the 8-byte integer 1 to an eventfd (host peer) */
#define IVSHM_BELL_MMIO 2    /* 32-bit store of `value` to a doorbell register (guest BAR0) */

struct ivshm_bell {
    int kind;
    int fd;
    volatile uint32_t *reg;
    uint32_t value;
};

/* Ring one doorbell.  0, or -errno from write(2) (a full eventfd counter counts as rung). */
int ivshm_bell_ring(const struct ivshm_bell *b);

/* Sleep until the doorbell `fd` is readable, one of ncancel cancel fds is readable, or timeout_ms
 * passes (negative: no limit); one poll(2), nothing drained.  1 rung, 0 timed out, -ECANCELED
 * (a cancel fd fired, checked first), -EBADF (fd closed or in error), -EINTR, -errno. */
int ivshm_bell_sleep(int fd, const int *cancel_fds, int ncancel, int timeout_ms);

/* -- the bell table: how to ring (peer, vector), for every peer a provider knows ------------------
 *
 * A doorbell provider (a host peer of a server, a guest device) owns one table and keeps it up to
 * date; a channel's waker reads it (ivshm_bell_table_resolve is an ivshm_chan_resolve_fn) without
 * calling back into its owner.  Two kinds:
 *   IVSHM_BELL_EVENTFD: an eventfd per (peer, vector), set as peers' vectors arrive and cleared
 *     when they leave (rows of max_vectors fds per peer id, made on first use, kept until destroy);
 *   IVSHM_BELL_MMIO: one doorbell register for every peer, value peer << 16 | vector.
 *
 * Concurrency: set, clear and lookup are single atomic stores and loads, so they may run in any
 * threads at once, and a lookup never sees a torn entry.  A lookup that ran just before a clear
 * may still hand out the old fd: whoever closes a cleared fd must first make sure that no lookup
 * that could have read it is still about to ring it (Python: lookups and rings run with the GIL
 * held, and the owner clears, then takes the GIL, then closes; docs/wakeup.md).  Rows are freed
 * only by destroy, which must not run while others may use the table.
 *
 * The watch fd (a host peer's server socket) turns readable when the server has news the owner
 * has not taken in (a peer joined or left): ivshm_bell_table_stale() says so with one poll(2), so
 * that a waker can let the owner refresh the table: first when a lookup missed (maybe the peer has
 * just joined), otherwise after the ring, so that the poll is not between a publish and its
 * doorbell; a waker that rang an entry which the refresh changed (ivshm_bell_table_changes())
 * rings it again.  The poll would double the system calls of a ring, so an unforced look runs at
 * most once per watch interval. */
struct ivshm_bell_table;

/* A new table of `kind` for peer ids 0..max_peer and vectors 0..max_vectors-1 (max_peer <=
 * 65535, 1 <= max_vectors <= 256).  0 or -EINVAL / -ENOMEM. */
int ivshm_bell_table_create(int kind, uint32_t max_peer, uint32_t max_vectors,
                            struct ivshm_bell_table **out);
void ivshm_bell_table_destroy(struct ivshm_bell_table *t);

/* Eventfd tables: the fd that rings (peer, vector), or -1 to clear it.  0, -EINVAL (out of range,
 * not an eventfd table), -ENOMEM. */
int ivshm_bell_table_set_fd(struct ivshm_bell_table *t, uint32_t peer, uint32_t vector, int fd);
/* Clear every vector of one peer (it left); 0 or -EINVAL. */
int ivshm_bell_table_clear_peer(struct ivshm_bell_table *t, uint32_t peer);
/* How many set_fd and clear_peer calls changed one peer's entries so far (0 for a peer never
 * set, or an MMIO table): a waker compares two reads to see whether a refresh touched them. */
uint32_t ivshm_bell_table_changes(const struct ivshm_bell_table *t, uint32_t peer);
/* MMIO tables: the Doorbell register's address, 0 to clear (the BAR is going away). */
int ivshm_bell_table_set_mmio(struct ivshm_bell_table *t, uintptr_t reg);
/* Clear everything: every fd, the register and the watch fd (the owner is closing). */
void ivshm_bell_table_clear(struct ivshm_bell_table *t);

/* The watch fd, -1 for none (clear it before closing the fd), and how often at most an unforced
 * ivshm_bell_table_stale() looks at it (ns; 0: every time). */
void ivshm_bell_table_set_watch(struct ivshm_bell_table *t, int fd, uint64_t interval_ns);
/* 1 when the watch fd is readable (the owner has news to take in), else 0.  Unless `force`, 0
 * without looking when the last look was less than the watch interval ago. */
int ivshm_bell_table_stale(struct ivshm_bell_table *t, int force);

/* How to ring (peer, vector): 0 and *out filled, or -ENOENT (unknown peer or vector: *out is
 * IVSHM_BELL_NONE).  Never looks at the watch fd.  An ivshm_chan_resolve_fn (ctx: the table). */
int ivshm_bell_table_resolve(void *table, uint32_t peer, uint32_t vector, struct ivshm_bell *out);

/* Resolve and ring in one call: 0, -ENOENT, or ivshm_bell_ring's error. */
int ivshm_bell_table_ring(const struct ivshm_bell_table *t, uint32_t peer, uint32_t vector);
/* cffi:end */

#ifdef __cplusplus
}
#endif

#endif /* IVSHM_DOORBELL_H */
