/* fuzz_rings.c - libFuzzer harness: ring operations interleaved with a hostile peer's writes.
 *
 * A region holds an SPSC ring and an MPMC ring (shapes chosen by the first input byte) and a
 * canary SPSC ring.  The rest of the input is a script: each byte picks an operation on one of
 * the rings (every send, receive, batch and zero-copy call, re-attaching a side, probing for
 * stalls) or a "poke" that overwrites 1-8 bytes anywhere in the SPSC or MPMC ring (control block
 * or slots) with fuzzer-chosen or near-miss values, as a concurrent peer would between two calls.
 *
 * Until a ring is first poked, a model (a queue of what was sent) predicts every result exactly:
 * return codes, lengths and every byte received.  After a poke only the contract is checked:
 * documented error codes, -EPROTO with an explanation, lengths and pointers inside the ring.  The
 * canary ring is never poked and must always round-trip its messages; while one ring is used,
 * the rest of the region is ASan-poisoned, so any access outside that ring is reported.
 */
#include "fuzz_common.h"

#define RSIZE 16384u
#define QMAX 64

struct model { /* messages sent and not yet received, oldest first */
    uint64_t seq[QMAX], len[QMAX];
    unsigned head, n;
    uint64_t next_seq;
    uint64_t slots; /* SPSC: slots in use */
    int dirty;      /* poked: the model no longer applies */
};

static void model_push(struct model *m, uint64_t len, uint64_t slots)
{
    FUZZ_ASSERT(m->n < QMAX, "model overflow");
    unsigned i = (m->head + m->n++) % QMAX;
    m->seq[i] = m->next_seq++;
    m->len[i] = len;
    m->slots += slots;
}

static void model_pop(struct model *m, uint64_t *seq, uint64_t *len, uint64_t slots)
{
    FUZZ_ASSERT(m->n > 0, "model underflow: the ring produced a message that was never sent");
    *seq = m->seq[m->head];
    *len = m->len[m->head];
    m->head = (m->head + 1) % QMAX;
    m->n--;
    m->slots -= slots;
}

static const uint64_t *model_peek(const struct model *m, unsigned k) /* k-th oldest length */
{
    return k < m->n ? &m->len[(m->head + k) % QMAX] : NULL;
}

struct world {
    uint8_t *mem;
    struct ivshm_region r;
    struct ivshm_ring_info si, mi, ci;
    struct ivshm_spsc sp, sc;  /* SPSC producer / consumer handles */
    int sp_ok, sc_ok;          /* attached (a re-attach may fail once the ring is poked) */
    struct ivshm_mpmc mp, mc;  /* MPMC producer / consumer handles */
    struct ivshm_spsc cp, cc;  /* canary */
    uint64_t canary_seq;
    struct model ms, mm;
    uint8_t buf[8192], msg[8192];
};

static uint64_t spsc_slots(const struct ivshm_ring_info *i, uint64_t len)
{
    return len <= i->slot_size ? 1 : (len + i->slot_size - 1) / i->slot_size;
}

static void fill(uint8_t *p, uint64_t seq, uint64_t len)
{
    for (uint64_t j = 0; j < len; j++)
        p[j] = fz_byte(seq, j);
}

static void verify(const uint8_t *p, uint64_t seq, uint64_t len)
{
    for (uint64_t j = 0; j < len; j++)
        FUZZ_ASSERT(p[j] == fz_byte(seq, j), "message %" PRIu64 " byte %" PRIu64 " wrong", seq, j);
}

static void in_ring(const struct world *w, const struct ivshm_ring_info *i, const uint8_t *p, uint64_t n)
{
    const uint8_t *lo = w->mem + i->offset + IVSHM_CTRL_SIZE;
    const uint8_t *hi = lo + (uint64_t)i->capacity * i->stride;
    FUZZ_ASSERT(p >= lo && p <= hi && n <= (uint64_t)(hi - p), "pointer outside the ring's slots");
}

