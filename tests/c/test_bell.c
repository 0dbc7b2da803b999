/* test_bell.c - doorbells (csrc/ivshm_doorbell.c): one bell rung and slept on, the bell table that
 * says how to ring every peer's vectors, and a channel whose waker resolves through that table.
 *
 * The table is read by wakers in other threads while its owner changes it (peers join and
 * leave): `table_readers_never_see_a_foreign_fd` has readers resolve while a writer sets and
 * clears rows, and checks that every fd a reader gets is one the writer set for that very
 * (peer, vector); under TSan it also shows the accesses are race-free.
 */
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tcommon.h"
#include "tchan.h"


static uint64_t counter_of(int fd)
{
    uint64_t v = 0;
    return ivshm_eventfd_take(fd, &v) == 0 ? v : UINT64_MAX;
}

/* ---------------------------------------------------------------------------------------------- */
static void bell_ring_sleep_take(char *detail, size_t dn)
{
    int fd = ivshm_eventfd_create(1);
    int cancel = ivshm_eventfd_create(1);
    CHECK(fd >= 0 && cancel >= 0, "eventfds");
    struct ivshm_bell b = {.kind = IVSHM_BELL_EVENTFD, .fd = fd, .reg = NULL, .value = 0};
    /* nothing rung: the sleep times out, a take finds nothing */
    CHECK(ivshm_bell_sleep(fd, &cancel, 1, 10) == 0, "an unrung bell woke the sleeper");
    CHECK(counter_of(fd) == 0, "a take found rings nobody made");
    /* rung twice: the sleep returns at once, nothing drained, a take gets both rings */
    CHECK(ivshm_bell_ring(&b) == 0 && ivshm_bell_ring(&b) == 0, "ring");
    CHECK(ivshm_bell_sleep(fd, &cancel, 1, 10000) == 1, "a rung bell did not wake the sleeper");
    CHECK(ivshm_bell_sleep(fd, NULL, 0, 0) == 1, "the sleep drained the bell");
    CHECK(counter_of(fd) == 2, "two rings, not two in the counter");
    /* a cancel fd wins over a rung bell */
    CHECK(ivshm_bell_ring(&b) == 0 && ivshm_eventfd_ring(cancel) == 0, "ring");
    CHECK(ivshm_bell_sleep(fd, &cancel, 1, 10000) == -ECANCELED, "cancel not reported");
    /* a closed fd is an error, not a wake-up */
    close(fd);
    CHECK(ivshm_bell_sleep(fd, NULL, 0, 0) == -EBADF, "sleeping on a closed fd");
    CHECK(ivshm_bell_sleep(cancel, &cancel, 5, 0) == -EINVAL, "more cancel fds than allowed");
    /* MMIO: a 32-bit store of the value */
    uint32_t reg = 0;
    struct ivshm_bell m = {.kind = IVSHM_BELL_MMIO, .fd = -1, .reg = &reg, .value = 0x00050003u};
    CHECK(ivshm_bell_ring(&m) == 0 && reg == 0x00050003u, "MMIO ring wrote %#x", reg);
    /* NONE rings nothing */
    struct ivshm_bell none = {.kind = IVSHM_BELL_NONE, .fd = -1, .reg = NULL, .value = 0};
    CHECK(ivshm_bell_ring(&none) == 0, "ringing nothing");
    close(cancel);
    snprintf(detail, dn, "eventfd, cancel, closed fd, MMIO");
}

