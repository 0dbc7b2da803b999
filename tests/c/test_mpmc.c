/* test_mpmc.c - exactly-once, per-producer-order stress of the MPMC ring with several threads.
 *
 * Every message carries {producer id, length, sequence number} in its first 16 bytes and a byte
 * pattern after that.  Producers send bursts with try_send, send_fixed and claim/commit (committing
 * a burst's slots in reverse order, so consumers meet claimed-but-uncommitted slots); consumers
 * take them with try_recv, recv_fixed (zero-padded cells) and claim_recv/verify in place/release.
 * A shared table marks each (producer, seq) once: a second mark is a duplicate, a missing mark at
 * the end a loss; each consumer checks that it sees every producer's numbers increasing.
 */
#include "tcommon.h"

#define MAXP 4
#define MAXC 4
#define HDR 16

struct mpmc_test {
    struct ivshm_region *region;
    struct ivshm_ring_info info;
    int np, nc;
    uint64_t per_producer;
    uint64_t total_received; /* atomic */
    uint8_t *seen[MAXP];
    double deadline;
    uint64_t bytes[MAXC];
    int max_burst;
};

struct worker {
    struct mpmc_test *t;
    int id;
};

static void make_msg(uint8_t *p, uint32_t pid, uint64_t seq, uint32_t len)
{
    memcpy(p, &pid, 4);
    memcpy(p + 4, &len, 4);
    memcpy(p + 8, &seq, 8);
    for (uint32_t j = HDR; j < len; j++)
        p[j] = tc_byte(pid, seq, j);
}

static void *mpmc_producer(void *arg)
{
    struct worker *w = arg;
    struct mpmc_test *t = w->t;
    struct ivshm_mpmc q;
    const char *why = NULL;
    CHECKP(ivshm_mpmc_attach(&q, t->region, &t->info, &why) == 0, "attach: %s", why);
    struct trng rng = {tc_mix(0x5eed + (uint64_t)w->id)};
    uint32_t slot = t->info.slot_size;
    uint8_t *arr = malloc((size_t)slot * (size_t)t->max_burst);
    CHECKP(arr != NULL, "malloc");
    uint64_t seq = 0, spins = 0;
    while (seq < t->per_producer && !tc_failed()) {
        uint32_t len = HDR + (uint32_t)trng_below(&rng, slot - HDR + 1);
        uint64_t burst = 1 + trng_below(&rng, (uint64_t)t->max_burst);
        if (burst > t->per_producer - seq)
            burst = t->per_producer - seq;
        int api = (int)trng_below(&rng, 3);
        int64_t sent = 0;
        if (api == 0) {
            make_msg(arr, (uint32_t)w->id, seq, len);
            int rc = ivshm_mpmc_try_send(&q, arr, len);
            CHECKP(rc == 0 || rc == -EAGAIN, "try_send = %d (%s)", rc, q.why);
            sent = rc == 0;
        } else if (api == 1) {
            for (uint64_t i = 0; i < burst; i++)
                make_msg(arr + i * len, (uint32_t)w->id, seq + i, len);
            sent = ivshm_mpmc_send_fixed(&q, arr, len, burst);
            CHECKP(sent >= 0 && (uint64_t)sent <= burst, "send_fixed = %" PRId64 " (%s)", sent, q.why);
        } else {
            uint64_t pos;
            int64_t m = ivshm_mpmc_claim_send(&q, burst, &pos);
            CHECKP(m > 0 || m == -EAGAIN, "claim_send = %" PRId64 " (%s)", m, q.why);
            if (m > 0) {
                CHECKP((uint64_t)m <= burst, "claimed %" PRId64 " of %" PRIu64, m, burst);
                for (int64_t i = 0; i < m; i++)
                    make_msg(ivshm_mpmc_payload(&q, pos + (uint64_t)i), (uint32_t)w->id,
                             seq + (uint64_t)i, len);
                /* commit in reverse: consumers must wait at the first, not skip it */
                for (int64_t i = m - 1; i >= 0; i--)
                    ivshm_mpmc_commit_one(&q, pos + (uint64_t)i, len);
                sent = m;
            }
        }
        seq += (uint64_t)sent;
        if (!sent) {
            tc_relax();
            if ((++spins & 0xffff) == 0)
                CHECKP(tc_now() < t->deadline, "producer %d stuck at %" PRIu64, w->id, seq);
        }
    }
    free(arr);
    return NULL;
}