static void only(struct world *w, const struct ivshm_ring_info *i) { fz_only(w->mem, RSIZE, i->offset, i->size); }

/* ------------------------------------------------------------------------------------------ */
/* SPSC */

static void spsc_sent(struct world *w, int rc, uint64_t len)
{
    struct model *m = &w->ms;
    const struct ivshm_ring_info *i = &w->si;
    uint64_t need = spsc_slots(i, len);
    if (!m->dirty) {
        int want = need > i->capacity ? -EMSGSIZE : need > i->capacity - m->slots ? -EAGAIN : 0;
        FUZZ_ASSERT(rc == want, "spsc send of %" PRIu64 " bytes: %d, model says %d", len, rc, want);
    } else {
        FUZZ_ASSERT(rc == 0 || rc == -EAGAIN || rc == -EMSGSIZE || (rc == -EPROTO && w->sp.why), "send %d", rc);
        FUZZ_ASSERT(rc != -EMSGSIZE || need > i->capacity, "EMSGSIZE");
    }
    if (rc == 0 && !m->dirty)
        model_push(m, len, need);
}

static void spsc_got(struct world *w, const uint8_t *data, uint64_t len, uint32_t nslots)
{
    struct model *m = &w->ms;
    FUZZ_ASSERT(len <= (uint64_t)w->si.capacity * w->si.slot_size && nslots <= w->si.capacity, "message shape");
    if (m->dirty)
        return;
    uint64_t seq, want;
    model_pop(m, &seq, &want, nslots);
    FUZZ_ASSERT(len == want, "message %" PRIu64 ": %" PRIu64 " bytes, sent %" PRIu64, seq, len, want);
    FUZZ_ASSERT(nslots == spsc_slots(&w->si, len), "slots");
    verify(data, seq, len);
}

