/* test_spsc.c - sequence-checked stress of the SPSC ring with a producer and a consumer thread.
 *
 * Both threads derive the whole message stream from one seed: message `seq` has a size from
 * size_of() and bytes from tc_byte(), so the consumer checks every byte, the length and the order
 * of every message.  Sizes come in blocks of 16: some blocks have one size that fits a slot (so
 * the batch calls send_fixed/recv_fixed apply), others vary per message, some span several slots
 * and a few approach the whole ring.  Each side picks a different API at random for each step:
 *   producer: try_send, write x k + one publish, send_fixed, reserve/commit
 *   consumer: try_recv, try_recv into a too-small buffer (must leave the message queued),
 *             next/verify in place/advance x k + one release, recv_fixed
 * Producer and consumer each attach their own handle, as two processes would.
 */
#include "tcommon.h"

struct shape {
    uint32_t slot_size, capacity;
    uint64_t messages; /* at scale 1.0 */
};

struct spsc_test {
    struct ivshm_region *region;
    struct ivshm_ring_info info;
    uint64_t n;      /* messages to move */
    uint64_t seed;
    uint64_t max_len;
    double deadline; /* give up (as a failure) after this, so a lost wake-up never hangs the run */
    /* statistics */
    uint64_t bytes, prod_calls[4], cons_calls[4], full_spins, empty_spins;
};

/* Block kinds: uniform blocks (one size <= slot_size) allow the fixed-size batch calls. */
static int block_uniform(const struct spsc_test *t, uint64_t seq)
{
    return tc_mix(t->seed ^ (seq >> 4)) % 16 < 10;
}

static uint64_t size_of(const struct spsc_test *t, uint64_t seq)
{
    uint64_t h = tc_mix(t->seed ^ (seq >> 4));
    uint64_t slot = t->info.slot_size;
    uint64_t k = h % 16;
    uint64_t r = tc_mix(t->seed * 3 + seq);
    if (k < 8)
        return (h >> 8) % (slot + 1);
    if (k < 10)
        return slot < 8 ? slot : 8;
    if (k < 13)
        return r % (slot + 1);
    if (k < 15) {
        uint64_t s = slot + 1 + r % (3 * slot);
        return s > t->max_len ? t->max_len : s;
    }
    return r % (t->max_len + 1);
}

static void *spsc_producer(void *arg)
{
    struct spsc_test *t = arg;
    struct ivshm_spsc q;
    const char *why = NULL;
    CHECKP(ivshm_spsc_attach(&q, t->region, &t->info, &why) == 0, "producer attach: %s", why);
    struct trng rng = {t->seed * 7 + 1};
    uint8_t *buf = malloc(t->max_len + 64);
    uint8_t *arr = malloc((size_t)t->info.slot_size * 32 + 64);
    CHECKP(buf && arr, "malloc");
    uint64_t seq = 0, spins = 0;
    while (seq < t->n && !tc_failed()) {
        uint64_t len = size_of(t, seq);
        int api = (int)trng_below(&rng, 4);
        int progressed = 0;
        if (api == 2 && !(block_uniform(t, seq) && len <= t->info.slot_size))
            api = 1;
        if (api == 3 && len > t->info.slot_size)
            api = 0;
        t->prod_calls[api]++;
        if (api == 0) { /* one message, published at once */
            tc_fill(buf, t->seed, seq, len);
            int rc = ivshm_spsc_try_send(&q, buf, len);
            CHECKP(rc == 0 || rc == -EAGAIN, "try_send(%" PRIu64 " bytes) = %d", len, rc);
            if (rc == 0)
                seq++, progressed = 1;
        } else if (api == 1) { /* several messages, one publish */
            uint64_t k = 1 + trng_below(&rng, 8);
            for (uint64_t i = 0; i < k && seq < t->n; i++) {
                len = size_of(t, seq);
                tc_fill(buf, t->seed, seq, len);
                int rc = ivshm_spsc_write(&q, buf, len);
                CHECKP(rc == 0 || rc == -EAGAIN, "write(%" PRIu64 " bytes) = %d", len, rc);
                if (rc)
                    break;
                seq++, progressed = 1;
            }
            ivshm_spsc_publish(&q);
        } else if (api == 2) { /* fixed-size batch up to the end of the uniform block */
            uint64_t left = 16 - (seq & 15);
            uint64_t k = 1 + trng_below(&rng, left);
            if (k > t->n - seq)
                k = t->n - seq;
            for (uint64_t i = 0; i < k; i++)
                tc_fill(arr + i * len, t->seed, seq + i, len);
            int64_t got = ivshm_spsc_send_fixed(&q, arr, (uint32_t)len, k);
            CHECKP(got >= 0 && (uint64_t)got <= k, "send_fixed(%" PRIu64 ") = %" PRId64, k, got);
            seq += (uint64_t)got;
            progressed = got > 0;
        } else { /* zero copy */
            uint8_t *p = NULL;
            int rc = ivshm_spsc_reserve(&q, len, &p);
            CHECKP(rc == 0 || rc == -EAGAIN, "reserve(%" PRIu64 ") = %d", len, rc);
            if (rc == 0) {
                tc_fill(p, t->seed, seq, len);
                ivshm_spsc_commit(&q, (uint32_t)len);
                seq++, progressed = 1;
            }
        }
        if (!progressed) {
            t->full_spins++;
            tc_relax();
            if ((++spins & 0xffff) == 0)
                CHECKP(tc_now() < t->deadline, "producer stuck at message %" PRIu64, seq);
        }
    }
    free(buf);
    free(arr);
    return NULL;
}

