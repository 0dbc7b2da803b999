/* chan_wake.c - what the wake-up protocol costs in C, against a bare eventfd.
 *
 * Two threads pinned to two CPUs.  The waker waits `gap` us (so the sleeper is asleep), takes the
 * time, and either writes the eventfd (bare) or sends one message through an ivshm_chan over an
 * SPSC ring (chan: publish, fence, claim the sleeper, ring its eventfd).  The sleeper, blocked in
 * read(2) (bare) or ivshm_chan_recv (chan, no spinning), takes the time when it returns.  Both
 * kinds alternate sample by sample, so a change of the machine's speed hits them alike.  Prints
 * p50/p90/p99 one-way wake-up latency per kind and the ratio chan/bare.
 *
 *   make -C bench/c chan_wake && bench/c/chan_wake [-n SAMPLES] [-g GAP_US] [-c CPU_A,CPU_B]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "ivshm.h"

static int resolve(void *ctx, uint32_t peer, uint32_t vector, struct ivshm_bell *out)
{
    const int *fds = ctx;
    if (peer > 1 || vector != 0)
        return -ENOENT;
    out->kind = IVSHM_BELL_EVENTFD;
    out->fd = fds[peer];
    return 0;
}

struct shared {
    int n, gap_us, cpu[2];
    int bare_fd, ack_fd, fds[2];
    struct ivshm_region r;
    struct ivshm_ring_info info;
    int64_t sent_ns, *lat[2];
    volatile int kind; /* what the next sample uses: 0 bare, 1 chan */
};

static void pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    pthread_setaffinity_np(pthread_self(), sizeof(s), &s);
}

static void *sleeper(void *p)
{
    struct shared *sh = p;
    pin(sh->cpu[1]);
    struct ivshm_spsc q;
    const char *why;
    ivshm_spsc_attach(&q, &sh->r, &sh->info, &why);
    struct ivshm_chan ch;
    ivshm_chan_init(&ch, IVSHM_KIND_SPSC, &q, 1, 0, sh->fds[1], -1, resolve, sh->fds, 0,
                    1000000000ull);
    uint64_t one = 1, v;
    for (int i = 0; i < 2 * sh->n; i++) {
        int kind = i & 1;
        if (kind == 0) {
            if (read(sh->bare_fd, &v, 8) != 8)
                abort();
        } else {
            if (ivshm_chan_recv(&ch, &v, 8, NULL, -1) != 8)
                abort();
        }
        sh->lat[kind][i / 2] = ivshm_chan_now_ns() - __atomic_load_n(&sh->sent_ns, __ATOMIC_ACQUIRE);
        if (write(sh->ack_fd, &one, 8) != 8) /* the waker may go on */
            abort();
    }
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    struct shared sh;
    memset(&sh, 0, sizeof(sh));
    sh.n = 2000;
    sh.gap_us = 500;
    sh.cpu[0] = 0;
    sh.cpu[1] = 1;
    int opt;
    while ((opt = getopt(argc, argv, "n:g:c:")) != -1) {
        if (opt == 'n')
            sh.n = atoi(optarg);
        else if (opt == 'g')
            sh.gap_us = atoi(optarg);
        else if (opt == 'c' && sscanf(optarg, "%d,%d", &sh.cpu[0], &sh.cpu[1]) == 2)
            ;
        else {
            fprintf(stderr, "usage: %s [-n SAMPLES] [-g GAP_US] [-c CPU_A,CPU_B]\n", argv[0]);
            return 2;
        }
    }
    uint64_t size = 1 << 16;
    void *mem = aligned_alloc(4096, size);
    memset(mem, 0, size);
    const char *why = NULL;
    if (ivshm_region_attach(&sh.r, mem, size, IVSHM_ATTACH_FORMAT, 1, 0) ||
        ivshm_region_create_ring(&sh.r, "w", IVSHM_KIND_SPSC, 64, 16, 1, 0, &sh.info, &why) < 0) {
        fprintf(stderr, "region: %s\n", why ? why : "?");
        return 1;
    }
    sh.bare_fd = eventfd(0, EFD_CLOEXEC);               /* blocking, as in the bare ping-pong */
    sh.ack_fd = eventfd(0, EFD_CLOEXEC);
    sh.fds[0] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    sh.fds[1] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    sh.lat[0] = calloc(sh.n, 8);
    sh.lat[1] = calloc(sh.n, 8);
    pin(sh.cpu[0]);
    struct ivshm_spsc q;
    ivshm_spsc_attach(&q, &sh.r, &sh.info, &why);
    struct ivshm_chan ch;
    ivshm_chan_init(&ch, IVSHM_KIND_SPSC, &q, 0, 0, sh.fds[0], -1, resolve, sh.fds, 0, 1000000000ull);
    pthread_t th;
    pthread_create(&th, NULL, sleeper, &sh);
    uint64_t one = 1, v = 0;
    for (int i = 0; i < 2 * sh.n; i++) {
        struct timespec ts = {0, sh.gap_us * 1000L};
        nanosleep(&ts, NULL);
        __atomic_store_n(&sh.sent_ns, ivshm_chan_now_ns(), __ATOMIC_RELEASE);
        if ((i & 1) == 0) {
            if (write(sh.bare_fd, &one, 8) != 8)
                abort();
        } else if (ivshm_chan_send(&ch, &v, 8, -1) != 0) {
            abort();
        }
        if (read(sh.ack_fd, &v, 8) != 8)
            abort();
    }
    pthread_join(th, NULL);
    double p[2][3];
    for (int k = 0; k < 2; k++) {
        qsort(sh.lat[k], sh.n, 8, cmp);
        p[k][0] = sh.lat[k][sh.n / 2] / 1e3;
        p[k][1] = sh.lat[k][sh.n * 9 / 10] / 1e3;
        p[k][2] = sh.lat[k][sh.n * 99 / 100] / 1e3;
    }
    struct ivshm_chan_stats st;
    ivshm_chan_get_stats(&ch, &st);
    printf("RESULT kind=bare p50=%.2f p90=%.2f p99=%.2f\n", p[0][0], p[0][1], p[0][2]);
    printf("RESULT kind=chan p50=%.2f p90=%.2f p99=%.2f doorbells=%llu\n", p[1][0], p[1][1], p[1][2],
           (unsigned long long)st.doorbells);
    printf("one-way wake-up of a sleeping thread, %d samples each, alternated, CPUs %d,%d: "
           "chan/bare p50 x%.2f\n", sh.n, sh.cpu[0], sh.cpu[1], p[1][0] / p[0][0]);
    return 0;
}
