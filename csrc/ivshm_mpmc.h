/* ivshm_mpmc.h - multi-producer multi-consumer ring with per-slot sequence numbers.
 *
 * Each slot carries a sequence word (its low 32 bits: indices that meet at a slot are at most a
 * capacity, <= 2^30, apart): seq == i means slot i is free for the producer of index i,
 * seq == i + 1 means it holds the message of index i, and the consumer of index i hands it to the
 * next lap by storing i + capacity.  Producers claim indices by CAS on ctrl->head, consumers on
 * ctrl->tail; a burst claims several consecutive indices with one CAS after checking each slot's
 * sequence.  A slow producer delays only the consumers that reach its slot.
 *
 * A consumer finds work by the sequence word of the slot at ctrl->tail, never by reading
 * ctrl->head: that line is the producers' to CAS on, and a consumer polling it on an empty ring
 * would take it away from a producer in the middle of every claim.  A producer commits a burst's
 * first slot last, so consumers see a burst only once all of it is written and take it whole
 * with one CAS instead of chasing the producer slot by slot.  (Layout version 1 had consumers
 * poll a commit hint that producers raised by CAS after every claim; that second CAS per claim
 * cost more than the polling it saved.)
 *
 * Pairings:
 *   producer: writes payload, then release-stores seq = i + 1   -> consumer's acquire load of seq
 *   consumer: reads payload,  then release-stores seq = i + cap -> producer's acquire load of seq
 *   CAS on head/tail: acq_rel, they only order the claims among producers (resp. consumers).
 *
 * Cooperating peers only: a producer that dies between claim and commit leaves its slot claimed
 * forever and consumers stop there; a consumer that dies between claim and release (a receive or
 * a held peek) leaves its slot claimed and producers stop there one lap later.
 * ivshm_mpmc_stalled() and ivshm_mpmc_consumer_stalled() detect those states so callers can report
 * them after a timeout, and ivshm_mpmc_recover() (an operator's call, once the holder is known to
 * be dead) gets the ring moving again.  Values read from shared memory are validated (lengths, flags); every loop
 * that retries after another party's progress is bounded, so a hostile peer cannot spin us forever.
 */
#ifndef IVSHM_MPMC_H
#define IVSHM_MPMC_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ivshm_atomic.h"
#include "ivshm_copy.h"
#include "ivshm_layout.h"
#include "ivshm_region.h"

