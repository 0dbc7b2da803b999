/* ivshm_chan.c - the wake-up protocol (see ivshm_chan.h for the rules, docs/wakeup.md for the
 * argument that no wake-up is lost).  Every atomic access names the one it pairs with. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* ppoll */
#endif
#include "ivshm_chan.h"

#include <poll.h>
#include <sched.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BACKOFF_MIN_US 50u
#define BACKOFF_MAX_US 1000u

int64_t ivshm_chan_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void stat_add(uint64_t *counter)
{
    atomic_fetch_add_explicit(IVSHM_ATOMIC(counter), 1, memory_order_relaxed);
}

int ivshm_chan_init(struct ivshm_chan *ch, uint32_t kind, void *ring, int peer, int vector,
                    int wait_fd, int cancel_fd, ivshm_chan_resolve_fn resolve, void *resolve_ctx,
                    uint64_t spin_ns, uint64_t recheck_ns)
{
    memset(ch, 0, sizeof(*ch));
    if ((kind != IVSHM_KIND_SPSC && kind != IVSHM_KIND_MPMC && kind != IVSHM_KIND_PUBSUB) ||
        ring == NULL || recheck_ns == 0)
        return -EINVAL;
    if (kind == IVSHM_KIND_PUBSUB && ivshm_pubsub_ops_of(ring) == NULL)
        return -EINVAL; /* not an attached publisher or subscriber */
    if (peer >= 0 && ((uint32_t)peer > IVSHM_MAX_PEER_ID || vector < 0 ||
                      (uint32_t)vector >= IVSHM_MAX_VECTORS))
        return -EINVAL;
    ch->kind = kind;
    if (kind == IVSHM_KIND_SPSC) {
        ch->spsc = ring;
        ch->ctrl = ch->spsc->ctrl;
    } else if (kind == IVSHM_KIND_PUBSUB) {
        ch->pubsub = ring;
        ch->ctrl = ivshm_pubsub_ctrl_of(ring);
        if (recheck_ns > ivshm_pubsub_ops_of(ring)->recheck_ns(ring))
            recheck_ns = ivshm_pubsub_ops_of(ring)->recheck_ns(ring); /* the publisher's slow_timeout */
    } else {
        ch->mpmc = ring;
        ch->ctrl = ch->mpmc->ctrl;
    }
    /* a sleeper that cannot be rung (no route, or nothing to sleep on) polls instead */
    ch->route = (peer >= 0 && wait_fd >= 0) ? IVSHM_SLEEPER_WORD(peer, vector) : 0;
    ch->wait_fd = wait_fd;
    ch->cancel_fd = cancel_fd;
    ch->cancel_fd2 = -1;
    ch->resolve = resolve;
    ch->resolve_ctx = resolve_ctx;
    ch->spin_ns = spin_ns;
    ch->recheck_ns = recheck_ns;
    ch->start_cons = ch->start_prod = (uint32_t)(peer >= 0 ? peer : 0) % IVSHM_SLEEPERS;
    return 0;
}

void ivshm_chan_call_init(struct ivshm_chan_call *call, uint32_t side, int64_t timeout_ns,
                          uint64_t need)
{
    int64_t now = ivshm_chan_now_ns();
    call->deadline_ns = timeout_ns < 0 || timeout_ns > IVSHM_CHAN_FOREVER - now
                            ? IVSHM_CHAN_FOREVER : now + timeout_ns;
    call->spin_until_ns = 0;
    call->side = side;
    call->slept = 0;
    call->need = need ? need : 1;
    call->entry = -1;
    call->backoff_us = BACKOFF_MIN_US;
    call->fd_counted = 0;
    call->claimed_early = 0;
    call->crowded = 0;
}

void ivshm_chan_call_progress(struct ivshm_chan_call *call)
{
    call->spin_until_ns = 0;
    call->backoff_us = BACKOFF_MIN_US;
}

/* -- the table of one side ---------------------------------------------------------------------- */
static uint32_t *table_of(const struct ivshm_chan *ch, uint32_t side)
{
    return side == IVSHM_CHAN_RECV ? ch->ctrl->cons_sleepers : ch->ctrl->prod_sleepers;
}

static uint32_t *waiting_of(const struct ivshm_chan *ch, uint32_t side)
{
    return side == IVSHM_CHAN_RECV ? &ch->ctrl->cons_waiting : &ch->ctrl->prod_waiting;
}

