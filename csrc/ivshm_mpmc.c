/* ivshm_mpmc.c - attaching a private MPMC handle to a ring in a region (hot path: ivshm_mpmc.h). */
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