static void spsc_op(struct world *w, struct fz_in *in, uint8_t op)
{
    const struct ivshm_ring_info *i = &w->si;
    struct model *m = &w->ms;
    uint64_t maxmsg = (uint64_t)i->capacity * i->slot_size;
    if (op == 7) { /* a side restarts: a fresh handle from the shared indices */
        uint8_t which = fz_u8(in);
        const char *why;
        if (which & 1)
            w->sp_ok = ivshm_spsc_attach(&w->sp, &w->r, i, &why) == 0;
        else
            w->sc_ok = ivshm_spsc_attach(&w->sc, &w->r, i, &why) == 0;
        FUZZ_ASSERT(m->dirty || (w->sp_ok && w->sc_ok), "re-attach of an unpoked ring failed");
        return;
    }
    if (op <= 3 && !w->sp_ok)
        return;
    if (op >= 4 && !w->sc_ok)
        return;
    switch (op) {
    case 0: {
        uint64_t len = fz_u16(in) % (maxmsg + i->slot_size + 1);
        fill(w->msg, m->next_seq, len);
        spsc_sent(w, ivshm_spsc_try_send(&w->sp, w->msg, len), len);
        break;
    }
    case 1: { /* several writes, one publish */
        unsigned k = 1 + fz_u8(in) % 4;
        for (unsigned j = 0; j < k; j++) {
            uint64_t len = fz_u8(in) % (2 * i->slot_size + 1);
            fill(w->msg, m->next_seq, len);
            int rc = ivshm_spsc_write(&w->sp, w->msg, len);
            spsc_sent(w, rc, len);
            if (rc)
                break;
        }
        ivshm_spsc_publish(&w->sp);
        break;
    }
    case 2: {
        uint32_t elem = fz_u8(in) % (i->slot_size + 2);
        uint64_t n = fz_u8(in) % (i->capacity + 2);
        for (uint64_t j = 0; j < n && elem <= i->slot_size; j++)
            fill(w->msg + j * elem, m->next_seq + j, elem);
        int64_t got = ivshm_spsc_send_fixed(&w->sp, w->msg, elem, n);
        if (!m->dirty) {
            int64_t want = elem > i->slot_size ? -EMSGSIZE
                                               : (int64_t)(n < i->capacity - m->slots ? n : i->capacity - m->slots);
            FUZZ_ASSERT(got == want, "send_fixed %" PRId64 ", model says %" PRId64, got, want);
            for (int64_t j = 0; j < got; j++)
                model_push(m, elem, 1);
        } else {
            FUZZ_ASSERT((got >= 0 && (uint64_t)got <= n) || got == -EMSGSIZE || got == -EPROTO, "send_fixed");
        }
        break;
    }
    case 3: {
        uint64_t len = fz_u8(in) % (i->slot_size + 2);
        uint8_t *p = NULL;
        int rc = ivshm_spsc_reserve(&w->sp, len, &p);
        if (!m->dirty) {
            int want = len > i->slot_size ? -EMSGSIZE : m->slots >= i->capacity ? -EAGAIN : 0;
            FUZZ_ASSERT(rc == want, "reserve %d, model says %d", rc, want);
        }
        FUZZ_ASSERT(rc == 0 || rc == -EAGAIN || rc == -EMSGSIZE || rc == -EPROTO, "reserve %d", rc);
        if (rc == 0) {
            in_ring(w, i, p, len);
            uint64_t len2 = fz_u8(in) % (len + 1);
            fill(p, m->next_seq, len2);
            ivshm_spsc_commit(&w->sp, (uint32_t)len2);
            if (!m->dirty)
                model_push(m, len2, 1);
        }
        break;
    }
    case 4: {
        uint64_t cap = fz_u16(in) % (maxmsg + 2);
        uint64_t needed = 0;
        int64_t got = ivshm_spsc_try_recv(&w->sc, w->buf, cap, &needed);
        const uint64_t *want = model_peek(m, 0);
        if (!m->dirty) {
            FUZZ_ASSERT(want ? (got >= 0 || got == -ENOBUFS) : got == -EAGAIN, "try_recv %" PRId64, got);
            if (got == -ENOBUFS)
                FUZZ_ASSERT(needed == *want && *want > cap, "ENOBUFS with needed %" PRIu64, needed);
            else if (want)
                FUZZ_ASSERT(*want <= cap, "a message larger than the buffer was delivered");
        } else {
            FUZZ_ASSERT((got >= 0 && (uint64_t)got <= cap) || got == -EAGAIN || got == -ENOBUFS || got == -EPROTO,
                        "try_recv %" PRId64, got);
        }
        if (got >= 0)
            spsc_got(w, w->buf, (uint64_t)got, (uint32_t)spsc_slots(i, (uint64_t)got));
        break;
    }
    case 5: {
        uint32_t elem = fz_u8(in) % (i->slot_size + 2);
        uint64_t n = fz_u8(in) % (i->capacity + 2);
        int64_t got = ivshm_spsc_recv_fixed(&w->sc, w->msg, elem, n);
        if (!m->dirty) {
            int64_t want;
            if (elem > i->slot_size)
                want = -EMSGSIZE;
            else if (m->n == 0)
                want = 0;
            else {
                want = 0;
                while ((uint64_t)want < n && model_peek(m, (unsigned)want) && *model_peek(m, (unsigned)want) == elem)
                    want++;
                if (want == 0 && n > 0)
                    want = -ENOMSG;
            }
            /* the consumer re-reads the producer's index only when its cached view is empty, so a
             * batch may stop at what the cache knows: at least one, at most the model's count */
            FUZZ_ASSERT(want > 0 ? (got >= 1 && got <= want) : got == want,
                        "recv_fixed(%u, %" PRIu64 ") = %" PRId64 ", model says %" PRId64, elem, n, got, want);
        } else {
            FUZZ_ASSERT((got >= 0 && (uint64_t)got <= n) || got == -ENOMSG || got == -EMSGSIZE || got == -EPROTO,
                        "recv_fixed %" PRId64, got);
        }
        for (int64_t j = 0; j < got; j++)
            spsc_got(w, w->msg + (uint64_t)j * elem, elem, 1);
        break;
    }
    default: { /* located in place, k at a time, one release */
        unsigned k = 1 + fz_u8(in) % 4;
        for (unsigned j = 0; j < k; j++) {
            struct ivshm_spsc_msg msg;
            int rc = ivshm_spsc_next(&w->sc, &msg);
            FUZZ_ASSERT(m->dirty ? (rc == 0 || rc == -EAGAIN || (rc == -EPROTO && w->sc.why))
                                 : rc == (m->n ? 0 : -EAGAIN),
                        "next %d", rc);
            if (rc)
                break;
            in_ring(w, i, msg.data, msg.nslots == 1 ? msg.len : i->slot_size);
            ivshm_spsc_copy(&w->sc, &msg, w->buf);
            spsc_got(w, w->buf, msg.len, msg.nslots);
            ivshm_spsc_advance(&w->sc, &msg);
        }
        ivshm_spsc_release(&w->sc);
        break;
    }
    }
    uint64_t c = ivshm_spsc_count(&w->sc);
    FUZZ_ASSERT(c <= i->capacity, "count");
    FUZZ_ASSERT(m->dirty || !w->sp_ok || c == m->slots, "count %" PRIu64 ", model %" PRIu64, c, m->slots);
}

