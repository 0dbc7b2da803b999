/* ivshm_spsc.h - single-producer single-consumer ring of variable-length messages.
 *
 * The hot path is static inline so that C programs and the Cython module compile it in place.
 * Each side keeps its own index in private memory (`struct ivshm_spsc` lives in the process, not
 * in the region).  Shared indices only grow (64-bit, no wrap in practice).
 *
 * How the consumer finds messages: by the stamp in each slot's header, not by the producer's
 * index.  The producer stores (uint32_t)(i + 1) into the stamp of slot i after the rest of the
 * slot, and a batch's first slot is stamped last, so one release store publishes the whole batch
 * (every later slot of it was written and stamped before).  The consumer reads the stamp of the
 * slot at its own index: published or not.  It never reads ctrl->head after attaching, so the
 * line the producer writes on every publish stays in the producer's cache, and a message crosses
 * in the one cache line that carries it.  Polling ctrl->head instead made every message move two
 * contended lines (head and slot) and cost half the throughput at burst 1 (docs/bench.md).
 * The producer caches the consumer's index and re-reads ctrl->tail only when its cache says the
 * ring is full.  ctrl->head is still stored after each batch: it is what inspection, len() and a
 * newly attached consumer read.
 *
 * Pairings:
 *   producer: writes slots, then release-stores the first slot's stamp -> consumer's acquire load
 *             of that stamp; then release-stores ctrl->head (for count, attach, the wake-up check)
 *   consumer: reads slots,  then release-stores ctrl->tail   -> producer's acquire load of tail
 * A message longer than one slot takes several consecutive slots (IVSHM_SPSC_MORE on all but the
 * last, each but the last full), all in one batch.
 *
 * A producer that dies leaves at most stamps on slots of a batch it never published (the first
 * slot is stamped last): the next producer clears those when it starts (ivshm_spsc_recover), and
 * adopts a batch its predecessor published but whose ctrl->head store it did not live to make.
 *
 * Trust: every value read from shared memory (the other side's index, slot lengths, stamps) is
 * read once and validated: index distance <= capacity, length <= slot size, chunk chains stamped
 * and inside the ring.  A violation returns -EPROTO and sets q->why; nothing outside the ring's
 * slots is ever read or written.  A forged stamp can at worst present a slot's (in-bounds) bytes
 * as a message, as a forged index could.
 */
#ifndef IVSHM_SPSC_H
#define IVSHM_SPSC_H

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

struct ivshm_spsc {
    struct ivshm_ring_ctrl *ctrl;
    uint8_t *slots;
    uint64_t mask;
    uint32_t capacity;
    uint32_t slot_size;
    uint32_t stride;
    uint32_t _pad;
    /* producer side, private */
    uint64_t head;           /* next index to write */
    uint64_t head_published; /* last value stored to ctrl->head */
    uint64_t tail_cache;     /* last ctrl->tail seen */
    uint32_t recovered;      /* ivshm_spsc_recover() has run */
    uint32_t _pad2;
    /* consumer side, private */
    uint64_t tail;           /* next index to read */
    uint64_t tail_published;
    /* last corruption found: a static explanation and the values involved */
    const char *why;
    uint64_t why_a, why_b;
};

/* A message located by ivshm_spsc_next(): validated, not yet consumed. */
struct ivshm_spsc_msg {
    const uint8_t *data; /* payload of its first slot */
    uint64_t len;        /* total payload bytes */
    uint32_t nslots;
};

int ivshm_spsc_attach(struct ivshm_spsc *q, const struct ivshm_region *r,
                      const struct ivshm_ring_info *info, const char **why);

static inline uint8_t *ivshm_spsc_slot(const struct ivshm_spsc *q, uint64_t idx)
{
    return q->slots + (idx & q->mask) * (uint64_t)q->stride;
}

static inline struct ivshm_spsc_slot_hdr *ivshm_spsc_hdr(const struct ivshm_spsc *q, uint64_t idx)
{
    return (struct ivshm_spsc_slot_hdr *)ivshm_spsc_slot(q, idx);
}

