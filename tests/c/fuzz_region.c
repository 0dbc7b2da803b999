/* fuzz_region.c - libFuzzer harness: arbitrary region contents against every reader of a region.
 *
 * Input byte 0 chooses the mode and the region size (8 to 64 KiB):
 *   raw   (bit 0 set):   the region is the rest of the input, zero-padded;
 *   patch (bit 0 clear): a well-formed region with three rings holding messages, then patches
 *                        {u16 offset, u8 length, bytes} from the rest of the input.
 * Bit 3 attaches with "format if empty".  The harness then attaches, lists the directory, looks
 * rings up by name, attaches every ring the directory offers and drains, sends, batches, reserves
 * and commits on it, and finally creates a ring.  What it asserts:
 *   - only the documented error codes come back, each -EPROTO with an explanation;
 *   - a validated directory entry lies inside the region, after the header, and has a valid shape;
 *   - while one ring is used, nothing else in the region is read or written (ASan-poisoned);
 *   - lengths and counts returned are bounded by the ring's shape; nothing hangs (libFuzzer's
 *     -timeout catches a loop).
 */
#include "fuzz_common.h"

#define TOKEN 0x5151u

static uint8_t *g_buf;      /* receive buffer, larger than any ring's largest message */
static uint64_t g_buf_size; /* = region size */

static void check_info(const struct ivshm_ring_info *info, uint64_t rsize)
{
    FUZZ_ASSERT(info->offset >= IVSHM_HDR_SIZE && info->offset % IVSHM_RING_ALIGN == 0, "offset %" PRIu64,
                info->offset);
    FUZZ_ASSERT(info->offset <= rsize && info->size <= rsize - info->offset, "ring [%" PRIu64 ", +%" PRIu64 ")",
                info->offset, info->size);
    FUZZ_ASSERT(ivshm_ring_shape_ok(info->kind, info->slot_size, info->capacity, NULL) == 0, "shape");
    FUZZ_ASSERT(info->size == ivshm_ring_bytes(info->kind, info->slot_size, info->capacity), "size");
    FUZZ_ASSERT(info->stride == ivshm_ring_stride(info->kind, info->slot_size), "stride");
    FUZZ_ASSERT(memchr(info->name, 0, IVSHM_NAME_MAX) != NULL, "name unterminated");
}

static void check_ptr(const struct ivshm_ring_info *info, const uint8_t *mem, const uint8_t *p, uint64_t n)
{
    const uint8_t *lo = mem + info->offset + IVSHM_CTRL_SIZE;
    const uint8_t *hi = lo + (uint64_t)info->capacity * info->stride;
    FUZZ_ASSERT(p >= lo && p <= hi && n <= (uint64_t)(hi - p), "pointer outside the ring's slots");
}

static int allowed(int64_t rc, const int *codes)
{
    for (; *codes; codes++)
        if (rc == -*codes)
            return 1;
    return 0;
}

