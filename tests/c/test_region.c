/* test_region.c - formatting and ring-directory races between threads sharing one region.
 *
 * Several threads attach the same all-zero memory with "format if empty" (exactly one may format:
 * all must end up with the same generation), then create the same set of ring names in different
 * orders at once and look them up.  One ring per name must result, at one offset that every
 * thread agrees on, with no two rings overlapping, and every ring must carry its own messages.
 * Also: a dead holder of the directory lock makes creators time out instead of hanging, and a
 * name raced with two different shapes yields one ring and one -EEXIST.
 */
#include "tcommon.h"

#define NTHREADS 4
#define NNAMES 16

struct race {
    uint8_t *mem;
    uint64_t size;
    pthread_barrier_t go;
    uint64_t generation[NTHREADS];
    uint64_t offset[NTHREADS][NNAMES];
    int created[NTHREADS][NNAMES];
    int variant;
};

struct rworker {
    struct race *r;
    int id;
};

static void *race_worker(void *arg)
{
    struct rworker *w = arg;
    struct race *r = w->r;
    struct ivshm_region reg;
    pthread_barrier_wait(&r->go);
    int rc = ivshm_region_attach(&reg, r->mem, r->size, IVSHM_ATTACH_FORMAT_IF_EMPTY,
                                 0x1000 + (uint64_t)w->id, 5000);
    CHECKP(rc == 0, "thread %d attach = %d", w->id, rc);
    r->generation[w->id] = reg.generation;
    struct trng rng = {tc_mix((uint64_t)w->id * 77 + (uint64_t)r->variant)};
    int order[NNAMES];
    for (int i = 0; i < NNAMES; i++)
        order[i] = i;
    for (int i = NNAMES - 1; i > 0; i--) {
        int j = (int)trng_below(&rng, (uint64_t)i + 1), x = order[i];
        order[i] = order[j];
        order[j] = x;
    }
    for (int k = 0; k < NNAMES; k++) {
        int i = order[k];
        char name[16];
        snprintf(name, sizeof(name), "ring%02d", i);
        uint32_t kind = i % 2 ? IVSHM_KIND_MPMC : IVSHM_KIND_SPSC;
        struct ivshm_ring_info info;
        const char *why = NULL;
        /* a lookup first: either absent or complete, never half-made */
        rc = ivshm_region_find_ring(&reg, name, &info, &why);
        CHECKP(rc == 0 || rc == -ENOENT, "find %s = %d (%s)", name, rc, why);
        rc = ivshm_region_create_ring(&reg, name, kind, 16 + 8 * (uint32_t)i, 8u << (i % 3),
                                      (uint64_t)w->id + 1, 5000, &info, &why);
        CHECKP(rc == 0 || rc == 1, "create %s = %d (%s)", name, rc, why);
        r->created[w->id][i] = rc == 0;
        CHECKP(ivshm_region_find_ring(&reg, name, &info, &why) == 0, "find %s after create", name);
        CHECKP(ivshm_ring_check_ctrl(&reg, &info, &why) == 0, "ctrl of %s: %s", name, why);
        r->offset[w->id][i] = info.offset;
    }
    return NULL;
}