/* The stamp that says "slot of index idx holds the published message idx". */
static inline uint32_t ivshm_spsc_stamp(uint64_t idx)
{
    return (uint32_t)(idx + 1);
}

static inline int ivshm_spsc_corrupt(struct ivshm_spsc *q, const char *why, uint64_t a, uint64_t b)
{
    q->why = why;
    q->why_a = a;
    q->why_b = b;
    return -EPROTO;
}

/* Slots a message of `len` bytes needs. */
static inline uint64_t ivshm_spsc_slots_for(const struct ivshm_spsc *q, uint64_t len)
{
    /* not (len + slot_size - 1) / slot_size: that wraps for len near 2^64 and yields 0 slots */
    return len <= q->slot_size ? 1 : len / q->slot_size + (len % q->slot_size != 0);
}

/* A producer's first look at the ring (ivshm_spsc.c): adopts a batch its predecessor stamped but
 * did not live to announce in ctrl->head, and clears stamps its predecessor left on slots it
 * never published.  0 or -EPROTO. */
int ivshm_spsc_recover(struct ivshm_spsc *q);

/* Free slots for the producer, re-reading the consumer's index if fewer than `need` are cached.
 * Returns the count, or -EPROTO. */
static inline int64_t ivshm_spsc_free(struct ivshm_spsc *q, uint64_t need)
{
    uint64_t used = q->head - q->tail_cache;
    if (IVSHM_LIKELY(q->capacity - used >= need))
        return (int64_t)(q->capacity - used);
    if (IVSHM_UNLIKELY(!q->recovered)) {
        /* attach leaves the cache "full", so a producer's first call lands here */
        int rc = ivshm_spsc_recover(q);
        if (rc)
            return rc;
    }
    /* Our own shared index must still be what we published: otherwise another producer (or a
     * peer) wrote it, and we would overwrite messages it published. */
    uint64_t own = IVSHM_LOAD_RELAXED(&q->ctrl->head);
    if (IVSHM_UNLIKELY(own != q->head_published))
        return ivshm_spsc_corrupt(q, "another producer moved this SPSC ring's index (one producer only)",
                                  own, q->head_published);
    /* pairs with the consumer's release store of ctrl->tail: its reads of these slots are done */
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    used = q->head - t;
    if (IVSHM_UNLIKELY(used > q->capacity))
        return ivshm_spsc_corrupt(q, "consumer index is outside the producer's window", t, q->head);
    if (IVSHM_UNLIKELY(t < q->tail_cache))
        return ivshm_spsc_corrupt(q, "consumer index moved backwards", t, q->tail_cache);
    q->tail_cache = t;
    return (int64_t)(q->capacity - used);
}

/* Fill in the header of slot `s`, of index i: its length, and its stamp unless i is the first
 * slot of the batch (`first`: that one is stamped last, by ivshm_spsc_publish). */
static inline void ivshm_spsc_put_hdr(uint8_t *s, uint64_t i, uint64_t first, uint32_t len_more)
{
    struct ivshm_spsc_slot_hdr *hd = (struct ivshm_spsc_slot_hdr *)s;
    if (IVSHM_UNLIKELY(i == first)) {
        hd->len = len_more; /* the consumer may be polling this slot's stamp: leave it alone */
        return;
    }
    /* Both words in one store.  The consumer reads them only after the acquire load of the
     * batch's first stamp, which the producer stores after this one (release). */
    struct ivshm_spsc_slot_hdr v = {.len = len_more, .stamp = ivshm_spsc_stamp(i)};
    uint64_t word;
    memcpy(&word, &v, sizeof(word));
    IVSHM_STORE_RELAXED((uint64_t *)hd, word);
}

/* Write one message at the private head without publishing it.
 * 0, -EAGAIN (not enough free slots), -EMSGSIZE (larger than the whole ring), -EPROTO. */
