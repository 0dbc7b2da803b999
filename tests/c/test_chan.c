/* test_chan.c - the wake-up protocol of ivshm_chan: several sleepers on each side, close against
 * blocked calls, shared routes, a hostile sleeper table.  Re-checks are 60 s apart and spinning
 * is off, so every message below is delivered by a doorbell: a lost wake-up shows as a receive
 * that times out (FAIL "lost wake-up"), never as a slow pass. */
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "ivshm_chan.h"
#include "tcommon.h"
#include "tchan.h"

#define MAXP 8

/* A doorbell table: peer id -> its eventfd (vector 0). */
struct bells {
    int fd[MAXP];
    int bad_calls; /* resolver calls with out-of-range values (must stay 0) */
};

static int resolve(void *ctx, uint32_t peer, uint32_t vector, struct ivshm_bell *out)
{
    struct bells *b = ctx;
    if (peer >= MAXP || vector != 0) {
        __atomic_add_fetch(&b->bad_calls, 1, __ATOMIC_RELAXED);
        return -ENOENT;
    }
    if (b->fd[peer] < 0)
        return -ENOENT;
    out->kind = IVSHM_BELL_EVENTFD;
    out->fd = b->fd[peer];
    return 0;
}

static void bells_open(struct bells *b)
{
    memset(b, 0, sizeof(*b));
    for (int i = 0; i < MAXP; i++)
        b->fd[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

static void bells_close(struct bells *b)
{
    for (int i = 0; i < MAXP; i++)
        if (b->fd[i] >= 0)
            close(b->fd[i]);
}

/* ---------------------------------------------------------------------------------------------- */
/* several consumers asleep on one MPMC ring, messages sent one at a time */

struct mctx {
    struct tregion t;
    struct ivshm_ring_info info;
    struct bells bells;
    int cancel_fd;
    uint64_t n;
    uint8_t *seen;
    uint64_t received;
    uint64_t sleeps;
    int shared_route; /* all consumers use peer 1's route and eventfd */
    struct ivshm_fd_share fd_share; /* their sleepers on it (ivshm_chan.h) */
};

struct cons_arg {
    struct mctx *m;
    int peer;
};

static void *consumer(void *p)
{
    struct cons_arg *a = p;
    struct mctx *m = a->m;
    struct ivshm_mpmc q;
    const char *why = NULL;
    CHECKP(ivshm_mpmc_attach(&q, &m->t.r, &m->info, &why) == 0, "attach: %s", why);
    struct ivshm_chan ch;
    int peer = m->shared_route ? 1 : a->peer;
    CHECKP(ivshm_chan_init(&ch, IVSHM_KIND_MPMC, &q, peer, 0, m->bells.fd[peer], m->cancel_fd,
                           resolve, &m->bells, 0, RECHECK_NS) == 0, "init");
    if (m->shared_route)
        ch.fd_share = &m->fd_share; /* the consumers share one eventfd: say so */
    for (;;) {
        uint64_t v;
        int64_t n = ivshm_chan_recv(&ch, &v, sizeof(v), NULL, LOST_NS);
        if (n == -ECANCELED)
            break;
        CHECKP(n != -ETIMEDOUT, "lost wake-up: consumer %d slept %.0f s with nothing delivered",
               a->peer, LOST_NS / 1e9);
        CHECKP(n == (int64_t)sizeof(v), "recv returned %" PRId64, n);
        CHECKP(v < m->n, "value %" PRIu64 " out of range", v);
        CHECKP(__atomic_exchange_n(&m->seen[v], 1, __ATOMIC_RELAXED) == 0, "%" PRIu64 " twice", v);
        __atomic_add_fetch(&m->received, 1, __ATOMIC_RELEASE);
    }
    struct ivshm_chan_stats st;
    ivshm_chan_get_stats(&ch, &st);
    __atomic_add_fetch(&m->sleeps, st.sleeps, __ATOMIC_RELAXED);
    return NULL;
}

static void run_sleepy_consumers(char *detail, size_t dn, int nthreads, int shared_route)
{
    struct mctx m;
    memset(&m, 0, sizeof(m));
    m.n = tc_count(1000, 200);
    m.shared_route = shared_route;
    CHECK(tregion_new(&m.t, 1 << 16) == 0, "region");
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&m.t.r, "m", IVSHM_KIND_MPMC, 8, 16, 1, 0, &m.info, &why) == 0,
          "ring: %s", why);
    bells_open(&m.bells);
    m.cancel_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    m.seen = calloc(m.n, 1);
    pthread_t th[MAXP];
    struct cons_arg args[MAXP];
    for (int i = 0; i < nthreads; i++) {
        args[i] = (struct cons_arg){&m, i + 1};
        pthread_create(&th[i], NULL, consumer, &args[i]);
    }
    struct ivshm_mpmc q;
    CHECK(ivshm_mpmc_attach(&q, &m.t.r, &m.info, &why) == 0, "attach");
    struct ivshm_chan ch;
    CHECK(ivshm_chan_init(&ch, IVSHM_KIND_MPMC, &q, 0, 0, m.bells.fd[0], -1, resolve, &m.bells, 0,
                          RECHECK_NS) == 0, "init");
    for (uint64_t i = 0; i < m.n && !tc_failed(); i++) {
        /* wait until the consumers are asleep again, now and then, so most sends find sleepers */
        {
            /* wait (up to 200 ms: a slow sanitizer build on a busy machine) until every consumer
             * is asleep again, so that the messages go to sleepers, one at a time */
            struct ivshm_ring_ctrl *c = (struct ivshm_ring_ctrl *)(m.t.mem + m.info.offset);
            int64_t until = ivshm_chan_now_ns() + 200000000;
            while (__atomic_load_n(&c->cons_waiting, __ATOMIC_RELAXED) < (uint32_t)nthreads &&
                   ivshm_chan_now_ns() < until)
                sched_yield();
        }
        CHECK(ivshm_chan_send(&ch, &i, sizeof(i), LOST_NS) == 0, "send %" PRIu64, i);
        int64_t t0 = ivshm_chan_now_ns();
        while (__atomic_load_n(&m.received, __ATOMIC_ACQUIRE) <= i && !tc_failed()) {
            if (ivshm_chan_now_ns() - t0 > LOST_NS) {
                tc_fail(__FILE__, __LINE__, "lost wake-up: message %" PRIu64 " not received", i);
                break;
            }
            sched_yield();
        }
    }
    uint64_t one = 1;
    CHECK(write(m.cancel_fd, &one, sizeof(one)) == sizeof(one), "cancel");
    for (int i = 0; i < nthreads; i++)
        pthread_join(th[i], NULL);
    if (!tc_failed()) {
        for (uint64_t i = 0; i < m.n; i++)
            CHECK(m.seen[i], "message %" PRIu64 " lost", i);
        CHECK(m.sleeps > m.n / 2, "consumers slept only %" PRIu64 " times", m.sleeps);
        CHECK(m.bells.bad_calls == 0, "resolver got bad routes");
        struct ivshm_ring_ctrl *c = (struct ivshm_ring_ctrl *)(m.t.mem + m.info.offset);
        CHECK(c->cons_waiting == 0, "%u sleepers left armed", c->cons_waiting);
        for (unsigned e = 0; e < IVSHM_SLEEPERS; e++)
            CHECK(c->cons_sleepers[e] == 0, "entry %u left armed", e);
    }
    snprintf(detail, dn, "%" PRIu64 " messages, %d sleepers, %" PRIu64 " sleeps", m.n, nthreads,
             m.sleeps);
    free(m.seen);
    close(m.cancel_fd);
    bells_close(&m.bells);
    tregion_free(&m.t);
}