static void region_create_race(char *detail, size_t dn)
{
    int rounds = (int)tc_count(200, 10);
    for (int round = 0; round < rounds && !tc_failed(); round++) {
        struct race r;
        memset(&r, 0, sizeof(r));
        r.size = 1u << 18;
        r.variant = round;
        r.mem = aligned_alloc(4096, r.size);
        CHECK(r.mem != NULL, "alloc");
        memset(r.mem, 0, r.size);
        pthread_barrier_init(&r.go, NULL, NTHREADS);
        pthread_t th[NTHREADS];
        struct rworker w[NTHREADS];
        for (int i = 0; i < NTHREADS; i++) {
            w[i] = (struct rworker){&r, i};
            pthread_create(&th[i], NULL, race_worker, &w[i]);
        }
        for (int i = 0; i < NTHREADS; i++)
            pthread_join(th[i], NULL);
        pthread_barrier_destroy(&r.go);
        if (tc_failed()) {
            free(r.mem);
            return;
        }
        struct ivshm_region reg;
        CHECK(ivshm_region_attach(&reg, r.mem, r.size, 0, 0, 0) == 0, "re-attach");
        for (int i = 1; i < NTHREADS; i++)
            CHECK(r.generation[i] == r.generation[0], "threads saw different generations: one format only");
        CHECK(r.generation[0] >= 0x1000 && r.generation[0] < 0x1000 + NTHREADS, "generation from a racer");
        struct ivshm_ring_info infos[NNAMES];
        for (int i = 0; i < NNAMES; i++) {
            int creators = 0;
            for (int t = 0; t < NTHREADS; t++) {
                creators += r.created[t][i];
                CHECK(r.offset[t][i] == r.offset[0][i], "ring %d: threads disagree on its offset", i);
            }
            CHECK(creators == 1, "ring %d created %d times", i, creators);
            char name[16];
            snprintf(name, sizeof(name), "ring%02d", i);
            const char *why;
            CHECK(ivshm_region_find_ring(&reg, name, &infos[i], &why) == 0, "find %s", name);
        }
        const struct ivshm_region_hdr *h = (const struct ivshm_region_hdr *)r.mem;
        CHECK(h->nrings == NNAMES, "nrings %u", h->nrings);
        CHECK(h->lock == 0, "directory lock left held");
        int used = 0;
        for (uint32_t e = 0; e < IVSHM_MAX_RINGS; e++)
            used += h->rings[e].state != IVSHM_DESC_FREE;
        CHECK(used == NNAMES, "%d directory entries in use for %d names", used, NNAMES);
        for (int i = 0; i < NNAMES; i++)
            for (int j = i + 1; j < NNAMES; j++)
                CHECK(infos[i].offset + infos[i].size <= infos[j].offset ||
                          infos[j].offset + infos[j].size <= infos[i].offset,
                      "rings %d and %d overlap", i, j);
        /* each ring carries its own message */
        for (int i = 0; i < NNAMES; i++) {
            uint8_t msg[16];
            memset(msg, 'a' + i, sizeof(msg));
            if (infos[i].kind == IVSHM_KIND_SPSC) {
                struct ivshm_spsc q;
                CHECK(ivshm_spsc_attach(&q, &reg, &infos[i], NULL) == 0, "attach %d", i);
                CHECK(ivshm_spsc_try_send(&q, msg, sizeof(msg)) == 0, "send %d", i);
            } else {
                struct ivshm_mpmc q;
                CHECK(ivshm_mpmc_attach(&q, &reg, &infos[i], NULL) == 0, "attach %d", i);
                CHECK(ivshm_mpmc_try_send(&q, msg, sizeof(msg)) == 0, "send %d", i);
            }
        }
        for (int i = 0; i < NNAMES; i++) {
            uint8_t buf[64];
            int64_t n;
            if (infos[i].kind == IVSHM_KIND_SPSC) {
                struct ivshm_spsc q;
                CHECK(ivshm_spsc_attach(&q, &reg, &infos[i], NULL) == 0, "attach %d", i);
                n = ivshm_spsc_try_recv(&q, buf, sizeof(buf), NULL);
            } else {
                struct ivshm_mpmc q;
                CHECK(ivshm_mpmc_attach(&q, &reg, &infos[i], NULL) == 0, "attach %d", i);
                n = ivshm_mpmc_try_recv(&q, buf, sizeof(buf), NULL);
            }
            CHECK(n == 16 && buf[0] == 'a' + i && buf[15] == 'a' + i, "ring %d got another's message", i);
        }
        free(r.mem);
    }
    snprintf(detail, dn, "%d rounds x %d threads x %d names", rounds, NTHREADS, NNAMES);
}

/* Two shapes for one name at once: exactly one creation, the other gets -EEXIST. */
struct shape_race {
    struct ivshm_region *reg;
    pthread_barrier_t go;
    int rc[2];
};

struct sworker {
    struct shape_race *s;
    int id;
};

static void *shape_worker(void *arg)
{
    struct sworker *w = arg;
    struct ivshm_ring_info info;
    const char *why;
    pthread_barrier_wait(&w->s->go);
    w->s->rc[w->id] = ivshm_region_create_ring(w->s->reg, "same", IVSHM_KIND_SPSC, 32 + 32 * (uint32_t)w->id,
                                               8, (uint64_t)w->id + 1, 5000, &info, &why);
    return NULL;
}