/* ------------------------------------------------------------------------------------------ */
/* MPMC */

static void mpmc_got(struct world *w, const uint8_t *data, uint64_t len, uint64_t copied)
{
    struct model *m = &w->mm;
    FUZZ_ASSERT(len <= w->mi.slot_size, "length %" PRIu64 " over the slot size", len);
    if (m->dirty)
        return;
    uint64_t seq, want;
    model_pop(m, &seq, &want, 1);
    FUZZ_ASSERT(len == want, "mpmc message %" PRIu64 ": %" PRIu64 " bytes, sent %" PRIu64, seq, len, want);
    verify(data, seq, copied < len ? copied : len);
}

static void mpmc_op(struct world *w, struct fz_in *in, uint8_t op)
{
    const struct ivshm_ring_info *i = &w->mi;
    struct model *m = &w->mm;
    uint64_t pos;
    uint64_t freeslots = i->capacity - m->n;
    switch (op) {
    case 0: {
        uint64_t len = fz_u8(in) % (i->slot_size + 2);
        fill(w->msg, m->next_seq, len);
        int rc = ivshm_mpmc_try_send(&w->mp, w->msg, len);
        if (!m->dirty)
            FUZZ_ASSERT(rc == (len > i->slot_size ? -EMSGSIZE : freeslots ? 0 : -EAGAIN), "mpmc send %d", rc);
        FUZZ_ASSERT(rc == 0 || rc == -EAGAIN || rc == -EMSGSIZE || (rc == -EPROTO && w->mp.why), "send %d", rc);
        if (rc == 0 && !m->dirty)
            model_push(m, len, 1);
        break;
    }
    case 1: {
        uint32_t elem = fz_u8(in) % (i->slot_size + 2);
        uint64_t n = fz_u8(in) % (i->capacity + 2);
        for (uint64_t j = 0; j < n && elem <= i->slot_size; j++)
            fill(w->msg + j * elem, m->next_seq + j, elem);
        int64_t got = ivshm_mpmc_send_fixed(&w->mp, w->msg, elem, n);
        if (!m->dirty) {
            int64_t want = elem > i->slot_size ? -EMSGSIZE : (int64_t)(n < freeslots ? n : freeslots);
            FUZZ_ASSERT(got == want, "mpmc send_fixed(%u, %" PRIu64 ") = %" PRId64 ", model says %" PRId64, elem, n,
                        got, want);
            for (int64_t j = 0; j < got; j++)
                model_push(m, elem, 1);
        } else {
            FUZZ_ASSERT((got >= 0 && (uint64_t)got <= n) || got == -EMSGSIZE || got == -EPROTO, "send_fixed");
        }
        break;
    }
    case 2: { /* claim a burst, fill, commit in reverse */
        uint64_t n = 1 + fz_u8(in) % (i->capacity + 1);
        int64_t got = ivshm_mpmc_claim_send(&w->mp, n, &pos);
        if (!m->dirty)
            FUZZ_ASSERT(got == (freeslots ? (int64_t)(n < freeslots ? n : freeslots) : -EAGAIN), "claim_send %" PRId64,
                        got);
        FUZZ_ASSERT((got >= 1 && (uint64_t)got <= n) || got == -EAGAIN || got == -EPROTO, "claim_send");
        uint64_t len = fz_u8(in) % (i->slot_size + 1);
        for (int64_t j = 0; j < got; j++) {
            in_ring(w, i, ivshm_mpmc_payload(&w->mp, pos + (uint64_t)j), i->slot_size);
            fill(ivshm_mpmc_payload(&w->mp, pos + (uint64_t)j), m->next_seq + (uint64_t)j, len);
        }
        for (int64_t j = got - 1; j >= 0; j--)
            ivshm_mpmc_commit_one(&w->mp, pos + (uint64_t)j, (uint32_t)len);
        for (int64_t j = 0; j < got && !m->dirty; j++)
            model_push(m, len, 1);
        break;
    }
    case 3: {
        uint64_t cap = fz_u8(in) % (i->slot_size + 2), needed = 0;
        int64_t got = ivshm_mpmc_try_recv(&w->mc, w->buf, cap, &needed);
        if (!m->dirty) {
            /* a message longer than the buffer stays in the ring: -ENOBUFS, its length in needed */
            uint64_t want = m->n ? *model_peek(m, 0) : 0;
            FUZZ_ASSERT(m->n ? (want > cap ? got == -ENOBUFS && needed == want : got >= 0) : got == -EAGAIN,
                        "mpmc try_recv %" PRId64, got);
        }
        FUZZ_ASSERT((got >= 0 && needed == (uint64_t)got && (uint64_t)got <= cap) || got == -EAGAIN ||
                        got == -ENOBUFS || (got == -EPROTO && w->mc.why),
                    "try_recv %" PRId64, got);
        if (got >= 0)
            mpmc_got(w, w->buf, (uint64_t)got, cap);
        break;
    }
    case 4: {
        uint32_t elem = fz_u8(in) % (i->slot_size + 2);
        uint64_t n = fz_u8(in) % (i->capacity + 2);
        int64_t got = ivshm_mpmc_recv_fixed(&w->mc, w->msg, elem, n);
        FUZZ_ASSERT((got >= 0 && (uint64_t)got <= n) || got == -EMSGSIZE || got == -EPROTO, "recv_fixed %" PRId64, got);
        if (!m->dirty) {
            /* the burst stops before the first message longer than a cell, which stays queued;
             * when that is the first one, -EMSGSIZE and nothing is taken */
            uint64_t k = n < m->n ? n : m->n, fit = 0;
            while (fit < k && *model_peek(m, (unsigned)fit) <= elem)
                fit++;
            int64_t want = k && fit == 0 ? -EMSGSIZE : (int64_t)fit;
            FUZZ_ASSERT(got == want, "mpmc recv_fixed(%u, %" PRIu64 ") = %" PRId64 ", model says %" PRId64, elem, n,
                        got, want);
            for (uint64_t j = 0; j < fit; j++) {
                uint64_t len = *model_peek(m, 0);
                const uint8_t *cell = w->msg + j * elem;
                mpmc_got(w, cell, len, len);
                for (uint64_t b = len; b < elem; b++)
                    FUZZ_ASSERT(cell[b] == 0, "padding");
            }
        }
        break;
    }
    case 5: {
        uint64_t n = 1 + fz_u8(in) % (i->capacity + 1);
        int64_t got = ivshm_mpmc_claim_recv(&w->mc, n, &pos);
        if (!m->dirty)
            FUZZ_ASSERT(got == (m->n ? (int64_t)(n < m->n ? n : m->n) : -EAGAIN), "claim_recv %" PRId64, got);
        FUZZ_ASSERT((got >= 1 && (uint64_t)got <= n) || got == -EAGAIN || got == -EPROTO, "claim_recv");
        for (int64_t j = 0; j < got; j++) {
            int64_t len = ivshm_mpmc_msg_len(&w->mc, pos + (uint64_t)j);
            FUZZ_ASSERT(m->dirty ? (len >= 0 || len == -EPROTO) : len >= 0, "msg_len %" PRId64, len);
            if (len >= 0) {
                in_ring(w, i, ivshm_mpmc_payload(&w->mc, pos + (uint64_t)j), (uint64_t)len);
                mpmc_got(w, ivshm_mpmc_payload(&w->mc, pos + (uint64_t)j), (uint64_t)len, (uint64_t)len);
            }
            ivshm_mpmc_release_one(&w->mc, pos + (uint64_t)j);
        }
        break;
    }
    default: { /* a producer holds a claim: the stall is visible, nothing is delivered past it */
        int64_t got = ivshm_mpmc_claim_send(&w->mp, 1, &pos);
        FUZZ_ASSERT(got == 1 || got == -EAGAIN || got == -EPROTO, "claim_send %" PRId64, got);
        if (got != 1)
            break;
        uint64_t spos = 0;
        int st = ivshm_mpmc_stalled(&w->mc, &spos);
        if (!m->dirty && m->n == 0) {
            FUZZ_ASSERT(st == 1 && spos == pos, "stall not reported");
            FUZZ_ASSERT(ivshm_mpmc_try_recv(&w->mc, w->buf, sizeof(w->buf), NULL) == -EAGAIN, "read past a claim");
        }
        fill(ivshm_mpmc_payload(&w->mp, pos), m->next_seq, 1);
        ivshm_mpmc_commit_one(&w->mp, pos, 1);
        if (!m->dirty)
            model_push(m, 1, 1);
        break;
    }
    }
    uint64_t c = ivshm_mpmc_count(&w->mc);
    FUZZ_ASSERT(c <= i->capacity, "count");
    FUZZ_ASSERT(m->dirty || c == m->n, "count %" PRIu64 ", model %u", c, m->n);
}