static inline int ivshm_spsc_write(struct ivshm_spsc *q, const void *data, uint64_t len)
{
    uint64_t n = ivshm_spsc_slots_for(q, len);
    if (IVSHM_UNLIKELY(n > q->capacity))
        return -EMSGSIZE;
    int64_t f = ivshm_spsc_free(q, n);
    if (IVSHM_UNLIKELY(f < 0))
        return (int)f;
    if ((uint64_t)f < n)
        return -EAGAIN;
    const uint8_t *src = (const uint8_t *)data;
    for (uint64_t k = 0; k < n; k++) {
        uint8_t *s = ivshm_spsc_slot(q, q->head + k);
        uint32_t chunk = (uint32_t)(k + 1 < n ? q->slot_size : len - k * (uint64_t)q->slot_size);
        ivshm_copy(s + IVSHM_SPSC_SLOT_HDR, src, chunk);
        ivshm_spsc_put_hdr(s, q->head + k, q->head_published, chunk | (k + 1 < n ? IVSHM_SPSC_MORE : 0));
        src += chunk;
    }
    q->head += n;
    return 0;
}

/* Publish everything written so far: stamp the batch's first slot, then announce the new index. */
static inline void ivshm_spsc_publish(struct ivshm_spsc *q)
{
    if (q->head != q->head_published) {
        /* pairs with the consumer's acquire load of the stamp: this batch is complete */
        IVSHM_STORE_RELEASE(&ivshm_spsc_hdr(q, q->head_published)->stamp,
                            ivshm_spsc_stamp(q->head_published));
        /* pairs with the acquire loads of ctrl->head in attach and ivshm_spsc_count */
        IVSHM_STORE_RELEASE(&q->ctrl->head, q->head);
        q->head_published = q->head;
    }
}

static inline int ivshm_spsc_try_send(struct ivshm_spsc *q, const void *data, uint64_t len)
{
    int rc = ivshm_spsc_write(q, data, len);
    if (IVSHM_LIKELY(rc == 0))
        ivshm_spsc_publish(q);
    return rc;
}

/* Send up to n messages of `elem` bytes each from a contiguous array; one publish.  Returns the
 * number sent (0 when full) or -errno. */
static inline int64_t ivshm_spsc_send_fixed(struct ivshm_spsc *q, const void *data, uint32_t elem,
                                            uint64_t n)
{
    if (IVSHM_UNLIKELY(elem > q->slot_size))
        return -EMSGSIZE;
    int64_t f = ivshm_spsc_free(q, n);
    if (IVSHM_UNLIKELY(f < 0))
        return f;
    if ((uint64_t)f < n)
        n = (uint64_t)f;
    /* locals: the compiler cannot tell that the slot stores leave *q alone */
    const uint8_t *src = (const uint8_t *)data;
    uint8_t *const slots = q->slots;
    const uint64_t mask = q->mask, stride = q->stride, h = q->head, first = q->head_published;
    for (uint64_t k = 0; k < n; k++) {
        uint8_t *s = slots + ((h + k) & mask) * stride;
        ivshm_copy(s + IVSHM_SPSC_SLOT_HDR, src + k * (uint64_t)elem, elem);
        ivshm_spsc_put_hdr(s, h + k, first, elem);
    }
    q->head = h + n;
    ivshm_spsc_publish(q);
    return (int64_t)n;
}

/* Nothing is published at the consumer's index.  Before saying so (0), check that our own shared
 * index is still what we stored (one consumer only): -EPROTO if not. */
static inline int ivshm_spsc_empty(struct ivshm_spsc *q)
{
    uint64_t own = IVSHM_LOAD_RELAXED(&q->ctrl->tail);
    if (IVSHM_UNLIKELY(own != q->tail_published))
        return ivshm_spsc_corrupt(q, "another consumer moved this SPSC ring's index (one consumer only)",
                                  own, q->tail_published);
    return 0;
}

/* 1 if header `hd`, of the slot of index i, says it holds the published message i. */
static inline int ivshm_spsc_stamped_hdr(const struct ivshm_spsc_slot_hdr *hd, uint64_t i)
{
    /* pairs with the producer's release store of the first stamp of i's batch (ivshm_spsc_publish) */
    return IVSHM_LOAD_ACQUIRE(&hd->stamp) == ivshm_spsc_stamp(i);
}