static void *spsc_consumer(void *arg)
{
    struct spsc_test *t = arg;
    struct ivshm_spsc q;
    const char *why = NULL;
    CHECKP(ivshm_spsc_attach(&q, t->region, &t->info, &why) == 0, "consumer attach: %s", why);
    struct trng rng = {t->seed * 11 + 5};
    uint8_t *buf = malloc(t->max_len + 64);
    uint8_t *arr = malloc((size_t)t->info.slot_size * 32 + 64);
    CHECKP(buf && arr, "malloc");
    uint64_t seq = 0, spins = 0;
    while (seq < t->n && !tc_failed()) {
        uint64_t len = size_of(t, seq);
        int api = (int)trng_below(&rng, 4);
        int progressed = 0;
        if (api == 3 && len > t->info.slot_size)
            api = 0;
        t->cons_calls[api]++;
        if (api == 0 || (api == 1 && len == 0)) {
            uint64_t needed = 0;
            int64_t got = ivshm_spsc_try_recv(&q, buf, t->max_len + 64, &needed);
            CHECKP(got >= 0 || got == -EAGAIN, "try_recv = %" PRId64 " (%s)", got, q.why);
            if (got >= 0) {
                CHECKP((uint64_t)got == len, "message %" PRIu64 ": %" PRId64 " bytes, expected %" PRIu64,
                       seq, got, len);
                int64_t bad = tc_verify(buf, t->seed, seq, len);
                CHECKP(bad < 0, "message %" PRIu64 " byte %" PRId64 " wrong", seq, bad);
                t->bytes += len;
                seq++, progressed = 1;
            }
        } else if (api == 1) { /* a buffer one byte short: the message must stay queued */
            uint64_t needed = 0;
            int64_t got = ivshm_spsc_try_recv(&q, buf, len - 1, &needed);
            CHECKP(got == -ENOBUFS || got == -EAGAIN, "short try_recv = %" PRId64, got);
            if (got == -ENOBUFS) {
                CHECKP(needed == len, "needed %" PRIu64 ", expected %" PRIu64, needed, len);
                got = ivshm_spsc_try_recv(&q, buf, len, &needed);
                CHECKP(got == (int64_t)len, "retry try_recv = %" PRId64 ", expected %" PRIu64, got, len);
                CHECKP(tc_verify(buf, t->seed, seq, len) < 0, "message %" PRIu64 " corrupt", seq);
                t->bytes += len;
                seq++, progressed = 1;
            }
        } else if (api == 2) { /* several messages located and checked in place, one release */
            uint64_t k = 1 + trng_below(&rng, 8);
            for (uint64_t i = 0; i < k && seq < t->n; i++) {
                struct ivshm_spsc_msg m;
                int rc = ivshm_spsc_next(&q, &m);
                CHECKP(rc == 0 || rc == -EAGAIN, "next = %d (%s)", rc, q.why);
                if (rc)
                    break;
                len = size_of(t, seq);
                CHECKP(m.len == len, "message %" PRIu64 ": %" PRIu64 " bytes, expected %" PRIu64,
                       seq, m.len, len);
                CHECKP(m.nslots == (len <= t->info.slot_size ? 1 : (len + t->info.slot_size - 1) / t->info.slot_size),
                       "message %" PRIu64 " of %" PRIu64 " bytes in %u slots", seq, len, m.nslots);
                if (m.nslots == 1) {
                    CHECKP(tc_verify(m.data, t->seed, seq, len) < 0, "message %" PRIu64 " corrupt in place", seq);
                } else {
                    ivshm_spsc_copy(&q, &m, buf);
                    CHECKP(tc_verify(buf, t->seed, seq, len) < 0, "message %" PRIu64 " corrupt", seq);
                }
                ivshm_spsc_advance(&q, &m);
                t->bytes += len;
                seq++, progressed = 1;
            }
            ivshm_spsc_release(&q);
        } else { /* fixed-size batch */
            uint64_t k = 1 + trng_below(&rng, 32);
            int64_t got = ivshm_spsc_recv_fixed(&q, arr, (uint32_t)len, k);
            CHECKP(got >= 0 || got == -ENOMSG, "recv_fixed = %" PRId64, got);
            CHECKP(got != -ENOMSG, "recv_fixed refused message %" PRIu64 " of %" PRIu64 " bytes", seq, len);
            for (int64_t i = 0; i < got; i++) {
                CHECKP(size_of(t, seq) == len, "recv_fixed took message %" PRIu64 " of another size", seq);
                CHECKP(tc_verify(arr + (uint64_t)i * len, t->seed, seq, len) < 0,
                       "message %" PRIu64 " corrupt (recv_fixed)", seq);
                t->bytes += len;
                seq++;
            }
            progressed = got > 0;
        }
        if (!progressed) {
            t->empty_spins++;
            tc_relax();
            if ((++spins & 0xffff) == 0)
                CHECKP(tc_now() < t->deadline, "consumer stuck at message %" PRIu64, seq);
        }
    }
    if (!tc_failed()) {
        /* nothing may follow the last message */
        struct ivshm_spsc_msg m;
        CHECKP(ivshm_spsc_next(&q, &m) == -EAGAIN, "a message after the last one");
        CHECKP(ivshm_spsc_count(&q) == 0, "count %" PRIu64 " after draining", ivshm_spsc_count(&q));
    }
    free(buf);
    free(arr);
    return NULL;
}