static void multi_sleeper_consumers(char *d, size_t n) { run_sleepy_consumers(d, n, 4, 0); }
static void shared_route_consumers(char *d, size_t n) { run_sleepy_consumers(d, n, 3, 1); }

/* ---------------------------------------------------------------------------------------------- */
/* several producers asleep on a full MPMC ring, one slow consumer */

struct pctx {
    struct tregion t;
    struct ivshm_ring_info info;
    struct bells bells;
    uint64_t per;
};

struct prod_arg {
    struct pctx *p;
    int peer;
};

static void *producer(void *a_)
{
    struct prod_arg *a = a_;
    struct ivshm_mpmc q;
    const char *why = NULL;
    CHECKP(ivshm_mpmc_attach(&q, &a->p->t.r, &a->p->info, &why) == 0, "attach");
    struct ivshm_chan ch;
    CHECKP(ivshm_chan_init(&ch, IVSHM_KIND_MPMC, &q, a->peer, 0, a->p->bells.fd[a->peer], -1,
                           resolve, &a->p->bells, 0, RECHECK_NS) == 0, "init");
    for (uint64_t i = 0; i < a->p->per && !tc_failed(); i++) {
        uint64_t v = ((uint64_t)a->peer << 32) | i;
        int rc = ivshm_chan_send(&ch, &v, sizeof(v), LOST_NS);
        CHECKP(rc != -ETIMEDOUT, "lost wake-up: producer %d blocked on a ring with room", a->peer);
        CHECKP(rc == 0, "send: %d", rc);
    }
    return NULL;
}

static void multi_sleeper_producers(char *detail, size_t dn)
{
    struct pctx p;
    memset(&p, 0, sizeof(p));
    p.per = tc_count(300, 50);
    const int np = 4;
    CHECK(tregion_new(&p.t, 1 << 16) == 0, "region");
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&p.t.r, "p", IVSHM_KIND_MPMC, 8, 2, 1, 0, &p.info, &why) == 0,
          "ring: %s", why);
    bells_open(&p.bells);
    pthread_t th[MAXP];
    struct prod_arg args[MAXP];
    for (int i = 0; i < np; i++) {
        args[i] = (struct prod_arg){&p, i + 1};
        pthread_create(&th[i], NULL, producer, &args[i]);
    }
    struct ivshm_mpmc q;
    CHECK(ivshm_mpmc_attach(&q, &p.t.r, &p.info, &why) == 0, "attach");
    struct ivshm_chan ch;
    CHECK(ivshm_chan_init(&ch, IVSHM_KIND_MPMC, &q, 0, 0, p.bells.fd[0], -1, resolve, &p.bells, 0,
                          RECHECK_NS) == 0, "init");
    uint64_t next[MAXP] = {0}, total = 0;
    while (total < p.per * np && !tc_failed()) {
        uint64_t v;
        int64_t n = ivshm_chan_recv(&ch, &v, sizeof(v), NULL, LOST_NS);
        CHECK(n != -ETIMEDOUT, "lost wake-up on the consumer side");
        CHECK(n == 8, "recv %" PRId64, n);
        uint32_t who = (uint32_t)(v >> 32);
        CHECK(who >= 1 && who <= (uint32_t)np, "producer %u", who);
        CHECK((uint32_t)v == next[who], "producer %u: got %u, expected %" PRIu64, who, (uint32_t)v,
              next[who]);
        next[who]++;
        total++;
        if (total % 4 == 0) /* let the producers fall asleep on the full ring */
            for (int k = 0; k < 50; k++)
                sched_yield();
    }
    for (int i = 0; i < np; i++)
        pthread_join(th[i], NULL);
    snprintf(detail, dn, "%" PRIu64 " messages from %d sleeping producers", total, np);
    bells_close(&p.bells);
    tregion_free(&p.t);
}

/* ---------------------------------------------------------------------------------------------- */
/* SPSC ping-pong, both sides blocking, no spinning: every message is a sleep and a doorbell */

static void spsc_pingpong(char *detail, size_t dn)
{
    struct bells bells;
    bells_open(&bells);
    struct tchan_pp p = {.resolve = resolve, .ctx = &bells, .fd_ping = bells.fd[2],
                         .fd_pong = bells.fd[1], .vector = 0, .rounds = tc_count(2000, 300)};
    tchan_pingpong(&p);
    snprintf(detail, dn, "%" PRIu64 " round trips, %" PRIu64 " sleeps", p.rounds, p.rx.sleeps);
    bells_close(&bells);
}

/* ---------------------------------------------------------------------------------------------- */
/* closing: a cancel fd wakes every blocked call at once, on both sides */

struct cctx {
    struct tregion t;
    struct ivshm_ring_info info;
    struct bells bells;
    int cancel_fd;
    int side;
    int rc;
};

static void *blocked(void *c_)
{
    struct cctx *c = c_;
    struct ivshm_mpmc q;
    const char *why = NULL;
    CHECKP(ivshm_mpmc_attach(&q, &c->t.r, &c->info, &why) == 0, "attach");
    struct ivshm_chan ch;
    ivshm_chan_init(&ch, IVSHM_KIND_MPMC, &q, 3, 0, c->bells.fd[3], c->cancel_fd, resolve,
                    &c->bells, 0, RECHECK_NS);
    uint64_t v = 7;
    if (c->side == IVSHM_CHAN_RECV)
        c->rc = (int)ivshm_chan_recv(&ch, &v, sizeof(v), NULL, -1);
    else
        c->rc = ivshm_chan_send(&ch, &v, sizeof(v), -1);
    return NULL;
}