static int route_ok(uint32_t w)
{
    return (w & IVSHM_SLEEPER_ARMED) && IVSHM_SLEEPER_VECTOR(w) < IVSHM_MAX_VECTORS;
}

/* -- readiness ------------------------------------------------------------------------------------ */
int ivshm_chan_ready(const struct ivshm_chan *ch, uint32_t side, uint64_t need)
{
    if (ch->kind == IVSHM_KIND_PUBSUB) /* the handle knows its side */
        return ivshm_pubsub_ops_of(ch->pubsub)->ready(ch->pubsub, need);
    if (ch->kind == IVSHM_KIND_SPSC) {
        struct ivshm_spsc *q = ch->spsc;
        if (side == IVSHM_CHAN_RECV)
            return ivshm_spsc_stamped(q, q->tail); /* acquire: pairs with the producer's publish */
        int64_t free = ivshm_spsc_free(q, need);   /* acquire of ctrl->tail inside */
        return free < 0 || (uint64_t)free >= need;
    }
    struct ivshm_mpmc *q = ch->mpmc;
    if (side == IVSHM_CHAN_RECV) {
        uint64_t t = IVSHM_LOAD_RELAXED(&q->ctrl->tail);
        /* pairs with the producer's release store of seq = i + 1 (commit) */
        return IVSHM_LOAD_ACQUIRE(&ivshm_mpmc_slot(q, t)->seq) == (uint32_t)(t + 1);
    }
    uint64_t h = IVSHM_LOAD_RELAXED(&q->ctrl->head);
    /* pairs with the consumer's release store of seq = i + capacity (release_one) */
    return IVSHM_LOAD_ACQUIRE(&ivshm_mpmc_slot(q, h)->seq) == (uint32_t)h;
}

/* -- sleeping side -------------------------------------------------------------------------------- */
/* Tickets: bits 24..30 of an arming's word.  Sleepers with the same route (threads of one
 * channel, channels of one process on one vector) must never write equal words while one of
 * them still holds its arming: one whose entry was claimed, then re-armed by another with an
 * equal word, would read its arming as not claimed, and its disarm would take the other's
 * arming back, leaving that one asleep with no entry for any waker to claim (and the sleepers
 * of a shared fd would misjudge who was rung).  So a ticket is taken at arming and given back
 * at disarm, and is unique among this process's live armings of a vector: one set of 128 per
 * vector, whatever the peer (other processes have other peer ids). */
#define TICKETS 128u
static uint64_t ticket_map[IVSHM_MAX_VECTORS][TICKETS / 64];
static uint32_t ticket_next; /* where the next search starts (spreads the tickets) */

static int ticket_take(uint32_t vector)
{
    uint32_t start = atomic_fetch_add_explicit(IVSHM_ATOMIC(&ticket_next), 1u,
                                               memory_order_relaxed);
    for (uint32_t k = 0; k < TICKETS; k++) {
        uint32_t t = (start + k) % TICKETS;
        uint64_t bit = 1ull << (t % 64);
        /* acquire: pairs with the release in ticket_give, so that the giver's last look at an
         * entry with this ticket comes before our arming's CAS */
        if (!(atomic_fetch_or_explicit(IVSHM_ATOMIC(&ticket_map[vector][t / 64]), bit,
                                       memory_order_acquire) & bit))
            return (int)t;
    }
    return -1;
}

static void ticket_give(uint32_t word)
{
    uint32_t t = (word >> 24) & (TICKETS - 1);
    /* release: pairs with the acquire in ticket_take */
    atomic_fetch_and_explicit(IVSHM_ATOMIC(&ticket_map[IVSHM_SLEEPER_VECTOR(word)][t / 64]),
                              ~(1ull << (t % 64)), memory_order_release);
}