static void exercise_spsc(const struct ivshm_region *r, const struct ivshm_ring_info *info, uint8_t *mem)
{
    struct ivshm_spsc q;
    const char *why = NULL;
    int rc = ivshm_spsc_attach(&q, r, info, &why);
    FUZZ_ASSERT(rc == 0 || (rc == -EPROTO && why), "spsc attach %d", rc);
    if (rc)
        return;
    uint64_t maxmsg = (uint64_t)info->capacity * info->slot_size;
    static const int recv_codes[] = {EAGAIN, EPROTO, 0};
    for (uint32_t k = 0; k <= info->capacity + 1; k++) {
        int64_t n = ivshm_spsc_try_recv(&q, g_buf, g_buf_size, NULL);
        FUZZ_ASSERT(n >= 0 ? (uint64_t)n <= maxmsg : allowed(n, recv_codes), "try_recv %" PRId64, n);
        FUZZ_ASSERT(n != -EPROTO || q.why, "no explanation");
        if (n < 0)
            break;
    }
    struct ivshm_spsc_msg m;
    rc = ivshm_spsc_next(&q, &m);
    FUZZ_ASSERT(rc == 0 || rc == -EAGAIN || rc == -EPROTO, "next %d", rc);
    if (rc == 0) {
        FUZZ_ASSERT(m.len <= maxmsg && m.nslots >= 1 && m.nslots <= info->capacity, "message shape");
        check_ptr(info, mem, m.data, m.nslots == 1 ? m.len : info->slot_size);
        ivshm_spsc_copy(&q, &m, g_buf);
        ivshm_spsc_advance(&q, &m);
        ivshm_spsc_release(&q);
    }
    int64_t n = ivshm_spsc_recv_fixed(&q, g_buf, info->slot_size, info->capacity);
    FUZZ_ASSERT((n >= 0 && n <= info->capacity) || n == -ENOMSG || n == -EPROTO, "recv_fixed %" PRId64, n);
    FUZZ_ASSERT(ivshm_spsc_count(&q) <= info->capacity, "count");
    /* and the sending side */
    static const int send_codes[] = {EAGAIN, EPROTO, EMSGSIZE, 0};
    uint64_t sizes[] = {0, 1, info->slot_size, (uint64_t)info->slot_size + 1, 3ull * info->slot_size, maxmsg,
                        maxmsg + 1};
    memset(g_buf, 0x5a, g_buf_size);
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        if (sizes[i] > g_buf_size)
            continue;
        rc = ivshm_spsc_try_send(&q, g_buf, sizes[i]);
        FUZZ_ASSERT(rc == 0 || allowed(rc, send_codes), "try_send %d", rc);
        FUZZ_ASSERT(rc != -EMSGSIZE || sizes[i] > maxmsg, "EMSGSIZE for %" PRIu64 " bytes", sizes[i]);
    }
    n = ivshm_spsc_send_fixed(&q, g_buf, info->slot_size < 8 ? info->slot_size : 8, 3);
    FUZZ_ASSERT((n >= 0 && n <= 3) || n == -EPROTO, "send_fixed %" PRId64, n);
    uint8_t *p;
    rc = ivshm_spsc_reserve(&q, info->slot_size, &p);
    FUZZ_ASSERT(rc == 0 || rc == -EAGAIN || rc == -EPROTO, "reserve %d", rc);
    if (rc == 0) {
        check_ptr(info, mem, p, info->slot_size);
        memset(p, 0x33, info->slot_size);
        ivshm_spsc_commit(&q, info->slot_size);
    }
    /* what we just sent comes back intact when the ring was consistent enough to take it */
    for (uint32_t k = 0; k <= info->capacity + 1; k++) {
        int64_t got = ivshm_spsc_try_recv(&q, g_buf, g_buf_size, NULL);
        FUZZ_ASSERT(got >= 0 ? (uint64_t)got <= maxmsg : allowed(got, recv_codes), "try_recv %" PRId64, got);
        if (got < 0)
            break;
    }
}