static void cancel_wakes_blocked_calls(char *detail, size_t dn)
{
    for (int side = 0; side < 2; side++) {
        struct cctx c;
        memset(&c, 0, sizeof(c));
        c.side = side;
        CHECK(tregion_new(&c.t, 1 << 16) == 0, "region");
        const char *why = NULL;
        CHECK(ivshm_region_create_ring(&c.t.r, "c", IVSHM_KIND_MPMC, 8, 2, 1, 0, &c.info, &why) == 0, "ring");
        if (side == IVSHM_CHAN_SEND) { /* fill it so that the sender blocks */
            struct ivshm_mpmc q;
            ivshm_mpmc_attach(&q, &c.t.r, &c.info, &why);
            uint64_t v = 1;
            while (ivshm_mpmc_try_send(&q, &v, sizeof(v)) == 0)
                ;
        }
        bells_open(&c.bells);
        c.cancel_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        c.rc = 1;
        pthread_t th;
        pthread_create(&th, NULL, blocked, &c);
        struct ivshm_ring_ctrl *ctl = (struct ivshm_ring_ctrl *)(c.t.mem + c.info.offset);
        uint32_t *waiting = side == IVSHM_CHAN_RECV ? &ctl->cons_waiting : &ctl->prod_waiting;
        while (__atomic_load_n(waiting, __ATOMIC_ACQUIRE) == 0) /* until it sleeps */
            sched_yield();
        uint64_t one = 1;
        CHECK(write(c.cancel_fd, &one, sizeof(one)) == 8, "cancel");
        pthread_join(th, NULL);
        CHECK(c.rc == -ECANCELED, "blocked %s returned %d", side ? "send" : "recv", c.rc);
        CHECK(*waiting == 0, "left armed");
        close(c.cancel_fd);
        bells_close(&c.bells);
        tregion_free(&c.t);
    }
    snprintf(detail, dn, "recv and send");
}

/* ---------------------------------------------------------------------------------------------- */
/* a hostile sleeper table: garbage words are skipped, a full table makes sleepers poll */

static void hostile_table(char *detail, size_t dn)
{
    struct tregion t;
    struct ivshm_ring_info info;
    const char *why = NULL;
    CHECK(tregion_new(&t, 1 << 16) == 0, "region");
    CHECK(ivshm_region_create_ring(&t.r, "h", IVSHM_KIND_MPMC, 8, 4, 1, 0, &info, &why) == 0, "ring");
    struct ivshm_ring_ctrl *c = (struct ivshm_ring_ctrl *)(t.mem + info.offset);
    struct bells b;
    bells_open(&b);
    struct ivshm_mpmc q;
    ivshm_mpmc_attach(&q, &t.r, &info, &why);
    struct ivshm_chan tx;
    ivshm_chan_init(&tx, IVSHM_KIND_MPMC, &q, 0, 0, b.fd[0], -1, resolve, &b, 0, RECHECK_NS);
    /* every entry taken by garbage: no armed bit, a vector out of range, stray high bits */
    for (unsigned e = 0; e < IVSHM_SLEEPERS; e++)
        c->cons_sleepers[e] = e % 3 == 0 ? 0x00000105u : e % 3 == 1 ? (IVSHM_SLEEPER_ARMED | 200u)
                                                                     : 0xff0001ffu;
    c->cons_waiting = 0xffffffffu;
    uint64_t v = 1;
    CHECK(ivshm_chan_send(&tx, &v, sizeof(v), 0) == 0, "send");
    CHECK(b.bad_calls == 0, "the waker resolved a garbage route");
    struct ivshm_chan_stats st;
    ivshm_chan_get_stats(&tx, &st);
    CHECK(st.doorbells == 0, "rang a garbage route");
    /* a consumer finds the table full: it must still receive (by polling), not hang */
    struct ivshm_chan rx;
    ivshm_chan_init(&rx, IVSHM_KIND_MPMC, &q, 1, 0, b.fd[1], -1, resolve, &b, 0, RECHECK_NS);
    uint64_t got = 0;
    CHECK(ivshm_chan_recv(&rx, &got, 8, NULL, LOST_NS) == 8 && got == 1, "first recv");
    int64_t t0 = ivshm_chan_now_ns();
    CHECK(ivshm_chan_recv(&rx, &got, 8, NULL, 20 * 1000000ll) == -ETIMEDOUT, "empty recv");
    CHECK(ivshm_chan_now_ns() - t0 < LOST_NS, "a timed wait overran");
    /* valid routes of peers nobody knows: claimed, counted as unrouted, never a crash */
    for (unsigned e = 0; e < IVSHM_SLEEPERS; e++)
        c->cons_sleepers[e] = IVSHM_SLEEPER_WORD(5000 + e, 0);
    c->cons_waiting = IVSHM_SLEEPERS;
    CHECK(ivshm_chan_send(&tx, &v, sizeof(v), 0) == 0, "send");
    ivshm_chan_get_stats(&tx, &st);
    CHECK(st.unrouted == IVSHM_SLEEPERS, "unrouted %" PRIu64, st.unrouted);
    CHECK(b.bad_calls == IVSHM_SLEEPERS, "the resolver decides whether a peer exists");
    snprintf(detail, dn, "garbage skipped, full table polled");
    bells_close(&b);
    tregion_free(&t);
}

/* ---------------------------------------------------------------------------------------------- */
/* pass-on: a sleeper that was rung but leaves without taking the message hands the wake-up on */