/* ------------------------------------------------------------------------------------------ */

static void poke(struct world *w, struct fz_in *in)
{
    uint8_t sel = fz_u8(in);
    const struct ivshm_ring_info *i = (sel & 1) ? &w->mi : &w->si;
    struct model *m = (sel & 1) ? &w->mm : &w->ms;
    uint8_t *base = w->mem + i->offset;
    unsigned width = 1u << ((sel >> 1) & 3);
    uint64_t off;
    switch ((sel >> 3) & 3) {
    case 0: off = 128; break; /* head */
    case 1: off = 256; break; /* tail */
    default: off = fz_u16(in) % i->size; break;
    }
    off &= ~(uint64_t)(width - 1);
    if (off + width > i->size)
        return;
    uint64_t cur = 0, v;
    memcpy(&cur, base + off, width);
    uint8_t how = fz_u8(in);
    switch (how % 4) {
    case 0: v = fz_u64(in); break;                          /* anything */
    case 1: v = cur + (uint64_t)(int8_t)fz_u8(in); break;    /* near miss */
    case 2: v = cur + (uint64_t)i->capacity * (1 + how / 4); break; /* a lap away */
    default: v = (uint64_t)i->slot_size + (uint64_t)(int8_t)fz_u8(in); break; /* length-like */
    }
    memcpy(base + off, &v, width);
    m->dirty = 1;
}