/* Check one received message; returns its length or -1 after recording a failure. */
static int64_t check_msg(struct mpmc_test *t, int cid, uint64_t *last, const uint8_t *p, uint64_t len)
{
    uint32_t pid, hlen;
    uint64_t seq;
    if (len < HDR) {
        tc_fail(__FILE__, __LINE__, "consumer %d: message of %" PRIu64 " bytes", cid, len);
        return -1;
    }
    memcpy(&pid, p, 4);
    memcpy(&hlen, p + 4, 4);
    memcpy(&seq, p + 8, 8);
    if (pid >= (uint32_t)t->np || hlen != len || seq >= t->per_producer) {
        tc_fail(__FILE__, __LINE__, "consumer %d: bad header pid=%u len=%u/%" PRIu64 " seq=%" PRIu64,
                cid, pid, hlen, len, seq);
        return -1;
    }
    for (uint64_t j = HDR; j < len; j++)
        if (p[j] != tc_byte(pid, seq, j)) {
            tc_fail(__FILE__, __LINE__, "message %u/%" PRIu64 " byte %" PRIu64 " wrong", pid, seq, j);
            return -1;
        }
    if (last[pid] != UINT64_MAX && seq <= last[pid]) {
        tc_fail(__FILE__, __LINE__, "consumer %d: producer %u order broken: %" PRIu64 " after %" PRIu64,
                cid, pid, seq, last[pid]);
        return -1;
    }
    last[pid] = seq;
    if (__atomic_exchange_n(&t->seen[pid][seq], 1, __ATOMIC_RELAXED)) {
        tc_fail(__FILE__, __LINE__, "message %u/%" PRIu64 " delivered twice", pid, seq);
        return -1;
    }
    t->bytes[cid] += len;
    return (int64_t)len;
}