static void exercise_mpmc(const struct ivshm_region *r, const struct ivshm_ring_info *info, uint8_t *mem)
{
    struct ivshm_mpmc q;
    const char *why = NULL;
    int rc = ivshm_mpmc_attach(&q, r, info, &why);
    FUZZ_ASSERT(rc == 0 || (rc == -EPROTO && why), "mpmc attach %d", rc);
    if (rc)
        return;
    for (uint32_t k = 0; k <= info->capacity + 1; k++) {
        uint64_t needed = 0;
        int64_t n = ivshm_mpmc_try_recv(&q, g_buf, g_buf_size, &needed);
        FUZZ_ASSERT((n >= 0 && n <= info->slot_size && needed == (uint64_t)n) || n == -EAGAIN || n == -EPROTO,
                    "try_recv %" PRId64, n);
        if (n < 0)
            break;
    }
    uint64_t pos;
    int64_t m = ivshm_mpmc_claim_recv(&q, info->capacity, &pos);
    FUZZ_ASSERT((m >= 1 && m <= info->capacity) || m == -EAGAIN || m == -EPROTO, "claim_recv %" PRId64, m);
    for (int64_t i = 0; i < m; i++) {
        int64_t len = ivshm_mpmc_msg_len(&q, pos + (uint64_t)i);
        FUZZ_ASSERT(len == -EPROTO || (len >= 0 && len <= info->slot_size), "msg_len %" PRId64, len);
        if (len > 0) {
            check_ptr(info, mem, ivshm_mpmc_payload(&q, pos + (uint64_t)i), (uint64_t)len);
            memcpy(g_buf, ivshm_mpmc_payload(&q, pos + (uint64_t)i), (uint64_t)len);
        }
        ivshm_mpmc_release_one(&q, pos + (uint64_t)i);
    }
    int64_t n = ivshm_mpmc_recv_fixed(&q, g_buf, info->slot_size, info->capacity);
    FUZZ_ASSERT((n >= 0 && n <= info->capacity) || n == -EPROTO || n == -EMSGSIZE, "recv_fixed %" PRId64, n);
    FUZZ_ASSERT(ivshm_mpmc_count(&q) <= info->capacity, "count");
    if (ivshm_mpmc_stalled(&q, &pos))
        check_ptr(info, mem, (const uint8_t *)ivshm_mpmc_slot(&q, pos), IVSHM_MPMC_SLOT_HDR);
    memset(g_buf, 0x6b, g_buf_size);
    int rc2 = ivshm_mpmc_try_send(&q, g_buf, info->slot_size);
    FUZZ_ASSERT(rc2 == 0 || rc2 == -EAGAIN || rc2 == -EPROTO, "try_send %d", rc2);
    rc2 = ivshm_mpmc_try_send(&q, g_buf, (uint64_t)info->slot_size + 1);
    FUZZ_ASSERT(rc2 == -EMSGSIZE, "oversized try_send %d", rc2);
    n = ivshm_mpmc_send_fixed(&q, g_buf, 1, info->capacity);
    FUZZ_ASSERT((n >= 0 && n <= info->capacity) || n == -EPROTO, "send_fixed %" PRId64, n);
    m = ivshm_mpmc_claim_send(&q, 2, &pos);
    FUZZ_ASSERT((m >= 1 && m <= 2) || m == -EAGAIN || m == -EPROTO, "claim_send %" PRId64, m);
    for (int64_t i = 0; i < m; i++) {
        check_ptr(info, mem, ivshm_mpmc_payload(&q, pos + (uint64_t)i), info->slot_size);
        ivshm_mpmc_commit_one(&q, pos + (uint64_t)i, 0);
    }
    for (uint32_t k = 0; k <= info->capacity + 1; k++) {
        int64_t got = ivshm_mpmc_try_recv(&q, g_buf, 0, NULL);
        FUZZ_ASSERT(got == 0 || got == -EAGAIN || got == -ENOBUFS || got == -EPROTO, "recv %" PRId64, got);
        if (got < 0)
            break;
    }
}

static void exercise_ring(const struct ivshm_region *r, const struct ivshm_ring_info *info, uint8_t *mem,
                          uint64_t rsize)
{
    check_info(info, rsize);
    fz_only(mem, rsize, info->offset, info->size);
    if (info->kind == IVSHM_KIND_SPSC)
        exercise_spsc(r, info, mem);
    else
        exercise_mpmc(r, info, mem);
    fz_open_all(mem, rsize);
}