int ivshm_chan_arm(struct ivshm_chan *ch, struct ivshm_chan_call *call)
{
    call->entry = -1;
    if (ch->route == 0)
        return 0;
    uint32_t *table = table_of(ch, call->side);
    uint32_t *waiting = waiting_of(ch, call->side);
    uint32_t start = ch->route % IVSHM_SLEEPERS;
    /* Count ourselves BEFORE the entry shows, and uncount only after it is cleared (disarm, or
     * a waker's claim): then `waiting` is never below the number of armed entries.  Counting
     * after the entry let a waker that claimed the entry first decrement before our increment,
     * so that another sleeper's waker could read 0 and skip a table with that sleeper in it.
     * The count and the entry are ordered by the release CAS below, which the claim's acquire
     * CAS pairs with. */
    atomic_fetch_add_explicit(IVSHM_ATOMIC(waiting), 1u, memory_order_relaxed);
    /* This arming's word: the route and a ticket in bits 24..30, unique among the live armings
     * of this process on this vector (see ticket_take). */
    int ticket = ticket_take(IVSHM_SLEEPER_VECTOR(ch->route));
    if (ticket < 0) {
        atomic_fetch_sub_explicit(IVSHM_ATOMIC(waiting), 1u, memory_order_relaxed);
        return 0; /* 128 armings of this vector in this process: this one polls */
    }
    call->word = ch->route | ((uint32_t)ticket << 24);
    for (uint32_t k = 0; k < IVSHM_SLEEPERS; k++) {
        uint32_t e = (start + k) % IVSHM_SLEEPERS;
        uint32_t expect = 0;
        if (IVSHM_LOAD_RELAXED(&table[e]) != 0)
            continue;
        /* S1: pairs with the waker's load and CAS in claim_one() (through F1/F2) */
        if (atomic_compare_exchange_strong_explicit(IVSHM_ATOMIC(&table[e]), &expect, call->word,
                                                    memory_order_release, memory_order_relaxed)) {
            IVSHM_FENCE(); /* F1: pairs with F2 in ivshm_chan_wake_other / pass_on */
            stat_add(&ch->st.arms);
            call->entry = (int)e;
            return 1;
        }
    }
    ticket_give(call->word);
    atomic_fetch_sub_explicit(IVSHM_ATOMIC(waiting), 1u, memory_order_relaxed);
    return 0; /* the table is full: this call polls */
}

void ivshm_chan_disarm(struct ivshm_chan *ch, struct ivshm_chan_call *call)
{
    if (call->entry < 0)
        return;
    uint32_t *slot = &table_of(ch, call->side)[call->entry];
    uint32_t expect = call->word;
    call->entry = -1;
    /* Take the entry back.  A failed CAS means a waker claimed it (and decremented `waiting`):
     * its ring is on the way or already in the eventfd; the next sleep absorbs it. */
    if (atomic_compare_exchange_strong_explicit(IVSHM_ATOMIC(slot), &expect, 0u,
                                                memory_order_relaxed, memory_order_relaxed))
        atomic_fetch_sub_explicit(IVSHM_ATOMIC(waiting_of(ch, call->side)), 1u,
                                  memory_order_relaxed);
    ticket_give(call->word); /* after the CAS: the last look at the entry with this word */
}

/* The fds that cancel a wait, into fds[]; their number. */
static int cancel_fds(const struct ivshm_chan *ch, int *fds)
{
    int n = 0;
    if (ch->cancel_fd >= 0)
        fds[n++] = ch->cancel_fd;
    if (ch->cancel_fd2 >= 0)
        fds[n++] = ch->cancel_fd2;
    return n;
}

/* Was the entry this call holds claimed by a waker (rung for us)?  Only while it holds one. */
static int claimed(const struct ivshm_chan *ch, const struct ivshm_chan_call *call)
{
    if (call->entry < 0)
        return 0;
    return IVSHM_LOAD_RELAXED(&table_of(ch, call->side)[call->entry]) != call->word;
}

/* fd_share's spin lock (process-local; held for a walk of its list, never across a call). */
static void share_lock(struct ivshm_fd_share *sh)
{
    /* acquire: pairs with the release in share_unlock */
    while (atomic_exchange_explicit(IVSHM_ATOMIC(&sh->lock), 1u, memory_order_acquire) != 0)
        while (IVSHM_LOAD_RELAXED(&sh->lock) != 0)
            sched_yield();
}

static void share_unlock(struct ivshm_fd_share *sh)
{
    IVSHM_STORE_RELEASE(&sh->lock, 0u); /* pairs with the acquire in share_lock */
}

/* How many units the other sleepers of this process on the fd still need: those whose entry a
 * waker claimed (so a ring for them is in the fd, or on its way) and that have not taken one.
 * *alone: nobody else is counted. */