static void *mpmc_consumer(void *arg)
{
    struct worker *w = arg;
    struct mpmc_test *t = w->t;
    struct ivshm_mpmc q;
    const char *why = NULL;
    CHECKP(ivshm_mpmc_attach(&q, t->region, &t->info, &why) == 0, "attach: %s", why);
    struct trng rng = {tc_mix(0xc0de + (uint64_t)w->id)};
    uint32_t slot = t->info.slot_size;
    uint8_t *arr = malloc((size_t)slot * (size_t)t->max_burst);
    CHECKP(arr != NULL, "malloc");
    uint64_t last[MAXP];
    for (int i = 0; i < MAXP; i++)
        last[i] = UINT64_MAX;
    uint64_t total = (uint64_t)t->np * t->per_producer, spins = 0;
    while (__atomic_load_n(&t->total_received, __ATOMIC_RELAXED) < total && !tc_failed()) {
        int api = (int)trng_below(&rng, 3);
        uint64_t burst = 1 + trng_below(&rng, (uint64_t)t->max_burst);
        int64_t got = 0;
        /* half of the calls use a buffer or cells shorter than a slot: the claim then checks
         * lengths first, and a longer message stays for another call (nothing lost or doubled) */
        uint32_t cap = trng_below(&rng, 2) ? slot : HDR + (uint32_t)trng_below(&rng, slot - HDR + 1);
        if (api == 0) {
            uint64_t needed = 0;
            int64_t n = ivshm_mpmc_try_recv(&q, arr, cap, &needed);
            CHECKP(n >= 0 || n == -EAGAIN || n == -ENOBUFS, "try_recv = %" PRId64 " (%s)", n, q.why);
            if (n == -ENOBUFS)
                CHECKP(needed > cap && needed <= slot, "ENOBUFS with needed %" PRIu64 ", cap %u", needed, cap);
            if (n >= 0) {
                CHECKP(needed == (uint64_t)n, "needed %" PRIu64 " != %" PRId64, needed, n);
                if (check_msg(t, w->id, last, arr, (uint64_t)n) < 0)
                    return NULL;
                got = 1;
            }
        } else if (api == 1) {
            int64_t n = ivshm_mpmc_recv_fixed(&q, arr, cap, burst);
            CHECKP(n >= 0 || (n == -EMSGSIZE && cap < slot), "recv_fixed = %" PRId64 " (%s)", n, q.why);
            for (int64_t i = 0; i < n; i++) {
                const uint8_t *cell = arr + (uint64_t)i * cap;
                uint32_t len;
                memcpy(&len, cell + 4, 4);
                CHECKP(len >= HDR && len <= cap, "recv_fixed cell with length %u", len);
                for (uint32_t j = len; j < cap; j++)
                    CHECKP(cell[j] == 0, "recv_fixed padding not zeroed");
                if (check_msg(t, w->id, last, cell, len) < 0)
                    return NULL;
            }
            got = n > 0 ? n : 0;
        } else {
            uint64_t pos;
            int64_t m = ivshm_mpmc_claim_recv(&q, burst, &pos);
            CHECKP(m > 0 || m == -EAGAIN, "claim_recv = %" PRId64 " (%s)", m, q.why);
            for (int64_t i = 0; i < m; i++) {
                int64_t len = ivshm_mpmc_msg_len(&q, pos + (uint64_t)i);
                CHECKP(len >= 0, "msg_len: %s", q.why);
                if (check_msg(t, w->id, last, ivshm_mpmc_payload(&q, pos + (uint64_t)i), (uint64_t)len) < 0)
                    return NULL;
                ivshm_mpmc_release_one(&q, pos + (uint64_t)i);
            }
            got = m > 0 ? m : 0;
        }
        if (got)
            __atomic_fetch_add(&t->total_received, (uint64_t)got, __ATOMIC_RELAXED);
        else {
            tc_relax();
            if ((++spins & 0xffff) == 0)
                CHECKP(tc_now() < t->deadline, "consumer %d stuck (%" PRIu64 " of %" PRIu64 " received)",
                       w->id, __atomic_load_n(&t->total_received, __ATOMIC_RELAXED), total);
        }
    }
    free(arr);
    return NULL;
}

static void run_mpmc(int np, int nc, uint32_t slot, uint32_t cap, int max_burst, uint64_t per,
                     char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 1u << 20) == 0, "region");
    struct mpmc_test t;
    memset(&t, 0, sizeof(t));
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&tr.r, "mpmc", IVSHM_KIND_MPMC, slot, cap, 1, 0, &t.info, &why) == 0,
          "create: %s", why);
    t.region = &tr.r;
    t.np = np;
    t.nc = nc;
    t.per_producer = tc_count(per, 1000);
    t.max_burst = max_burst;
    t.deadline = tc_now() + 120;
    for (int i = 0; i < np; i++)
        CHECK((t.seen[i] = calloc(t.per_producer, 1)) != NULL, "calloc");
    pthread_t th[MAXP + MAXC];
    struct worker w[MAXP + MAXC];
    for (int i = 0; i < nc; i++) {
        w[i] = (struct worker){&t, i};
        pthread_create(&th[i], NULL, mpmc_consumer, &w[i]);
    }
    for (int i = 0; i < np; i++) {
        w[nc + i] = (struct worker){&t, i};
        pthread_create(&th[nc + i], NULL, mpmc_producer, &w[nc + i]);
    }
    for (int i = 0; i < np + nc; i++)
        pthread_join(th[i], NULL);
    uint64_t missing = 0, bytes = 0;
    for (int i = 0; i < np; i++) {
        for (uint64_t s = 0; s < t.per_producer; s++)
            missing += !t.seen[i][s];
        free(t.seen[i]);
    }
    for (int i = 0; i < nc; i++)
        bytes += t.bytes[i];
    if (!tc_failed()) {
        CHECK(missing == 0, "%" PRIu64 " messages never delivered", missing);
        struct ivshm_mpmc q;
        CHECK(ivshm_mpmc_attach(&q, &tr.r, &t.info, &why) == 0, "attach");
        CHECK(ivshm_mpmc_count(&q) == 0, "ring not empty at the end");
        uint8_t b[8];
        CHECK(ivshm_mpmc_try_recv(&q, b, 0, NULL) == -EAGAIN, "a message after the last one");
    }
    tregion_free(&tr);
    snprintf(detail, dn, "%dx%d, %" PRIu64 " messages exactly once, %" PRIu64 " bytes checked", np, nc,
             (uint64_t)np * t.per_producer, bytes);
}