static void pass_on_after_cancelled_sleeper(char *detail, size_t dn)
{
    struct tregion t;
    struct ivshm_ring_info info;
    const char *why = NULL;
    CHECK(tregion_new(&t, 1 << 16) == 0, "region");
    CHECK(ivshm_region_create_ring(&t.r, "po", IVSHM_KIND_MPMC, 8, 4, 1, 0, &info, &why) == 0, "ring");
    struct bells b;
    bells_open(&b);
    struct ivshm_mpmc q;
    ivshm_mpmc_attach(&q, &t.r, &info, &why);
    struct ivshm_chan tx, a, c;
    ivshm_chan_init(&tx, IVSHM_KIND_MPMC, &q, 0, 0, b.fd[0], -1, resolve, &b, 0, RECHECK_NS);
    ivshm_chan_init(&a, IVSHM_KIND_MPMC, &q, 1, 0, b.fd[1], -1, resolve, &b, 0, RECHECK_NS);
    ivshm_chan_init(&c, IVSHM_KIND_MPMC, &q, 2, 0, b.fd[2], -1, resolve, &b, 0, RECHECK_NS);
    struct ivshm_chan_call ca, cc;
    ivshm_chan_call_init(&ca, IVSHM_CHAN_RECV, -1, 1);
    ivshm_chan_call_init(&cc, IVSHM_CHAN_RECV, -1, 1);
    CHECK(ivshm_chan_arm(&a, &ca) == 1 && ivshm_chan_arm(&c, &cc) == 1, "arm");
    ca.slept = cc.slept = 1;
    uint64_t v = 9, n1 = 0, n2 = 0;
    CHECK(ivshm_mpmc_try_send(&q, &v, 8) == 0, "send");
    CHECK(ivshm_chan_wake_other(&tx, IVSHM_CHAN_SEND) == 1, "nobody rung");
    int ra = read(b.fd[1], &n1, 8) == 8, rc_ = read(b.fd[2], &n2, 8) == 8;
    CHECK(ra + rc_ == 1, "one publish must ring exactly one sleeper (%d, %d)", ra, rc_);
    /* the rung one leaves without the message (cancelled); the other must be rung now */
    struct ivshm_chan *rung = ra ? &a : &c, *other = ra ? &c : &a;
    struct ivshm_chan_call *rcall = ra ? &ca : &cc, *ocall = ra ? &cc : &ca;
    int ofd = ra ? b.fd[2] : b.fd[1];
    ivshm_chan_disarm(rung, rcall);
    ivshm_chan_pass_on(rung, rcall);
    uint64_t n = 0;
    CHECK(read(ofd, &n, 8) == 8 && n == 1, "the wake-up was not passed on");
    ivshm_chan_disarm(other, ocall);
    struct ivshm_ring_ctrl *ctl = (struct ivshm_ring_ctrl *)(t.mem + info.offset);
    CHECK(ctl->cons_waiting == 0, "waiting %u", ctl->cons_waiting);
    snprintf(detail, dn, "passed on");
    bells_close(&b);
    tregion_free(&t);
}

/* ---------------------------------------------------------------------------------------------- */
/* an event-loop sleeper (arm, re-check, sleep_begin, poll, absorb: ivshm_chan.h's sequence, and
 * Channel._async_wait's) on channel Y, claimed and rung between its re-check and its count, while
 * channel X of the same process and vector sleeps alone: X wakes, takes the ring (it thinks itself
 * alone on the fd), and Y must learn from sleep_begin that it was claimed instead of sleeping */

struct loop_ctx {
    struct tregion t;
    struct ivshm_ring_info ix;
    struct bells bells;
    struct ivshm_fd_share fd_share;
    struct ivshm_spsc qx;
    struct ivshm_chan x;
    int64_t got;
};

static void *loop_x_sleeper(void *c_)
{
    struct loop_ctx *c = c_;
    uint64_t v = 0;
    c->got = ivshm_chan_recv(&c->x, &v, sizeof(v), NULL, LOST_NS);
    return NULL;
}

static void loop_sleeper_claimed_before_counted(char *detail, size_t dn)
{
    struct loop_ctx c;
    memset(&c, 0, sizeof(c));
    CHECK(tregion_new(&c.t, 1 << 16) == 0, "region");
    const char *why = NULL;
    struct ivshm_ring_info iy;
    CHECK(ivshm_region_create_ring(&c.t.r, "x", IVSHM_KIND_SPSC, 8, 4, 1, 0, &c.ix, &why) == 0,
          "ring x: %s", why);
    CHECK(ivshm_region_create_ring(&c.t.r, "y", IVSHM_KIND_SPSC, 8, 4, 1, 0, &iy, &why) == 0,
          "ring y: %s", why);
    bells_open(&c.bells);
    int fd = c.bells.fd[1]; /* X and Y: peer 1, vector 0, one eventfd, one count of its sleepers */
    struct ivshm_spsc qy, px, py;
    CHECK(ivshm_spsc_attach(&c.qx, &c.t.r, &c.ix, &why) == 0, "attach");
    CHECK(ivshm_spsc_attach(&qy, &c.t.r, &iy, &why) == 0, "attach");
    CHECK(ivshm_spsc_attach(&px, &c.t.r, &c.ix, &why) == 0, "attach");
    CHECK(ivshm_spsc_attach(&py, &c.t.r, &iy, &why) == 0, "attach");
    struct ivshm_chan y, tx, ty;
    ivshm_chan_init(&c.x, IVSHM_KIND_SPSC, &c.qx, 1, 0, fd, -1, resolve, &c.bells, 0, RECHECK_NS);
    ivshm_chan_init(&y, IVSHM_KIND_SPSC, &qy, 1, 0, fd, -1, resolve, &c.bells, 0, RECHECK_NS);
    c.x.fd_share = y.fd_share = &c.fd_share;
    ivshm_chan_init(&tx, IVSHM_KIND_SPSC, &px, 2, 0, c.bells.fd[2], -1, resolve, &c.bells, 0,
                    RECHECK_NS);
    ivshm_chan_init(&ty, IVSHM_KIND_SPSC, &py, 2, 0, c.bells.fd[2], -1, resolve, &c.bells, 0,
                    RECHECK_NS);
    /* 1. X sleeps on the fd, alone */
    pthread_t th;
    pthread_create(&th, NULL, loop_x_sleeper, &c);
    struct ivshm_ring_ctrl *cx = (struct ivshm_ring_ctrl *)(c.t.mem + c.ix.offset);
    while ((__atomic_load_n(&cx->cons_waiting, __ATOMIC_ACQUIRE) == 0 ||
            __atomic_load_n(&c.fd_share.count, __ATOMIC_ACQUIRE) == 0) && !tc_failed())
        sched_yield();
    /* 2. Y, an event-loop sleeper: arms and re-checks (empty) */
    struct ivshm_chan_call cy;
    ivshm_chan_call_init(&cy, IVSHM_CHAN_RECV, -1, 1);
    CHECK(ivshm_chan_arm(&y, &cy) == 1, "arm y");
    CHECK(!ivshm_chan_ready(&y, IVSHM_CHAN_RECV, 1), "y empty");
    /* 3. a message for Y: its entry is claimed and its ring written to the shared fd, which
     *    wakes X; X takes the ring (alone on the fd: Y is not counted yet) and sleeps again */
    uint64_t v = 6;
    CHECK(ivshm_chan_send(&ty, &v, sizeof(v), LOST_NS) == 0, "send y");
    struct pollfd p = {.fd = fd, .events = POLLIN};
    struct ivshm_chan_stats st;
    do {
        sched_yield();
        ivshm_chan_get_stats(&c.x, &st);
    } while ((st.sleeps < 2 || poll(&p, 1, 0) != 0) && !tc_failed());
    /* 4. Y is counted: sleep_begin must say that Y was claimed, so that Y does not sleep */
    int claimed = ivshm_chan_sleep_begin(&y, &cy);
    int n = claimed ? 1 : poll(&p, 1, (int)(LOST_NS / 1000000));
    ivshm_chan_absorb(&y, &cy);
    ivshm_chan_sleep_end(&y, &cy);
    ivshm_chan_disarm(&y, &cy);
    CHECK(n == 1, "lost wake-up: x took y's ring and y, not told it was claimed, slept its whole "
                  "timeout with a message on its ring (ready=%d)",
          ivshm_chan_ready(&y, IVSHM_CHAN_RECV, 1));
    CHECK(ivshm_chan_ready(&y, IVSHM_CHAN_RECV, 1), "y's message");
    /* X goes on sleeping until its own message */
    v = 5;
    CHECK(ivshm_chan_send(&tx, &v, sizeof(v), LOST_NS) == 0, "send x");
    pthread_join(th, NULL);
    CHECK(c.got == 8, "lost wake-up of x: recv %" PRId64, c.got);
    snprintf(detail, dn, "y told it was claimed: %s", claimed ? "yes" : "no");
    bells_close(&c.bells);
    tregion_free(&c.t);
}

