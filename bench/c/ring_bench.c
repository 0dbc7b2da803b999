/* ring_bench.c - throughput of pyivshmem's C rings against DPDK's rte_ring, same run, same machine.
 *
 * Two threads, pinned to two CPUs, move N 8-byte elements (a running sequence number, checked by
 * the consumer) through one ring, in bursts of 1, 8 and 32 elements per call:
 *
 *   ivshm SPSC        ivshm_spsc_send_fixed / ivshm_spsc_recv_fixed
 *   ivshm MPMC        ivshm_mpmc_send_fixed / ivshm_mpmc_recv_fixed (multi-producer code path)
 *   rte_ring SP/SC    rte_ring_enqueue_burst / rte_ring_dequeue_burst on a RING_F_SP_ENQ|SC_DEQ ring
 *   rte_ring MP/MC    the same on a ring created with default flags (multi-producer/consumer)
 *
 * Both kinds of ring live in caller-provided memory of the same capacity; rte_ring_init() needs
 * no DPDK environment (EAL), so no hugepages or root.  Built with -DHAVE_DPDK when pkg-config
 * finds libdpdk; without it only pyivshmem's rings are measured.  The figure is elements per
 * second from the producer's start to the consumer's last element, the median of -r runs.
 *
 *   make -C bench/c && bench/c/ring_bench [-n ELEMENTS] [-c CAPACITY] [-r RUNS] [-p CPU,CPU]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ivshm.h"

#ifdef HAVE_DPDK
#include <rte_ring.h>
#endif

#define MAX_BURST 32

enum kind { IVSHM_SPSC, IVSHM_MPMC, RTE_SPSC, RTE_MPMC };
static const char *const kind_names[] = {
    "pyivshmem SPSC", "pyivshmem MPMC", "DPDK rte_ring SP/SC", "DPDK rte_ring MP/MC (default)",
};

struct job {
    enum kind kind;
    unsigned burst;
    uint64_t n;
    int cpu[2];
    void *ring;   /* the producer's view: struct ivshm_spsc / ivshm_mpmc / rte_ring */
    void *ring_c; /* the consumer's view (its own private struct, as in another process) */
    atomic_int ready;
    atomic_int go;
    struct timespec start, end;
    uint64_t bad; /* elements out of sequence, seen by the consumer */
    int error;    /* -errno from a ring call */
};