static void mpmc_2x2_cap1024(char *d, size_t n) { run_mpmc(2, 2, 64, 1024, 32, 1000000, d, n); }
static void mpmc_2x2_cap4_burst(char *d, size_t n) { run_mpmc(2, 2, 24, 4, 8, 300000, d, n); }
static void mpmc_1x1_fifo(char *d, size_t n) { run_mpmc(1, 1, 40, 16, 16, 1000000, d, n); }
static void mpmc_3x3_cap8(char *d, size_t n) { run_mpmc(3, 3, 32, 8, 4, 150000, d, n); }
static void mpmc_4x1_cap2(char *d, size_t n) { run_mpmc(4, 1, 16, 2, 2, 100000, d, n); }

/* A region with an MPMC ring "m" of `cap` 16-byte slots and three handles on it; 0, or -1 with
 * the region freed. */
static int mpmc_three_handles(struct tregion *tr, uint32_t cap, struct ivshm_mpmc *a, struct ivshm_mpmc *b,
                              struct ivshm_mpmc *c)
{
    struct ivshm_ring_info info;
    const char *why = NULL;
    if (tregion_new(tr, 65536) != 0)
        return -1;
    if (ivshm_region_create_ring(&tr->r, "m", IVSHM_KIND_MPMC, 16, cap, 1, 0, &info, &why) != 0 ||
        ivshm_mpmc_attach(a, &tr->r, &info, &why) != 0 || ivshm_mpmc_attach(b, &tr->r, &info, &why) != 0 ||
        ivshm_mpmc_attach(c, &tr->r, &info, &why) != 0) {
        tregion_free(tr);
        return -1;
    }
    return 0;
}

/* A producer that claimed a slot and did not commit: consumers stop there, stalled() says where;
 * the commit lets everything behind it through, in order. */
