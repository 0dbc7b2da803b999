/* soak.c - a long exactly-once run: N messages through an SPSC ring, then N through an MPMC ring.
 *
 * Usage: soak [N]   (default 100000000; `make soak SOAK_MESSAGES=N`)
 *
 * SPSC: one producer thread, one consumer thread, slot size 64, capacity 4096.  Most messages go
 * in batches of 16-byte cells (send_fixed / recv_fixed); one batch in eight is variable-length
 * (16 to 300 bytes, up to five slots) and received through next/copy/advance with one release.
 * Every message carries its sequence number, which must be exactly the next one expected;
 * variable-length messages are checked byte by byte.
 * MPMC: two producers, two consumers, slot size 32, capacity 4096, bursts of up to 32.  A bitmap
 * per producer marks each message received: a bit already set is a duplicate, a bit still clear at
 * the end a loss; every consumer checks that each producer's numbers increase.
 * Progress is printed every tenth of the run; the last line says PASS or FAIL.
 */
#include "tcommon.h"

static void progress(const char *what, uint64_t done, uint64_t total, double t0)
{
    printf("  %s: %" PRIu64 " / %" PRIu64 " messages, %.1f s\n", what, done, total, tc_now() - t0);
}

/* ---------------------------------------------------------------------------------------------- */
/* SPSC */

struct spsc_soak {
    struct ivshm_region *r;
    struct ivshm_ring_info info;
    uint64_t n;
    double t0;
    uint64_t bytes;
};

/* batch b (of 32 messages, or fewer at the end) is variable-length when this says so */
static int spsc_variable(uint64_t batch) { return (tc_mix(batch) & 7) == 0; }
static uint64_t spsc_len(uint64_t seq) { return 16 + tc_mix(seq * 31) % 285; }

static void *soak_spsc_producer(void *arg)
{
    struct spsc_soak *s = arg;
    struct ivshm_spsc q;
    CHECKP(ivshm_spsc_attach(&q, s->r, &s->info, NULL) == 0, "attach");
    uint64_t cells[2 * 32];
    uint8_t msg[320];
    uint64_t seq = 0;
    while (seq < s->n && !tc_failed()) {
        uint64_t batch = seq / 32, end = (batch + 1) * 32 < s->n ? (batch + 1) * 32 : s->n;
        if (spsc_variable(batch)) {
            uint64_t len = spsc_len(seq);
            memcpy(msg, &seq, 8);
            tc_fill(msg + 8, 5, seq, len - 8);
            int rc = ivshm_spsc_write(&q, msg, len);
            CHECKP(rc == 0 || rc == -EAGAIN, "write %d", rc);
            if (rc == 0)
                seq++;
            if (rc || seq == end)
                ivshm_spsc_publish(&q);
            if (rc)
                tc_relax();
            continue;
        }
        uint64_t k = end - seq;
        for (uint64_t i = 0; i < k; i++) {
            cells[2 * i] = seq + i;
            cells[2 * i + 1] = ~(seq + i);
        }
        int64_t got = ivshm_spsc_send_fixed(&q, cells, 16, k);
        CHECKP(got >= 0, "send_fixed %" PRId64, got);
        seq += (uint64_t)got;
        if (got == 0)
            tc_relax();
    }
    return NULL;
}