static void run_shape(const struct shape *sh, uint64_t seed, char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 1u << 20) == 0, "region");
    struct spsc_test t;
    memset(&t, 0, sizeof(t));
    const char *why = NULL;
    int rc = ivshm_region_create_ring(&tr.r, "stress", IVSHM_KIND_SPSC, sh->slot_size, sh->capacity, 1,
                                      0, &t.info, &why);
    CHECK(rc == 0, "create_ring: %d %s", rc, why);
    t.region = &tr.r;
    t.n = tc_count(sh->messages, 2000);
    t.seed = seed;
    t.max_len = (uint64_t)sh->slot_size * sh->capacity;
    t.deadline = tc_now() + 120;
    pthread_t p, c;
    pthread_create(&c, NULL, spsc_consumer, &t);
    pthread_create(&p, NULL, spsc_producer, &t);
    pthread_join(p, NULL);
    pthread_join(c, NULL);
    tregion_free(&tr);
    snprintf(detail, dn, "%" PRIu64 " messages, %" PRIu64 " bytes checked", t.n, t.bytes);
}

#define SHAPE_CASE(fname, slot, cap, msgs)                                                         \
    static void fname(char *d, size_t n)                                                           \
    {                                                                                              \
        struct shape sh = {slot, cap, msgs};                                                       \
        run_shape(&sh, tc_mix(slot * 1000003ull + cap), d, n);                                     \
    }

SHAPE_CASE(spsc_slot8_cap2, 8, 2, 400000)
SHAPE_CASE(spsc_slot13_cap8, 13, 8, 400000)
SHAPE_CASE(spsc_slot64_cap64, 64, 64, 600000)
SHAPE_CASE(spsc_slot1000_cap16, 1000, 16, 60000)