/* ---------------------------------------------------------------------------------------------- */
/* the units in a shared fd, counted: X (not rung) takes a ring meant for Y (rung, counted, has not
 * read it yet) and must put back exactly that one; Y then takes its ring and drops a stray one.
 * Single-threaded, with the event-loop calls: each step is forced, none depends on timing */

static uint64_t units_in(int fd)
{
    uint64_t v = 0;
    if (read(fd, &v, sizeof(v)) != sizeof(v))
        return 0;
    if (write(fd, &v, sizeof(v)) != sizeof(v))
        tc_fail(__FILE__, __LINE__, "cannot put %" PRIu64 " units back", v);
    return v;
}

static void shared_fd_units_counted(char *detail, size_t dn)
{
    struct tregion t;
    CHECK(tregion_new(&t, 1 << 16) == 0, "region");
    const char *why = NULL;
    struct ivshm_ring_info ix, iy;
    CHECK(ivshm_region_create_ring(&t.r, "x", IVSHM_KIND_SPSC, 8, 4, 1, 0, &ix, &why) == 0, "x");
    CHECK(ivshm_region_create_ring(&t.r, "y", IVSHM_KIND_SPSC, 8, 4, 1, 0, &iy, &why) == 0, "y");
    struct bells b;
    bells_open(&b);
    int fd = b.fd[1];
    struct ivshm_fd_share share;
    memset(&share, 0, sizeof(share));
    struct ivshm_spsc qx, qy, py;
    CHECK(ivshm_spsc_attach(&qx, &t.r, &ix, &why) == 0 &&
          ivshm_spsc_attach(&qy, &t.r, &iy, &why) == 0 &&
          ivshm_spsc_attach(&py, &t.r, &iy, &why) == 0, "attach");
    struct ivshm_chan x, y, ty;
    ivshm_chan_init(&x, IVSHM_KIND_SPSC, &qx, 1, 0, fd, -1, resolve, &b, 0, RECHECK_NS);
    ivshm_chan_init(&y, IVSHM_KIND_SPSC, &qy, 1, 0, fd, -1, resolve, &b, 0, RECHECK_NS);
    x.fd_share = y.fd_share = &share;
    ivshm_chan_init(&ty, IVSHM_KIND_SPSC, &py, 2, 0, b.fd[2], -1, resolve, &b, 0, RECHECK_NS);
    struct ivshm_chan_call cx, cy;
    ivshm_chan_call_init(&cx, IVSHM_CHAN_RECV, -1, 1);
    ivshm_chan_call_init(&cy, IVSHM_CHAN_RECV, -1, 1);
    /* both asleep on the fd, counted */
    CHECK(ivshm_chan_arm(&y, &cy) == 1 && ivshm_chan_sleep_begin(&y, &cy) == 0, "y asleep");
    CHECK(ivshm_chan_arm(&x, &cx) == 1 && ivshm_chan_sleep_begin(&x, &cx) == 0, "x asleep");
    CHECK(share.count == 2, "two counted: %u", share.count);
    /* a message for Y: Y's entry claimed, one unit in the fd */
    uint64_t v = 7;
    CHECK(ivshm_chan_send(&ty, &v, sizeof(v), LOST_NS) == 0, "send y");
    CHECK(units_in(fd) == 1, "one ring in the fd");
    /* X wakes first: the unit is not its own; Y needs it */
    CHECK(ivshm_chan_absorb(&x, &cx) == 0, "x took y's ring as its own");
    uint64_t after_x = units_in(fd);
    CHECK(after_x == 1, "x put back %" PRIu64 " units for y's one ring", after_x);
    /* a stray besides (a sleeper's earlier arming, claimed as its re-check found work) */
    uint64_t one = 1;
    CHECK(write(fd, &one, sizeof(one)) == sizeof(one), "stray");
    CHECK(ivshm_chan_absorb(&y, &cy) == 1, "y's ring");
    uint64_t after_y = units_in(fd);
    CHECK(after_y == 0, "%" PRIu64 " units left after y took its ring: nobody else was rung",
          after_y);
    /* X wakes again (say a stray comes while Y is still counted, having taken its ring): X must
     * drop it, not hand it to Y */
    CHECK(write(fd, &one, sizeof(one)) == sizeof(one), "stray");
    CHECK(ivshm_chan_absorb(&x, &cx) == 0, "x: a stray is not its ring");
    uint64_t after_x2 = units_in(fd);
    CHECK(after_x2 == 0, "x put a stray back for y, which took its ring already (%" PRIu64 ")",
          after_x2);
    ivshm_chan_sleep_end(&y, &cy);
    ivshm_chan_disarm(&y, &cy);
    ivshm_chan_sleep_end(&x, &cx);
    ivshm_chan_disarm(&x, &cx);
    CHECK(share.count == 0, "counted after the sleeps ended: %u", share.count);
    CHECK(share.head == NULL, "a sleeper still linked in the share");
    snprintf(detail, dn, "x put back 1 for y; 2 strays dropped");
    bells_close(&b);
    tregion_free(&t);
}

/* ---------------------------------------------------------------------------------------------- */
/* a stray ring in an fd that n channels of the process sleep on (left by another that woke alone
 * and then closed): it ends a sleep or two, then somebody drops it; it must not go round the idle
 * sleepers for as long as they sleep.  With 34 of them: more than the 32 slots a first version of
 * the share had, whose overflow made every sleeper put back every unit */

#define STRAY_MAX 34

struct stray_ctx {
    struct tregion t;
    struct ivshm_ring_info info[STRAY_MAX];
    struct bells bells;
    struct ivshm_fd_share fd_share;
    uint64_t sleeps[STRAY_MAX];
};