static void *soak_spsc_consumer(void *arg)
{
    struct spsc_soak *s = arg;
    struct ivshm_spsc q;
    CHECKP(ivshm_spsc_attach(&q, s->r, &s->info, NULL) == 0, "attach");
    uint64_t cells[2 * 32];
    uint8_t msg[320];
    uint64_t seq = 0, next_report = s->n / 10;
    while (seq < s->n && !tc_failed()) {
        uint64_t batch = seq / 32, end = (batch + 1) * 32 < s->n ? (batch + 1) * 32 : s->n;
        int progressed = 0;
        if (spsc_variable(batch)) {
            for (; seq < end; seq++) {
                struct ivshm_spsc_msg m;
                int rc = ivshm_spsc_next(&q, &m);
                CHECKP(rc == 0 || rc == -EAGAIN, "next %d (%s)", rc, q.why);
                if (rc)
                    break;
                uint64_t len = spsc_len(seq), got;
                CHECKP(m.len == len, "message %" PRIu64 ": %" PRIu64 " bytes, expected %" PRIu64, seq, m.len, len);
                ivshm_spsc_copy(&q, &m, msg);
                memcpy(&got, msg, 8);
                CHECKP(got == seq, "message %" PRIu64 " arrived as %" PRIu64, seq, got);
                CHECKP(tc_verify(msg + 8, 5, seq, len - 8) < 0, "message %" PRIu64 " corrupt", seq);
                ivshm_spsc_advance(&q, &m);
                s->bytes += len;
                progressed = 1;
            }
            ivshm_spsc_release(&q);
        } else {
            int64_t got = ivshm_spsc_recv_fixed(&q, cells, 16, end - seq);
            CHECKP(got >= 0, "recv_fixed %" PRId64, got);
            for (int64_t i = 0; i < got; i++, seq++)
                CHECKP(cells[2 * i] == seq && cells[2 * i + 1] == ~seq, "message %" PRIu64 " arrived as %" PRIu64, seq,
                       cells[2 * i]);
            s->bytes += 16 * (uint64_t)got;
            progressed = got > 0;
        }
        if (!progressed)
            tc_relax();
        if (seq >= next_report) {
            progress("spsc", seq, s->n, s->t0);
            next_report += s->n / 10;
        }
    }
    struct ivshm_spsc_msg m;
    CHECKP(tc_failed() || ivshm_spsc_next(&q, &m) == -EAGAIN, "a message after the last one");
    return NULL;
}

static void soak_spsc(uint64_t n, char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 1u << 20) == 0, "region");
    struct spsc_soak s;
    memset(&s, 0, sizeof(s));
    CHECK(ivshm_region_create_ring(&tr.r, "soak", IVSHM_KIND_SPSC, 64, 4096, 1, 0, &s.info, NULL) == 0, "create");
    s.r = &tr.r;
    s.n = n;
    s.t0 = tc_now();
    pthread_t p, c;
    pthread_create(&c, NULL, soak_spsc_consumer, &s);
    pthread_create(&p, NULL, soak_spsc_producer, &s);
    pthread_join(p, NULL);
    pthread_join(c, NULL);
    double dt = tc_now() - s.t0;
    tregion_free(&tr);
    snprintf(detail, dn, "%" PRIu64 " messages (%" PRIu64 " bytes) exactly once in order in %.1f s, %.1f M/s", n,
             s.bytes, dt, (double)n / dt / 1e6);
}

/* ---------------------------------------------------------------------------------------------- */
/* MPMC */

#define NP 2
#define NC 2

struct mpmc_soak {
    struct ivshm_region *r;
    struct ivshm_ring_info info;
    uint64_t per;           /* messages per producer */
    uint64_t *seen[NP];     /* bitmaps */
    uint64_t received;      /* atomic */
    double t0;
};

struct mworker {
    struct mpmc_soak *s;
    int id;
};

static void *soak_mpmc_producer(void *arg)
{
    struct mworker *w = arg;
    struct mpmc_soak *s = w->s;
    struct ivshm_mpmc q;
    CHECKP(ivshm_mpmc_attach(&q, s->r, &s->info, NULL) == 0, "attach");
    uint64_t cells[4 * 32];
    struct trng rng = {(uint64_t)w->id + 99};
    uint64_t seq = 0;
    while (seq < s->per && !tc_failed()) {
        uint64_t k = 1 + trng_below(&rng, 32);
        if (k > s->per - seq)
            k = s->per - seq;
        for (uint64_t i = 0; i < k; i++) {
            cells[4 * i] = (uint64_t)w->id;
            cells[4 * i + 1] = seq + i;
            cells[4 * i + 2] = ~(seq + i);
            cells[4 * i + 3] = tc_mix(seq + i);
        }
        int64_t got = ivshm_mpmc_send_fixed(&q, cells, 32, k);
        CHECKP(got >= 0, "send_fixed %" PRId64 " (%s)", got, q.why);
        seq += (uint64_t)got;
        if (got == 0)
            tc_relax();
    }
    return NULL;
}