static void mpmc_stall_detected(char *detail, size_t dn)
{
    struct tregion tr;
    struct ivshm_mpmc a, b, c;
    CHECK(mpmc_three_handles(&tr, 8, &a, &b, &c) == 0, "a ring of 8 slots, three handles");
    uint8_t buf[16];
    uint64_t pos = 99, spos = 0;
    CHECK(ivshm_mpmc_try_send(&a, "0", 1) == 0, "send 0");
    CHECK(ivshm_mpmc_claim_send(&a, 1, &pos) == 1 && pos == 1, "claim 1");
    CHECK(ivshm_mpmc_try_send(&b, "2", 1) == 0, "send 2 behind the claimed slot");
    CHECK(ivshm_mpmc_stalled(&c, &spos) == 0, "not stalled while message 0 is ready");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1 && buf[0] == '0', "recv 0");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "consumer waits at the claim");
    CHECK(ivshm_mpmc_stalled(&c, &spos) == 1 && spos == 1, "stalled() reports slot 1 (got %" PRIu64 ")", spos);
    CHECK(ivshm_mpmc_count(&c) == 2, "count includes the claim");
    memcpy(ivshm_mpmc_payload(&a, pos), "1", 1);
    ivshm_mpmc_commit_one(&a, pos, 1);
    CHECK(ivshm_mpmc_stalled(&c, &spos) == 0, "not stalled after the commit");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1 && buf[0] == '1', "recv 1");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1 && buf[0] == '2', "recv 2");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "empty");
    /* full ring: -EAGAIN, and the claim of a burst stops at the first taken slot */
    for (int i = 0; i < 8; i++)
        CHECK(ivshm_mpmc_try_send(&a, "x", 1) == 0, "fill %d", i);
    CHECK(ivshm_mpmc_try_send(&a, "x", 1) == -EAGAIN, "full");
    CHECK(ivshm_mpmc_send_fixed(&a, "xxxx", 1, 4) == 0, "send_fixed on a full ring sends 0");
    CHECK(ivshm_mpmc_try_send(&a, buf, 17) == -EMSGSIZE, "over the slot size");
    CHECK(ivshm_mpmc_send_fixed(&a, buf, 17, 1) == -EMSGSIZE, "send_fixed over the slot size");
    /* a too-small buffer: -ENOBUFS with the length, and the message stays for everyone */
    uint64_t needed = 0;
    CHECK(ivshm_mpmc_try_recv(&c, buf, 0, &needed) == -ENOBUFS && needed == 1, "short buffer");
    CHECK(ivshm_mpmc_count(&c) == 8, "the message stayed in the ring");
    CHECK(ivshm_mpmc_try_recv(&b, buf, 1, &needed) == 1 && needed == 1, "another consumer gets it");
    tregion_free(&tr);
    snprintf(detail, dn, "claim without commit seen as stall at slot 1");
}

/* Bursts of zero messages are no-ops, not a retry loop that ends in -EPROTO. */
static void mpmc_zero_bursts(char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 65536) == 0, "region");
    struct ivshm_ring_info info;
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&tr.r, "m", IVSHM_KIND_MPMC, 16, 8, 1, 0, &info, &why) == 0, "create");
    struct ivshm_mpmc q;
    CHECK(ivshm_mpmc_attach(&q, &tr.r, &info, &why) == 0, "attach");
    uint8_t buf[64];
    uint64_t pos;
    int64_t rc = ivshm_mpmc_send_fixed(&q, buf, 8, 0);
    CHECK(rc == 0, "send_fixed of 0 messages = %" PRId64 " (%s)", rc, q.why ? q.why : "");
    rc = ivshm_mpmc_recv_fixed(&q, buf, 8, 0);
    CHECK(rc == 0, "recv_fixed of 0 messages on an empty ring = %" PRId64, rc);
    CHECK(ivshm_mpmc_try_send(&q, "abc", 3) == 0, "send");
    rc = ivshm_mpmc_recv_fixed(&q, buf, 8, 0);
    CHECK(rc == 0, "recv_fixed of 0 messages = %" PRId64, rc);
    rc = ivshm_mpmc_claim_send(&q, 0, &pos);
    CHECK(rc == 0, "claim_send(0) = %" PRId64, rc);
    rc = ivshm_mpmc_claim_recv(&q, 0, &pos);
    CHECK(rc == 0, "claim_recv(0) = %" PRId64, rc);
    CHECK(ivshm_mpmc_count(&q) == 1, "nothing claimed");
    CHECK(ivshm_mpmc_try_recv(&q, buf, sizeof(buf), NULL) == 3, "the message is still there");
    tregion_free(&tr);
    snprintf(detail, dn, "no-ops");
}

/* A buffer or cell shorter than a message never loses it: try_recv answers -ENOBUFS and
 * recv_fixed stops its burst before it (-EMSGSIZE when it is the first); the message stays. */