struct stray_arg {
    struct stray_ctx *c;
    int i;
};

static void *stray_sleeper(void *a_)
{
    struct stray_arg *a = a_;
    struct stray_ctx *c = a->c;
    struct ivshm_spsc q;
    const char *why = NULL;
    CHECKP(ivshm_spsc_attach(&q, &c->t.r, &c->info[a->i], &why) == 0, "attach");
    struct ivshm_chan ch;
    ivshm_chan_init(&ch, IVSHM_KIND_SPSC, &q, 1, 0, c->bells.fd[1], -1, resolve, &c->bells, 0,
                    RECHECK_NS);
    ch.fd_share = &c->fd_share;
    uint64_t v;
    int64_t rc = ivshm_chan_recv(&ch, &v, sizeof(v), NULL, 2000 * 1000000ll);
    CHECKP(rc == -ETIMEDOUT, "recv: %" PRId64, rc);
    struct ivshm_chan_stats st;
    ivshm_chan_get_stats(&ch, &st);
    c->sleeps[a->i] = st.sleeps;
    return NULL;
}

static void stray_ring_among_sleepers(char *detail, size_t dn, int n)
{
    struct stray_ctx *c = calloc(1, sizeof(*c));
    CHECK(c != NULL, "memory");
    CHECK(tregion_new(&c->t, 1 << 20) == 0, "region");
    const char *why = NULL;
    for (int i = 0; i < n; i++) {
        char name[16];
        snprintf(name, sizeof(name), "r%d", i);
        CHECK(ivshm_region_create_ring(&c->t.r, name, IVSHM_KIND_SPSC, 8, 4, 1, 0, &c->info[i],
                                       &why) == 0, "ring: %s", why);
    }
    bells_open(&c->bells);
    pthread_t th[STRAY_MAX];
    struct stray_arg a[STRAY_MAX];
    for (int i = 0; i < n; i++) {
        a[i] = (struct stray_arg){c, i};
        pthread_create(&th[i], NULL, stray_sleeper, &a[i]);
    }
    while (__atomic_load_n(&c->fd_share.count, __ATOMIC_ACQUIRE) < (uint32_t)n && !tc_failed())
        sched_yield(); /* all asleep */
    uint64_t one = 1;
    CHECK(write(c->bells.fd[1], &one, sizeof(one)) == sizeof(one), "stray");
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(th[i], NULL);
        total += c->sleeps[i];
    }
    /* each: its first sleep, then at most one more after the stray woke it */
    CHECK(total <= 2 * (uint64_t)n, "one stray ring ended %" PRIu64 " sleeps of %d idle channels",
          total, n);
    snprintf(detail, dn, "%" PRIu64 " sleeps of %d channels", total, n);
    bells_close(&c->bells);
    tregion_free(&c->t);
    free(c);
}

static void stray_ring_between_two_sleepers(char *d, size_t n)
{
    stray_ring_among_sleepers(d, n, 2);
}
static void stray_ring_among_more_sleepers_than_slots(char *d, size_t n)
{
    stray_ring_among_sleepers(d, n, STRAY_MAX);
}

/* ---------------------------------------------------------------------------------------------- */
/* two channels of one process with one route on one MPMC ring: X's entry is claimed, Y arms
 * (again and again) and takes the freed entry.  Y's word must never equal X's while X still
 * holds its arming: X would then read its arming as not claimed and its disarm would take Y's
 * arming back, leaving Y asleep with no entry (nobody could ring it) */

static void same_route_armings_never_collide(char *detail, size_t dn)
{
    struct tregion t;
    CHECK(tregion_new(&t, 1 << 16) == 0, "region");
    const char *why = NULL;
    struct ivshm_ring_info info;
    CHECK(ivshm_region_create_ring(&t.r, "m", IVSHM_KIND_MPMC, 8, 16, 1, 0, &info, &why) == 0,
          "ring: %s", why);
    struct bells b;
    bells_open(&b);
    struct ivshm_mpmc qx, qy, qw;
    CHECK(ivshm_mpmc_attach(&qx, &t.r, &info, &why) == 0 &&
          ivshm_mpmc_attach(&qy, &t.r, &info, &why) == 0 &&
          ivshm_mpmc_attach(&qw, &t.r, &info, &why) == 0, "attach");
    struct ivshm_chan x, y, w;
    ivshm_chan_init(&x, IVSHM_KIND_MPMC, &qx, 1, 0, b.fd[1], -1, resolve, &b, 0, RECHECK_NS);
    ivshm_chan_init(&y, IVSHM_KIND_MPMC, &qy, 1, 0, b.fd[1], -1, resolve, &b, 0, RECHECK_NS);
    ivshm_chan_init(&w, IVSHM_KIND_MPMC, &qw, 2, 0, b.fd[2], -1, resolve, &b, 0, RECHECK_NS);
    struct ivshm_ring_ctrl *c = (struct ivshm_ring_ctrl *)(t.mem + info.offset);
    struct ivshm_chan_call cx, cy;
    ivshm_chan_call_init(&cx, IVSHM_CHAN_RECV, -1, 1);
    CHECK(ivshm_chan_arm(&x, &cx) == 1, "arm x");
    CHECK(ivshm_chan_wake_other(&w, IVSHM_CHAN_SEND) == 1, "claim x");
    CHECK(c->cons_sleepers[cx.entry] == 0, "x's entry claimed");
    int tries = 0, same = 0;
    for (; tries < 2000 && !same; tries++) {
        ivshm_chan_call_init(&cy, IVSHM_CHAN_RECV, -1, 1);
        CHECK(ivshm_chan_arm(&y, &cy) == 1, "arm y");
        same = cy.entry == cx.entry && cy.word == cx.word;
        if (!same)
            ivshm_chan_disarm(&y, &cy);
    }
    /* X wakes and takes its arming back: it must see the claim and leave Y's arming alone */
    ivshm_chan_disarm(&x, &cx);
    if (same) {
        CHECK(c->cons_sleepers[cy.entry] == cy.word,
              "y armed entry %d with x's word %#x after %d armings; x's disarm took it back",
              cy.entry, cy.word, tries);
        ivshm_chan_disarm(&y, &cy);
    }
    CHECK(!same, "y armed with x's word %#x after %d armings", cx.word, tries);
    CHECK(c->cons_waiting == 0, "waiting %u", c->cons_waiting);
    snprintf(detail, dn, "%d armings of y, none with x's word", tries);
    bells_close(&b);
    tregion_free(&t);
}

