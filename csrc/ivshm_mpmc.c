/* ivshm_mpmc.c - attaching a private MPMC handle to a ring in a region, and the cold paths: giving
 * back a reservation, recovering a slot a dead party held (hot path: ivshm_mpmc.h). */
#include "ivshm_mpmc.h"

int ivshm_mpmc_attach(struct ivshm_mpmc *q, const struct ivshm_region *r,
                      const struct ivshm_ring_info *info, const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    if (info->kind != IVSHM_KIND_MPMC) {
        *why = "not an MPMC ring";
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
    return 0;
}

int64_t ivshm_mpmc_get_odd(struct ivshm_mpmc *q, uint8_t *d, const uint8_t *payload, uint32_t len,
                           uint32_t elem, int64_t rc)
{
    if (ivshm_mpmc_check_len(q, len) < 0)
        return -EPROTO;
    if (len > elem)
        return -EMSGSIZE;
    ivshm_copy(d, payload, len);
    memset(d + len, 0, elem - len);
    return rc;
}

int ivshm_mpmc_abandon(struct ivshm_mpmc *q, uint64_t i)
{
    uint64_t expected = i + 1;
    /* release: our writes into the payload happen before the claim of whoever takes the index
     * next (pairs with its acquire CAS on head); the slot's sequence word was never changed */
    if (IVSHM_CAS(&q->ctrl->head, &expected, i))
        return 0;
    ivshm_mpmc_commit_one(q, i, 0);
    return 1;
}

int ivshm_mpmc_claim_state(const struct ivshm_mpmc *q, uint64_t i)
{
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    /* pairs with the release stores of seq by producers and consumers */
    uint32_t seq = IVSHM_LOAD_ACQUIRE(&ivshm_mpmc_slot(q, i)->seq);
    if (t - i - 1 < q->capacity) /* t - capacity <= i < t */
        return seq == (uint32_t)(i + 1) ? IVSHM_MPMC_RECOVERED_CONSUMER : 0;
    if (i - t < q->capacity) /* t <= i < t + capacity */
        return h - i - 1 < q->capacity && seq == (uint32_t)i ? IVSHM_MPMC_RECOVERED_PRODUCER : 0;
    return -EINVAL;
}

int ivshm_mpmc_next_claim(const struct ivshm_mpmc *q, int consumer, uint64_t from, uint64_t *pos)
{
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    if (h - t > q->capacity)
        return 0; /* indices out of order (corrupt): nothing to report */
    /* consumers hold indices in [t - capacity, t), producers in [t, h) (at most a lap) */
    uint64_t lo = consumer ? (t >= q->capacity ? t - q->capacity : 0) : t;
    uint64_t hi = consumer ? t : h;
    const int want = consumer ? IVSHM_MPMC_RECOVERED_CONSUMER : IVSHM_MPMC_RECOVERED_PRODUCER;
    for (uint64_t i = from > lo ? from : lo; i < hi; i++) {
        if (ivshm_mpmc_claim_state(q, i) == want) {
            *pos = i;
            return 1;
        }
    }
    return 0;
}

int64_t ivshm_mpmc_read_claimed(struct ivshm_mpmc *q, uint64_t i, void *buf, uint64_t cap,
                                uint64_t *needed)
{
    int st = ivshm_mpmc_claim_state(q, i);
    if (st < 0)
        return st;
    if (st != IVSHM_MPMC_RECOVERED_CONSUMER)
        return -ENOENT;
    /* the acquire load of seq in claim_state ordered the producer's writes before these reads */
    int64_t len = ivshm_mpmc_msg_len(q, i);
    if (len < 0)
        return len;
    if (needed)
        *needed = (uint64_t)len;
    if ((uint64_t)len > cap)
        return -ENOBUFS;
    ivshm_copy(buf, ivshm_mpmc_payload(q, i), (uint64_t)len);
    /* the copy happens before this load (acquire fence); a claim still held means nobody wrote
     * the slot meanwhile (producers of the next lap wait for the hand-back) */
    atomic_thread_fence(memory_order_acquire);
    if (IVSHM_LOAD_RELAXED(&ivshm_mpmc_slot(q, i)->seq) != (uint32_t)(i + 1) ||
        (uint64_t)IVSHM_READ_ONCE(&ivshm_mpmc_slot(q, i)->len) != (uint64_t)len)
        return -ENOENT;
    return len;
}

int ivshm_mpmc_recover(struct ivshm_mpmc *q, uint64_t i)
{
    uint64_t h = IVSHM_LOAD_ACQUIRE(&q->ctrl->head);
    uint64_t t = IVSHM_LOAD_ACQUIRE(&q->ctrl->tail);
    struct ivshm_mpmc_slot_hdr *s = ivshm_mpmc_slot(q, i);
    /* pairs with the release stores of seq by producers and consumers */
    uint32_t seq = IVSHM_LOAD_ACQUIRE(&s->seq);
    if (t - i - 1 < q->capacity && seq == (uint32_t)(i + 1)) {
        /* claimed by a consumer (i < t), committed, never handed back: hand it to the next lap
         * (pairs with the producers' acquire load of seq in claim_send) */
        uint32_t expected = seq;
        if (IVSHM_CAS(&s->seq, &expected, (uint32_t)(i + q->capacity)))
            return IVSHM_MPMC_RECOVERED_CONSUMER;
        return -ENOENT;
    }
    if (i - t < q->capacity && h - i - 1 < q->capacity && seq == (uint32_t)i)
        return ivshm_mpmc_recover_with(q, i, NULL, 0);
    if (t - i - 1 >= q->capacity && i - t >= q->capacity)
        return -EINVAL;
    return -ENOENT;
}

int ivshm_mpmc_recover_with(struct ivshm_mpmc *q, uint64_t i, const void *data, uint32_t len)
{
    if (len > q->slot_size)
        return -EMSGSIZE;
    int st = ivshm_mpmc_claim_state(q, i);
    if (st < 0)
        return st;
    if (st == IVSHM_MPMC_RECOVERED_CONSUMER)
        return -EBUSY;
    if (st != IVSHM_MPMC_RECOVERED_PRODUCER)
        return -ENOENT;
    struct ivshm_mpmc_slot_hdr *s = ivshm_mpmc_slot(q, i);
    /* claimed by a producer (t <= i < h), never committed: consumers wait at its sequence word,
     * so nobody reads the payload or length until the CAS below publishes them */
    if (len)
        ivshm_copy(ivshm_mpmc_payload(q, i), data, len);
    IVSHM_STORE_RELAXED(&s->len, len); /* atomic: see ivshm_mpmc_commit_one */
    /* release: payload and length before the sequence word (pairs with the consumers' acquire
     * load of seq in claim_recv); a CAS, so a slot that changed hands meanwhile is left alone */
    uint32_t expected = (uint32_t)i;
    if (IVSHM_CAS(&s->seq, &expected, (uint32_t)(i + 1)))
        return IVSHM_MPMC_RECOVERED_PRODUCER;
    return -ENOENT;
}
