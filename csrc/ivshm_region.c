/* ivshm_region.c - the region header and its directory of named rings.
 *
 * Formatting is race-safe: the magic word goes 0 -> IVSHM_MAGIC_FORMATTING by CAS, the header is
 * written, then IVSHM_MAGIC is stored with release; attachers read the magic with acquire.  Ring
 * creation takes a directory lock (a CAS'd token word) for the few microseconds it needs, so two
 * processes creating the same name get one ring.  The holder refreshes `lock_time` while it
 * clears a large ring; a waiter that sees neither the lock word nor `lock_time` change for
 * IVSHM_DIR_LEASE_MS of its own clock takes the holder for dead and takes the lock over (only a
 * change is compared, so the clocks of processes in different VMs need not agree).  A waiter
 * with less time than the lease times out with -ETIMEDOUT instead of hanging.  Opening by name needs no lock: entries are
 * published with a release store of `state` after all their fields.
 */
#include "ivshm_region.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#include "ivshm_atomic.h"
#include "ivshm_time.h"

static void short_sleep(void)
{
    struct timespec ts = {0, 50000}; /* 50 us */
    nanosleep(&ts, NULL);
}

static int is_pow2_u64(uint64_t x) { return x && !(x & (x - 1)); }

int ivshm_region_size_ok(uint64_t size)
{
    if (!is_pow2_u64(size) || size < IVSHM_MIN_REGION_SIZE)
        return -EINVAL;
    return 0;
}

uint32_t ivshm_ring_stride(uint32_t kind, uint32_t slot_size)
{
    uint64_t hdr = kind == IVSHM_KIND_MPMC ? IVSHM_MPMC_SLOT_HDR : IVSHM_SPSC_SLOT_HDR;
    if (kind == IVSHM_KIND_PUBSUB)
        hdr = IVSHM_PUBSUB_SLOT_HDR;
    uint64_t s = (hdr + (uint64_t)slot_size + 7u) & ~(uint64_t)7u;
    return s > UINT32_MAX ? 0 : (uint32_t)s;
}

int ivshm_ring_shape_ok(uint32_t kind, uint32_t slot_size, uint32_t capacity, const char **why)
{
    if (kind != IVSHM_KIND_SPSC && kind != IVSHM_KIND_MPMC && kind != IVSHM_KIND_PUBSUB) {
        if (why) *why = "unknown ring kind";
        return -EINVAL;
    }
    if (slot_size == 0 || slot_size > IVSHM_MAX_SLOT_SIZE) {
        if (why) *why = "slot size must be between 1 byte and 1 GiB";
        return -EINVAL;
    }
    if (capacity < 2 || capacity > IVSHM_MAX_CAPACITY || !is_pow2_u64(capacity)) {
        if (why) *why = "capacity must be a power of two between 2 and 2^30 slots";
        return -EINVAL;
    }
    return 0;
}

uint64_t ivshm_ring_bytes(uint32_t kind, uint32_t slot_size, uint32_t capacity)
{
    if (ivshm_ring_shape_ok(kind, slot_size, capacity, NULL))
        return 0;
    uint64_t stride = ivshm_ring_stride(kind, slot_size);
    /* both factors are <= 2^31, so the product fits in 64 bits */
    uint64_t bytes = IVSHM_CTRL_SIZE + stride * (uint64_t)capacity;
    if (kind == IVSHM_KIND_PUBSUB)
        bytes += IVSHM_PUBSUB_EXTRA; /* config line + subscriber table, before the slots */
    return (bytes + IVSHM_RING_ALIGN - 1) & ~(uint64_t)(IVSHM_RING_ALIGN - 1);
}

static void format_header(struct ivshm_region_hdr *h, uint64_t size, uint64_t generation)
{
    /* magic is left alone: the caller owns it (FORMATTING) and publishes it last */
    memset((uint8_t *)h + sizeof(h->magic), 0, IVSHM_HDR_SIZE - sizeof(h->magic));
    h->version = IVSHM_LAYOUT_VERSION;
    h->hdr_size = IVSHM_HDR_SIZE;
    h->region_size = size;
    h->generation = generation;
    h->max_rings = IVSHM_MAX_RINGS;
    h->nrings = 0;
    h->alloc_off = IVSHM_HDR_SIZE;
    h->lock = 0;
}

static int validate_header(const struct ivshm_region_hdr *h, uint64_t size)
{
    if (IVSHM_READ_ONCE(&h->version) != IVSHM_LAYOUT_VERSION)
        return -ENOEXEC;
    if (IVSHM_READ_ONCE(&h->hdr_size) != IVSHM_HDR_SIZE ||
        IVSHM_READ_ONCE(&h->region_size) != size ||
        IVSHM_READ_ONCE(&h->max_rings) != IVSHM_MAX_RINGS)
        return -EPROTO;
    return 0;
}