/* ---------------------------------------------------------------------------------------------- */
static void table_eventfd(char *detail, size_t dn)
{
    struct ivshm_bell_table *t;
    struct ivshm_bell b;
    CHECK(ivshm_bell_table_create(IVSHM_BELL_NONE, 10, 4, &t) == -EINVAL, "kind NONE accepted");
    CHECK(ivshm_bell_table_create(IVSHM_BELL_EVENTFD, 0x10000, 4, &t) == -EINVAL, "max_peer > 65535");
    CHECK(ivshm_bell_table_create(IVSHM_BELL_EVENTFD, 10, 0, &t) == -EINVAL, "no vectors");
    CHECK(ivshm_bell_table_create(IVSHM_BELL_EVENTFD, 65535, 64, &t) == 0, "create");
    int fd = ivshm_eventfd_create(1);
    CHECK(fd >= 0, "eventfd");
    /* unknown: -ENOENT and NONE */
    CHECK(ivshm_bell_table_resolve(t, 7, 2, &b) == -ENOENT && b.kind == IVSHM_BELL_NONE, "empty");
    CHECK(ivshm_bell_table_set_fd(t, 7, 2, fd) == 0, "set");
    CHECK(ivshm_bell_table_resolve(t, 7, 2, &b) == 0 && b.kind == IVSHM_BELL_EVENTFD && b.fd == fd,
          "resolve after set: kind %d fd %d", b.kind, b.fd);
    CHECK(ivshm_bell_table_resolve(t, 7, 1, &b) == -ENOENT, "another vector of the peer");
    CHECK(ivshm_bell_table_resolve(t, 6, 2, &b) == -ENOENT, "another peer");
    CHECK(ivshm_bell_table_resolve(t, 65535, 63, &b) == -ENOENT, "the last id");
    CHECK(ivshm_bell_table_resolve(t, 65536, 0, &b) == -ENOENT, "past the last id");
    CHECK(ivshm_bell_table_resolve(t, 7, 64, &b) == -ENOENT, "past the last vector");
    /* out of range or wrong kind */
    CHECK(ivshm_bell_table_set_fd(t, 65536, 0, fd) == -EINVAL, "peer out of range");
    CHECK(ivshm_bell_table_set_fd(t, 7, 64, fd) == -EINVAL, "vector out of range");
    CHECK(ivshm_bell_table_set_fd(t, 7, 0, -2) == -EINVAL, "fd -2");
    CHECK(ivshm_bell_table_set_mmio(t, 0x1000) == -EINVAL, "MMIO on an eventfd table");
    /* ring through the table */
    CHECK(ivshm_bell_table_ring(t, 7, 2) == 0, "ring");
    CHECK(ivshm_bell_table_ring(t, 7, 3) == -ENOENT, "ringing an unknown vector");
    CHECK(counter_of(fd) == 1, "the ring did not reach the fd");
    /* each peer's entries count their changes: a waker compares two reads */
    CHECK(ivshm_bell_table_changes(t, 7) == 1 && ivshm_bell_table_changes(t, 6) == 0 &&
          ivshm_bell_table_changes(t, 65536) == 0, "changes after one set_fd");
    /* the peer leaves: cleared, and no ring reaches the fd any more */
    CHECK(ivshm_bell_table_clear_peer(t, 7) == 0, "clear");
    CHECK(ivshm_bell_table_changes(t, 7) == 2, "a clear is a change");
    CHECK(ivshm_bell_table_resolve(t, 7, 2, &b) == -ENOENT, "a cleared peer resolves");
    CHECK(ivshm_bell_table_ring(t, 7, 2) == -ENOENT && counter_of(fd) == 0, "rang a cleared peer");
    /* set one vector to -1 */
    CHECK(ivshm_bell_table_set_fd(t, 9, 0, fd) == 0 && ivshm_bell_table_set_fd(t, 9, 0, -1) == 0, "");
    CHECK(ivshm_bell_table_resolve(t, 9, 0, &b) == -ENOENT, "a vector set to -1 resolves");
    /* clear everything */
    CHECK(ivshm_bell_table_set_fd(t, 1, 0, fd) == 0 && ivshm_bell_table_set_fd(t, 65535, 63, fd) == 0, "");
    ivshm_bell_table_clear(t);
    CHECK(ivshm_bell_table_resolve(t, 1, 0, &b) == -ENOENT, "clear left peer 1");
    CHECK(ivshm_bell_table_resolve(t, 65535, 63, &b) == -ENOENT, "clear left peer 65535");
    close(fd);
    ivshm_bell_table_destroy(t);
    ivshm_bell_table_destroy(NULL);
    snprintf(detail, dn, "set, resolve, ring, clear");
}

static void table_mmio(char *detail, size_t dn)
{
    struct ivshm_bell_table *t;
    struct ivshm_bell b;
    uint32_t regs[4] = {0, 0, 0, 0};
    CHECK(ivshm_bell_table_create(IVSHM_BELL_MMIO, 65535, 64, &t) == 0, "create");
    CHECK(ivshm_bell_table_resolve(t, 3, 1, &b) == -ENOENT, "no register yet");
    CHECK(ivshm_bell_table_set_mmio(t, (uintptr_t)&regs[3]) == 0, "set");
    CHECK(ivshm_bell_table_set_mmio(t, (uintptr_t)&regs[3] + 1) == -EINVAL, "misaligned register");
    CHECK(ivshm_bell_table_set_fd(t, 3, 1, 0) == -EINVAL, "an fd in an MMIO table");
    CHECK(ivshm_bell_table_ring(t, 3, 1) == 0 && regs[3] == ((3u << 16) | 1u), "wrote %#x", regs[3]);
    CHECK(ivshm_bell_table_ring(t, 0xffff, 63) == 0 && regs[3] == 0xffff003fu, "wrote %#x", regs[3]);
    CHECK(ivshm_bell_table_ring(t, 3, 64) == -ENOENT, "vector 64");
    CHECK(regs[0] == 0 && regs[1] == 0 && regs[2] == 0, "stored elsewhere");
    CHECK(ivshm_bell_table_clear_peer(t, 3) == 0, "clear_peer on MMIO is a no-op");
    ivshm_bell_table_clear(t); /* the BAR goes away */
    regs[3] = 0;
    CHECK(ivshm_bell_table_ring(t, 3, 1) == -ENOENT && regs[3] == 0, "rang after clear");
    ivshm_bell_table_destroy(t);
    snprintf(detail, dn, "value peer << 16 | vector");
}