static uint64_t others_owed(const struct ivshm_chan *ch, const struct ivshm_chan_call *call,
                            int *alone)
{
    struct ivshm_fd_share *sh = ch->fd_share;
    *alone = 1;
    if (sh == NULL)
        return 0;
    uint32_t me = call->fd_counted != 0;
    /* seq_cst: pairs with the count in ivshm_chan_sleep_begin.  A sleeper B rung, but not yet
     * counted when this load ran, sees its claim in sleep_begin's look and does not sleep: the
     * count, that look, the claim's CAS and this load are sequentially consistent, and the claim
     * comes before the ring we took. */
    if (atomic_load_explicit(IVSHM_ATOMIC(&sh->count), memory_order_seq_cst) <= me)
        return 0;
    *alone = 0;
    uint64_t owed = 0;
    /* Under the lock, a listed sleeper's entry is armed and mapped: its sleeper is between
     * sleep_begin and sleep_end.  A sleeper counted after our eventfd read registered after the
     * claim behind the units we took (the claim, the ring, our read, then its registration under
     * this lock), so its look in sleep_begin sees the claim; one registered before we hold the
     * lock is scanned here, and the claim is visible to this load. */
    share_lock(sh);
    for (const struct ivshm_fd_sleeper *o = sh->head; o != NULL; o = o->next) {
        /* seq_cst: pairs with the claim's CAS in claim_one */
        if (o != &call->fd_node && atomic_load_explicit(IVSHM_ATOMIC(o->entry),
                                                       memory_order_seq_cst) != o->word &&
            !IVSHM_LOAD_RELAXED(&o->took)) /* pairs with the store in ivshm_chan_absorb */
            owed++;
    }
    share_unlock(sh);
    return owed;
}

/* Read the units in wait_fd and settle them: keep one if `own` (this call was rung and
 * counted before its claim), put back what the other sleepers of the fd were rung for and have
 * not taken (others_owed), drop the rest.  1 if a unit was kept or the call is alone on the fd
 * (what it read was its own or strays), 0 if not or nothing was there, -errno. */
static int settle(struct ivshm_chan *ch, struct ivshm_chan_call *call, int own)
{
    uint64_t v;
    /* EAGAIN (nothing: another reader was first) reads as 0 */
    int rc = ivshm_eventfd_take(ch->wait_fd, &v);
    if (rc < 0)
        return rc;
    if (v == 0)
        return 0;
    int alone;
    uint64_t owed = others_owed(ch, call, &alone);
    uint64_t rest = own ? v - 1 : v;
    uint64_t back = rest < owed ? rest : owed;
    if (own && call->fd_counted) /* pairs with the load in others_owed */
        IVSHM_STORE_RELAXED(&call->fd_node.took, 1u);
    if (back > 0) {
        ssize_t w = write(ch->wait_fd, &back, sizeof(back));
        (void)w; /* EAGAIN: the counter is full, which wakes the others just as well */
        if (!own) {
            sched_yield(); /* let the sleepers they are for run */
            /* and do not poll the fd at once again: it stays readable until they take them */
            call->crowded = 1;
        }
    }
    return own || alone;
}

int ivshm_chan_absorb(struct ivshm_chan *ch, struct ivshm_chan_call *call)
{
    /* Sleepers of this process may share the fd: channels on other rings with the same vector,
     * or threads on one channel.  Each ring is one unit meant for one claimed sleeper.  A call
     * that was claimed while it slept counted keeps one unit.  Of the rest, it puts back as many
     * as the other sleepers on the fd were rung for and have not taken, and yields if it was not
     * claimed itself, so that they run.  What is left are strays (rings of a sleeper's earlier
     * arming that found work in its re-check, of sleepers that left): dropped, so that they do
     * not wake idle sleepers again and again.  A call that saw its claim in sleep_begin keeps
     * nothing: its own ring may be gone already (dropped by a sleeper that read it before this
     * call was counted), and a unit it kept could be another sleeper's. */
    int rc = settle(ch, call, claimed(ch, call) && !call->claimed_early);
    if (rc > 0)
        stat_add(&ch->st.wakeups);
    return rc;
}