static inline int ivshm_spsc_stamped(const struct ivshm_spsc *q, uint64_t i)
{
    return ivshm_spsc_stamped_hdr(ivshm_spsc_hdr(q, i), i);
}

/* Locate and validate the next message.  0, -EAGAIN (empty), -EPROTO. */
static inline int ivshm_spsc_next(struct ivshm_spsc *q, struct ivshm_spsc_msg *m)
{
    if (!ivshm_spsc_stamped(q, q->tail)) {
        int rc = ivshm_spsc_empty(q);
        return rc ? rc : -EAGAIN;
    }
    const uint8_t *s = ivshm_spsc_slot(q, q->tail);
    uint32_t word = IVSHM_READ_ONCE(&((const struct ivshm_spsc_slot_hdr *)s)->len);
    uint32_t len = word & IVSHM_SPSC_LEN_MASK;
    if (IVSHM_UNLIKELY(len > q->slot_size))
        return ivshm_spsc_corrupt(q, "slot length exceeds the slot size", len, q->slot_size);
    m->data = s + IVSHM_SPSC_SLOT_HDR;
    m->len = len;
    m->nslots = 1;
    if (IVSHM_LIKELY(!(word & IVSHM_SPSC_MORE)))
        return 0;
    /* A chunked message: every chunk but the last is full, and the producer stamped all of them
     * before the first (one batch), so an unstamped chunk is a lie, not a message in progress. */
    uint64_t k = 0;
    while (word & IVSHM_SPSC_MORE) {
        if (IVSHM_UNLIKELY(len != q->slot_size))
            return ivshm_spsc_corrupt(q, "a continued chunk is not full", len, q->slot_size);
        k++;
        if (IVSHM_UNLIKELY(k >= q->capacity))
            return ivshm_spsc_corrupt(q, "chunked message is longer than the ring", q->tail, k);
        const struct ivshm_spsc_slot_hdr *hd = ivshm_spsc_hdr(q, q->tail + k);
        uint32_t st = IVSHM_READ_ONCE(&hd->stamp);
        if (IVSHM_UNLIKELY(st != ivshm_spsc_stamp(q->tail + k)))
            return ivshm_spsc_corrupt(q, "chunked message runs past the published slots",
                                      q->tail + k, st);
        word = IVSHM_READ_ONCE(&hd->len);
        len = word & IVSHM_SPSC_LEN_MASK;
        if (IVSHM_UNLIKELY(len > q->slot_size))
            return ivshm_spsc_corrupt(q, "slot length exceeds the slot size", len, q->slot_size);
        m->len += len;
    }
    m->nslots = (uint32_t)(k + 1);
    return 0;
}

/* Copy a located message out.  The chunk lengths are derived from m (validated), never re-read. */
static inline void ivshm_spsc_copy(const struct ivshm_spsc *q, const struct ivshm_spsc_msg *m,
                                   void *dst)
{
    if (IVSHM_LIKELY(m->nslots == 1)) {
        ivshm_copy(dst, m->data, m->len);
        return;
    }
    uint8_t *d = (uint8_t *)dst;
    uint64_t left = m->len;
    for (uint32_t k = 0; k < m->nslots; k++) {
        uint64_t chunk = left < q->slot_size ? left : q->slot_size;
        memcpy(d, ivshm_spsc_slot(q, q->tail + k) + IVSHM_SPSC_SLOT_HDR, chunk);
        d += chunk;
        left -= chunk;
    }
}

/* Consume a located message (private), and hand the slots back to the producer. */
static inline void ivshm_spsc_advance(struct ivshm_spsc *q, const struct ivshm_spsc_msg *m)
{
    q->tail += m->nslots;
}