static void table_watch_fd(char *detail, size_t dn)
{
    struct ivshm_bell_table *t;
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    CHECK(ivshm_bell_table_create(IVSHM_BELL_EVENTFD, 15, 2, &t) == 0, "create");
    CHECK(ivshm_bell_table_stale(t, 1) == 0, "stale without a watch fd");
    ivshm_bell_table_set_watch(t, sv[0], 0); /* look every time */
    CHECK(ivshm_bell_table_stale(t, 0) == 0, "stale with nothing to read");
    CHECK(write(sv[1], "x", 1) == 1, "write");
    CHECK(ivshm_bell_table_stale(t, 0) == 1, "not stale with news waiting");
    char c;
    CHECK(read(sv[0], &c, 1) == 1, "read");
    CHECK(ivshm_bell_table_stale(t, 0) == 0, "stale after the news were taken in");
    /* at most one look per interval, unless forced; the first look is not held back */
    ivshm_bell_table_set_watch(t, sv[0], 3600ull * 1000000000);
    CHECK(ivshm_bell_table_stale(t, 0) == 0, "stale with nothing to read");
    CHECK(write(sv[1], "y", 1) == 1, "write");
    CHECK(ivshm_bell_table_stale(t, 0) == 0, "looked again within the interval");
    CHECK(ivshm_bell_table_stale(t, 1) == 1, "a forced look missed the news");
    CHECK(read(sv[0], &c, 1) == 1, "read");
    ivshm_bell_table_set_watch(t, sv[0], 0);
    close(sv[1]); /* EOF is news too (the server went away) */
    CHECK(ivshm_bell_table_stale(t, 0) == 1, "EOF not reported");
    ivshm_bell_table_set_watch(t, -1, 0);
    CHECK(ivshm_bell_table_stale(t, 1) == 0, "stale after the watch fd was cleared");
    ivshm_bell_table_set_watch(t, sv[0], 0);
    ivshm_bell_table_clear(t);
    CHECK(ivshm_bell_table_stale(t, 1) == 0, "clear kept the watch fd");
    close(sv[0]);
    ivshm_bell_table_destroy(t);
    snprintf(detail, dn, "readable, drained, interval, forced, EOF, cleared");
}

/* ---------------------------------------------------------------------------------------------- */
/* readers resolve while a writer sets and clears: every fd a reader gets is the one set for that
 * (peer, vector) at some point, never another entry's.  The "fds" are made-up distinct numbers
 * (nothing is rung), 1000 + peer * 8 + vector + 100000 * round parity. */
#define RPEERS 16
#define RVEC 8

struct rw {
    struct ivshm_bell_table *t;
    int stop;
    int started;       /* readers running */
    uint64_t progress; /* lookups that found an fd so far, published every 256 */
    uint64_t hits, misses, bad;
};

static int fd_for(uint32_t peer, uint32_t vector, int round)
{
    return 1000 + (int)(peer * RVEC + vector) + (round & 1) * 100000;
}

static void *reader(void *a_)
{
    struct rw *a = a_;
    uint64_t hits = 0, misses = 0, bad = 0;
    uint32_t x = 12345;
    __atomic_add_fetch(&a->started, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&a->stop, __ATOMIC_ACQUIRE)) {
        x = x * 1103515245u + 12345u;
        uint32_t peer = (x >> 8) % RPEERS, vector = (x >> 20) % RVEC;
        struct ivshm_bell b;
        if (ivshm_bell_table_resolve(a->t, peer, vector, &b) < 0) {
            misses++;
            continue;
        }
        if ((++hits & 255) == 0)
            __atomic_add_fetch(&a->progress, 256, __ATOMIC_RELAXED);
        if (b.kind != IVSHM_BELL_EVENTFD ||
            (b.fd != fd_for(peer, vector, 0) && b.fd != fd_for(peer, vector, 1)))
            bad++;
    }
    __atomic_add_fetch(&a->hits, hits, __ATOMIC_RELAXED);
    __atomic_add_fetch(&a->misses, misses, __ATOMIC_RELAXED);
    __atomic_add_fetch(&a->bad, bad, __ATOMIC_RELAXED);
    return NULL;
}