/* ---------------------------------------------------------------------------------------------- */
/* Y is rung between its re-check and its count; X, counted, reads Y's ring before Y is counted
 * and drops it (nobody counted was rung for it); Z, counted, is rung.  Y learns of its claim in
 * sleep_begin and absorbs: it must not keep Z's ring as its own (Z would sleep rung with nothing
 * in the fd, and nobody rings a claimed entry again) */

static void early_claimed_keeps_no_ring(char *detail, size_t dn)
{
    struct tregion t;
    CHECK(tregion_new(&t, 1 << 16) == 0, "region");
    const char *why = NULL;
    struct ivshm_ring_info info[3];
    for (int i = 0; i < 3; i++)
        CHECK(ivshm_region_create_ring(&t.r, (const char *[]){"x", "y", "z"}[i], IVSHM_KIND_SPSC, 8,
                                       4, 1, 0, &info[i], &why) == 0, "ring: %s", why);
    struct bells b;
    bells_open(&b);
    int fd = b.fd[1];
    struct ivshm_fd_share share;
    memset(&share, 0, sizeof(share));
    struct ivshm_spsc q[3], p[3];
    struct ivshm_chan ch[3], tx[3];
    struct ivshm_chan_call call[3];
    for (int i = 0; i < 3; i++) {
        CHECK(ivshm_spsc_attach(&q[i], &t.r, &info[i], &why) == 0 &&
              ivshm_spsc_attach(&p[i], &t.r, &info[i], &why) == 0, "attach");
        ivshm_chan_init(&ch[i], IVSHM_KIND_SPSC, &q[i], 1, 0, fd, -1, resolve, &b, 0, RECHECK_NS);
        ch[i].fd_share = &share;
        ivshm_chan_init(&tx[i], IVSHM_KIND_SPSC, &p[i], 2, 0, b.fd[2], -1, resolve, &b, 0,
                        RECHECK_NS);
        ivshm_chan_call_init(&call[i], IVSHM_CHAN_RECV, -1, 1);
        CHECK(ivshm_chan_arm(&ch[i], &call[i]) == 1, "arm %d", i);
    }
    enum { X, Y, Z };
    CHECK(ivshm_chan_sleep_begin(&ch[X], &call[X]) == 0, "x asleep");
    /* Y armed and re-checked, not counted yet: rung */
    uint64_t v = 1;
    CHECK(ivshm_chan_send(&tx[Y], &v, sizeof(v), LOST_NS) == 0, "send y");
    /* X reads Y's ring: Y is not counted, so X drops it */
    ivshm_chan_absorb(&ch[X], &call[X]); /* alone as far as it can tell: "its own or a stray" */
    CHECK(units_in(fd) == 0, "x put back a unit nobody counted needs");
    /* Z, counted, is rung */
    CHECK(ivshm_chan_sleep_begin(&ch[Z], &call[Z]) == 0, "z asleep");
    CHECK(ivshm_chan_send(&tx[Z], &v, sizeof(v), LOST_NS) == 0, "send z");
    CHECK(units_in(fd) == 1, "z's ring");
    /* Y is counted, sees its claim, absorbs as the asyncio calls do, and goes to its ring */
    CHECK(ivshm_chan_sleep_begin(&ch[Y], &call[Y]) == 1, "y told it was claimed");
    ivshm_chan_absorb(&ch[Y], &call[Y]);
    uint64_t left = units_in(fd);
    CHECK(left == 1, "y took z's ring (%" PRIu64 " left): z sleeps rung with nothing to wake it",
          left);
    CHECK(ivshm_chan_absorb(&ch[Z], &call[Z]) == 1, "z's ring");
    for (int i = 0; i < 3; i++) {
        ivshm_chan_sleep_end(&ch[i], &call[i]);
        ivshm_chan_disarm(&ch[i], &call[i]);
    }
    CHECK(share.count == 0, "counted: %u", share.count);
    snprintf(detail, dn, "z's ring left for z");
    bells_close(&b);
    tregion_free(&t);
}

/* ---------------------------------------------------------------------------------------------- */
/* a sleeper alone on its fd, rung: it leaves the ring's unit in the fd (the read would be on the
 * wake-up's path) and takes it before its next sleep, which then sleeps until its timeout
 * instead of ending at once on the leftover unit */

static void wake_leaves_ring_for_next_sleep(char *detail, size_t dn)
{
    struct loop_ctx c; /* as the loop sleeper's case: channel x, asleep in loop_x_sleeper */
    memset(&c, 0, sizeof(c));
    CHECK(tregion_new(&c.t, 1 << 16) == 0, "region");
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&c.t.r, "r", IVSHM_KIND_SPSC, 8, 4, 1, 0, &c.ix, &why) == 0,
          "ring: %s", why);
    bells_open(&c.bells);
    struct ivshm_spsc p;
    CHECK(ivshm_spsc_attach(&c.qx, &c.t.r, &c.ix, &why) == 0 &&
          ivshm_spsc_attach(&p, &c.t.r, &c.ix, &why) == 0, "attach");
    ivshm_chan_init(&c.x, IVSHM_KIND_SPSC, &c.qx, 1, 0, c.bells.fd[1], -1, resolve, &c.bells, 0,
                    RECHECK_NS);
    c.x.fd_share = &c.fd_share;
    struct ivshm_chan tx;
    ivshm_chan_init(&tx, IVSHM_KIND_SPSC, &p, 2, 0, c.bells.fd[2], -1, resolve, &c.bells, 0,
                    RECHECK_NS);
    struct ivshm_ring_ctrl *ctl = (struct ivshm_ring_ctrl *)(c.t.mem + c.ix.offset);
    pthread_t th;
    pthread_create(&th, NULL, loop_x_sleeper, &c);
    while ((__atomic_load_n(&ctl->cons_waiting, __ATOMIC_ACQUIRE) == 0 ||
            __atomic_load_n(&c.fd_share.count, __ATOMIC_ACQUIRE) == 0) && !tc_failed())
        sched_yield(); /* asleep, counted on the fd */
    uint64_t v = 9;
    CHECK(ivshm_chan_send(&tx, &v, sizeof(v), LOST_NS) == 0, "send");
    pthread_join(th, NULL);
    CHECK(c.got == 8, "recv: %" PRId64, c.got);
    struct ivshm_chan_stats st;
    ivshm_chan_get_stats(&c.x, &st);
    CHECK(st.sleeps == 1 && st.wakeups == 1, "sleeps %" PRIu64 ", wake-ups %" PRIu64, st.sleeps,
          st.wakeups);
    CHECK(units_in(c.bells.fd[1]) == 1, "the ring's unit read on the wake-up's path");
    /* the next receive: nothing comes; it must sleep once, until its timeout */
    int64_t rc = ivshm_chan_recv(&c.x, &v, sizeof(v), NULL, 100 * 1000000ll);
    CHECK(rc == -ETIMEDOUT, "recv: %" PRId64, rc);
    ivshm_chan_get_stats(&c.x, &st);
    CHECK(st.sleeps == 2, "%" PRIu64 " sleeps: the unit left in the fd ended a sleep",
          st.sleeps);
    CHECK(units_in(c.bells.fd[1]) == 0, "the unit is still in the fd");
    CHECK(c.fd_share.count == 0 && c.fd_share.unread == 0, "share: count %u, unread %u",
          c.fd_share.count,
          c.fd_share.unread);
    snprintf(detail, dn, "left 1, taken before the next sleep");
    bells_close(&c.bells);
    tregion_free(&c.t);
}