static void *soak_mpmc_consumer(void *arg)
{
    struct mworker *w = arg;
    struct mpmc_soak *s = w->s;
    struct ivshm_mpmc q;
    CHECKP(ivshm_mpmc_attach(&q, s->r, &s->info, NULL) == 0, "attach");
    uint64_t cells[4 * 32];
    uint64_t last[NP] = {UINT64_MAX, UINT64_MAX};
    uint64_t total = NP * s->per, next_report = total / 10;
    struct trng rng = {(uint64_t)w->id + 7};
    for (;;) {
        uint64_t have = __atomic_load_n(&s->received, __ATOMIC_RELAXED);
        if (have >= total || tc_failed())
            break;
        int64_t got = ivshm_mpmc_recv_fixed(&q, cells, 32, 1 + trng_below(&rng, 32));
        CHECKP(got >= 0, "recv_fixed %" PRId64 " (%s)", got, q.why);
        if (got == 0) {
            tc_relax();
            continue;
        }
        for (int64_t i = 0; i < got; i++) {
            uint64_t pid = cells[4 * i], seq = cells[4 * i + 1];
            CHECKP(pid < NP && seq < s->per && cells[4 * i + 2] == ~seq && cells[4 * i + 3] == tc_mix(seq),
                   "bad message pid=%" PRIu64 " seq=%" PRIu64, pid, seq);
            CHECKP(last[pid] == UINT64_MAX || seq > last[pid], "producer %" PRIu64 ": %" PRIu64 " after %" PRIu64, pid,
                   seq, last[pid]);
            last[pid] = seq;
            uint64_t bit = 1ull << (seq & 63);
            uint64_t old = __atomic_fetch_or(&s->seen[pid][seq >> 6], bit, __ATOMIC_RELAXED);
            CHECKP(!(old & bit), "message %" PRIu64 "/%" PRIu64 " delivered twice", pid, seq);
        }
        have = __atomic_add_fetch(&s->received, (uint64_t)got, __ATOMIC_RELAXED);
        if (w->id == 0 && have >= next_report) {
            progress("mpmc", have, total, s->t0);
            while (next_report <= have)
                next_report += total / 10;
        }
    }
    return NULL;
}

static void soak_mpmc(uint64_t n, char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 1u << 20) == 0, "region");
    struct mpmc_soak s;
    memset(&s, 0, sizeof(s));
    CHECK(ivshm_region_create_ring(&tr.r, "soak", IVSHM_KIND_MPMC, 32, 4096, 1, 0, &s.info, NULL) == 0, "create");
    s.r = &tr.r;
    s.per = n / NP;
    for (int i = 0; i < NP; i++)
        CHECK((s.seen[i] = calloc(s.per / 64 + 1, 8)) != NULL, "calloc");
    s.t0 = tc_now();
    pthread_t th[NP + NC];
    struct mworker w[NP + NC];
    for (int i = 0; i < NC; i++) {
        w[i] = (struct mworker){&s, i};
        pthread_create(&th[i], NULL, soak_mpmc_consumer, &w[i]);
    }
    for (int i = 0; i < NP; i++) {
        w[NC + i] = (struct mworker){&s, i};
        pthread_create(&th[NC + i], NULL, soak_mpmc_producer, &w[NC + i]);
    }
    for (int i = 0; i < NP + NC; i++)
        pthread_join(th[i], NULL);
    double dt = tc_now() - s.t0;
    uint64_t missing = 0;
    for (int i = 0; i < NP; i++) {
        for (uint64_t q = 0; q < s.per; q++)
            missing += !(s.seen[i][q >> 6] >> (q & 63) & 1);
        free(s.seen[i]);
    }
    tregion_free(&tr);
    CHECK(tc_failed() || missing == 0, "%" PRIu64 " messages never delivered", missing);
    snprintf(detail, dn, "%dx%d, %" PRIu64 " messages exactly once, per-producer order kept, in %.1f s, %.1f M/s", NP,
             NC, NP * s.per, dt, (double)(NP * s.per) / dt / 1e6);
}

static uint64_t g_n = 100000000ull;
static void soak_spsc_case(char *d, size_t n) { soak_spsc(g_n, d, n); }
static void soak_mpmc_case(char *d, size_t n) { soak_mpmc(g_n, d, n); }

int main(int argc, char **argv)
{
    if (argc > 1)
        g_n = strtoull(argv[1], NULL, 10);
    if (g_n < 64) {
        fprintf(stderr, "usage: soak [MESSAGES >= 64]\n");
        return 2;
    }
    static const struct tcase cases[] = {
        {"soak_spsc", soak_spsc_case, 0},
        {"soak_mpmc", soak_mpmc_case, 0},
    };
    double t0 = tc_now();
    int rc = tc_main(1, argv, cases, 2);
    printf("soak: %s, %" PRIu64 " + %" PRIu64 " messages checked in %.1f s\n", rc ? "FAIL" : "PASS", g_n,
           g_n / NP * NP, tc_now() - t0);
    return rc;
}