int ivshm_region_attach(struct ivshm_region *r, void *base, uint64_t size, unsigned flags,
                        uint64_t generation, int wait_ms)
{
    int rc = ivshm_region_size_ok(size);
    if (rc)
        return rc;
    struct ivshm_region_hdr *h = (struct ivshm_region_hdr *)base;
    uint64_t deadline = (uint64_t)ivshm_now_ns() + (uint64_t)(wait_ms < 0 ? 0 : wait_ms) * 1000000ull;

    if (flags & IVSHM_ATTACH_FORMAT) {
        /* Unconditional re-format: mark it in progress first so attachers wait, not misread. */
        IVSHM_STORE_SEQCST(&h->magic, IVSHM_MAGIC_FORMATTING);
        format_header(h, size, generation);
        /* pairs with the acquire load of magic below in other attachers */
        IVSHM_STORE_RELEASE(&h->magic, IVSHM_MAGIC);
    }
    for (;;) {
        /* pairs with the release store of IVSHM_MAGIC by whoever formatted */
        uint64_t magic = IVSHM_LOAD_ACQUIRE(&h->magic);
        if (magic == IVSHM_MAGIC)
            break;
        if (magic == 0 && (flags & IVSHM_ATTACH_FORMAT_IF_EMPTY)) {
            uint64_t expected = 0;
            if (IVSHM_CAS(&h->magic, &expected, IVSHM_MAGIC_FORMATTING)) {
                format_header(h, size, generation);
                IVSHM_STORE_RELEASE(&h->magic, IVSHM_MAGIC); /* pairs with the acquire above */
                break;
            }
            continue; /* someone else won the race: wait for their magic */
        }
        if (magic != IVSHM_MAGIC_FORMATTING)
            return -EBADMSG;
        if ((uint64_t)ivshm_now_ns() >= deadline)
            return -ETIMEDOUT;
        short_sleep();
    }
    rc = validate_header(h, size);
    if (rc)
        return rc;
    r->base = (uint8_t *)base;
    r->size = size;
    r->generation = IVSHM_READ_ONCE(&h->generation);
    return 0;
}

int ivshm_region_check(const struct ivshm_region *r)
{
    const struct ivshm_region_hdr *h = (const struct ivshm_region_hdr *)r->base;
    if (IVSHM_LOAD_ACQUIRE(&h->magic) != IVSHM_MAGIC) /* pairs with the formatter's release */
        return -EBADMSG;
    if (IVSHM_READ_ONCE(&h->generation) != r->generation)
        return -ESTALE;
    return 0;
}

static int copy_desc(const struct ivshm_region *r, uint32_t index, struct ivshm_ring_info *out,
                     const char **why)
{
    const struct ivshm_region_hdr *h = (const struct ivshm_region_hdr *)r->base;
    const struct ivshm_ring_desc *d = &h->rings[index];
    /* pairs with the release store of state in ivshm_region_create_ring */
    uint32_t state = IVSHM_LOAD_ACQUIRE(&d->state);
    if (state == IVSHM_DESC_FREE)
        return -ENOENT;
    /* the name first: callers match it even when the entry turns out corrupt */
    memset(out, 0, sizeof(*out));
    memcpy(out->name, d->name, IVSHM_NAME_MAX);
    if (state != IVSHM_DESC_READY) {
        *why = "directory entry has an invalid state";
        return -EPROTO;
    }
    out->index = index;
    out->kind = IVSHM_READ_ONCE(&d->kind);
    out->slot_size = IVSHM_READ_ONCE(&d->slot_size);
    out->capacity = IVSHM_READ_ONCE(&d->capacity);
    out->offset = IVSHM_READ_ONCE(&d->offset);
    out->size = IVSHM_READ_ONCE(&d->size);
    /* validate the private copy only */
    if (memchr(out->name, 0, IVSHM_NAME_MAX) == NULL || out->name[0] == 0) {
        out->name[IVSHM_NAME_MAX - 1] = 0;
        *why = "ring name is empty or not NUL-terminated";
        return -EPROTO;
    }
    if (ivshm_ring_shape_ok(out->kind, out->slot_size, out->capacity, why))
        return -EPROTO;
    out->stride = ivshm_ring_stride(out->kind, out->slot_size);
    if (out->size != ivshm_ring_bytes(out->kind, out->slot_size, out->capacity)) {
        *why = "ring size does not match its slot size and capacity";
        return -EPROTO;
    }
    if (out->offset < IVSHM_HDR_SIZE || (out->offset & (IVSHM_RING_ALIGN - 1)) ||
        out->offset > r->size || out->size > r->size - out->offset) {
        *why = "ring lies outside the region";
        return -EPROTO;
    }
    return 0;
}