/* ---------------------------------------------------------------------------------------------- */
/* close against a sleeper kept off its fd: Y (counted on the fd, rung) never takes its ring, so
 * X, woken by it, puts it back and sleeps back-off steps off the fd; the cancel fd must still end
 * X's wait at once, and X must not go round the readable fd meanwhile */

static void cancel_wakes_a_sleeper_kept_off_its_fd(char *detail, size_t dn)
{
    struct loop_ctx c;
    memset(&c, 0, sizeof(c));
    CHECK(tregion_new(&c.t, 1 << 16) == 0, "region");
    const char *why = NULL;
    struct ivshm_ring_info iy;
    CHECK(ivshm_region_create_ring(&c.t.r, "x", IVSHM_KIND_SPSC, 8, 4, 1, 0, &c.ix, &why) == 0 &&
          ivshm_region_create_ring(&c.t.r, "y", IVSHM_KIND_SPSC, 8, 4, 1, 0, &iy, &why) == 0,
          "rings: %s", why);
    bells_open(&c.bells);
    int fd = c.bells.fd[1];
    int cancel = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct ivshm_spsc qy, py;
    CHECK(ivshm_spsc_attach(&c.qx, &c.t.r, &c.ix, &why) == 0 &&
          ivshm_spsc_attach(&qy, &c.t.r, &iy, &why) == 0 &&
          ivshm_spsc_attach(&py, &c.t.r, &iy, &why) == 0, "attach");
    struct ivshm_chan y, ty;
    ivshm_chan_init(&c.x, IVSHM_KIND_SPSC, &c.qx, 1, 0, fd, cancel, resolve, &c.bells, 0,
                    RECHECK_NS);
    ivshm_chan_init(&y, IVSHM_KIND_SPSC, &qy, 1, 0, fd, -1, resolve, &c.bells, 0, RECHECK_NS);
    c.x.fd_share = y.fd_share = &c.fd_share;
    ivshm_chan_init(&ty, IVSHM_KIND_SPSC, &py, 2, 0, c.bells.fd[2], -1, resolve, &c.bells, 0,
                    RECHECK_NS);
    /* Y: asleep on the fd (counted), then rung; it never reads the fd in this case */
    struct ivshm_chan_call cy;
    ivshm_chan_call_init(&cy, IVSHM_CHAN_RECV, -1, 1);
    CHECK(ivshm_chan_arm(&y, &cy) == 1 && ivshm_chan_sleep_begin(&y, &cy) == 0, "y asleep");
    pthread_t th;
    pthread_create(&th, NULL, loop_x_sleeper, &c);
    while (__atomic_load_n(&c.fd_share.count, __ATOMIC_ACQUIRE) < 2 && !tc_failed())
        sched_yield(); /* x asleep on the fd too */
    uint64_t v = 3;
    CHECK(ivshm_chan_send(&ty, &v, sizeof(v), LOST_NS) == 0, "ring y");
    /* X wakes on Y's ring, puts it back, and sleeps again, off the fd */
    struct ivshm_chan_stats st;
    do {
        sched_yield();
        ivshm_chan_get_stats(&c.x, &st);
    } while (st.sleeps < 2 && !tc_failed());
    /* Y's ring stays owed for 100 ms (the scenario's length, not a wait for an event): X, off
     * the fd, sleeps on; X polling the readable fd would sleep thousands of times meanwhile */
    struct timespec owed = {0, 100 * 1000000L};
    nanosleep(&owed, NULL);
    uint64_t one = 1;
    CHECK(write(cancel, &one, sizeof(one)) == sizeof(one), "cancel");
    pthread_join(th, NULL);
    CHECK(c.got == -ECANCELED, "x's recv: %" PRId64 " (the cancel fd did not end its wait)", c.got);
    ivshm_chan_get_stats(&c.x, &st);
    CHECK(st.sleeps <= 3, "x slept %" PRIu64 " times: it went round the readable fd", st.sleeps);
    CHECK(units_in(fd) == 1, "y's ring is not in the fd");
    ivshm_chan_sleep_end(&y, &cy);
    ivshm_chan_disarm(&y, &cy);
    snprintf(detail, dn, "cancelled after %" PRIu64 " sleeps", st.sleeps);
    close(cancel);
    bells_close(&c.bells);
    tregion_free(&c.t);
}

static const struct tcase cases[] = {
    {"chan_multi_sleeper_consumers", multi_sleeper_consumers, 0},
    {"chan_shared_route_consumers", shared_route_consumers, 0},
    {"chan_multi_sleeper_producers", multi_sleeper_producers, 0},
    {"chan_spsc_pingpong", spsc_pingpong, 0},
    {"chan_cancel_wakes_blocked_calls", cancel_wakes_blocked_calls, 0},
    {"chan_hostile_table", hostile_table, 0},
    {"chan_pass_on_after_cancelled_sleeper", pass_on_after_cancelled_sleeper, 0},
    {"chan_loop_sleeper_claimed_before_counted", loop_sleeper_claimed_before_counted, 0},
    {"chan_shared_fd_units_counted", shared_fd_units_counted, 0},
    {"chan_stray_ring_between_two_sleepers", stray_ring_between_two_sleepers, 0},
    {"chan_same_route_armings_never_collide", same_route_armings_never_collide, 0},
    {"chan_early_claimed_keeps_no_ring", early_claimed_keeps_no_ring, 0},
    {"chan_wake_leaves_ring_for_next_sleep", wake_leaves_ring_for_next_sleep, 0},
    {"chan_cancel_wakes_a_sleeper_kept_off_its_fd", cancel_wakes_a_sleeper_kept_off_its_fd, 0},
    {"chan_stray_ring_among_more_sleepers_than_slots", stray_ring_among_more_sleepers_than_slots, 0},
};

int main(int argc, char **argv) { return tc_main(argc, argv, cases, sizeof(cases) / sizeof(cases[0])); }