int ivshm_chan_sleep_begin(struct ivshm_chan *ch, struct ivshm_chan_call *call)
{
    stat_add(&ch->st.sleeps);
    call->fd_counted = 0;
    call->claimed_early = 0;
    if (call->entry < 0)
        return 0; /* not armed: it does not sleep on the fd */
    const uint32_t *entry = &table_of(ch, call->side)[call->entry];
    struct ivshm_fd_share *sh = ch->fd_share;
    if (sh) {
        struct ivshm_fd_sleeper *n = &call->fd_node;
        n->entry = entry;
        n->word = call->word;
        IVSHM_STORE_RELAXED(&n->took, 0u);
        n->prev = NULL;
        share_lock(sh);
        n->next = sh->head;
        if (sh->head)
            sh->head->prev = n;
        sh->head = n;
        /* seq_cst: pairs with the load in others_owed */
        atomic_fetch_add_explicit(IVSHM_ATOMIC(&sh->count), 1u, memory_order_seq_cst);
        share_unlock(sh);
        call->fd_counted = 1;
    }
    /* Claimed already (between the re-check and here)?  Then do not sleep: another sleeper of
     * this fd that woke before we were counted may have taken our ring, thinking itself alone or
     * not seeing us in the list.  Either it sees us counted and listed (and puts our ring
     * back), or we see the claim here (see others_owed).  Every sleeper on a shared fd needs
     * this look, the event loops' as much as ivshm_chan_wait's. */
    if (atomic_load_explicit(IVSHM_ATOMIC(entry), memory_order_seq_cst) == call->word)
        return 0;
    /* Its ring is no longer this call's to take (see ivshm_chan_absorb): say so to the others,
     * so that they do not put a unit back for it. */
    call->claimed_early = 1;
    if (call->fd_counted) /* pairs with the load in others_owed */
        IVSHM_STORE_RELAXED(&call->fd_node.took, 1u);
    return 1;
}

void ivshm_chan_sleep_end(struct ivshm_chan *ch, struct ivshm_chan_call *call)
{
    struct ivshm_fd_share *sh = ch->fd_share;
    if (sh != NULL && call->fd_counted) {
        struct ivshm_fd_sleeper *n = &call->fd_node;
        share_lock(sh);
        if (n->prev)
            n->prev->next = n->next;
        else
            sh->head = n->next;
        if (n->next)
            n->next->prev = n->prev;
        atomic_fetch_sub_explicit(IVSHM_ATOMIC(&sh->count), 1u, memory_order_relaxed);
        share_unlock(sh);
    }
    call->fd_counted = 0;
}

int ivshm_chan_sleep_on_fd(struct ivshm_chan *ch, struct ivshm_chan_call *call)
{
    if (call->entry < 0 || ch->wait_fd < 0)
        return 0;
    if (call->crowded) {
        call->crowded = 0; /* one back-off step, then the fd again */
        return 0;
    }
    return 1;
}

int64_t ivshm_chan_backoff_ns(struct ivshm_chan_call *call)
{
    int64_t ns = (int64_t)call->backoff_us * 1000;
    if (call->backoff_us < BACKOFF_MAX_US)
        call->backoff_us *= 2;
    return ns;
}

/* The count of rings that sleepers on this channel's fd left unread (see sleep_fd). */
static uint32_t *unread_of(struct ivshm_chan *ch)
{
    return ch->fd_share ? &ch->fd_share->unread : &ch->unread;
}

/* Before arming: take the rings that sleepers woken alone left in wait_fd (sleep_fd), which
 * would otherwise end this sleep at once.  Like ivshm_chan_absorb for a sleeper that was not
 * rung: what other sleepers of the fd were rung for and have not taken goes back, the rest
 * (those rings, strays) is dropped.  This call is not armed, so none of it is its own. */
static void take_unread(struct ivshm_chan *ch)
{
    uint32_t *unread = unread_of(ch);
    if (IVSHM_LOAD_RELAXED(unread) == 0)
        return;
    IVSHM_STORE_RELAXED(unread, 0u); /* one left after this store ends a later sleep: absorbed */
    struct ivshm_chan_call none = {.entry = -1, .fd_counted = 0};
    (void)settle(ch, &none, 0);
}

/* Sleep on wait_fd (and the cancel fds) for up to `ms`.  1 woken (rung, or a ring for another
 * sleeper of this fd), 0 timed out, -ECANCELED, -errno. */