#ifdef __cplusplus
extern "C" {
#endif

#define IVSHM_MPMC_MAX_RETRIES (1u << 20)

struct ivshm_mpmc {
    struct ivshm_ring_ctrl *ctrl;
    uint8_t *slots;
    uint64_t mask;
    uint32_t capacity;
    uint32_t slot_size;
    uint32_t stride;
    uint32_t _pad;
    const char *why;
    uint64_t why_a, why_b;
};

int ivshm_mpmc_attach(struct ivshm_mpmc *q, const struct ivshm_region *r,
                      const struct ivshm_ring_info *info, const char **why);

static inline struct ivshm_mpmc_slot_hdr *ivshm_mpmc_slot(const struct ivshm_mpmc *q, uint64_t i)
{
    return (struct ivshm_mpmc_slot_hdr *)(q->slots + (i & q->mask) * (uint64_t)q->stride);
}

static inline uint8_t *ivshm_mpmc_payload(const struct ivshm_mpmc *q, uint64_t i)
{
    return (uint8_t *)ivshm_mpmc_slot(q, i) + IVSHM_MPMC_SLOT_HDR;
}

/* Slots are read (their sequence word) and then written by the same side: fetching their lines
 * for writing up front saves a shared-then-exclusive upgrade per line in a burst.  One prefetch
 * per 64 bytes (per slot for slots of 64 bytes or more). */
static inline void ivshm_mpmc_prefetch_w(const struct ivshm_mpmc *q, uint64_t p, uint64_t n)
{
    if (n < 4)
        return;
    const uint64_t stride = q->stride, step = stride >= 64 ? stride : 64, size = n * stride;
    uint8_t *const base = q->slots;
    const uint64_t ring = (uint64_t)q->capacity * stride;
    uint64_t at = (p & q->mask) * stride;
    for (uint64_t b = 0; b < size; b += step, at += step) {
        while (at >= ring) /* once at most: 4 <= n <= capacity, so the ring spans a step */
            at -= ring;
        __builtin_prefetch(base + at, 1, 3);
    }
}

/* How many of the `run` slots from s on carry the sequence words want, want + 1, ...; *seen is
 * the first other one. */
static inline uint64_t ivshm_mpmc_scan_run(const uint8_t *s, uint64_t run, uint64_t stride, uint32_t want,
                                           uint32_t *seen)
{
    uint64_t k = 0;
    /* four slots per branch; a group that does not match is looked at again one slot at a time */
    for (; k + 4 <= run; k += 4, s += 4 * stride, want += 4) {
        /* acquire: pairs with the release store of each sequence word by the other side */
        uint32_t a = IVSHM_LOAD_ACQUIRE(&((const struct ivshm_mpmc_slot_hdr *)s)->seq);
        uint32_t b = IVSHM_LOAD_ACQUIRE(&((const struct ivshm_mpmc_slot_hdr *)(s + stride))->seq);
        uint32_t c = IVSHM_LOAD_ACQUIRE(&((const struct ivshm_mpmc_slot_hdr *)(s + 2 * stride))->seq);
        uint32_t d = IVSHM_LOAD_ACQUIRE(&((const struct ivshm_mpmc_slot_hdr *)(s + 3 * stride))->seq);
        if (IVSHM_UNLIKELY(((a ^ want) | (b ^ (want + 1)) | (c ^ (want + 2)) | (d ^ (want + 3))) != 0))
            break;
    }
    for (; k < run; k++, s += stride, want++) {
        uint32_t seq = IVSHM_LOAD_ACQUIRE(&((const struct ivshm_mpmc_slot_hdr *)s)->seq);
        if (seq != want) {
            *seen = seq;
            return k;
        }
    }
    return run;
}

/* How many of the n slots from index p carry the sequence word p + k + off (off 0: free for
 * the producer of p + k; off 1: holding message p + k); *dif is the first other one's distance
 * from what was expected (0 if all n do). */
static inline uint64_t ivshm_mpmc_scan(const struct ivshm_mpmc *q, uint64_t p, uint64_t n,
                                       uint64_t off, int64_t *dif)
{
    /* locals: the acquire loads would otherwise make the compiler reload q's fields per slot */
    const uint64_t stride = q->stride;
    uint8_t *const base = q->slots;
    const uint64_t idx = p & q->mask;
    uint64_t run = (uint64_t)q->capacity - idx; /* slots before the ring's end */
    const uint32_t want = (uint32_t)(p + off);
    uint32_t seen = 0;
    if (run > n)
        run = n;
    uint64_t k = ivshm_mpmc_scan_run(base + idx * stride, run, stride, want, &seen);
    if (k == run && k < n)
        k += ivshm_mpmc_scan_run(base, n - k, stride, want + (uint32_t)k, &seen);
    /* |dif| <= capacity <= 2^30 */
    *dif = k < n ? (int32_t)(seen - (want + (uint32_t)k)) : 0;
    return k;
}

static inline int ivshm_mpmc_corrupt(struct ivshm_mpmc *q, const char *why, uint64_t a, uint64_t b)
{
    q->why = why;
    q->why_a = a;
    q->why_b = b;
    return -EPROTO;
}

/* Claim up to n consecutive free slots for writing.  On success returns the count m >= 1 and the
 * first index in *pos; the caller fills payloads and calls ivshm_mpmc_commit_one for each.
 * 0 when n is 0, -EAGAIN when full, -EPROTO when the indices keep moving without end (hostile
 * peer). */
static inline int64_t ivshm_mpmc_claim_send(struct ivshm_mpmc *q, uint64_t n, uint64_t *pos)
{
    if (IVSHM_UNLIKELY(n == 0))
        return 0; /* else the loop below claims nothing, retries and reports a hostile peer */
    if (n > q->capacity)
        n = q->capacity;
    uint64_t p = IVSHM_LOAD_RELAXED(&q->ctrl->head);
    ivshm_mpmc_prefetch_w(q, p, n);
    for (uint32_t tries = 0; tries < IVSHM_MPMC_MAX_RETRIES; tries++) {
        int64_t dif;
        /* pairs with the consumer's release store of seq = i + capacity (slot handed back) */
        uint64_t m = ivshm_mpmc_scan(q, p, n, 0, &dif);
        if (m == 0) {
            if (dif < 0)
                return -EAGAIN; /* the slot still holds the previous lap's message: full */
            /* Another producer got there first: it moved head past p with its CAS before the seq
             * store our acquire load saw, so head must have changed.  If it has not, the sequence
             * word was forged: report it now instead of retrying 2^20 times. */
            uint64_t again = IVSHM_LOAD_RELAXED(&q->ctrl->head);
            if (IVSHM_UNLIKELY(again == p))
                return ivshm_mpmc_corrupt(q, "slot sequence number is ahead of the producer index",
                                          p + (uint64_t)dif, p);
            p = again;
            continue;
        }
        /* orders our claim against other producers' claims; on failure p is reloaded */
        if (IVSHM_CAS(&q->ctrl->head, &p, p + m)) {
            *pos = p;
            return (int64_t)m;
        }
    }
    return ivshm_mpmc_corrupt(q, "producer index keeps changing (hostile peer?)", p, 0);
}

static inline void ivshm_mpmc_commit_one(struct ivshm_mpmc *q, uint64_t i, uint32_t len)
{
    struct ivshm_mpmc_slot_hdr *s = ivshm_mpmc_slot(q, i);
    /* an atomic (relaxed: a plain store) write: a consumer with a short buffer reads lengths
     * before its claim (ivshm_mpmc_claim_recv_max) and may read this slot while it is reused;
     * its claim then fails and the value read is dropped */
    IVSHM_STORE_RELAXED(&s->len, len);
    /* pairs with the consumer's acquire load of seq in ivshm_mpmc_claim_recv */
    IVSHM_STORE_RELEASE(&s->seq, (uint32_t)(i + 1));
}

/* Claim up to n consecutive full slots for reading; 0 when n is 0, -EAGAIN when empty (or when the
 * next slot is claimed by a producer that has not committed: see ivshm_mpmc_stalled). */
static inline int64_t ivshm_mpmc_claim_recv(struct ivshm_mpmc *q, uint64_t n, uint64_t *pos)
{
    if (IVSHM_UNLIKELY(n == 0))
        return 0;
    if (n > q->capacity)
        n = q->capacity;
    uint64_t p = IVSHM_LOAD_RELAXED(&q->ctrl->tail);
    for (uint32_t tries = 0; tries < IVSHM_MPMC_MAX_RETRIES; tries++) {
        if (tries == 0)
            ivshm_mpmc_prefetch_w(q, p, n);
        int64_t dif;
        /* pairs with the producer's release store of seq = i + 1 (commit) */
        uint64_t m = ivshm_mpmc_scan(q, p, n, 1, &dif);
        if (m == 0) {
            if (dif < 0)
                return -EAGAIN;
            /* Consumed by another consumer, whose CAS moved tail past p before the seq store we
             * saw; an unchanged tail means a forged sequence word (see claim_send). */
            uint64_t again = IVSHM_LOAD_RELAXED(&q->ctrl->tail);
            if (IVSHM_UNLIKELY(again == p))
                return ivshm_mpmc_corrupt(q, "slot sequence number is ahead of the consumer index",
                                          p + 1 + (uint64_t)dif, p);
            p = again;
            continue;
        }
        if (IVSHM_CAS(&q->ctrl->tail, &p, p + m)) { /* orders claims among consumers */
            *pos = p;
            return (int64_t)m;
        }
    }
    return ivshm_mpmc_corrupt(q, "consumer index keeps changing (hostile peer?)", p, 0);
}

/* Like ivshm_mpmc_claim_recv, but claims only messages of at most max_len bytes: a burst stops
 * before the first longer message, and when the first is longer nothing is claimed: -EMSGSIZE with
 * its length in *needed, the message staying in the ring for a consumer with room.  (A length over
 * the slot size is claimed, so that the caller reports the corruption and it goes.)  The lengths
 * are read before the claim, after the acquire load that shows each slot committed: no producer
 * writes them until a consumer has claimed and released the slot, and a successful CAS from p
 * proves that no consumer claimed them.  For callers whose buffer is smaller than a slot only;
 * the others use ivshm_mpmc_claim_recv, which reads no lengths. */
static inline int64_t ivshm_mpmc_claim_recv_max(struct ivshm_mpmc *q, uint64_t n, uint64_t max_len,
                                                uint64_t *pos, uint64_t *needed)
{
    if (IVSHM_UNLIKELY(n == 0))
        return 0;
    if (n > q->capacity)
        n = q->capacity;
    uint64_t p = IVSHM_LOAD_RELAXED(&q->ctrl->tail);
    for (uint32_t tries = 0; tries < IVSHM_MPMC_MAX_RETRIES; tries++) {
        int64_t dif;
        /* pairs with the producer's release store of seq = i + 1 (commit) */
        uint64_t m = ivshm_mpmc_scan(q, p, n, 1, &dif);
        if (m == 0) {
            if (dif < 0)
                return -EAGAIN;
            uint64_t again = IVSHM_LOAD_RELAXED(&q->ctrl->tail);
            if (IVSHM_UNLIKELY(again == p))
                return ivshm_mpmc_corrupt(q, "slot sequence number is ahead of the consumer index",
                                          p + 1 + (uint64_t)dif, p);
            p = again;
            continue;
        }
        uint64_t k = 0;
        uint32_t len = 0;
        for (; k < m; k++) {
            /* acquire: the tail load below must not be answered before this length is read */
            len = IVSHM_LOAD_ACQUIRE(&ivshm_mpmc_slot(q, p + k)->len);
            if (len > max_len)
                break;
        }
        if (k == 0) {
            if (len > q->slot_size) {
                k = 1; /* corrupt: claim it, the caller's length check reports it */
            } else {
                /* an unchanged tail means nobody claimed the slot since its commit was seen: the
                 * length is that message's */
                uint64_t again = IVSHM_LOAD_RELAXED(&q->ctrl->tail);
                if (again != p) {
                    p = again;
                    continue;
                }
                if (needed)
                    *needed = len;
                return -EMSGSIZE;
            }
        }
        if (IVSHM_CAS(&q->ctrl->tail, &p, p + k)) { /* orders claims among consumers */
            *pos = p;
            return (int64_t)k;
        }
    }
    return ivshm_mpmc_corrupt(q, "consumer index keeps changing (hostile peer?)", p, 0);
}

/* `len`, a length read from a slot header, if it fits the slot; else -EPROTO. */
static inline int64_t ivshm_mpmc_check_len(struct ivshm_mpmc *q, uint32_t len)
{
    if (IVSHM_UNLIKELY(len > q->slot_size))
        return ivshm_mpmc_corrupt(q, "slot length exceeds the slot size", len, q->slot_size);
    return len;
}

/* Validated length of the claimed message at index i (or -EPROTO). */
static inline int64_t ivshm_mpmc_msg_len(struct ivshm_mpmc *q, uint64_t i)
{
    return ivshm_mpmc_check_len(q, IVSHM_READ_ONCE(&ivshm_mpmc_slot(q, i)->len));
}

/* Hand a consumed slot back to producers of the next lap. */
static inline void ivshm_mpmc_release_one(struct ivshm_mpmc *q, uint64_t i)
{
    /* pairs with the producer's acquire load of seq in ivshm_mpmc_claim_send */
    IVSHM_STORE_RELEASE(&ivshm_mpmc_slot(q, i)->seq, (uint32_t)(i + q->capacity));
}

static inline int ivshm_mpmc_try_send(struct ivshm_mpmc *q, const void *data, uint64_t len)
{
    if (IVSHM_UNLIKELY(len > q->slot_size))
        return -EMSGSIZE;
    uint64_t p = 0; /* set by every claim that returns > 0 (gcc cannot tell) */
    int64_t m = ivshm_mpmc_claim_send(q, 1, &p);
    if (IVSHM_UNLIKELY(m <= 0))
        return (int)m;
    ivshm_copy(ivshm_mpmc_payload(q, p), data, len);
    ivshm_mpmc_commit_one(q, p, (uint32_t)len);
    return 0;
}

/* Receive one message into buf: its length, -EAGAIN, -ENOBUFS (buf too small: the message stays
 * in the ring for any consumer, *needed says its length; as ivshm_spsc_try_recv), -EPROTO.  A
 * buffer of at least the slot size always fits and takes the plain claim. */
static inline int64_t ivshm_mpmc_try_recv(struct ivshm_mpmc *q, void *buf, uint64_t cap,
                                          uint64_t *needed)
{
    uint64_t p = 0; /* set by every claim that returns > 0 (gcc cannot tell) */
    int64_t m;
    if (IVSHM_LIKELY(cap >= q->slot_size)) {
        m = ivshm_mpmc_claim_recv(q, 1, &p);
    } else {
        m = ivshm_mpmc_claim_recv_max(q, 1, cap, &p, needed);
        if (m == -EMSGSIZE)
            return -ENOBUFS;
    }
    if (IVSHM_UNLIKELY(m <= 0))
        return m;
    int64_t len = ivshm_mpmc_msg_len(q, p);
    if (len >= 0) {
        if (IVSHM_UNLIKELY((uint64_t)len > cap)) {
            len = ivshm_mpmc_corrupt(q, "slot length changed after the claim", (uint64_t)len, cap);
        } else {
            if (needed)
                *needed = (uint64_t)len;
            ivshm_copy(buf, ivshm_mpmc_payload(q, p), (uint64_t)len);
        }
    }
    ivshm_mpmc_release_one(q, p);
    return len;
}

static inline int64_t ivshm_mpmc_send_fixed(struct ivshm_mpmc *q, const void *data, uint32_t elem,
                                            uint64_t n)
{
    if (IVSHM_UNLIKELY(elem > q->slot_size))
        return -EMSGSIZE;
    uint64_t p = 0; /* set by every claim that returns > 0 (gcc cannot tell) */
    int64_t m = ivshm_mpmc_claim_send(q, n, &p);
    if (m <= 0)
        return m == -EAGAIN ? 0 : m;
    const uint8_t *src = (const uint8_t *)data;
    const uint64_t mask = q->mask, stride = q->stride;
    uint8_t *const base = q->slots;
    /* From the last slot to the first, each committed with a release store that pairs with the
     * consumer's acquire load in claim_recv.  Consumers meet the burst's first slot first, so
     * they see the burst only once all of it is committed; and the line they poll, the one
     * with that slot, is written only at the end instead of while they read it.  (Not unrolled
     * like the consumer's loop: a producer faster than its consumers keeps the ring full, and
     * then meets each consumer burst half handed back; docs/bench.md.) */
    uint64_t idx = (p + (uint64_t)m - 1) & mask;
    uint8_t *s = base + idx * stride;
    uint32_t seq = (uint32_t)(p + (uint64_t)m);
    for (int64_t k = m - 1; k >= 0; k--, seq--) {
        struct ivshm_mpmc_slot_hdr *h = (struct ivshm_mpmc_slot_hdr *)s;
        ivshm_copy(s + IVSHM_MPMC_SLOT_HDR, src + (uint64_t)k * elem, elem);
        IVSHM_STORE_RELAXED(&h->len, elem); /* atomic: see ivshm_mpmc_commit_one */
        IVSHM_STORE_RELEASE(&h->seq, seq);
        if (idx == 0) {
            idx = mask;
            s = base + mask * stride;
        } else {
            idx--;
            s -= stride;
        }
    }
    /* The next burst's claim must read those slots' sequence words, last written by a consumer:
     * start fetching their lines now, one per 64 bytes, so that the claim does not wait. */
    if (m >= 4) {
        uint64_t step = q->stride >= 64 ? 1 : 64 / q->stride;
        for (uint64_t k = 0; k < (uint64_t)m; k += step)
            __builtin_prefetch(ivshm_mpmc_slot(q, p + (uint64_t)m + k), 0, 3);
    }
    return m;
}

/* A slot whose length is not the cell size, for ivshm_mpmc_get_run: pads a shorter message with
 * zeros; -EPROTO for a length over the slot size, -EMSGSIZE for one over the cell; else rc. */
int64_t ivshm_mpmc_get_odd(struct ivshm_mpmc *q, uint8_t *d, const uint8_t *payload, uint32_t len,
                           uint32_t elem, int64_t rc);

/* Copy the messages of the `cnt` slots from s on into cells of `elem` bytes from d on, and hand
 * each slot to the next lap with sequence word seq, seq + 1, ...; returns rc or an error of
 * ivshm_mpmc_get_odd. */
static inline int64_t ivshm_mpmc_get_run(struct ivshm_mpmc *q, uint8_t *s, uint64_t cnt, uint64_t stride,
                                         uint8_t *d, uint32_t elem, uint32_t seq, int64_t rc)
{
#pragma GCC unroll 4
    for (uint64_t k = 0; k < cnt; k++, s += stride, d += elem, seq++) {
        struct ivshm_mpmc_slot_hdr *h = (struct ivshm_mpmc_slot_hdr *)s;
        uint32_t len = IVSHM_READ_ONCE(&h->len);
        if (IVSHM_LIKELY(len == elem))
            ivshm_copy(d, s + IVSHM_MPMC_SLOT_HDR, elem);
        else
            rc = ivshm_mpmc_get_odd(q, d, s + IVSHM_MPMC_SLOT_HDR, len, elem, rc);
        /* read: hand it to the next lap (pairs with the producer's acquire load in claim_send) */
        IVSHM_STORE_RELEASE(&h->seq, seq);
    }
    return rc;
}

/* Receive up to n messages into an array of `elem`-byte cells (shorter messages are zero-padded).
 * A message longer than a cell ends the burst before it and stays in the ring; when it is the
 * first, the call returns -EMSGSIZE and claims nothing (receive it with ivshm_mpmc_try_recv and a
 * larger buffer).  Cells of at least the slot size take the plain claim, which reads no lengths. */
static inline int64_t ivshm_mpmc_recv_fixed(struct ivshm_mpmc *q, void *dst, uint32_t elem,
                                            uint64_t n)
{
    uint64_t p = 0; /* set by every claim that returns > 0 (gcc cannot tell) */
    int64_t m;
    if (IVSHM_LIKELY(elem >= q->slot_size)) {
        m = ivshm_mpmc_claim_recv(q, n, &p);
    } else {
        uint64_t needed;
        m = ivshm_mpmc_claim_recv_max(q, n, elem, &p, &needed);
    }
    if (m <= 0)
        return m == -EAGAIN ? 0 : m;
    uint8_t *const d = (uint8_t *)dst;
    int64_t rc = m;
    const uint64_t stride = q->stride;
    uint8_t *const base = q->slots;
    const uint64_t idx = p & q->mask;
    uint64_t run = (uint64_t)q->capacity - idx; /* slots before the ring's end */
    const uint32_t seq = (uint32_t)(p + q->capacity);
    if (run > (uint64_t)m)
        run = (uint64_t)m;
    rc = ivshm_mpmc_get_run(q, base + idx * stride, run, stride, d, elem, seq, rc);
    if ((uint64_t)m > run)
        rc = ivshm_mpmc_get_run(q, base, (uint64_t)m - run, stride, d + run * elem, elem,
                                seq + (uint32_t)run, rc);
    return rc;
}

/* Messages in the ring as the shared indices say (claims included), clamped to [0, capacity]. */
static inline uint64_t ivshm_mpmc_count(const struct ivshm_mpmc *q)
{
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
    uint64_t d = h - t;
    return d > q->capacity ? 0 : d;
}

/* The producer index (slots claimed by producers so far) and the consumer index, as they are
 * now (each may move on at once): for callers that note where the ring was before a claim. */
static inline void ivshm_mpmc_indices(const struct ivshm_mpmc *q, uint64_t *head, uint64_t *tail)
{
    *tail = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    *head = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
}

/* 1 if the slot at the consumers' index is claimed by a producer that has not committed yet (the
 * state a dead producer leaves behind), with its index in *pos; else 0. */
static inline int ivshm_mpmc_stalled(const struct ivshm_mpmc *q, uint64_t *pos)
{
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
    if (h == t || h - t > q->capacity)
        return 0;
    uint32_t seq = IVSHM_LOAD_ACQUIRE(&ivshm_mpmc_slot(q, t)->seq);
    if (seq != (uint32_t)t)
        return 0;
    *pos = t;
    return 1;
}

/* 1 if the slot producers wait for (index head - capacity, the oldest one not yet handed back) was
 * claimed by a consumer that has not released it: the state a consumer that died in a receive or
 * holding a peek leaves behind (producers see a full ring while head - tail says it is not), with
 * its index in *pos; else 0.  A live consumer is in that state for the length of one copy, so
 * callers report it only after a timeout. */
static inline int ivshm_mpmc_consumer_stalled(const struct ivshm_mpmc *q, uint64_t *pos)
{
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    uint64_t i = h - q->capacity;
    if (h - t > q->capacity || t - i - 1 >= q->capacity) /* need i < t <= h */
        return 0;
    /* pairs with the producer's release store of seq = i + 1: committed, and not handed back */
    uint32_t seq = IVSHM_LOAD_ACQUIRE(&ivshm_mpmc_slot(q, i)->seq);
    if (seq != (uint32_t)(i + 1))
        return 0;
    *pos = i;
    return 1;
}

/* Give up index i, claimed for sending and not committed (a reservation dropped without commit).
 * If no producer claimed after it, head moves back to i and the slot is as if never claimed
 * (returns 0); otherwise it is committed as an empty message, so that consumers move past it
 * (returns 1). */
int ivshm_mpmc_abandon(struct ivshm_mpmc *q, uint64_t i);

#define IVSHM_MPMC_RECOVERED_CONSUMER 1 /* a consumer's claim was dropped: its message is lost */
#define IVSHM_MPMC_RECOVERED_PRODUCER 2 /* a producer's claim was committed as an empty message */

/* Operator recovery of slot index i, claimed by a party that died (as ivshm_mpmc_stalled or
 * ivshm_mpmc_consumer_stalled report it).  Only safe once the holder is known to be dead: a live
 * holder would go on reading or writing a slot that others now use.  Returns
 * IVSHM_MPMC_RECOVERED_CONSUMER, IVSHM_MPMC_RECOVERED_PRODUCER, -ENOENT if slot i is claimed by
 * nobody (nothing to recover, or the holder finished meanwhile), -EINVAL if i is not within a lap
 * of the indices. */
int ivshm_mpmc_recover(struct ivshm_mpmc *q, uint64_t i);

/* Who holds slot index i: IVSHM_MPMC_RECOVERED_CONSUMER (claimed by a consumer, not handed
 * back: tail - capacity <= i < tail, its sequence word i + 1), IVSHM_MPMC_RECOVERED_PRODUCER
 * (claimed by a producer, not committed: tail <= i < head, its sequence word i), 0 (nobody), or
 * -EINVAL if i is not within a lap of the indices.  A snapshot: a live holder may finish at once. */
int ivshm_mpmc_claim_state(const struct ivshm_mpmc *q, uint64_t i);

/* The first index from `from` on (and within a lap) that a consumer (consumer nonzero) or a
 * producer holds as ivshm_mpmc_claim_state says, in *pos: returns 1; 0 when there is none.  For
 * finding, after a restart, the claims a dead party left: a claim reported twice a while apart
 * belongs to a party that stalled or died. */
int ivshm_mpmc_next_claim(const struct ivshm_mpmc *q, int consumer, uint64_t from, uint64_t *pos);

/* Copy the message of slot index i, claimed by a consumer and not handed back (a dead consumer's
 * claim, before ivshm_mpmc_recover drops it), into buf (cap bytes).  Returns its length; -ENOENT
 * if no consumer holds slot i (or its holder handed it back during the copy: what was copied
 * may be torn), -ENOBUFS if cap is shorter than the message (*needed says its length when needed
 * is not NULL), -EPROTO if its length exceeds the slot size, -EINVAL if i is not within a lap.
 * The slot stays claimed. */
int64_t ivshm_mpmc_read_claimed(struct ivshm_mpmc *q, uint64_t i, void *buf, uint64_t cap,
                                uint64_t *needed);

/* Like ivshm_mpmc_recover of a producer's claim, but committing the message (data, len) instead
 * of an empty one: what a restarted producer does to finish the reservation its dead predecessor
 * left open, without a second reservation (no message lost or repeated).  The payload and length
 * are written, then the sequence word is set with a release CAS.  Returns
 * IVSHM_MPMC_RECOVERED_PRODUCER; -EMSGSIZE if len exceeds the slot size; -EBUSY if slot i is a
 * consumer's claim (no message can be committed there); -ENOENT if nobody holds it; -EINVAL if i
 * is not within a lap.  Only once the holder is known to be dead, and by one party at a time. */
int ivshm_mpmc_recover_with(struct ivshm_mpmc *q, uint64_t i, const void *data, uint32_t len);

#ifdef __cplusplus
}
#endif
#endif /* IVSHM_MPMC_H */
