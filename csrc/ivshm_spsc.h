/* ivshm_spsc.h - single-producer single-consumer ring of variable-length messages.
 *
 * The hot path is static inline so that C programs and the Cython module compile it in place.
 * Each side keeps its own index in private memory (`struct ivshm_spsc` lives in the process, not
 * in the region) and caches the other side's index, re-reading the shared copy only when the cache
 * says full/empty.  Shared indices only grow (64-bit, no wrap in practice).
 *
 * Pairings:
 *   producer: writes slots, then release-stores ctrl->head   -> consumer's acquire load of head
 *   consumer: reads slots,  then release-stores ctrl->tail   -> producer's acquire load of tail
 * A message longer than one slot takes several consecutive slots (IVSHM_SLOT_MORE on all but the
 * last, each but the last full); all of them are published by one store of head.
 *
 * Trust: every value read from shared memory (the other side's index, slot lengths and flags) is
 * read once and validated: index distance <= capacity, length <= slot size, chunk chains inside
 * what was published.  A violation returns -EPROTO and sets q->why; nothing outside the ring's
 * slots is ever read or written.
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
    /* consumer side, private */
    uint64_t tail;           /* next index to read */
    uint64_t tail_published;
    uint64_t head_cache;
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

/* Free slots for the producer, re-reading the consumer's index if fewer than `need` are cached.
 * Returns the count, or -EPROTO. */
static inline int64_t ivshm_spsc_free(struct ivshm_spsc *q, uint64_t need)
{
    uint64_t used = q->head - q->tail_cache;
    if (IVSHM_LIKELY(q->capacity - used >= need))
        return (int64_t)(q->capacity - used);
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
        struct ivshm_spsc_slot_hdr *hd = (struct ivshm_spsc_slot_hdr *)s;
        uint32_t chunk = (uint32_t)(k + 1 < n ? q->slot_size : len - k * (uint64_t)q->slot_size);
        hd->len = chunk;
        hd->flags = k + 1 < n ? IVSHM_SLOT_MORE : 0;
        ivshm_copy(s + IVSHM_SPSC_SLOT_HDR, src, chunk);
        src += chunk;
    }
    q->head += n;
    return 0;
}