static void region_shape_conflict(char *detail, size_t dn)
{
    int rounds = (int)tc_count(300, 20);
    for (int round = 0; round < rounds; round++) {
        struct tregion tr;
        CHECK(tregion_new(&tr, 65536) == 0, "region");
        struct shape_race s;
        s.reg = &tr.r;
        pthread_barrier_init(&s.go, NULL, 2);
        pthread_t th[2];
        struct sworker w[2] = {{&s, 0}, {&s, 1}};
        for (int i = 0; i < 2; i++)
            pthread_create(&th[i], NULL, shape_worker, &w[i]);
        for (int i = 0; i < 2; i++)
            pthread_join(th[i], NULL);
        pthread_barrier_destroy(&s.go);
        tregion_free(&tr);
        CHECK((s.rc[0] == 0 && s.rc[1] == -EEXIST) || (s.rc[1] == 0 && s.rc[0] == -EEXIST),
              "round %d: results %d and %d", round, s.rc[0], s.rc[1]);
    }
    snprintf(detail, dn, "%d rounds", rounds);
}

/* A creator that died holding the directory lock: later creators time out, lookups still work. */
static void region_dead_lock_holder(char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 65536) == 0, "region");
    struct ivshm_ring_info info;
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&tr.r, "a", IVSHM_KIND_SPSC, 16, 4, 7, 0, &info, &why) == 0, "create");
    struct ivshm_region_hdr *h = (struct ivshm_region_hdr *)tr.mem;
    h->lock = 0xdeadull; /* the dead holder's token */
    double t0 = tc_now();
    int rc = ivshm_region_create_ring(&tr.r, "b", IVSHM_KIND_SPSC, 16, 4, 7, 50, &info, &why);
    double dt = tc_now() - t0;
    CHECK(rc == -ETIMEDOUT, "create under a dead lock = %d", rc);
    CHECK(why != NULL && strstr(why, "lock"), "explanation: %s", why ? why : "(none)");
    CHECK(ivshm_region_find_ring(&tr.r, "a", &info, &why) == 0, "lookups need no lock");
    CHECK(h->lock == 0xdeadull, "a timed-out creator must not take over the lock");
    /* an unlock by a creator whose token was overwritten must not release someone else's lock */
    h->lock = 0;
    tregion_free(&tr);
    snprintf(detail, dn, "timed out after %.0f ms", dt * 1000);
}

/* A creator that died holding the directory lock: a waiter with more time than the lease takes
 * the lock over once it stayed silent for the lease, creates its ring and releases the lock. */
static void region_dead_lock_holder_taken_over(char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 65536) == 0, "region");
    struct ivshm_ring_info info;
    const char *why = NULL;
    struct ivshm_region_hdr *h = (struct ivshm_region_hdr *)tr.mem;
    h->lock = 0xdeadull; /* the dead holder's token, and its last heartbeat */
    h->lock_time = 12345;
    double t0 = tc_now();
    int rc = ivshm_region_create_ring(&tr.r, "b", IVSHM_KIND_SPSC, 16, 4, 7, 3 * IVSHM_DIR_LEASE_MS, &info, &why);
    double dt = tc_now() - t0;
    CHECK(rc == 0, "create after taking over = %d (%s)", rc, why ? why : "");
    CHECK(dt * 1000 >= IVSHM_DIR_LEASE_MS * 0.99, "took over before the lease ran out (%.0f ms)", dt * 1000);
    CHECK(h->lock == 0, "lock released after the take-over");
    CHECK(ivshm_region_find_ring(&tr.r, "b", &info, &why) == 0, "the ring is there");
    tregion_free(&tr);
    snprintf(detail, dn, "taken over after %.0f ms", dt * 1000);
}

/* A slow holder that keeps its heartbeat going is not taken for dead, however long it holds the
 * lock: the waiter gets the lock only when the holder releases it. */
struct slow_holder {
    struct ivshm_region_hdr *h;
    double hold_s;
    int released;
};

static void *slow_holder_run(void *arg)
{
    struct slow_holder *s = arg;
    double until = tc_now() + s->hold_s;
    while (tc_now() < until) {
        __atomic_store_n(&s->h->lock_time, (uint64_t)(tc_now() * 1e9), __ATOMIC_RELAXED); /* heartbeat */
        struct timespec ts = {0, 20 * 1000000};
        nanosleep(&ts, NULL);
    }
    __atomic_store_n(&s->released, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->h->lock, 0, __ATOMIC_RELEASE);
    return NULL;
}