/* The well-formed starting point of patch mode. */
static void build_fixture(uint8_t *mem, uint64_t rsize)
{
    struct ivshm_region r;
    struct ivshm_ring_info s, m, t;
    const char *why;
    memset(mem, 0, rsize);
    FUZZ_ASSERT(ivshm_region_attach(&r, mem, rsize, IVSHM_ATTACH_FORMAT, 0x600d, 0) == 0, "format");
    FUZZ_ASSERT(ivshm_region_create_ring(&r, "s", IVSHM_KIND_SPSC, 24, 8, TOKEN, 0, &s, &why) == 0, "s");
    FUZZ_ASSERT(ivshm_region_create_ring(&r, "m", IVSHM_KIND_MPMC, 16, 4, TOKEN, 0, &m, &why) == 0, "m");
    FUZZ_ASSERT(ivshm_region_create_ring(&r, "t", IVSHM_KIND_SPSC, 8, 2, TOKEN, 0, &t, &why) == 0, "t");
    struct ivshm_spsc qs, qt;
    struct ivshm_mpmc qm;
    ivshm_spsc_attach(&qs, &r, &s, NULL);
    ivshm_spsc_attach(&qt, &r, &t, NULL);
    ivshm_mpmc_attach(&qm, &r, &m, NULL);
    uint8_t msg[60];
    for (int i = 0; i < 60; i++)
        msg[i] = fz_byte(1, (uint64_t)i);
    uint8_t sink[64];
    ivshm_spsc_try_send(&qs, msg, 5);
    ivshm_spsc_try_recv(&qs, sink, sizeof(sink), NULL); /* tail 1: messages wrap */
    ivshm_spsc_try_send(&qs, msg, 5);
    ivshm_spsc_try_send(&qs, msg, 60); /* three slots */
    ivshm_spsc_try_send(&qs, msg, 0);
    ivshm_spsc_try_send(&qs, msg, 24);
    ivshm_mpmc_try_send(&qm, msg, 16);
    ivshm_mpmc_try_recv(&qm, sink, sizeof(sink), NULL);
    ivshm_mpmc_try_send(&qm, msg, 3);
    ivshm_mpmc_try_send(&qm, msg, 0);
    ivshm_spsc_try_send(&qt, msg, 8);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz_in in = {data, size, 0};
    uint8_t mode = fz_u8(&in);
    uint64_t rsize = 8192ull << ((mode >> 1) & 3);
    uint8_t *mem = aligned_alloc(4096, rsize);
    g_buf_size = rsize;
    g_buf = malloc(rsize);
    if (!mem || !g_buf)
        abort();
    if (mode & 1) {
        size_t n = size - 1 < rsize ? size - 1 : rsize;
        memset(mem, 0, rsize);
        if (n)
            memcpy(mem, data + 1, n);
    } else {
        build_fixture(mem, rsize);
        while (fz_more(&in)) {
            uint64_t off = fz_u16(&in) % rsize;
            uint64_t len = fz_u8(&in) % 17;
            for (uint64_t j = 0; j < len && off + j < rsize; j++)
                mem[off + j] = fz_u8(&in);
        }
    }

    struct ivshm_region r;
    unsigned flags = (mode & 8) ? IVSHM_ATTACH_FORMAT_IF_EMPTY : 0;
    int rc = ivshm_region_attach(&r, mem, rsize, flags, 0xabc, 0);
    FUZZ_ASSERT(rc == 0 || rc == -EBADMSG || rc == -ENOEXEC || rc == -EPROTO || rc == -ETIMEDOUT, "attach %d", rc);
    if (rc == 0) {
        FUZZ_ASSERT(ivshm_region_check(&r) == 0, "check right after attach");
        struct ivshm_ring_info info;
        const char *why;
        for (uint32_t i = 0; i <= IVSHM_MAX_RINGS; i++) {
            why = NULL;
            rc = ivshm_region_ring_at(&r, i, &info, &why);
            if (i == IVSHM_MAX_RINGS) {
                FUZZ_ASSERT(rc == -ERANGE, "index past the directory %d", rc);
                break;
            }
            FUZZ_ASSERT(rc == 0 || rc == -ENOENT || (rc == -EPROTO && why), "ring_at %d", rc);
            if (rc == 0) {
                exercise_ring(&r, &info, mem, rsize);
                struct ivshm_ring_info again;
                rc = ivshm_region_find_ring(&r, info.name, &again, &why);
                FUZZ_ASSERT(rc == 0 || rc == -EPROTO, "find of a listed name %d", rc);
                if (rc == 0)
                    check_info(&again, rsize);
            }
        }
        static const char *names[] = {"s", "m", "t", "absent"};
        for (size_t i = 0; i < 4; i++) {
            rc = ivshm_region_find_ring(&r, names[i], &info, &why);
            FUZZ_ASSERT(rc == 0 || rc == -ENOENT || rc == -EPROTO, "find %s %d", names[i], rc);
        }
        rc = ivshm_region_create_ring(&r, "new", (mode & 16) ? IVSHM_KIND_MPMC : IVSHM_KIND_SPSC, 16, 4, TOKEN,
                                      0, &info, &why);
        FUZZ_ASSERT(rc == 0 || rc == 1 || rc == -EEXIST || rc == -ENOSPC || rc == -ETIMEDOUT || rc == -EPROTO,
                    "create %d", rc);
        if (rc == 0 || rc == 1)
            exercise_ring(&r, &info, mem, rsize);
    }
    fz_open_all(mem, rsize);
    free(mem);
    free(g_buf);
    g_buf = NULL;
    return 0;
}