static void mpmc_short_buffers_keep_messages(char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 65536) == 0, "region");
    struct ivshm_ring_info info;
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&tr.r, "m", IVSHM_KIND_MPMC, 32, 8, 1, 0, &info, &why) == 0, "create");
    struct ivshm_mpmc q;
    CHECK(ivshm_mpmc_attach(&q, &tr.r, &info, &why) == 0, "attach");
    uint8_t cells[8 * 8], buf[32];
    uint64_t needed = 0;
    CHECK(ivshm_mpmc_try_send(&q, "aa", 2) == 0 && ivshm_mpmc_try_send(&q, "bbb", 3) == 0 &&
              ivshm_mpmc_try_send(&q, "0123456789abcdef", 16) == 0 && ivshm_mpmc_try_send(&q, "c", 1) == 0,
          "send");
    int64_t rc = ivshm_mpmc_recv_fixed(&q, cells, 8, 8);
    CHECK(rc == 2, "the burst stops before the long message: %" PRId64, rc);
    CHECK(memcmp(cells, "aa\0\0\0\0\0\0", 8) == 0 && memcmp(cells + 8, "bbb\0\0\0\0\0", 8) == 0, "cells");
    CHECK(ivshm_mpmc_count(&q) == 2, "the long message and the one after it stayed");
    rc = ivshm_mpmc_recv_fixed(&q, cells, 8, 8);
    CHECK(rc == -EMSGSIZE, "first message too long: %" PRId64, rc);
    CHECK(ivshm_mpmc_try_recv(&q, buf, 8, &needed) == -ENOBUFS && needed == 16, "try_recv: -ENOBUFS");
    CHECK(ivshm_mpmc_count(&q) == 2, "nothing was taken");
    CHECK(ivshm_mpmc_try_recv(&q, buf, 16, &needed) == 16 && memcmp(buf, "0123456789abcdef", 16) == 0,
          "a buffer that fits gets it");
    CHECK(ivshm_mpmc_recv_fixed(&q, cells, 8, 8) == 1 && cells[0] == 'c', "then the rest");
    tregion_free(&tr);
    snprintf(detail, dn, "no message lost to a short buffer");
}

/* A consumer that claimed a slot and never released it (died in a receive, or holding a peek):
 * producers stop there one lap later, consumer_stalled() names the slot, recover() hands it back;
 * a producer's abandoned claim is given back (or committed empty when others claimed after it). */