static double seconds(const struct timespec *a, const struct timespec *b)
{
    return (double)(b->tv_sec - a->tv_sec) + (double)(b->tv_nsec - a->tv_nsec) / 1e9;
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void wait_start(struct job *j)
{
    atomic_fetch_add(&j->ready, 1);
    while (!atomic_load(&j->go))
        IVSHM_CPU_RELAX();
}

/* Returns the number of elements moved (0 when full/empty) or -errno. */
static inline int64_t put(enum kind kind, void *ring, const uint64_t *src, unsigned n)
{
    switch (kind) {
    case IVSHM_SPSC:
        return ivshm_spsc_send_fixed(ring, src, 8, n);
    case IVSHM_MPMC:
        return ivshm_mpmc_send_fixed(ring, src, 8, n);
#ifdef HAVE_DPDK
    case RTE_SPSC:
    case RTE_MPMC:
        return rte_ring_enqueue_burst(ring, (void *const *)src, n, NULL);
#endif
    default:
        return -ENOSYS;
    }
}

static inline int64_t get(enum kind kind, void *ring, uint64_t *dst, unsigned n)
{
    switch (kind) {
    case IVSHM_SPSC: {
        int64_t m = ivshm_spsc_recv_fixed(ring, dst, 8, n);
        return m == -EAGAIN ? 0 : m;
    }
    case IVSHM_MPMC:
        return ivshm_mpmc_recv_fixed(ring, dst, 8, n);
#ifdef HAVE_DPDK
    case RTE_SPSC:
    case RTE_MPMC:
        return rte_ring_dequeue_burst(ring, (void **)dst, n, NULL);
#endif
    default:
        return -ENOSYS;
    }
}

static void *producer(void *arg)
{
    struct job *j = arg;
    uint64_t buf[MAX_BURST];
    const enum kind kind = j->kind;
    void *const ring = j->ring;
    const uint64_t n = j->n;
    const unsigned burst = j->burst;
    pin(j->cpu[0]);
    wait_start(j);
    clock_gettime(CLOCK_MONOTONIC, &j->start);
    uint64_t next = 0;
    while (next < n) {
        unsigned want = burst;
        if (n - next < want)
            want = (unsigned)(n - next);
        for (unsigned k = 0; k < want; k++)
            buf[k] = next + k + 1; /* never 0: a NULL pointer for rte_ring is fine, but be clear */
        int64_t m = put(kind, ring, buf, want);
        if (m < 0) {
            j->error = (int)m;
            return NULL;
        }
        if (m == 0)
            IVSHM_CPU_RELAX();
        next += (uint64_t)m; /* the calls take the first m of buf; the rest is refilled above */
    }
    return NULL;
}

static void *consumer(void *arg)
{
    struct job *j = arg;
    uint64_t buf[MAX_BURST];
    const enum kind kind = j->kind;
    void *const ring = j->ring_c;
    const uint64_t n = j->n;
    const unsigned burst = j->burst;
    pin(j->cpu[1]);
    wait_start(j);
    uint64_t expect = 1, bad = 0;
    while (expect <= n) {
        int64_t m = get(kind, ring, buf, burst);
        if (m < 0) {
            j->error = (int)m;
            return NULL;
        }
        if (m == 0) {
            IVSHM_CPU_RELAX();
            continue;
        }
        for (int64_t k = 0; k < m; k++)
            bad += buf[k] != expect++;
    }
    clock_gettime(CLOCK_MONOTONIC, &j->end);
    j->bad = bad;
    return NULL;
}

/* Build a fresh ring of `kind` with `capacity` slots in `mem` (zeroed by the caller). */
/* The two sides' private ring structs, each on cache lines of its own (128-byte aligned and
 * padded), as they would be in two processes. */
struct view {
    _Alignas(128) union {
        struct ivshm_spsc spsc;
        struct ivshm_mpmc mpmc;
    } u;
};
_Static_assert(sizeof(struct view) % 128 == 0, "views must not share a cache line pair");

static int make_ring(struct job *j, void *mem, size_t memsize, uint32_t capacity,
                     struct ivshm_region *reg, struct view views[2])
{
    const char *why = NULL;
    struct ivshm_ring_info info;
    int rc;
    switch (j->kind) {
    case IVSHM_SPSC:
    case IVSHM_MPMC: {
        memset(mem, 0, memsize);
        rc = ivshm_region_attach(reg, mem, memsize, IVSHM_ATTACH_FORMAT, 0x5eed, 1000);
        if (rc)
            return rc;
        uint32_t k = j->kind == IVSHM_SPSC ? IVSHM_KIND_SPSC : IVSHM_KIND_MPMC;
        rc = ivshm_region_create_ring(reg, "bench", k, 8, capacity, 1, 1000, &info, &why);
        if (rc < 0) {
            fprintf(stderr, "create ring: %s (%s)\n", strerror(-rc), why ? why : "");
            return rc;
        }
        /* each side attaches its own private struct, as two processes would */
        for (int side = 0; side < 2 && rc >= 0; side++) {
            if (j->kind == IVSHM_SPSC)
                rc = ivshm_spsc_attach(&views[side].u.spsc, reg, &info, &why);
            else
                rc = ivshm_mpmc_attach(&views[side].u.mpmc, reg, &info, &why);
        }
        j->ring = &views[0].u;
        j->ring_c = &views[1].u;
        return rc < 0 ? rc : 0;
    }
#ifdef HAVE_DPDK
    case RTE_SPSC:
    case RTE_MPMC: {
        ssize_t need = rte_ring_get_memsize(capacity);
        if (need < 0 || (size_t)need > memsize)
            return -ENOSPC;
        memset(mem, 0, (size_t)need);
        /* RING_F_EXACT_SZ: usable capacity == capacity, as for the ivshm rings */
        unsigned flags = RING_F_EXACT_SZ | (j->kind == RTE_SPSC ? RING_F_SP_ENQ | RING_F_SC_DEQ : 0);
        rc = rte_ring_init(mem, "bench", capacity, flags);
        j->ring = j->ring_c = mem; /* one shared struct by design (prod/cons lines apart) */
        return rc;
    }
#endif
    default:
        return -ENOSYS;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(const char *prog)
{
    fprintf(stderr,
            "usage: %s [-n ELEMENTS] [-c CAPACITY] [-r RUNS] [-p CPU,CPU] [-k KINDS]\n"
            "  -n  elements per run (default 20000000)\n"
            "  -c  ring capacity in slots, a power of two (default 1024)\n"
            "  -r  runs per figure, the median is printed (default 3)\n"
            "  -p  CPUs of producer and consumer (default: the first two this process may use)\n"
            "  -k  which rings: a comma list of spsc,mpmc,rte-spsc,rte-mpmc (default: all built)\n",
            prog);
}

int main(int argc, char **argv)
{
    uint64_t n = 20000000;
    uint32_t capacity = 1024;
    int runs = 3;
    int cpu[2] = {-1, -1};
    int want[4] = {1, 1, 1, 1};
    int opt;
    while ((opt = getopt(argc, argv, "n:c:r:p:k:h")) != -1) {
        switch (opt) {
        case 'n': n = strtoull(optarg, NULL, 0); break;
        case 'c': capacity = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'r': runs = atoi(optarg); break;
        case 'p':
            if (sscanf(optarg, "%d,%d", &cpu[0], &cpu[1]) != 2) {
                usage(argv[0]);
                return 2;
            }
            break;
        case 'k':
            memset(want, 0, sizeof(want));
            for (char *tok = strtok(optarg, ","); tok; tok = strtok(NULL, ",")) {
                if (!strcmp(tok, "spsc")) want[IVSHM_SPSC] = 1;
                else if (!strcmp(tok, "mpmc")) want[IVSHM_MPMC] = 1;
                else if (!strcmp(tok, "rte-spsc")) want[RTE_SPSC] = 1;
                else if (!strcmp(tok, "rte-mpmc")) want[RTE_MPMC] = 1;
                else {
                    usage(argv[0]);
                    return 2;
                }
            }
            break;
        default:
            usage(argv[0]);
            return opt == 'h' ? 0 : 2;
        }
    }
    if (n == 0 || runs < 1 || runs > 99 || capacity < 64 || (capacity & (capacity - 1))) {
        fprintf(stderr, "ring_bench: need -n > 0, 1 <= -r <= 99, -c a power of two >= 64\n");
        return 2;
    }
    if (cpu[0] < 0) {
        cpu_set_t set;
        if (sched_getaffinity(0, sizeof(set), &set) == 0) {
            for (int c = 0, found = 0; c < CPU_SETSIZE && found < 2; c++)
                if (CPU_ISSET(c, &set))
                    cpu[found++] = c;
        }
    }
#ifndef HAVE_DPDK
    if (want[RTE_SPSC] || want[RTE_MPMC])
        printf("# built without DPDK (pkg-config libdpdk not found): pyivshmem's rings only\n");
    want[RTE_SPSC] = want[RTE_MPMC] = 0;
#endif

    /* one buffer, large enough for a region holding the ring or for an rte_ring */
    size_t memsize = 1u << 16;
    while (memsize < IVSHM_HDR_SIZE + ivshm_ring_bytes(IVSHM_KIND_MPMC, 8, capacity) + 4096)
        memsize <<= 1;
#ifdef HAVE_DPDK
    while ((ssize_t)memsize < rte_ring_get_memsize(capacity))
        memsize <<= 1;
#endif
    void *mem = mmap(NULL, memsize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }

    static struct view views[2];
    static const unsigned bursts[] = {1, 8, 32};
    double result[4][3] = {{0}};
    printf("# %" PRIu64 " 8-byte elements per run, capacity %u, median of %d runs, CPUs %d,%d\n",
           n, capacity, runs, cpu[0], cpu[1]);
    int failed = 0;
    /* Runs are interleaved (run r of every ring and burst, then run r + 1), so that a noisy
     * stretch of a shared machine slows every figure alike instead of one ring's runs. */
    static double mops[4][3][99];
    for (int r = 0; r < runs; r++) {
        for (int b = 0; b < 3; b++) {
            for (int k = 0; k < 4; k++) {
                if (!want[k])
                    continue;
                struct job j = {.kind = (enum kind)k, .burst = bursts[b], .n = n,
                                .cpu = {cpu[0], cpu[1]}};
                struct ivshm_region reg;
                int rc = make_ring(&j, mem, memsize, capacity, &reg, views);
                if (rc) {
                    fprintf(stderr, "%s: cannot make the ring: %s\n", kind_names[k], strerror(-rc));
                    return 1;
                }
                pthread_t tp, tc;
                pthread_create(&tc, NULL, consumer, &j);
                pthread_create(&tp, NULL, producer, &j);
                while (atomic_load(&j.ready) < 2)
                    IVSHM_CPU_RELAX();
                atomic_store(&j.go, 1);
                pthread_join(tp, NULL);
                pthread_join(tc, NULL);
                if (j.error || j.bad) {
                    fprintf(stderr, "%s burst %u: %s, %" PRIu64 " elements out of sequence\n",
                            kind_names[k], bursts[b], j.error ? strerror(-j.error) : "no error",
                            j.bad);
                    failed = 1;
                }
                mops[k][b][r] = (double)n / seconds(&j.start, &j.end) / 1e6;
            }
        }
    }
    for (int k = 0; k < 4; k++) {
        if (!want[k])
            continue;
        for (int b = 0; b < 3; b++) {
            qsort(mops[k][b], (size_t)runs, sizeof(double), cmp_double);
            result[k][b] = mops[k][b][runs / 2];
            printf("RESULT ring=%s burst=%u mops=%.1f\n",
                   k == IVSHM_SPSC ? "ivshm-spsc" : k == IVSHM_MPMC ? "ivshm-mpmc"
                   : k == RTE_SPSC ? "rte-spsc" : "rte-mpmc", bursts[b], result[k][b]);
        }
    }

    printf("\n%-32s %12s %12s %12s   (millions of elements/s)\n", "ring", "burst 1", "burst 8",
           "burst 32");
    for (int k = 0; k < 4; k++) {
        if (!want[k])
            continue;
        printf("%-32s", kind_names[k]);
        for (int b = 0; b < 3; b++)
            printf(" %12.1f", result[k][b]);
        printf("\n");
    }
    if (want[IVSHM_SPSC] && want[RTE_SPSC]) {
        printf("%-32s", "  SPSC: pyivshmem / rte_ring");
        for (int b = 0; b < 3; b++)
            printf(" %11.2fx", result[IVSHM_SPSC][b] / result[RTE_SPSC][b]);
        printf("\n");
    }
    if (want[IVSHM_MPMC] && want[RTE_MPMC]) {
        printf("%-32s", "  MPMC: pyivshmem / rte_ring");
        for (int b = 0; b < 3; b++)
            printf(" %11.2fx", result[IVSHM_MPMC][b] / result[RTE_MPMC][b]);
        printf("\n");
    }
    munmap(mem, memsize);
    return failed;
}
