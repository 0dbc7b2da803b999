/* ivshm_spsc.c - attaching a private SPSC handle to a ring in a region.
 *
 * The hot path is inline in ivshm_spsc.h.  Attaching validates the directory entry against the
 * control block and seeds both private indices from the shared ones, so a restarted producer or
 * consumer continues where its predecessor stopped; a producer's first call also tidies what a
 * predecessor that died in the middle of a batch left behind (ivshm_spsc_recover).
 */
#include "ivshm_spsc.h"

int ivshm_spsc_attach(struct ivshm_spsc *q, const struct ivshm_region *r,
                      const struct ivshm_ring_info *info, const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    if (info->kind != IVSHM_KIND_SPSC) {
        *why = "not an SPSC ring";
        return -EINVAL;
    }
    int rc = ivshm_ring_check_ctrl(r, info, why);
    if (rc)
        return rc;
    memset(q, 0, sizeof(*q));
    q->ctrl = (struct ivshm_ring_ctrl *)(r->base + info->offset);
    q->slots = r->base + info->offset + IVSHM_CTRL_SIZE;
    q->capacity = info->capacity;
    q->mask = (uint64_t)info->capacity - 1;
    q->slot_size = info->slot_size;
    q->stride = info->stride;
    /* pairs with the release stores of head and tail by the previous owners of each side */
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    /* The consumer follows slot stamps, which the producer stores before ctrl->head: a producer
     * that died between the two leaves a consumer ahead of head, over slots that are stamped. */
    int ahead_ok = t - h <= q->capacity;
    for (uint64_t i = h; ahead_ok && i != t; i++)
        ahead_ok = ivshm_spsc_stamped(q, i);
    if (h - t > q->capacity && !ahead_ok) {
        *why = "ring indices are inconsistent (producer and consumer more than capacity apart)";
        return -EPROTO;
    }
    q->head = q->head_published = h;
    q->tail = q->tail_published = t;
    /* "full", so that a producer's first ivshm_spsc_free() runs ivshm_spsc_recover() */
    q->tail_cache = h - q->capacity;
    return 0;
}

int ivshm_spsc_recover(struct ivshm_spsc *q)
{
    /* pairs with the release stores of head and tail by the previous owners of each side */
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    if (h != q->head_published)
        return ivshm_spsc_corrupt(q, "another producer moved this SPSC ring's index (one producer only)",
                                  h, q->head_published);
    if (h - t > q->capacity && t - h > q->capacity)
        return ivshm_spsc_corrupt(q, "consumer index is outside the producer's window", t, h);
    /* A predecessor that died between stamping a batch and storing ctrl->head published that
     * batch (the consumer may be reading it, or be past it): start after it.  At most capacity
     * steps: slot i cannot carry the stamps of both i and i + capacity. */
    uint64_t i = h;
    while ((i < t || i - t < q->capacity) && ivshm_spsc_stamped(q, i))
        i++;
    if (i - t > q->capacity)
        return ivshm_spsc_corrupt(q, "consumer index is ahead of every published slot", t, i);
    /* Slot i is free.  A predecessor that died while writing its next batch stamped every slot of
     * it but the first (i): clear those stamps, or the consumer would take them for part of the
     * first batch this producer publishes. */
    for (uint64_t j = i + 1; j - t < q->capacity; j++) {
        struct ivshm_spsc_slot_hdr *hd = ivshm_spsc_hdr(q, j);
        if (IVSHM_READ_ONCE(&hd->stamp) != ivshm_spsc_stamp(j))
            break;
        /* ordered before the consumer can reach slot j by the release of our first publish */
        IVSHM_STORE_RELAXED(&hd->stamp, (uint32_t)j);
    }
    if (i != h) {
        q->head = q->head_published = i;
        IVSHM_STORE_RELEASE(&q->ctrl->head, i); /* pairs with the acquire loads of ctrl->head */
    }
    q->tail_cache = t;
    q->recovered = 1;
    return 0;
}