static int sleep_fd(struct ivshm_chan *ch, struct ivshm_chan_call *call, int ms)
{
    int cancel[2];
    int rc = ivshm_bell_sleep(ch->wait_fd, cancel, cancel_fds(ch, cancel), ms);
    if (rc <= 0)
        return rc;
    /* Rung for this call, and nobody else of the process sleeps on the fd: leave the unit(s) in
     * the fd and go to the ring; the next sleep takes them before it arms (take_unread).  The
     * read would cost a system call here, on the wake-up's path.  Nothing is taken, so nobody's
     * ring is lost: a sleeper that joins meanwhile wakes once, finds this one's ring taken,
     * and drops the unit. */
    if (claimed(ch, call) &&
        (ch->fd_share == NULL || IVSHM_LOAD_RELAXED(&ch->fd_share->count) <= 1)) {
        if (call->fd_counted) /* pairs with the load in others_owed */
            IVSHM_STORE_RELAXED(&call->fd_node.took, 1u);
        atomic_fetch_add_explicit(IVSHM_ATOMIC(unread_of(ch)), 1u, memory_order_relaxed);
        stat_add(&ch->st.wakeups);
        return 1;
    }
    rc = ivshm_chan_absorb(ch, call);
    return rc < 0 ? rc : 1;
}

/* No doorbell to sleep on (no route, or the table is full): sleep a back-off step, waking at
 * once if cancel_fd fires.  0 slept, -ECANCELED, -EINTR, -errno. */
static int sleep_poll(struct ivshm_chan *ch, struct ivshm_chan_call *call, int64_t max_ns)
{
    int64_t ns = ivshm_chan_backoff_ns(call);
    if (ns > max_ns)
        ns = max_ns > 0 ? max_ns : 0;
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    int cancel[2];
    struct pollfd p[2];
    int nc = cancel_fds(ch, cancel);
    for (int i = 0; i < nc; i++)
        p[i] = (struct pollfd){.fd = cancel[i], .events = POLLIN, .revents = 0};
    int n = ppoll(p, (nfds_t)nc, &ts, NULL);
    if (n < 0)
        return -errno;
    return n > 0 ? -ECANCELED : 0;
}

int ivshm_chan_wait(struct ivshm_chan *ch, struct ivshm_chan_call *call)
{
    int64_t now = ivshm_chan_now_ns();
    if (now >= call->deadline_ns)
        return 0;
    if (call->spin_until_ns == 0) {
        call->spin_until_ns = now + (int64_t)ch->spin_ns;
        while (now < call->spin_until_ns && now < call->deadline_ns) {
            for (int k = 0; k < 16; k++) {
                if (ivshm_chan_ready(ch, call->side, call->need))
                    return 1;
                IVSHM_CPU_RELAX();
            }
            now = ivshm_chan_now_ns();
        }
        if (now >= call->deadline_ns)
            return 0;
    }
    /* no separate look at the cancel fds: the sleep below polls them with the doorbell */
    int64_t span = call->deadline_ns - now;
    if (span > (int64_t)ch->recheck_ns)
        span = (int64_t)ch->recheck_ns;
    if (ch->wait_fd >= 0)
        take_unread(ch);
    int armed = ivshm_chan_arm(ch, call);
    /* L1: the re-check after F1 (inside arm) */
    if (ivshm_chan_ready(ch, call->side, call->need)) {
        ivshm_chan_disarm(ch, call);
        return 1;
    }
    call->slept++;
    int rc;
    if (armed) {
        int64_t ms = (span + 999999) / 1000000;
        if (ivshm_chan_sleep_begin(ch, call)) { /* claimed already: see there */
            /* Rung before sleeping: this call does not sleep (and is not counted as a sleep or
             * a wake-up).  What is in the fd is settled as by a sleeper that was not rung: the
             * strays, its own ring among them if it is there, are dropped, so that they do not
             * end the next sleep at once. */
            atomic_fetch_sub_explicit(IVSHM_ATOMIC(&ch->st.sleeps), 1, memory_order_relaxed);
            int took = settle(ch, call, 0);
            rc = took < 0 ? took : 1;
        } else if (ivshm_chan_sleep_on_fd(ch, call)) {
            rc = sleep_fd(ch, call, ms > 0x7fffffff ? 0x7fffffff : (int)ms);
        } else {
            /* The fd holds rings that other sleepers have not taken yet (polling it would end
             * at once, again and again): sleep back-off steps until this call is rung, they
             * took their rings, or the span ends; then absorb as if woken. */
            int64_t until = ivshm_chan_now_ns() + span;
            int alone;
            do
                rc = sleep_poll(ch, call, until - ivshm_chan_now_ns());
            while (rc == 0 && !claimed(ch, call) && others_owed(ch, call, &alone) > 0 &&
                   ivshm_chan_now_ns() < until);
            if (rc == 0) {
                int took = ivshm_chan_absorb(ch, call);
                rc = took < 0 ? took : 1;
            }
        }
        ivshm_chan_sleep_end(ch, call);
    } else {
        stat_add(&ch->st.sleeps);
        rc = sleep_poll(ch, call, span);
    }
    ivshm_chan_disarm(ch, call);
    if (rc == -ECANCELED || rc == -EINTR || (rc < 0 && rc != -EAGAIN))
        return rc;
    if (ivshm_chan_now_ns() >= call->deadline_ns && !ivshm_chan_ready(ch, call->side, call->need))
        return 0;
    return 1;
}

