/* test_wake.c - the wake-up protocol's fences (csrc/ivshm_wake.h), as a store-buffering litmus.
 *
 * The argument that no wake-up is lost is the Dekker pattern: the sleeper stores its flag, fences
 * and loads the ring; the waker stores (publishes), fences and loads the flag; with both fences
 * at least one side sees the other's store.  Without a fence a CPU may let the load pass its own
 * earlier store (x86 does, from its store buffer), and then both sides miss each other: the
 * sleeper sleeps on an empty ring and the waker does not ring.  The Python stress tests cannot
 * see that window (tens of nanoseconds against microseconds of interpreter work per message), so
 * this test runs the two halves alone, in lock-step rounds released at the same instant, with
 * the real ivshm_wake_arm / ivshm_wake_needed / ivshm_wake_disarm:
 *
 *   sleeper: arm(waiting); if published >= round: done; else "sleep": wait for a ring
 *   waker:   published = round (release); if wake_needed(waiting): ring
 *
 * A sleep that the waker finished its round without ringing is a lost wake-up and fails the
 * case (counted, so that the run ends either way).
 */
#include "tcommon.h"

struct litmus {
    uint64_t published; /* the "ring": the last round published */
    uint32_t waiting;   /* the sleeper's flag, as in a ring's control block */
    uint64_t rung;      /* doorbells: the round last rung for */
    uint64_t go;        /* the round both threads may start */
    uint64_t done;      /* the waker finished this round */
    uint64_t rounds;
    uint64_t lost, slept, found;
};

static void *waker(void *arg)
{
    struct litmus *l = arg;
    for (uint64_t r = 1; r <= l->rounds; r++) {
        while (__atomic_load_n(&l->go, __ATOMIC_ACQUIRE) < r)
            IVSHM_CPU_RELAX();
        IVSHM_STORE_RELEASE(&l->published, r); /* publish, as a producer's release store */
        if (ivshm_wake_needed(&l->waiting))     /* F2, then the flag */
            __atomic_store_n(&l->rung, r, __ATOMIC_RELEASE);
        __atomic_store_n(&l->done, r, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void wake_fences_lose_no_wakeup(char *detail, size_t n)
{
    struct litmus l;
    memset(&l, 0, sizeof(l));
    l.rounds = tc_count(50000, 20000);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, waker, &l) == 0, "pthread_create");
    struct trng rng = {42};
    for (uint64_t r = 1; r <= l.rounds; r++) {
        __atomic_store_n(&l.go, r, __ATOMIC_RELEASE); /* both start the round together */
        /* the waker sees `go` a cache-line transfer later: a varying head start sweeps the
         * offset between the two sides across the window where they overlap */
        for (uint64_t k = trng_below(&rng, 64); k > 0; k--)
            IVSHM_CPU_RELAX();
        ivshm_wake_arm(&l.waiting);                   /* S1, F1 */
        if (IVSHM_LOAD_ACQUIRE(&l.published) >= r) {  /* L1: the re-check */
            ivshm_wake_disarm(&l.waiting);
            l.found++;
        } else {
            /* asleep: only a ring ends this (bounded, so a lost wake-up is counted, not hung) */
            l.slept++;
            while (__atomic_load_n(&l.rung, __ATOMIC_ACQUIRE) < r &&
                   __atomic_load_n(&l.done, __ATOMIC_ACQUIRE) < r)
                IVSHM_CPU_RELAX();
            /* the waker rings before it says done: done without a ring is a lost wake-up */
            if (__atomic_load_n(&l.rung, __ATOMIC_ACQUIRE) < r)
                l.lost++;
            ivshm_wake_disarm(&l.waiting);
        }
        while (__atomic_load_n(&l.done, __ATOMIC_ACQUIRE) < r)
            IVSHM_CPU_RELAX();
    }
    pthread_join(t, NULL);
    snprintf(detail, n, "%" PRIu64 " rounds: %" PRIu64 " found by the re-check, %" PRIu64
             " woken by a ring, %" PRIu64 " lost", l.rounds, l.found, l.slept - l.lost, l.lost);
    CHECK(l.lost == 0, "%" PRIu64 " wake-ups lost in %" PRIu64 " rounds (%" PRIu64 " sleeps)",
          l.lost, l.rounds, l.slept);
}

int main(int argc, char **argv)
{
    static const struct tcase cases[] = {
        {"wake_fences_lose_no_wakeup", wake_fences_lose_no_wakeup, 0},
    };
    return tc_main(argc, argv, cases, sizeof(cases) / sizeof(cases[0]));
}
