/* tcommon.h - a tiny test harness shared by the C tests in tests/c/.
 *
 * Each test program lists its cases in a `struct tcase` table and calls tc_main().  A case prints
 * `PASS name (details)` or `FAIL name: why` on its own line; runtests.sh counts those lines, and a
 * program that dies without printing counts as a failure.  Message counts scale with the
 * IVSHM_TEST_SCALE environment variable (a float, default 1.0) so that sanitizer builds can run
 * the same cases with fewer messages.  Regions live in private heap memory of exactly the region's
 * size, so AddressSanitizer reports any access past its end.
 */
#ifndef TCOMMON_H
#define TCOMMON_H

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ivshm.h"

/* ---------------------------------------------------------------------------------------------- */
/* reporting */

static char tc_msg[512];
static int tc_failed_flag;

static void tc_fail(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    char buf[400];
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    /* first failure wins; later ones are usually consequences */
    if (!__atomic_exchange_n(&tc_failed_flag, 1, __ATOMIC_SEQ_CST))
        snprintf(tc_msg, sizeof(tc_msg), "%s:%d: %s", file, line, buf);
}

static int tc_failed(void) { return __atomic_load_n(&tc_failed_flag, __ATOMIC_SEQ_CST); }

/* Check a condition inside a test case (or a thread of one); on failure record it and return. */
#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            tc_fail(__FILE__, __LINE__, "check failed: " #cond " -- " __VA_ARGS__);                \
            return;                                                                                \
        }                                                                                          \
    } while (0)

/* Same for functions returning a pointer (thread bodies). */
#define CHECKP(cond, ...)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            tc_fail(__FILE__, __LINE__, "check failed: " #cond " -- " __VA_ARGS__);                \
            return NULL;                                                                           \
        }                                                                                          \
    } while (0)

struct tcase {
    const char *name;
    void (*fn)(char *detail, size_t n); /* may write a short summary into detail */
    int skip_under_tsan;                /* deliberately racy by design (hostile writer thread) */
};

static double tc_scale(void)
{
    const char *s = getenv("IVSHM_TEST_SCALE");
    double v = s ? atof(s) : 1.0;
    return v > 0 ? v : 1.0;
}

/* n scaled, at least `min`. */
static uint64_t tc_count(uint64_t n, uint64_t min)
{
    double v = (double)n * tc_scale();
    return v < (double)min ? min : (uint64_t)v;
}

static double tc_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#if defined(__SANITIZE_THREAD__)
#define TC_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TC_TSAN 1
#endif
#endif
#ifndef TC_TSAN
#define TC_TSAN 0
#endif

static int tc_main(int argc, char **argv, const struct tcase *cases, size_t ncases)
{
    int failed = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (size_t i = 0; i < ncases; i++) {
        if (argc > 1) { /* run only the named cases */
            int want = 0;
            for (int a = 1; a < argc; a++)
                want |= strcmp(argv[a], cases[i].name) == 0;
            if (!want)
                continue;
        }
        if (TC_TSAN && cases[i].skip_under_tsan) {
            printf("SKIP %s (a hostile writer races with the reader by design; run without TSan)\n",
                   cases[i].name);
            continue;
        }
        char detail[256] = "";
        tc_failed_flag = 0;
        tc_msg[0] = 0;
        double t0 = tc_now();
        cases[i].fn(detail, sizeof(detail));
        double dt = tc_now() - t0;
        if (tc_failed()) {
            printf("FAIL %s: %s\n", cases[i].name, tc_msg);
            failed++;
        } else {
            printf("PASS %s (%s%s%.2f s)\n", cases[i].name, detail, detail[0] ? ", " : "", dt);
        }
    }
    return failed ? 1 : 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* regions in private memory */

struct tregion {
    struct ivshm_region r;
    uint8_t *mem;
    uint64_t size;
};

/* A freshly formatted region of `size` bytes; aborts the case on failure. */
static int tregion_new(struct tregion *t, uint64_t size)
{
    t->size = size;
    t->mem = aligned_alloc(4096, size);
    if (!t->mem)
        return -ENOMEM;
    memset(t->mem, 0, size);
    return ivshm_region_attach(&t->r, t->mem, size, IVSHM_ATTACH_FORMAT, 0x1234567890abcdefull, 0);
}

static void tregion_free(struct tregion *t)
{
    free(t->mem);
    t->mem = NULL;
}

/* ---------------------------------------------------------------------------------------------- */
/* deterministic pseudo-random numbers and message contents */

static inline uint64_t tc_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

struct trng {
    uint64_t s;
};

static inline uint64_t trng_next(struct trng *r)
{
    r->s += 0x9e3779b97f4a7c15ull;
    return tc_mix(r->s);
}

static inline uint64_t trng_below(struct trng *r, uint64_t n) { return n ? trng_next(r) % n : 0; }

/* Byte j of message `seq` of stream `stream`: both sides compute it, so every byte is checked. */
static inline uint8_t tc_byte(uint64_t stream, uint64_t seq, uint64_t j)
{
    return (uint8_t)(seq * 131u + j * 7u + (seq >> 8) + stream * 29u + (j >> 8));
}

static void tc_fill(uint8_t *p, uint64_t stream, uint64_t seq, uint64_t len)
{
    for (uint64_t j = 0; j < len; j++)
        p[j] = tc_byte(stream, seq, j);
}

/* Index of the first wrong byte, or -1. */
static int64_t tc_verify(const uint8_t *p, uint64_t stream, uint64_t seq, uint64_t len)
{
    for (uint64_t j = 0; j < len; j++)
        if (p[j] != tc_byte(stream, seq, j))
            return (int64_t)j;
    return -1;
}

/* Wait a little for the other side: pause, and yield now and then so that a waiting thread does
 * not starve the one it waits for on a busy two-core machine. */
static inline void tc_relax(void)
{
    static __thread unsigned n;
#if TC_TSAN
    (void)n;
    sched_yield();
#else
    if ((++n & 63) == 0)
        sched_yield();
    else
        IVSHM_CPU_RELAX();
#endif
}

#endif /* TCOMMON_H */
