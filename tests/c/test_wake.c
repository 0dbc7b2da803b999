/* test_wake.c - the wake-up protocol's fences (csrc/ivshm_chan.c), as a store-buffering litmus.
 *
 * The argument that no wake-up is lost is the Dekker pattern: the sleeper claims its entry,
 * fences and looks at the ring; the waker publishes, fences and looks at the sleeper table; with
 * both fences at least one side sees the other's store.  Without a fence a CPU may let the load
 * pass its own earlier store (x86 does, from its store buffer), and then both sides miss each
 * other: the sleeper sleeps on a ring that has a message and the waker claims nobody.  Stress
 * tests through Python cannot see that window (tens of nanoseconds against microseconds of
 * interpreter work per message), so this test runs the two halves alone, in lock-step rounds
 * released at the same instant, with the real channel calls on a real SPSC ring:
 *
 *   sleeper: ivshm_chan_arm (S1, F1); if ivshm_chan_ready (L1): found; else "asleep" until the
 *            waker finished its round, then take the entry back: if it is still ours, nobody
 *            claimed it although the message was there: a lost wake-up
 *   waker:   ivshm_spsc_try_send (S2); ivshm_chan_wake_other (F2, L2, claim)
 *
 * Lost wake-ups are counted, so that the run ends either way.
 */
#include "ivshm_chan.h"
#include "tcommon.h"

struct litmus {
    struct tregion t;
    struct ivshm_ring_info info;
    uint64_t go;        /* the round both threads may start */
    uint64_t done;      /* the waker finished this round */
    uint64_t rounds;
    uint64_t rung;      /* rounds in which the waker claimed and "rang" the sleeper */
    uint64_t lost, slept, found;
};

/* The waker's doorbell: count the ring (no fd needed: the claim itself is what is checked). */
static int count_ring(void *ctx, uint32_t peer, uint32_t vector, struct ivshm_bell *out)
{
    __atomic_add_fetch((uint64_t *)ctx, 1, __ATOMIC_RELAXED);
    out->kind = IVSHM_BELL_NONE;
    return -1;
}

static void *waker(void *arg)
{
    struct litmus *l = arg;
    struct ivshm_spsc q;
    const char *why;
    CHECKP(ivshm_spsc_attach(&q, &l->t.r, &l->info, &why) == 0, "attach");
    struct ivshm_chan ch;
    CHECKP(ivshm_chan_init(&ch, IVSHM_KIND_SPSC, &q, 0, 0, -1, -1, count_ring, &l->rung, 0,
                           1000000000ull) == 0, "init");
    uint64_t v = 0;
    for (uint64_t r = 1; r <= l->rounds; r++) {
        while (__atomic_load_n(&l->go, __ATOMIC_ACQUIRE) < r)
            IVSHM_CPU_RELAX();
        CHECKP(ivshm_spsc_try_send(&q, &v, sizeof(v)) == 0, "send"); /* S2: the publish */
        ivshm_chan_wake_other(&ch, IVSHM_CHAN_SEND);                /* F2, then the table */
        __atomic_store_n(&l->done, r, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void wake_fences_lose_no_wakeup(char *detail, size_t n)
{
    struct litmus l;
    memset(&l, 0, sizeof(l));
    l.rounds = tc_count(50000, 20000);
    CHECK(tregion_new(&l.t, 1 << 16) == 0, "region");
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&l.t.r, "w", IVSHM_KIND_SPSC, 8, 16, 1, 0, &l.info, &why) == 0,
          "ring: %s", why);
    struct ivshm_spsc q;
    CHECK(ivshm_spsc_attach(&q, &l.t.r, &l.info, &why) == 0, "attach");
    struct ivshm_chan ch; /* a route (peer 1) and an fd number it never sleeps on */
    CHECK(ivshm_chan_init(&ch, IVSHM_KIND_SPSC, &q, 1, 0, 0, -1, NULL, NULL, 0, 1000000000ull) == 0,
          "init");
    struct ivshm_ring_ctrl *ctl = (struct ivshm_ring_ctrl *)(l.t.mem + l.info.offset);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, waker, &l) == 0, "pthread_create");
    struct trng rng = {42};
    for (uint64_t r = 1; r <= l.rounds && !tc_failed(); r++) {
        __atomic_store_n(&l.go, r, __ATOMIC_RELEASE); /* both start the round together */
        /* the waker sees `go` a cache-line transfer later: a varying head start sweeps the
         * offset between the two sides across the window where they overlap */
        for (uint64_t k = trng_below(&rng, 64); k > 0; k--)
            IVSHM_CPU_RELAX();
        struct ivshm_chan_call call;
        ivshm_chan_call_init(&call, IVSHM_CHAN_RECV, -1, 1);
        CHECK(ivshm_chan_arm(&ch, &call) == 1, "arm");        /* S1, F1 */
        int saw = ivshm_chan_ready(&ch, IVSHM_CHAN_RECV, 1);   /* L1: the re-check */
        /* "asleep" (or not) until the waker's round is over: bounded, it always ends */
        while (__atomic_load_n(&l.done, __ATOMIC_ACQUIRE) < r)
            IVSHM_CPU_RELAX();
        /* Nobody touches the entry any more this round.  Still ours although the re-check did
         * not see the message: it was published and the waker claimed nobody, so a real
         * sleeper would sleep on.  (Claimed although we saw it: one spurious ring, no harm.) */
        int still_ours = __atomic_load_n(&ctl->cons_sleepers[call.entry], __ATOMIC_ACQUIRE) == call.word;
        if (saw) {
            l.found++;
        } else {
            l.slept++;
            l.lost += still_ours;
        }
        ivshm_chan_disarm(&ch, &call);
        uint64_t v;
        CHECK(ivshm_spsc_try_recv(&q, &v, sizeof(v), NULL) == 8, "the round's message");
    }
    pthread_join(t, NULL);
    snprintf(detail, n, "%" PRIu64 " rounds: %" PRIu64 " found by the re-check, %" PRIu64
             " claimed by the waker, %" PRIu64 " lost", l.rounds, l.found, l.slept - l.lost, l.lost);
    CHECK(l.lost == 0, "%" PRIu64 " wake-ups lost in %" PRIu64 " rounds (%" PRIu64 " sleeps)",
          l.lost, l.rounds, l.slept);
    tregion_free(&l.t);
}

int main(int argc, char **argv)
{
    static const struct tcase cases[] = {
        {"wake_fences_lose_no_wakeup", wake_fences_lose_no_wakeup, 0},
    };
    return tc_main(argc, argv, cases, sizeof(cases) / sizeof(cases[0]));
}