int ivshm_region_ring_at(const struct ivshm_region *r, uint32_t index, struct ivshm_ring_info *out,
                         const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    if (index >= IVSHM_MAX_RINGS)
        return -ERANGE;
    return copy_desc(r, index, out, why);
}

int ivshm_region_find_ring(const struct ivshm_region *r, const char *name,
                           struct ivshm_ring_info *out, const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    size_t n = strnlen(name, IVSHM_NAME_MAX);
    if (n == 0 || n >= IVSHM_NAME_MAX) {
        *why = "ring names are 1 to 31 bytes";
        return -EINVAL;
    }
    int found = 0;
    for (uint32_t i = 0; i < IVSHM_MAX_RINGS; i++) {
        struct ivshm_ring_info info;
        int rc = copy_desc(r, i, &info, why);
        if (rc == -ENOENT)
            continue;
        if (rc == 0 && strcmp(info.name, name) == 0) {
            /* the whole directory is looked at: a second entry of the same name means it is
             * corrupt, and which one is meant cannot be told */
            if (found) {
                *why = "two directory entries carry this name (corrupt directory)";
                return -EPROTO;
            }
            *out = info;
            found = 1;
            continue;
        }
        if (rc == -EPROTO && strncmp(info.name, name, IVSHM_NAME_MAX) == 0)
            return -EPROTO;
    }
    return found ? 0 : -ENOENT;
}

int ivshm_ring_check_ctrl(const struct ivshm_region *r, const struct ivshm_ring_info *info,
                          const char **why)
{
    const struct ivshm_ring_ctrl *c = (const struct ivshm_ring_ctrl *)(r->base + info->offset);
    if (IVSHM_READ_ONCE(&c->magic) != IVSHM_RING_MAGIC) {
        *why = "ring control block has a bad magic number";
        return -EPROTO;
    }
    if (IVSHM_READ_ONCE(&c->kind) != info->kind || IVSHM_READ_ONCE(&c->slot_size) != info->slot_size ||
        IVSHM_READ_ONCE(&c->capacity) != info->capacity || IVSHM_READ_ONCE(&c->stride) != info->stride) {
        *why = "ring control block does not match its directory entry";
        return -EPROTO;
    }
    return 0;
}

/* Take the directory lock: 0, 1 (taken over from a holder silent for a lease), -ETIMEDOUT. */
static int lock_dir(struct ivshm_region_hdr *h, uint64_t token, int wait_ms)
{
    uint64_t now = (uint64_t)ivshm_now_ns();
    uint64_t deadline = now + (uint64_t)(wait_ms < 0 ? 0 : wait_ms) * 1000000ull;
    uint64_t seen_lock = 0, seen_time = 0, seen_since = now;
    for (;;) {
        uint64_t expected = 0;
        /* acquire pairs with the release in unlock_dir by the previous holder */
        if (IVSHM_CAS(&h->lock, &expected, token)) {
            IVSHM_STORE_RELAXED(&h->lock_time, (uint64_t)ivshm_now_ns());
            return 0;
        }
        uint64_t beat = IVSHM_LOAD_RELAXED(&h->lock_time);
        now = (uint64_t)ivshm_now_ns();
        if (expected != seen_lock || beat != seen_time) {
            seen_lock = expected; /* the holder changed or made progress: its lease restarts */
            seen_time = beat;
            seen_since = now;
        } else if (now - seen_since >= (uint64_t)IVSHM_DIR_LEASE_MS * 1000000ull) {
            /* silent for a whole lease: presumed dead (the CAS fails if it released the lock
             * meanwhile).  What a dead holder left half-done is harmless: an entry it did not
             * publish is still free, and the space it reserved stays unused. */
            if (IVSHM_CAS(&h->lock, &expected, token)) {
                IVSHM_STORE_RELAXED(&h->lock_time, (uint64_t)ivshm_now_ns());
                return 1;
            }
            continue;
        }
        if (now >= deadline)
            return -ETIMEDOUT;
        short_sleep();
    }
}

/* Clear a new ring's memory, refreshing the lock's heartbeat every 16 MiB so that waiters do not
 * take a slow holder for a dead one. */
static void clear_ring(struct ivshm_region_hdr *h, uint8_t *base, uint64_t bytes)
{
    const uint64_t chunk = 16ull << 20;
    for (uint64_t done = 0; done < bytes; done += chunk) {
        uint64_t n = bytes - done < chunk ? bytes - done : chunk;
        memset(base + done, 0, n);
        IVSHM_STORE_RELAXED(&h->lock_time, (uint64_t)ivshm_now_ns());
    }
}

static void unlock_dir(struct ivshm_region_hdr *h, uint64_t token)
{
    uint64_t expected = token;
    /* release pairs with the acquire CAS in lock_dir; if the word no longer holds our token a peer
     * tampered with it, and there is nothing of ours to release */
    atomic_compare_exchange_strong_explicit(IVSHM_ATOMIC(&h->lock), &expected, 0,
                                            memory_order_release, memory_order_relaxed);
}

