/* ivshm_guard.c - the SIGBUS guard of shared mappings (see ivshm_guard.h).
 *
 * The registry is a fixed array; the handler reads it without locks or allocation.  Each slot has
 * a sequence word: odd while its owner changes it, even when stable.  The handler reads the
 * sequence (acquire), the fields, and the sequence again, and skips the slot unless both reads are
 * the same even value with the slot active.  A slot that is being changed is never the one that
 * faults: a mapping is added before its memory is used and removed after its last use.  Only
 * async-signal-safe calls are made in the handler: mmap, write, sigaction, raise, getpid.
 */
#include "ivshm_guard.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct guard_slot {
    uint64_t seq;          /* odd: being changed by its owner */
    uint64_t active;       /* 1: guarded */
    uintptr_t base;
    size_t len;
    volatile int *lost;
    int wake_fd;
};

static struct guard_slot slots[IVSHM_GUARD_MAX];
static unsigned long hits;

/* The disposition to chain to: two buffers, the handler reads the one `prev_idx` names, so that a
 * re-install never rewrites the buffer a running handler may be reading. */
static struct sigaction prevs[2];
static int prev_idx = -1;                 /* -1: never installed */
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;

/* Self-raised SIGBUS signals chained in a row (loop detection, see chain()). */
static unsigned self_raised_streak;
#define SELF_RAISED_LIMIT 8

static void guard_handler(int sig, siginfo_t *si, void *ctx);

static void die_by_default(int sig)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    /* blocked while this handler runs: delivered, with the default action, when it returns (and a
     * fault retried after the return faults again under the default action) */
    raise(sig);
}

static void chain(int sig, siginfo_t *si, void *ctx)
{
    int idx = __atomic_load_n(&prev_idx, __ATOMIC_ACQUIRE);
    if (idx < 0) {
        die_by_default(sig);
        return;
    }
    const struct sigaction *p = &prevs[idx];
    if (si && si->si_code == SI_TKILL && si->si_pid == getpid()) {
        /* A handler that re-raises into us (it restored us as its "previous" and raised) would
         * otherwise loop for ever. */
        if (__atomic_add_fetch(&self_raised_streak, 1, __ATOMIC_RELAXED) > SELF_RAISED_LIMIT) {
            die_by_default(sig);
            return;
        }
    } else {
        __atomic_store_n(&self_raised_streak, 0, __ATOMIC_RELAXED);
    }
    int info = (p->sa_flags & SA_SIGINFO) != 0;
    if (info && p->sa_sigaction == guard_handler) {
        die_by_default(sig);
        return;
    }
    if (!info) {
        if (p->sa_handler == SIG_IGN && si && si->si_code <= 0)
            return; /* sent by a process (kill), and ignored before the guard came */
        if (p->sa_handler == SIG_DFL || p->sa_handler == SIG_IGN) {
            /* a fault cannot be ignored: the kernel kills a process that ignores a fault's SIGBUS */
            die_by_default(sig);
            return;
        }
    }
    if (p->sa_flags & SA_RESETHAND) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
    }
    if (info)
        p->sa_sigaction(sig, si, ctx);
    else
        p->sa_handler(sig);
}