static void mpmc_consumer_stall_and_recovery(char *detail, size_t dn)
{
    struct tregion tr;
    struct ivshm_mpmc p, dead, c;
    CHECK(mpmc_three_handles(&tr, 4, &p, &dead, &c) == 0, "a ring of 4 slots, three handles");
    uint8_t buf[16];
    uint64_t pos = 99, spos = 0;
    for (int i = 0; i < 3; i++)
        CHECK(ivshm_mpmc_try_send(&p, "m", 1) == 0, "send %d", i);
    CHECK(ivshm_mpmc_claim_recv(&dead, 1, &pos) == 1 && pos == 0, "the doomed consumer claims slot 0");
    CHECK(ivshm_mpmc_consumer_stalled(&c, &spos) == 0, "nothing blocks producers yet");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1, "others receive past the claim");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1, "others receive past the claim");
    CHECK(ivshm_mpmc_try_send(&p, "m", 1) == 0, "index 3");
    CHECK(ivshm_mpmc_try_send(&p, "m", 1) == -EAGAIN, "index 4 waits for slot 0");
    CHECK(ivshm_mpmc_count(&c) == 1, "one message waiting");
    CHECK(ivshm_mpmc_consumer_stalled(&c, &spos) == 1 && spos == 0, "slot 0 reported (%" PRIu64 ")", spos);
    CHECK(ivshm_mpmc_stalled(&c, &spos) == 0, "no producer stall");
    CHECK(ivshm_mpmc_recover(&c, 1) == -ENOENT, "slot 1 holds nothing to recover");
    CHECK(ivshm_mpmc_recover(&c, 0) == IVSHM_MPMC_RECOVERED_CONSUMER, "recover slot 0");
    CHECK(ivshm_mpmc_consumer_stalled(&c, &spos) == 0, "moving again");
    CHECK(ivshm_mpmc_try_send(&p, "n", 1) == 0, "index 4 sent");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1 && buf[0] == 'm', "index 3");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1 && buf[0] == 'n', "index 4");
    /* a reservation given back while it is the last claim: as if never claimed */
    CHECK(ivshm_mpmc_claim_send(&p, 1, &pos) == 1 && pos == 5, "claim 5");
    CHECK(ivshm_mpmc_abandon(&p, pos) == 0, "handed back");
    CHECK(ivshm_mpmc_count(&c) == 0 && ivshm_mpmc_stalled(&c, &spos) == 0, "nothing claimed");
    CHECK(ivshm_mpmc_try_send(&p, "o", 1) == 0, "index 5 reused");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1 && buf[0] == 'o', "index 5");
    /* ... and when another producer claimed after it: committed as an empty message */
    CHECK(ivshm_mpmc_claim_send(&p, 1, &pos) == 1 && pos == 6, "claim 6");
    CHECK(ivshm_mpmc_try_send(&dead, "q", 1) == 0, "index 7 behind it");
    CHECK(ivshm_mpmc_abandon(&p, pos) == 1, "committed empty");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 0, "the empty message");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1 && buf[0] == 'q', "index 7");
    /* a producer that died holding a claim: recovered as an empty message */
    CHECK(ivshm_mpmc_claim_send(&dead, 1, &pos) == 1 && pos == 8, "claim 8");
    CHECK(ivshm_mpmc_try_send(&p, "r", 1) == 0, "index 9");
    CHECK(ivshm_mpmc_stalled(&c, &spos) == 1 && spos == 8, "producer stall at 8");
    CHECK(ivshm_mpmc_recover(&c, 8) == IVSHM_MPMC_RECOVERED_PRODUCER, "recover slot 8");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 0, "the empty message");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1 && buf[0] == 'r', "index 9");
    CHECK(ivshm_mpmc_recover(&c, 1000) == -EINVAL, "far away index refused");
    tregion_free(&tr);
    snprintf(detail, dn, "dead consumer and producer claims recovered");
}

/* A restarted party takes over what its dead predecessor held, exactly once: the message in a
 * dead consumer's claim is read out before the claim is dropped, and a dead producer's
 * reservation is committed with the message it was to carry; next_claim() finds both. */