/* -- waking side ---------------------------------------------------------------------------------- */
/* Claim one armed sleeper of `side` and ring it.  The caller has issued F2.  1 rung, 0 none. */
static int claim_one(struct ivshm_chan *ch, uint32_t side, int passing_on)
{
    uint32_t *waiting = waiting_of(ch, side);
    /* L2: pairs with S1 (the sleeper's count) through F1/F2 */
    if (IVSHM_LOAD_RELAXED(waiting) == 0)
        return 0;
    uint32_t *table = table_of(ch, side);
    uint32_t *startp = side == IVSHM_CHAN_RECV ? &ch->start_cons : &ch->start_prod;
    uint32_t start = IVSHM_LOAD_RELAXED(startp) % IVSHM_SLEEPERS;
    for (uint32_t k = 0; k < IVSHM_SLEEPERS; k++) {
        uint32_t e = (start + k) % IVSHM_SLEEPERS;
        uint32_t w = IVSHM_LOAD_RELAXED(&table[e]); /* L2: pairs with S1 through F1/F2 */
        if (w == 0 || !route_ok(w))
            continue;
        /* claim: pairs with the sleeper's CAS in ivshm_chan_disarm (exactly one of us wins);
         * acquire: pairs with the arming CAS, so our decrement follows the sleeper's increment;
         * seq_cst: pairs with the sleeper's look at its entry before it sleeps (ivshm_chan_wait) */
        if (!atomic_compare_exchange_strong_explicit(IVSHM_ATOMIC(&table[e]), &w, 0u,
                                                     memory_order_seq_cst, memory_order_relaxed))
            continue;
        atomic_fetch_sub_explicit(IVSHM_ATOMIC(waiting), 1u, memory_order_relaxed);
        IVSHM_STORE_RELAXED(startp, e + 1); /* the next waker starts past this one */
        struct ivshm_bell bell = {.kind = IVSHM_BELL_NONE, .fd = -1, .reg = NULL, .value = 0};
        if (ch->resolve == NULL ||
            ch->resolve(ch->resolve_ctx, IVSHM_SLEEPER_PEER(w), IVSHM_SLEEPER_VECTOR(w), &bell) < 0 ||
            bell.kind == IVSHM_BELL_NONE || ivshm_bell_ring(&bell) < 0) {
            /* a sleeper we cannot reach (gone, or not known yet): it re-checks by itself; try
             * the next one so that this publish still wakes somebody who can act on it */
            stat_add(&ch->st.unrouted);
            continue;
        }
        stat_add(passing_on ? &ch->st.passes : &ch->st.doorbells);
        return 1;
    }
    return 0;
}

int ivshm_chan_wake_other(struct ivshm_chan *ch, uint32_t my_side)
{
    IVSHM_FENCE(); /* F2: pairs with F1 in ivshm_chan_arm (the publish or release is S2) */
    return claim_one(ch, my_side == IVSHM_CHAN_RECV ? IVSHM_CHAN_SEND : IVSHM_CHAN_RECV, 0);
}

int ivshm_chan_wake_all(struct ivshm_chan *ch, uint32_t my_side)
{
    IVSHM_FENCE(); /* F2: pairs with F1 in ivshm_chan_arm (the publish is S2) */
    uint32_t side = my_side == IVSHM_CHAN_RECV ? IVSHM_CHAN_SEND : IVSHM_CHAN_RECV;
    int rung = 0;
    /* claim_one rings one armed sleeper per call and returns 0 once none is left (or none it can
     * reach); at most one claim per table entry, so this ends after IVSHM_SLEEPERS rings */
    for (uint32_t k = 0; k < IVSHM_SLEEPERS && claim_one(ch, side, 0); k++)
        rung++;
    return rung;
}

