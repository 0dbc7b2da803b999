/* ivshm_spsc.c - attaching a private SPSC handle to a ring in a region.
 *
 * The hot path is inline in ivshm_spsc.h.  Attaching validates the directory entry against the
 * control block and seeds both private indices from the shared ones, so a restarted producer or
 * consumer continues where its predecessor stopped.
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
    if (h - t > q->capacity) {
        *why = "ring indices are inconsistent (producer and consumer more than capacity apart)";
        return -EPROTO;
    }
    q->head = q->head_published = q->head_cache = h;
    q->tail = q->tail_published = q->tail_cache = t;
    return 0;
}