static void canary(struct world *w)
{
    fz_only(w->mem, RSIZE, w->ci.offset, w->ci.size);
    uint64_t len = w->canary_seq % 50; /* up to 4 slots of 16 */
    fill(w->msg, w->canary_seq, len);
    FUZZ_ASSERT(ivshm_spsc_try_send(&w->cp, w->msg, len) == 0, "canary send");
    FUZZ_ASSERT(ivshm_spsc_try_recv(&w->cc, w->buf, sizeof(w->buf), NULL) == (int64_t)len, "canary recv");
    verify(w->buf, w->canary_seq, len);
    w->canary_seq++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint32_t sslots[] = {1, 8, 13, 24}, mslots[] = {1, 8, 16, 40}, caps[] = {2, 4, 8, 8};
    struct fz_in in = {data, size, 0};
    uint8_t shape = fz_u8(&in);
    struct world *w = calloc(1, sizeof(*w));
    w->mem = aligned_alloc(4096, RSIZE);
    if (!w || !w->mem)
        abort();
    memset(w->mem, 0, RSIZE);
    const char *why;
    FUZZ_ASSERT(ivshm_region_attach(&w->r, w->mem, RSIZE, IVSHM_ATTACH_FORMAT, 9, 0) == 0, "format");
    FUZZ_ASSERT(ivshm_region_create_ring(&w->r, "s", IVSHM_KIND_SPSC, sslots[shape & 3], caps[(shape >> 2) & 3], 1, 0,
                                         &w->si, &why) == 0, "s");
    FUZZ_ASSERT(ivshm_region_create_ring(&w->r, "m", IVSHM_KIND_MPMC, mslots[(shape >> 4) & 3], caps[(shape >> 6) & 3],
                                         1, 0, &w->mi, &why) == 0, "m");
    FUZZ_ASSERT(ivshm_region_create_ring(&w->r, "c", IVSHM_KIND_SPSC, 16, 4, 1, 0, &w->ci, &why) == 0, "c");
    FUZZ_ASSERT(ivshm_spsc_attach(&w->sp, &w->r, &w->si, &why) == 0 && ivshm_spsc_attach(&w->sc, &w->r, &w->si, &why) == 0,
                "attach s");
    w->sp_ok = w->sc_ok = 1;
    FUZZ_ASSERT(ivshm_mpmc_attach(&w->mp, &w->r, &w->mi, &why) == 0 && ivshm_mpmc_attach(&w->mc, &w->r, &w->mi, &why) == 0,
                "attach m");
    FUZZ_ASSERT(ivshm_spsc_attach(&w->cp, &w->r, &w->ci, &why) == 0 && ivshm_spsc_attach(&w->cc, &w->r, &w->ci, &why) == 0,
                "attach c");
    w->mm.next_seq = 1ull << 32;
    uint8_t header[IVSHM_HDR_SIZE];
    memcpy(header, w->mem, IVSHM_HDR_SIZE);

    while (fz_more(&in)) {
        uint8_t op = fz_u8(&in);
        switch (op % 20) {
        case 0: case 1: case 2: case 3: case 4: case 5: case 6: case 7:
            only(w, &w->si);
            spsc_op(w, &in, op % 20);
            break;
        case 8: case 9: case 10: case 11: case 12: case 13: case 14:
            only(w, &w->mi);
            mpmc_op(w, &in, (uint8_t)(op % 20 - 8));
            break;
        case 15: case 16: case 17:
            fz_open_all(w->mem, RSIZE);
            poke(w, &in);
            break;
        case 18:
            canary(w);
            break;
        default:
            canary(w);
            break;
        }
        fz_open_all(w->mem, RSIZE);
    }
    canary(w);
    fz_open_all(w->mem, RSIZE);
    FUZZ_ASSERT(memcmp(header, w->mem, IVSHM_HDR_SIZE) == 0, "the region header changed");
    free(w->mem);
    free(w);
    return 0;
}