void ivshm_chan_pass_on(struct ivshm_chan *ch, struct ivshm_chan_call *call)
{
    /* publish-subscribe needs no pass-on: the publisher rings every sleeper itself, and one
     * subscriber's readiness says nothing about another's */
    if (call->slept == 0 || ch->kind == IVSHM_KIND_PUBSUB)
        return;
    IVSHM_FENCE(); /* F2 again: our view of the ring against new sleepers' F1 */
    if (ivshm_chan_ready(ch, call->side, call->need))
        claim_one(ch, call->side, 1);
}

/* -- blocking send and receive for C programs ----------------------------------------------------- */
static int try_send(struct ivshm_chan *ch, const void *data, uint64_t len)
{
    if (ch->kind == IVSHM_KIND_PUBSUB)
        return ivshm_pubsub_ops_of(ch->pubsub)->try_send(ch->pubsub, data, len);
    return ch->kind == IVSHM_KIND_SPSC ? ivshm_spsc_try_send(ch->spsc, data, len)
                                       : ivshm_mpmc_try_send(ch->mpmc, data, len);
}

int ivshm_chan_send(struct ivshm_chan *ch, const void *data, uint64_t len, int64_t timeout_ns)
{
    int rc = try_send(ch, data, len);
    if (rc == -EAGAIN) {
        struct ivshm_chan_call call;
        uint64_t need = ch->kind == IVSHM_KIND_SPSC ? ivshm_spsc_slots_for(ch->spsc, len) : 1;
        ivshm_chan_call_init(&call, IVSHM_CHAN_SEND, timeout_ns, need);
        for (;;) {
            int w = ivshm_chan_wait(ch, &call);
            if (w == -EINTR)
                continue;
            if (w < 0 || w == 0) {
                ivshm_chan_pass_on(ch, &call);
                return w == 0 ? -ETIMEDOUT : w;
            }
            rc = try_send(ch, data, len);
            if (rc != -EAGAIN)
                break;
        }
        ivshm_chan_pass_on(ch, &call);
    }
    if (rc == 0) {
        if (ch->kind == IVSHM_KIND_PUBSUB)
            ivshm_chan_wake_all(ch, IVSHM_CHAN_SEND);
        else
            ivshm_chan_wake_other(ch, IVSHM_CHAN_SEND);
    }
    return rc;
}

static int64_t try_recv(struct ivshm_chan *ch, void *buf, uint64_t cap, uint64_t *needed)
{
    if (ch->kind == IVSHM_KIND_PUBSUB)
        return ivshm_pubsub_ops_of(ch->pubsub)->try_recv(ch->pubsub, buf, cap, needed);
    return ch->kind == IVSHM_KIND_SPSC ? ivshm_spsc_try_recv(ch->spsc, buf, cap, needed)
                                       : ivshm_mpmc_try_recv(ch->mpmc, buf, cap, needed);
}

int64_t ivshm_chan_recv(struct ivshm_chan *ch, void *buf, uint64_t cap, uint64_t *needed,
                        int64_t timeout_ns)
{
    int64_t n = try_recv(ch, buf, cap, needed);
    if (n == -EAGAIN) {
        struct ivshm_chan_call call;
        ivshm_chan_call_init(&call, IVSHM_CHAN_RECV, timeout_ns, 1);
        for (;;) {
            int w = ivshm_chan_wait(ch, &call);
            if (w == -EINTR)
                continue;
            if (w <= 0) {
                ivshm_chan_pass_on(ch, &call);
                return w == 0 ? -ETIMEDOUT : w;
            }
            n = try_recv(ch, buf, cap, needed);
            if (n != -EAGAIN)
                break;
        }
        ivshm_chan_pass_on(ch, &call);
    }
    if (n >= 0)
        ivshm_chan_wake_other(ch, IVSHM_CHAN_RECV);
    return n;
}

void ivshm_chan_get_stats(const struct ivshm_chan *ch, struct ivshm_chan_stats *out)
{
    const uint64_t *src[] = {&ch->st.doorbells, &ch->st.sleeps, &ch->st.wakeups,
                             &ch->st.unrouted, &ch->st.passes, &ch->st.arms};
    uint64_t *dst[] = {&out->doorbells, &out->sleeps, &out->wakeups, &out->unrouted, &out->passes,
                       &out->arms};
    for (unsigned i = 0; i < sizeof(src) / sizeof(src[0]); i++)
        *dst[i] = atomic_load_explicit(IVSHM_ATOMIC((uint64_t *)src[i]), memory_order_relaxed);
}