static void region_slow_lock_holder_not_taken_over(char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 65536) == 0, "region");
    struct ivshm_ring_info info;
    const char *why = NULL;
    struct ivshm_region_hdr *h = (struct ivshm_region_hdr *)tr.mem;
    h->lock = 0xa11ceull; /* held by a live, slow creator */
    struct slow_holder s = {h, 2.5 * IVSHM_DIR_LEASE_MS / 1000.0, 0};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, slow_holder_run, &s) == 0, "thread");
    double t0 = tc_now();
    int rc = ivshm_region_create_ring(&tr.r, "c", IVSHM_KIND_SPSC, 16, 4, 7, 6 * IVSHM_DIR_LEASE_MS, &info, &why);
    double dt = tc_now() - t0;
    int released = __atomic_load_n(&s.released, __ATOMIC_RELAXED);
    pthread_join(th, NULL);
    CHECK(rc == 0, "create after the holder released = %d (%s)", rc, why ? why : "");
    CHECK(released, "the lock was taken from a live holder after %.0f ms", dt * 1000);
    CHECK(h->lock == 0, "lock released");
    tregion_free(&tr);
    snprintf(detail, dn, "waited %.0f ms for a holder beating for %.0f ms", dt * 1000, s.hold_s * 1000);
}

/* Two directory entries with one name (a corrupt directory) are reported, not resolved silently. */
static void region_duplicate_names(char *detail, size_t dn)
{
    struct tregion tr;
    CHECK(tregion_new(&tr, 65536) == 0, "region");
    struct ivshm_ring_info info;
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&tr.r, "a", IVSHM_KIND_SPSC, 16, 4, 7, 0, &info, &why) == 0, "create a");
    CHECK(ivshm_region_create_ring(&tr.r, "b", IVSHM_KIND_SPSC, 16, 4, 7, 0, &info, &why) == 0, "create b");
    struct ivshm_region_hdr *h = (struct ivshm_region_hdr *)tr.mem;
    memcpy(h->rings[1].name, "a", 2); /* entry 1 now claims the name of entry 0 */
    why = NULL;
    CHECK(ivshm_region_find_ring(&tr.r, "a", &info, &why) == -EPROTO && why && strstr(why, "two"),
          "find reports the duplicate (%s)", why ? why : "");
    why = NULL;
    CHECK(ivshm_region_create_ring(&tr.r, "a", IVSHM_KIND_SPSC, 16, 4, 7, 0, &info, &why) == -EPROTO &&
              why && strstr(why, "two"), "create reports the duplicate (%s)", why ? why : "");
    CHECK(h->lock == 0, "lock released");
    tregion_free(&tr);
    snprintf(detail, dn, "reported");
}

/* A region being formatted by someone who died: attachers time out, not hang. */
static void region_dead_formatter(char *detail, size_t dn)
{
    uint64_t size = 16384;
    uint8_t *mem = aligned_alloc(4096, size);
    CHECK(mem != NULL, "alloc");
    memset(mem, 0, size);
    ((struct ivshm_region_hdr *)mem)->magic = IVSHM_MAGIC_FORMATTING;
    struct ivshm_region reg;
    int rc = ivshm_region_attach(&reg, mem, size, IVSHM_ATTACH_FORMAT_IF_EMPTY, 5, 30);
    CHECK(rc == -ETIMEDOUT, "attach = %d", rc);
    rc = ivshm_region_attach(&reg, mem, size, 0, 5, 0);
    CHECK(rc == -ETIMEDOUT, "attach without waiting = %d", rc);
    /* an explicit re-format recovers it */
    CHECK(ivshm_region_attach(&reg, mem, size, IVSHM_ATTACH_FORMAT, 6, 0) == 0, "re-format");
    CHECK(reg.generation == 6, "new generation");
    free(mem);
    snprintf(detail, dn, "bounded");
}

int main(int argc, char **argv)
{
    static const struct tcase cases[] = {
        {"region_create_race", region_create_race, 0},
        {"region_shape_conflict", region_shape_conflict, 0},
        {"region_dead_lock_holder", region_dead_lock_holder, 0},
        {"region_dead_lock_holder_taken_over", region_dead_lock_holder_taken_over, 0},
        {"region_slow_lock_holder_not_taken_over", region_slow_lock_holder_not_taken_over, 0},
        {"region_duplicate_names", region_duplicate_names, 0},
        {"region_dead_formatter", region_dead_formatter, 0},
    };
    return tc_main(argc, argv, cases, sizeof(cases) / sizeof(cases[0]));
}