/* Restarting either side mid-stream: a new handle continues from the shared indices. */
static void spsc_restart_sides(char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 65536) == 0, "region");
    struct ivshm_ring_info info;
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&tr.r, "r", IVSHM_KIND_SPSC, 16, 8, 1, 0, &info, &why) == 0, "create");
    uint8_t buf[128];
    uint64_t sent = 0, got = 0;
    for (int round = 0; round < 200; round++) {
        struct ivshm_spsc p, c;
        CHECK(ivshm_spsc_attach(&p, &tr.r, &info, &why) == 0, "attach p");
        CHECK(ivshm_spsc_attach(&c, &tr.r, &info, &why) == 0, "attach c");
        int ns = round % 7, nr = (round * 5) % 6;
        for (int i = 0; i < ns; i++) {
            uint64_t len = (sent * 13) % 40; /* up to 3 slots */
            tc_fill(buf, 9, sent, len);
            int rc = ivshm_spsc_try_send(&p, buf, len);
            if (rc == -EAGAIN)
                break;
            CHECK(rc == 0, "send %d", rc);
            sent++;
        }
        for (int i = 0; i < nr; i++) {
            int64_t n = ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL);
            if (n == -EAGAIN)
                break;
            CHECK(n == (int64_t)((got * 13) % 40), "message %" PRIu64 " length %" PRId64, got, n);
            CHECK(tc_verify(buf, 9, got, (uint64_t)n) < 0, "message %" PRIu64 " corrupt", got);
            got++;
        }
    }
    tregion_free(&tr);
    snprintf(detail, dn, "%" PRIu64 " sent, %" PRIu64 " received across 200 re-attaches", sent, got);
}

/* Limits that must be refused, not wrapped. */
static void spsc_size_limits(char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 65536) == 0, "region");
    struct ivshm_ring_info info;
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&tr.r, "r", IVSHM_KIND_SPSC, 64, 8, 1, 0, &info, &why) == 0, "create");
    struct ivshm_spsc q;
    CHECK(ivshm_spsc_attach(&q, &tr.r, &info, &why) == 0, "attach");
    static uint8_t big[64 * 8 + 1];
    CHECK(ivshm_spsc_try_send(&q, big, 64 * 8 + 1) == -EMSGSIZE, "one byte over capacity * slot_size");
    CHECK(ivshm_spsc_try_send(&q, big, UINT64_MAX) == -EMSGSIZE, "UINT64_MAX bytes");
    CHECK(ivshm_spsc_try_send(&q, big, UINT64_MAX - 62) == -EMSGSIZE, "UINT64_MAX - 62 bytes");
    CHECK(ivshm_spsc_count(&q) == 0, "nothing may have been published");
    uint8_t *p;
    CHECK(ivshm_spsc_reserve(&q, 65, &p) == -EMSGSIZE, "reserve over the slot size");
    CHECK(ivshm_spsc_send_fixed(&q, big, 65, 1) == -EMSGSIZE, "send_fixed over the slot size");
    CHECK(ivshm_spsc_try_send(&q, big, 64 * 8) == 0, "exactly capacity * slot_size");
    CHECK(ivshm_spsc_try_send(&q, big, 0) == -EAGAIN, "full");
    CHECK(ivshm_spsc_try_recv(&q, big, sizeof(big), NULL) == 64 * 8, "recv the whole-ring message");
    tregion_free(&tr);
    snprintf(detail, dn, "refused");
}

int main(int argc, char **argv)
{
    static const struct tcase cases[] = {
        {"spsc_slot8_cap2", spsc_slot8_cap2, 0},
        {"spsc_slot13_cap8", spsc_slot13_cap8, 0},
        {"spsc_slot64_cap64", spsc_slot64_cap64, 0},
        {"spsc_slot1000_cap16", spsc_slot1000_cap16, 0},
        {"spsc_restart_sides", spsc_restart_sides, 0},
        {"spsc_size_limits", spsc_size_limits, 0},
    };
    return tc_main(argc, argv, cases, sizeof(cases) / sizeof(cases[0]));
}