static void table_readers_never_see_a_foreign_fd(char *detail, size_t dn)
{
    struct rw a;
    memset(&a, 0, sizeof(a));
    CHECK(ivshm_bell_table_create(IVSHM_BELL_EVENTFD, 65535, RVEC, &a.t) == 0, "create");
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        pthread_create(&th[i], NULL, reader, &a);
    while (__atomic_load_n(&a.started, __ATOMIC_ACQUIRE) < 2)
        sched_yield(); /* the readers run while the table changes, however loaded the machine */
    uint64_t rounds = tc_count(20000, 2000), want = tc_count(200000, 20000), r;
    /* go on until the readers found `want` fds between them (they share the CPUs with us) */
    for (r = 0; r < rounds || __atomic_load_n(&a.progress, __ATOMIC_RELAXED) < want; r++) {
        uint32_t peer = (uint32_t)(r % RPEERS);
        for (uint32_t v = 0; v < RVEC; v++) /* the peer (re)joins with new fds */
            ivshm_bell_table_set_fd(a.t, peer, v, fd_for(peer, v, (int)(r / RPEERS)));
        if (r % 3 == 0) /* ... and some leave again */
            ivshm_bell_table_clear_peer(a.t, (uint32_t)((r * 7) % RPEERS));
    }
    __atomic_store_n(&a.stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    ivshm_bell_table_destroy(a.t);
    CHECK(a.bad == 0, "%" PRIu64 " lookups returned another entry's fd", a.bad);
    CHECK(a.hits > 0 && a.misses > 0, "the readers never saw both a set and a cleared entry");
    snprintf(detail, dn, "%" PRIu64 " rounds, %" PRIu64 " hits, %" PRIu64 " misses", r, a.hits,
             a.misses);
}

/* ---------------------------------------------------------------------------------------------- */
/* a blocking SPSC ping-pong between two threads whose channels resolve through one bell table:
 * every message is a sleep and a doorbell, and a lost doorbell shows as a 20 s timeout */
static void channel_over_table(char *detail, size_t dn)
{
    struct ivshm_bell_table *bells = NULL;
    int fd[3];
    CHECK(ivshm_bell_table_create(IVSHM_BELL_EVENTFD, 65535, 64, &bells) == 0, "table");
    /* peer 1 sleeps on vector 1, peer 2 on vector 1; vector 0 of each is a decoy nobody sleeps on */
    for (int i = 0; i < 3; i++)
        fd[i] = ivshm_eventfd_create(1);
    CHECK(ivshm_bell_table_set_fd(bells, 1, 1, fd[1]) == 0, "set");
    CHECK(ivshm_bell_table_set_fd(bells, 2, 1, fd[2]) == 0, "set");
    CHECK(ivshm_bell_table_set_fd(bells, 1, 0, fd[0]) == 0, "set");
    CHECK(ivshm_bell_table_set_fd(bells, 2, 0, fd[0]) == 0, "set");
    struct tchan_pp p = {.resolve = ivshm_bell_table_resolve, .ctx = bells, .fd_ping = fd[2],
                         .fd_pong = fd[1], .vector = 1, .rounds = tc_count(1000, 200)};
    tchan_pingpong(&p);
    CHECK(counter_of(fd[0]) == 0, "a doorbell went to vector 0, which nobody sleeps on");
    CHECK(p.tx.unrouted == 0 && p.rx.unrouted == 0, "unrouted doorbells: %" PRIu64,
          p.tx.unrouted + p.rx.unrouted);
    snprintf(detail, dn, "%" PRIu64 " round trips, %" PRIu64 " doorbells", p.rounds,
             p.tx.doorbells + p.rx.doorbells);
    for (int i = 0; i < 3; i++)
        close(fd[i]);
    ivshm_bell_table_destroy(bells);
}

static const struct tcase cases[] = {
    {"bell_ring_sleep_take", bell_ring_sleep_take, 0},
    {"table_eventfd", table_eventfd, 0},
    {"table_mmio", table_mmio, 0},
    {"table_watch_fd", table_watch_fd, 0},
    {"table_readers_never_see_a_foreign_fd", table_readers_never_see_a_foreign_fd, 0},
    {"channel_over_table", channel_over_table, 0},
};

int main(int argc, char **argv) { return tc_main(argc, argv, cases, sizeof(cases) / sizeof(cases[0])); }