static void mpmc_claims_read_and_finished(char *detail, size_t dn)
{
    struct tregion tr;
    struct ivshm_mpmc p, dead, c;
    CHECK(mpmc_three_handles(&tr, 4, &p, &dead, &c) == 0, "a ring of 4 slots, three handles");
    uint8_t buf[16];
    uint64_t pos = 99, needed = 0;
    CHECK(ivshm_mpmc_next_claim(&c, 1, 0, &pos) == 0 && ivshm_mpmc_next_claim(&c, 0, 0, &pos) == 0,
          "an empty ring holds no claims");
    CHECK(ivshm_mpmc_try_send(&p, "hello", 5) == 0 && ivshm_mpmc_try_send(&p, "x", 1) == 0, "send");
    CHECK(ivshm_mpmc_claim_state(&c, 0) == 0, "a committed message is nobody's claim");
    CHECK(ivshm_mpmc_read_claimed(&c, 0, buf, sizeof(buf), NULL) == -ENOENT, "not claimed: refused");
    CHECK(ivshm_mpmc_claim_recv(&dead, 1, &pos) == 1 && pos == 0, "the doomed consumer claims 0");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1, "another takes 1");
    CHECK(ivshm_mpmc_claim_state(&c, 0) == IVSHM_MPMC_RECOVERED_CONSUMER, "0 is a consumer's");
    CHECK(ivshm_mpmc_next_claim(&c, 1, 0, &pos) == 1 && pos == 0, "found (%" PRIu64 ")", pos);
    CHECK(ivshm_mpmc_next_claim(&c, 1, 1, &pos) == 0, "none after it");
    CHECK(ivshm_mpmc_read_claimed(&c, 0, buf, 4, &needed) == -ENOBUFS && needed == 5, "short buffer");
    memset(buf, 0, sizeof(buf));
    CHECK(ivshm_mpmc_read_claimed(&c, 0, buf, sizeof(buf), NULL) == 5 && memcmp(buf, "hello", 5) == 0,
          "its message read out");
    CHECK(ivshm_mpmc_claim_state(&c, 0) == IVSHM_MPMC_RECOVERED_CONSUMER, "and still claimed");
    CHECK(ivshm_mpmc_recover_with(&c, 0, "y", 1) == -EBUSY, "no message into a consumer's claim");
    /* a length over the slot size in a claimed slot is reported, not copied */
    ivshm_mpmc_slot(&c, 0)->len = 17;
    CHECK(ivshm_mpmc_read_claimed(&c, 0, buf, sizeof(buf), NULL) == -EPROTO, "bad length refused");
    ivshm_mpmc_slot(&c, 0)->len = 5;
    CHECK(ivshm_mpmc_recover(&c, 0) == IVSHM_MPMC_RECOVERED_CONSUMER, "then dropped");
    CHECK(ivshm_mpmc_read_claimed(&c, 0, buf, sizeof(buf), NULL) == -ENOENT, "no longer claimed");
    /* a producer that died holding a reservation, with one committed after it */
    CHECK(ivshm_mpmc_claim_send(&dead, 1, &pos) == 1 && pos == 2, "the doomed producer claims 2");
    CHECK(ivshm_mpmc_try_send(&p, "z", 1) == 0, "index 3 behind it");
    CHECK(ivshm_mpmc_claim_state(&c, 2) == IVSHM_MPMC_RECOVERED_PRODUCER, "2 is a producer's");
    CHECK(ivshm_mpmc_next_claim(&c, 0, 0, &pos) == 1 && pos == 2, "found (%" PRIu64 ")", pos);
    CHECK(ivshm_mpmc_next_claim(&c, 1, 0, &pos) == 0, "no consumer claims left");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "consumers wait at 2");
    CHECK(ivshm_mpmc_recover_with(&c, 2, "0123456789abcdefg", 17) == -EMSGSIZE, "too long refused");
    CHECK(ivshm_mpmc_recover_with(&c, 2, "finished", 8) == IVSHM_MPMC_RECOVERED_PRODUCER, "finished");
    CHECK(ivshm_mpmc_recover_with(&c, 2, "again", 5) == -ENOENT, "only once");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 8 && memcmp(buf, "finished", 8) == 0,
          "consumers get its message");
    CHECK(ivshm_mpmc_try_recv(&c, buf, sizeof(buf), NULL) == 1 && buf[0] == 'z', "then index 3");
    CHECK(ivshm_mpmc_claim_state(&c, 1000) == -EINVAL && ivshm_mpmc_recover_with(&c, 1000, "", 0) == -EINVAL,
          "far away index refused");
    tregion_free(&tr);
    snprintf(detail, dn, "dead claims found, read out and finished");
}

int main(int argc, char **argv)
{
    static const struct tcase cases[] = {
        {"mpmc_2x2_cap1024", mpmc_2x2_cap1024, 0},
        {"mpmc_2x2_cap4_burst", mpmc_2x2_cap4_burst, 0},
        {"mpmc_1x1_fifo", mpmc_1x1_fifo, 0},
        {"mpmc_3x3_cap8", mpmc_3x3_cap8, 0},
        {"mpmc_4x1_cap2", mpmc_4x1_cap2, 0},
        {"mpmc_stall_detected", mpmc_stall_detected, 0},
        {"mpmc_zero_bursts", mpmc_zero_bursts, 0},
        {"mpmc_short_buffers_keep_messages", mpmc_short_buffers_keep_messages, 0},
        {"mpmc_consumer_stall_and_recovery", mpmc_consumer_stall_and_recovery, 0},
        {"mpmc_claims_read_and_finished", mpmc_claims_read_and_finished, 0},
    };
    return tc_main(argc, argv, cases, sizeof(cases) / sizeof(cases[0]));
}