static inline void ivshm_spsc_release(struct ivshm_spsc *q)
{
    if (q->tail != q->tail_published) {
        /* pairs with the producer's acquire load of ctrl->tail in ivshm_spsc_free */
        IVSHM_STORE_RELEASE(&q->ctrl->tail, q->tail);
        q->tail_published = q->tail;
    }
}

/* Receive one message into buf.  Returns its length, -EAGAIN, -ENOBUFS (buf too small: the
 * message stays, *needed says how large), -EPROTO. */
static inline int64_t ivshm_spsc_try_recv(struct ivshm_spsc *q, void *buf, uint64_t cap,
                                          uint64_t *needed)
{
    struct ivshm_spsc_msg m;
    int rc = ivshm_spsc_next(q, &m);
    if (IVSHM_UNLIKELY(rc))
        return rc;
    if (IVSHM_UNLIKELY(m.len > cap)) {
        if (needed)
            *needed = m.len;
        return -ENOBUFS;
    }
    ivshm_spsc_copy(q, &m, buf);
    ivshm_spsc_advance(q, &m);
    ivshm_spsc_release(q);
    return (int64_t)m.len;
}

/* Receive up to n messages of exactly `elem` bytes into a contiguous array; one release.  Stops
 * early at a message of another size.  Returns the count (0 when empty), -ENOMSG (the next
 * message is of another size, or chunked), or -errno. */
static inline int64_t ivshm_spsc_recv_fixed(struct ivshm_spsc *q, void *dst, uint32_t elem,
                                            uint64_t n)
{
    if (IVSHM_UNLIKELY(elem > q->slot_size))
        return -EMSGSIZE;
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *const slots = q->slots;
    const uint64_t mask = q->mask, stride = q->stride;
    uint64_t t = q->tail, k = 0;
    int stop = 0;
    for (; k < n; k++, t++) {
        const uint8_t *s = slots + (t & mask) * stride;
        const struct ivshm_spsc_slot_hdr *hd = (const struct ivshm_spsc_slot_hdr *)s;
        if (!ivshm_spsc_stamped_hdr(hd, t))
            break;
        if (IVSHM_READ_ONCE(&hd->len) != elem) {
            stop = -ENOMSG; /* another size, the MORE bit, or a bad length: not ours to take */
            break;
        }
        ivshm_copy(d + k * (uint64_t)elem, s + IVSHM_SPSC_SLOT_HDR, elem);
    }
    q->tail = t;
    ivshm_spsc_release(q);
    if (k == 0 && n > 0)
        return stop ? stop : ivshm_spsc_empty(q);
    return (int64_t)k;
}

/* Zero copy, producer: a pointer to the payload of the next slot if one is free. */
static inline int ivshm_spsc_reserve(struct ivshm_spsc *q, uint64_t len, uint8_t **ptr)
{
    if (IVSHM_UNLIKELY(len > q->slot_size))
        return -EMSGSIZE;
    int64_t f = ivshm_spsc_free(q, 1);
    if (IVSHM_UNLIKELY(f <= 0))
        return f < 0 ? (int)f : -EAGAIN;
    *ptr = ivshm_spsc_slot(q, q->head) + IVSHM_SPSC_SLOT_HDR;
    return 0;
}

/* Commit `len` bytes written into the reserved slot, and publish. */
static inline void ivshm_spsc_commit(struct ivshm_spsc *q, uint32_t len)
{
    ivshm_spsc_put_hdr(ivshm_spsc_slot(q, q->head), q->head, q->head_published, len);
    q->head++;
    ivshm_spsc_publish(q);
}

/* Published, unconsumed slots as the shared indices say (for len(), inspection).  The consumer
 * may be a few slots ahead of ctrl->head for an instant (it follows the stamps, which are stored
 * first): that reads as 0. */
static inline uint64_t ivshm_spsc_count(const struct ivshm_spsc *q)
{
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head); /* pairs with the producer's release */
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail); /* pairs with the consumer's release */
    uint64_t d = h - t;
    return d > q->capacity ? 0 : d;
}

#ifdef __cplusplus
}
#endif
#endif /* IVSHM_SPSC_H */