static void guard_handler(int sig, siginfo_t *si, void *ctx)
{
    int saved_errno = errno;
    if (si && si->si_code > 0) { /* raised by the kernel for a fault: si_addr is meaningful */
        uintptr_t a = (uintptr_t)si->si_addr;
        for (int i = 0; i < IVSHM_GUARD_MAX; i++) {
            struct guard_slot *s = &slots[i];
            uint64_t s1 = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
            if ((s1 & 1) || !__atomic_load_n(&s->active, __ATOMIC_RELAXED))
                continue;
            uintptr_t base = __atomic_load_n(&s->base, __ATOMIC_RELAXED);
            size_t len = __atomic_load_n(&s->len, __ATOMIC_RELAXED);
            volatile int *lost = __atomic_load_n(&s->lost, __ATOMIC_RELAXED);
            int fd = __atomic_load_n(&s->wake_fd, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (__atomic_load_n(&s->seq, __ATOMIC_RELAXED) != s1)
                continue;
            if (a - base >= len)
                continue;
            /* The flag first: a thread that reads the zero pages mapped below sees it set when
             * it checks after its operation (mmap is a full barrier). */
            if (lost)
                __atomic_store_n(lost, 1, __ATOMIC_SEQ_CST);
            void *p = mmap((void *)base, len, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            if (p == MAP_FAILED)
                break; /* cannot save it: behave as without the guard */
            __atomic_add_fetch(&hits, 1, __ATOMIC_RELAXED);
            if (fd >= 0) {
                uint64_t one = 1;
                ssize_t w = write(fd, &one, sizeof(one));
                (void)w; /* EAGAIN only if the counter is saturated: already readable */
            }
            errno = saved_errno;
            return;
        }
    }
    chain(sig, si, ctx);
    errno = saved_errno;
}

int ivshm_guard_installed(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return 0;
    return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == guard_handler;
}

int ivshm_guard_install(void)
{
    int rc = 0;
    pthread_mutex_lock(&install_lock);
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0) {
        rc = -errno;
        goto out;
    }
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == guard_handler)
        goto out;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    /* publish what to chain to before the handler can run */
    int next = __atomic_load_n(&prev_idx, __ATOMIC_RELAXED) == 0 ? 1 : 0;
    prevs[next] = cur;
    __atomic_store_n(&prev_idx, next, __ATOMIC_RELEASE);
    struct sigaction old;
    if (sigaction(SIGBUS, &sa, &old) != 0) {
        rc = -errno;
        goto out;
    }
    if (!((old.sa_flags & SA_SIGINFO) && old.sa_sigaction == guard_handler) &&
        (old.sa_handler != cur.sa_handler || old.sa_flags != cur.sa_flags)) {
        /* someone changed it between the two calls: chain to what we actually replaced */
        int other = next ^ 1;
        prevs[other] = old;
        __atomic_store_n(&prev_idx, other, __ATOMIC_RELEASE);
    }
out:
    pthread_mutex_unlock(&install_lock);
    return rc;
}

int ivshm_guard_add(void *base, size_t len, volatile int *lost, int wake_fd)
{
    if (base == NULL || len == 0 || (uintptr_t)base + len < (uintptr_t)base)
        return -EINVAL;
    int rc = ivshm_guard_install();
    if (rc)
        return rc;
    for (int i = 0; i < IVSHM_GUARD_MAX; i++) {
        struct guard_slot *s = &slots[i];
        uint64_t seq = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        if ((seq & 1) || __atomic_load_n(&s->active, __ATOMIC_RELAXED))
            continue;
        if (!__atomic_compare_exchange_n(&s->seq, &seq, seq + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_RELAXED))
            continue;
        if (__atomic_load_n(&s->active, __ATOMIC_RELAXED)) { /* taken between our two reads */
            __atomic_store_n(&s->seq, seq + 2, __ATOMIC_RELEASE);
            continue;
        }
        __atomic_store_n(&s->base, (uintptr_t)base, __ATOMIC_RELAXED);
        __atomic_store_n(&s->len, len, __ATOMIC_RELAXED);
        __atomic_store_n(&s->lost, lost, __ATOMIC_RELAXED);
        __atomic_store_n(&s->wake_fd, wake_fd, __ATOMIC_RELAXED);
        __atomic_store_n(&s->active, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&s->seq, seq + 2, __ATOMIC_RELEASE); /* pairs with the handler's acquire */
        return i;
    }
    return -ENOSPC;
}

void ivshm_guard_remove(int id)
{
    if (id < 0 || id >= IVSHM_GUARD_MAX)
        return;
    struct guard_slot *s = &slots[id];
    uint64_t seq = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
    if ((seq & 1) || !__atomic_load_n(&s->active, __ATOMIC_RELAXED))
        return;
    __atomic_store_n(&s->seq, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&s->active, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->lost, NULL, __ATOMIC_RELAXED);
    __atomic_store_n(&s->wake_fd, -1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->base, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->len, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->seq, seq + 2, __ATOMIC_RELEASE);
}

unsigned long ivshm_guard_hits(void)
{
    return __atomic_load_n(&hits, __ATOMIC_RELAXED);
}
