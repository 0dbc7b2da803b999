/* ivshm_region.h - formatting, attaching to and validating a region; its directory of rings.
 *
 * A region is caller-provided memory (a mapping of a file, a memfd or a guest's BAR2); this code
 * never maps or unmaps.  `struct ivshm_region` is this side's private view: base, size and the
 * generation seen at attach.  Every value read from the header is validated before use.
 */
#ifndef IVSHM_REGION_H
#define IVSHM_REGION_H

#include <stdint.h>

#include "ivshm_layout.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ivshm_region {
    uint8_t *base;
    uint64_t size;
    uint64_t generation;
};

/* A validated, private copy of one directory entry. */
struct ivshm_ring_info {
    char name[IVSHM_NAME_MAX];
    uint32_t index;
    uint32_t kind;
    uint32_t slot_size;
    uint32_t capacity;
    uint32_t stride;
    uint32_t reserved;
    uint64_t offset;
    uint64_t size;
};

/* A creator holding the directory lock that changes neither the lock word nor its heartbeat
 * (`lock_time`) for this long, by a waiter's clock, is taken for dead and the waiter takes over. */
#define IVSHM_DIR_LEASE_MS 1000
#define IVSHM_STR_(x) #x
#define IVSHM_STR(x) IVSHM_STR_(x)

#define IVSHM_ATTACH_FORMAT_IF_EMPTY 1u /* all-zero magic: format it (race-safe) */
#define IVSHM_ATTACH_FORMAT 2u          /* format unconditionally (new generation) */

/* 0 if `size` is a power of two >= IVSHM_MIN_REGION_SIZE, else -EINVAL. */
int ivshm_region_size_ok(uint64_t size);

/* Attach to `size` bytes at `base`.  With IVSHM_ATTACH_FORMAT_IF_EMPTY, an unformatted region is
 * formatted with `generation` (exactly one of several racing attachers formats; the others wait up
 * to `wait_ms` for it).  Returns 0, -EINVAL (size), -EBADMSG (not a pyivshmem region: bad magic),
 * -ENOEXEC (unsupported layout version), -EPROTO (header fields inconsistent), -ETIMEDOUT. */
int ivshm_region_attach(struct ivshm_region *r, void *base, uint64_t size, unsigned flags,
                        uint64_t generation, int wait_ms);

/* 0 if the region still carries the generation seen at attach; -ESTALE if it was re-formatted,
 * -EBADMSG if its magic is gone. */
int ivshm_region_check(const struct ivshm_region *r);

/* Bytes a ring of that shape occupies (control block + slots), 0 if the shape is invalid. */
uint64_t ivshm_ring_bytes(uint32_t kind, uint32_t slot_size, uint32_t capacity);
uint32_t ivshm_ring_stride(uint32_t kind, uint32_t slot_size);

/* Validate a ring shape: -EINVAL (with *why set) or 0. */
int ivshm_ring_shape_ok(uint32_t kind, uint32_t slot_size, uint32_t capacity, const char **why);

/* Copy and validate directory entry `index`.  -ENOENT if free, -EPROTO if it is inconsistent (why
 * set), -ERANGE if index is out of range. */
int ivshm_region_ring_at(const struct ivshm_region *r, uint32_t index, struct ivshm_ring_info *out,
                         const char **why);

/* Find a ready ring by name: 0, -ENOENT, -EPROTO (the entry with that name is corrupt). */
int ivshm_region_find_ring(const struct ivshm_region *r, const char *name,
                           struct ivshm_ring_info *out, const char **why);

/* Create a ring, or find it if one of that name exists.  Returns 0 if created, 1 if it already
 * existed with the same shape, -EEXIST if it exists with another shape, -ENOSPC (no room or no free
 * directory entry), -EINVAL (bad name or shape), -ETIMEDOUT (the directory lock stayed held for
 * `wait_ms`, shorter than IVSHM_DIR_LEASE_MS, or kept changing: a peer misbehaves).  A lock whose
 * holder stays silent for IVSHM_DIR_LEASE_MS is taken over (the holder died), so a `wait_ms` longer
 * than the lease gets past a dead creator.  `token` identifies this caller as the
 * lock holder and must be non-zero. */
int ivshm_region_create_ring(struct ivshm_region *r, const char *name, uint32_t kind,
                             uint32_t slot_size, uint32_t capacity, uint64_t token, int wait_ms,
                             struct ivshm_ring_info *out, const char **why);

/* Validate a ring's control block against its directory entry (line 0 must match). */
int ivshm_ring_check_ctrl(const struct ivshm_region *r, const struct ivshm_ring_info *info,
                          const char **why);

#ifdef __cplusplus
}
#endif
#endif /* IVSHM_REGION_H */