int ivshm_region_create_ring(struct ivshm_region *r, const char *name, uint32_t kind,
                             uint32_t slot_size, uint32_t capacity, uint64_t token, int wait_ms,
                             struct ivshm_ring_info *out, const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    size_t n = strnlen(name, IVSHM_NAME_MAX);
    if (n == 0 || n >= IVSHM_NAME_MAX) {
        *why = "ring names are 1 to 31 bytes";
        return -EINVAL;
    }
    int rc = ivshm_ring_shape_ok(kind, slot_size, capacity, why);
    if (rc)
        return rc;
    if (token == 0) {
        *why = "lock token must be non-zero";
        return -EINVAL;
    }
    uint64_t bytes = ivshm_ring_bytes(kind, slot_size, capacity);
    struct ivshm_region_hdr *h = (struct ivshm_region_hdr *)r->base;

    rc = lock_dir(h, token, wait_ms);
    if (rc < 0) {
        *why = "the region's directory lock stayed held (a creator died holding it? a waiter takes "
               "over a lock whose holder stays silent for " IVSHM_STR(IVSHM_DIR_LEASE_MS) " ms)";
        return rc;
    }
    /* Under the lock: look for the name, and for a free entry. */
    int free_idx = -1;
    for (uint32_t i = 0; i < IVSHM_MAX_RINGS; i++) {
        struct ivshm_ring_info info;
        rc = copy_desc(r, i, &info, why);
        if (rc == -ENOENT) {
            if (free_idx < 0)
                free_idx = (int)i;
            continue;
        }
        if (strncmp(info.name, name, IVSHM_NAME_MAX) != 0)
            continue;
        if (rc == 0) {
            for (uint32_t j = i + 1; j < IVSHM_MAX_RINGS && rc == 0; j++) {
                struct ivshm_ring_info other;
                if (copy_desc(r, j, &other, why) == 0 && strncmp(other.name, name, IVSHM_NAME_MAX) == 0) {
                    *why = "two directory entries carry this name (corrupt directory)";
                    rc = -EPROTO;
                }
            }
        }
        if (rc == 0)
            rc = ivshm_ring_check_ctrl(r, &info, why);
        unlock_dir(h, token);
        if (rc)
            return rc;
        *out = info;
        if (info.kind != kind || info.slot_size != slot_size || info.capacity != capacity) {
            *why = "a ring of that name exists with another kind, slot size or capacity";
            return -EEXIST;
        }
        return 1;
    }
    uint64_t off = IVSHM_READ_ONCE(&h->alloc_off);
    off = (off + IVSHM_RING_ALIGN - 1) & ~(uint64_t)(IVSHM_RING_ALIGN - 1);
    if (free_idx < 0 || off < IVSHM_HDR_SIZE || off > r->size || bytes > r->size - off) {
        unlock_dir(h, token);
        *why = free_idx < 0 ? "the region's ring directory is full"
                            : "not enough free space in the region for that ring";
        return -ENOSPC;
    }
    /* Reserve the space first: a holder taken for dead that wakes up later then clears only its
     * own space.  Initialise the control block and slots, then the entry, then publish it. */
    IVSHM_STORE_RELAXED(&h->alloc_off, off + bytes);
    uint8_t *base = r->base + off;
    struct ivshm_ring_ctrl *c = (struct ivshm_ring_ctrl *)base;
    clear_ring(h, base, bytes);
    c->magic = IVSHM_RING_MAGIC;
    c->kind = kind;
    c->slot_size = slot_size;
    c->capacity = capacity;
    c->stride = ivshm_ring_stride(kind, slot_size);
    c->generation = r->generation;
    if (kind == IVSHM_KIND_MPMC) {
        uint8_t *slots = base + IVSHM_CTRL_SIZE;
        for (uint64_t i = 0; i < capacity; i++)
            ((struct ivshm_mpmc_slot_hdr *)(slots + i * c->stride))->seq = (uint32_t)i;
    }
    struct ivshm_ring_desc *d = &h->rings[free_idx];
    memset(d->name, 0, IVSHM_NAME_MAX);
    memcpy(d->name, name, n);
    d->kind = kind;
    d->offset = off;
    d->size = bytes;
    d->slot_size = slot_size;
    d->capacity = capacity;
    IVSHM_STORE_RELAXED(&h->nrings, IVSHM_READ_ONCE(&h->nrings) + 1);
    /* pairs with the acquire load of state in copy_desc: readers see a complete ring */
    IVSHM_STORE_RELEASE(&d->state, IVSHM_DESC_READY);
    unlock_dir(h, token);
    return copy_desc(r, (uint32_t)free_idx, out, why);
}
