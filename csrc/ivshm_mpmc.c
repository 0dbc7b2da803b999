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
    if (i - t < q->capacity && h - i - 1 < q->capacity && seq == (uint32_t)i) {
        /* claimed by a producer (t <= i < h), never committed: commit it empty (the release CAS
         * pairs with the consumers' acquire load of seq in claim_recv) */
        IVSHM_STORE_RELAXED(&s->len, 0u);
        uint32_t expected = seq;
        if (IVSHM_CAS(&s->seq, &expected, (uint32_t)(i + 1)))
            return IVSHM_MPMC_RECOVERED_PRODUCER;
        return -ENOENT;
    }
    if (t - i - 1 >= q->capacity && i - t >= q->capacity)
        return -EINVAL;
    return -ENOENT;
}