/* Publish everything written so far (one release store). */
static inline void ivshm_spsc_publish(struct ivshm_spsc *q)
{
    if (q->head != q->head_published) {
        /* pairs with the consumer's acquire load of ctrl->head in ivshm_spsc_avail */
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
    const uint8_t *src = (const uint8_t *)data;
    for (uint64_t k = 0; k < n; k++) {
        uint8_t *s = ivshm_spsc_slot(q, q->head + k);
        struct ivshm_spsc_slot_hdr *hd = (struct ivshm_spsc_slot_hdr *)s;
        hd->len = elem;
        hd->flags = 0;
        ivshm_copy(s + IVSHM_SPSC_SLOT_HDR, src + k * (uint64_t)elem, elem);
    }
    q->head += n;
    ivshm_spsc_publish(q);
    return (int64_t)n;
}

/* Slots published and not yet read by this consumer; re-reads ctrl->head only when the cache is
 * empty.  Returns the count or -EPROTO. */
static inline int64_t ivshm_spsc_avail(struct ivshm_spsc *q)
{
    uint64_t a = q->head_cache - q->tail;
    if (a)
        return (int64_t)a;
    /* our own shared index must still be what we published (one consumer only) */
    uint64_t own = IVSHM_LOAD_RELAXED(&q->ctrl->tail);
    if (IVSHM_UNLIKELY(own != q->tail_published))
        return ivshm_spsc_corrupt(q, "another consumer moved this SPSC ring's index (one consumer only)",
                                  own, q->tail_published);
    /* pairs with the producer's release store of ctrl->head: the slots before it are written */
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
    a = h - q->tail;
    if (IVSHM_UNLIKELY(a > q->capacity))
        return ivshm_spsc_corrupt(q, "producer index is outside the consumer's window", h, q->tail);
    q->head_cache = h;
    return (int64_t)a;
}

/* Locate and validate the next message.  0, -EAGAIN (empty), -EPROTO. */
static inline int ivshm_spsc_next(struct ivshm_spsc *q, struct ivshm_spsc_msg *m)
{
    int64_t a = ivshm_spsc_avail(q);
    if (IVSHM_UNLIKELY(a <= 0))
        return a < 0 ? (int)a : -EAGAIN;
    const uint8_t *s = ivshm_spsc_slot(q, q->tail);
    const struct ivshm_spsc_slot_hdr *hd = (const struct ivshm_spsc_slot_hdr *)s;
    uint32_t len = IVSHM_READ_ONCE(&hd->len);
    uint32_t flags = IVSHM_READ_ONCE(&hd->flags);
    if (IVSHM_UNLIKELY(len > q->slot_size))
        return ivshm_spsc_corrupt(q, "slot length exceeds the slot size", len, q->slot_size);
    m->data = s + IVSHM_SPSC_SLOT_HDR;
    m->len = len;
    m->nslots = 1;
    if (IVSHM_LIKELY(!flags))
        return 0;
    /* a chunked message: every chunk but the last is full, all of them already published */
    uint64_t k = 0;
    for (;;) {
        if (IVSHM_UNLIKELY(flags & ~IVSHM_SLOT_FLAGS_VALID))
            return ivshm_spsc_corrupt(q, "slot has unknown flags", flags, q->tail + k);
        if (!(flags & IVSHM_SLOT_MORE))
            break;
        if (IVSHM_UNLIKELY(len != q->slot_size))
            return ivshm_spsc_corrupt(q, "a continued chunk is not full", len, q->slot_size);
        k++;
        if (IVSHM_UNLIKELY(k >= (uint64_t)a))
            return ivshm_spsc_corrupt(q, "chunked message runs past the published index",
                                      q->tail + k, q->head_cache);
        hd = (const struct ivshm_spsc_slot_hdr *)ivshm_spsc_slot(q, q->tail + k);
        len = IVSHM_READ_ONCE(&hd->len);
        flags = IVSHM_READ_ONCE(&hd->flags);
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
 * early at a message of another size.  Returns the count or -errno. */
static inline int64_t ivshm_spsc_recv_fixed(struct ivshm_spsc *q, void *dst, uint32_t elem,
                                            uint64_t n)
{
    if (IVSHM_UNLIKELY(elem > q->slot_size))
        return -EMSGSIZE;
    int64_t a = ivshm_spsc_avail(q);
    if (IVSHM_UNLIKELY(a <= 0))
        return a;
    if ((uint64_t)a < n)
        n = (uint64_t)a;
    uint8_t *d = (uint8_t *)dst;
    uint64_t k = 0;
    for (; k < n; k++) {
        const uint8_t *s = ivshm_spsc_slot(q, q->tail);
        const struct ivshm_spsc_slot_hdr *hd = (const struct ivshm_spsc_slot_hdr *)s;
        if (IVSHM_READ_ONCE(&hd->len) != elem || IVSHM_READ_ONCE(&hd->flags) != 0)
            break;
        ivshm_copy(d + k * (uint64_t)elem, s + IVSHM_SPSC_SLOT_HDR, elem);
        q->tail++;
    }
    ivshm_spsc_release(q);
    if (k == 0 && n > 0)
        return -ENOMSG; /* the next message is not of that size */
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
    struct ivshm_spsc_slot_hdr *hd = (struct ivshm_spsc_slot_hdr *)ivshm_spsc_slot(q, q->head);
    hd->len = len;
    hd->flags = 0;
    q->head++;
    ivshm_spsc_publish(q);
}

/* Published, unconsumed slots as the shared indices say (for len(), inspection). */
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
