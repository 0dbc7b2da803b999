/* ivshm_wake.h - the wake-up protocol: ring a peer only when it is asleep.
 *
 * A consumer about to sleep on an empty ring arms `cons_waiting` (store, then a full fence), checks
 * the ring once more, and sleeps only if it is still empty.  A producer publishes (release store
 * of the batch's first slot word: the SPSC stamp, the MPMC sequence word), issues a full fence, and loads `cons_waiting`; if set, it clears it (exchange) and
 * rings the consumer's doorbell.  The same holds the other way for a producer asleep on a full
 * ring (`prod_waiting`, rung by the consumer after it releases slots).
 *
 * Why no wake-up is lost: the two sides run the Dekker pattern.  Sleeper: S1 store waiting=1,
 * F1 fence, L1 load slot word.  Waker: S2 store slot word (publish), F2 fence, L2 load waiting.  With both
 * fences sequentially consistent, at least one of L1 and L2 observes the other side's store: either
 * the sleeper sees the new message and does not sleep, or the waker sees waiting=1 and rings.  A
 * ring that arrives after the sleeper re-checked but before it blocks is kept by the eventfd's
 * counter (or the MSI-X eventfd), so the blocking wait returns at once.  Doorbells can still be lost
 * outside this protocol (a peer not yet connected, MSI-X not yet enabled), so sleepers also
 * re-check shared memory after a bounded interval: a lost doorbell costs latency, never a hang.
 *
 * Under streaming load the consumer rarely sleeps, the flag is 0, and a publish costs one fence
 * and one load of a line the consumer does not write while awake: close to zero doorbells per
 * message.  Doorbell routes (who to ring) are published by each side in its own control line.
 */
#ifndef IVSHM_WAKE_H
#define IVSHM_WAKE_H

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <unistd.h>

#include "ivshm_atomic.h"
#include "ivshm_layout.h"

#ifdef __cplusplus
extern "C" {
#endif

#define IVSHM_MAX_PEER_ID 65535u
#define IVSHM_MAX_VECTORS 64u

#define IVSHM_BELL_NONE 0    /* nothing to ring: the peer polls */
#define IVSHM_BELL_EVENTFD 1 /* write the 8-byte integer 1 to an eventfd (host peer) */
#define IVSHM_BELL_MMIO 2    /* 32-bit store to a doorbell register (guest BAR0) */

struct ivshm_bell {
    int kind;
    int fd;
    volatile uint32_t *reg;
    uint32_t value;
};

/* -- sleeping side: arm, re-check, sleep, disarm ---------------------------------------------- */
static inline void ivshm_wake_arm(uint32_t *waiting)
{
    IVSHM_STORE_RELAXED(waiting, 1u);
    IVSHM_FENCE(); /* F1: pairs with F2 in ivshm_wake_needed (store-load ordering, see above) */
}

static inline void ivshm_wake_disarm(uint32_t *waiting)
{
    IVSHM_STORE_RELAXED(waiting, 0u); /* only a hint to the waker; a stale 1 costs one doorbell */
}

/* -- waking side: after publishing ------------------------------------------------------------ */
static inline int ivshm_wake_needed(uint32_t *waiting)
{
    IVSHM_FENCE(); /* F2: pairs with F1 in ivshm_wake_arm */
    if (IVSHM_LOAD_RELAXED(waiting) == 0)
        return 0;
    /* clear it so that one sleep costs at most one doorbell */
    return atomic_exchange_explicit(IVSHM_ATOMIC(waiting), 0u, memory_order_relaxed) != 0;
}

/* -- routes: which peer id and vector wake this side -------------------------------------------- */
static inline void ivshm_route_set(uint32_t *peer_f, uint32_t *vector_f, uint32_t *flags_f,
                                   uint32_t peer, uint32_t vector)
{
    IVSHM_STORE_RELAXED(flags_f, 0u);
    IVSHM_STORE_RELAXED(peer_f, peer);
    IVSHM_STORE_RELAXED(vector_f, vector);
    IVSHM_STORE_RELEASE(flags_f, IVSHM_ROUTE_VALID); /* pairs with the acquire in ivshm_route_get */
}

/* 0 with a validated route, -ENOENT if none is published, -EPROTO if it is out of range. */
static inline int ivshm_route_get(const uint32_t *peer_f, const uint32_t *vector_f,
                                  const uint32_t *flags_f, uint32_t *peer, uint32_t *vector)
{
    if (!(IVSHM_LOAD_ACQUIRE(flags_f) & IVSHM_ROUTE_VALID)) /* pairs with ivshm_route_set */
        return -ENOENT;
    uint32_t p = IVSHM_READ_ONCE(peer_f), v = IVSHM_READ_ONCE(vector_f);
    if (p > IVSHM_MAX_PEER_ID || v >= IVSHM_MAX_VECTORS)
        return -EPROTO;
    *peer = p;
    *vector = v;
    return 0;
}

/* -- ringing and waiting ---------------------------------------------------------------------- */
static inline int ivshm_bell_ring(const struct ivshm_bell *b)
{
    if (b->kind == IVSHM_BELL_EVENTFD) {
        uint64_t one = 1;
        ssize_t n;
        do {
            n = write(b->fd, &one, sizeof(one));
        } while (n < 0 && errno == EINTR);
        /* EAGAIN: the counter is saturated, so the peer has a wake-up pending anyway */
        if (n < 0 && errno != EAGAIN)
            return -errno;
        return 0;
    }
    if (b->kind == IVSHM_BELL_MMIO) {
        *b->reg = b->value; /* an aligned 32-bit store, as the ivshmem Doorbell register needs */
        return 0;
    }
    return 0;
}

/* Wait up to timeout_ms for fd to become readable, then drain it (fd must be non-blocking).
 * 1 fired, 0 timed out, -EINTR interrupted by a signal (the caller handles it and waits again
 * with what remains), -errno on error. */
static inline int ivshm_wait_fd(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    int n = poll(&p, 1, timeout_ms);
    if (n < 0)
        return -errno;
    if (n == 0)
        return 0;
    if (p.revents & (POLLERR | POLLNVAL))
        return -EBADF;
    uint64_t v;
    /* one read drains an eventfd's counter; EAGAIN: another reader of the same fd was first */
    if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN && errno != EINTR)
        return -errno;
    return 1;
}

#ifdef __cplusplus
}
#endif
#endif /* IVSHM_WAKE_H */
