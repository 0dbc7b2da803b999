/* test_pubsub.c - publish-subscribe rings: every subscriber gets every message exactly once and in
 * order (threads, doorbells, re-checks 60 s apart so a lost wake-up fails), joining and leaving
 * mid-stream, both slow policies, dead and silent subscribers, hostile cursors, stamps and lengths,
 * the subscriber limit, a second publisher, config mismatches. */
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ivshm_chan.h"
#include "ivshm_pubsub.h"
#include "tcommon.h"

#define RECHECK_NS (60ull * 1000000000ull)
#define LOST_NS (20ll * 1000000000ll)
#define MAXP 12

struct bells {
    int fd[MAXP];
};

static int resolve(void *ctx, uint32_t peer, uint32_t vector, struct ivshm_bell *out)
{
    struct bells *b = ctx;
    if (peer >= MAXP || vector != 0 || b->fd[peer] < 0)
        return -ENOENT;
    out->kind = IVSHM_BELL_EVENTFD;
    out->fd = b->fd[peer];
    return 0;
}

static void bells_open(struct bells *b)
{
    for (int i = 0; i < MAXP; i++)
        b->fd[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

static void bells_close(struct bells *b)
{
    for (int i = 0; i < MAXP; i++)
        close(b->fd[i]);
}

static struct ivshm_pubsub_entry *entry_of(struct tregion *t, const struct ivshm_ring_info *info,
                                           uint32_t i)
{
    return (struct ivshm_pubsub_entry *)(t->mem + info->offset + IVSHM_PUBSUB_TABLE_OFF) + i;
}

/* Message idx: 8 bytes of its index, then checkable bytes; its length varies with idx. */
static uint32_t msg_len(uint64_t idx, uint32_t slot) { return 8 + (uint32_t)(tc_mix(idx) % (slot - 7)); }

static void make_msg(uint8_t *buf, uint64_t idx, uint32_t slot)
{
    uint32_t len = msg_len(idx, slot);
    memcpy(buf, &idx, 8);
    tc_fill(buf + 8, 7, idx, len - 8);
}

/* "" if buf/len is message idx, else why not. */
static const char *bad_msg(const uint8_t *buf, int64_t len, uint64_t idx, uint32_t slot)
{
    uint64_t got;
    if (len < 8)
        return "too short";
    memcpy(&got, buf, 8);
    if (got != idx)
        return "wrong index (lost, repeated or reordered)";
    if ((uint64_t)len != msg_len(idx, slot))
        return "wrong length";
    if (tc_verify(buf + 8, 7, idx, (uint64_t)len - 8) >= 0)
        return "wrong bytes";
    return "";
}

/* ---------------------------------------------------------------------------------------------- */
/* a stream through several subscriber threads, with doorbells */

#define SLOT 48

struct sctx {
    struct tregion t;
    struct ivshm_ring_info info;
    struct bells bells;
    int cancel_fd;
    uint64_t n;
    uint64_t got[MAXP];
    uint64_t first[MAXP];
    uint64_t sleeps[MAXP];
    uint64_t arms[MAXP];
    uint64_t leave_after;  /* subscribers with odd peer ids leave after this many (0: never) */
    uint64_t join_after;   /* subscribers with peer ids >= 5 join once this many were published */
    uint64_t published;
};

struct sarg {
    struct sctx *c;
    int peer;
};

static void *subscriber(void *p)
{
    struct sarg *a = p;
    struct sctx *c = a->c;
    if (c->join_after && a->peer >= 5)
        while (__atomic_load_n(&c->published, __ATOMIC_ACQUIRE) < c->join_after && !tc_failed())
            tc_relax();
    struct ivshm_pubsub_sub s;
    const char *why = NULL;
    uint64_t published_before = __atomic_load_n(&c->published, __ATOMIC_ACQUIRE);
    CHECKP(ivshm_pubsub_subscribe(&s, &c->t.r, &c->info, 1000 + a->peer, 0, 0, &why) == 0,
           "subscribe: %s", why);
    CHECKP(s.joined_at >= published_before, "joined at %" PRIu64 ", before %" PRIu64 " published",
           s.joined_at, published_before);
    struct ivshm_chan ch;
    CHECKP(ivshm_chan_init(&ch, IVSHM_KIND_PUBSUB, &s, a->peer, 0, c->bells.fd[a->peer], c->cancel_fd,
                           resolve, &c->bells, 0, RECHECK_NS) == 0, "chan init");
    uint8_t buf[SLOT];
    uint64_t expect = s.joined_at, n = 0;
    c->first[a->peer] = expect;
    for (;;) {
        if (expect == c->n || (c->leave_after && (a->peer & 1) && n == c->leave_after))
            break;
        int64_t len = ivshm_chan_recv(&ch, buf, sizeof(buf), NULL, LOST_NS);
        if (len == -ECANCELED)
            break;
        CHECKP(len != -ETIMEDOUT, "lost wake-up: subscriber %d waited %.0f s at %" PRIu64
               " (published %" PRIu64 ", stamp there %" PRIu64 ", prod_waiting %u, cons_waiting %u)",
               a->peer, LOST_NS / 1e9, expect, __atomic_load_n(&c->published, __ATOMIC_ACQUIRE),
               __atomic_load_n(&ivshm_pubsub_slot(s.slots, s.mask, s.stride, expect)->stamp, __ATOMIC_ACQUIRE),
               __atomic_load_n(&s.ctrl->prod_waiting, __ATOMIC_RELAXED),
               __atomic_load_n(&s.ctrl->cons_waiting, __ATOMIC_RELAXED));
        CHECKP(len >= 0, "recv: %" PRId64 " (%s)", len, s.why ? s.why : "");
        const char *bad = bad_msg(buf, len, expect, SLOT);
        CHECKP(!*bad, "subscriber %d, message %" PRIu64 ": %s", a->peer, expect, bad);
        expect++;
        n++;
    }
    struct ivshm_chan_stats st;
    ivshm_chan_get_stats(&ch, &st);
    c->got[a->peer] = n;
    c->sleeps[a->peer] = st.sleeps;
    c->arms[a->peer] = st.arms;
    ivshm_pubsub_unsubscribe(&s);
    return NULL;
}

static void run_stream(char *detail, size_t dn, int nsubs, uint64_t n, uint32_t cap,
                       uint64_t leave_after, uint64_t join_after)
{
    static struct sctx c;
    memset(&c, 0, sizeof(c));
    c.n = n;
    c.leave_after = leave_after;
    c.join_after = join_after;
    CHECK(tregion_new(&c.t, 1 << 17) == 0, "region");
    const char *why = NULL;
    /* slow_timeout an hour: the publisher's channel then re-checks only every RECHECK_NS too */
    CHECK(ivshm_pubsub_create(&c.t.r, "ps", SLOT, cap, IVSHM_PUBSUB_BLOCK, 3600ull * 1000000000ull, 1,
                              0, &c.info, &why) == 0, "create: %s", why);
    bells_open(&c.bells);
    c.cancel_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct ivshm_pubsub_pub p;
    CHECK(ivshm_pubsub_pub_attach(&p, &c.t.r, &c.info, 0, &why) == 0, "attach: %s", why);
    pthread_t th[MAXP];
    struct sarg args[MAXP];
    for (int i = 1; i <= nsubs; i++) {
        args[i] = (struct sarg){&c, i};
        pthread_create(&th[i], NULL, subscriber, &args[i]);
    }
    /* the first subscribers must be in before the stream starts: they expect index 0 */
    int64_t t0 = ivshm_chan_now_ns();
    for (;;) {
        uint32_t in = 0;
        for (uint32_t i = 0; i < IVSHM_PUBSUB_MAX_SUBS; i++)
            in += IVSHM_SUB_STATE(__atomic_load_n(&entry_of(&c.t, &c.info, i)->ctl, __ATOMIC_ACQUIRE)) ==
                  IVSHM_SUB_ACTIVE;
        if (in >= (uint32_t)(join_after ? (nsubs < 4 ? nsubs : 4) : nsubs) || tc_failed())
            break;
        CHECK(ivshm_chan_now_ns() - t0 < LOST_NS, "subscribers did not join");
        sched_yield();
    }
    struct ivshm_chan ch;
    CHECK(ivshm_chan_init(&ch, IVSHM_KIND_PUBSUB, &p, 0, 0, c.bells.fd[0], -1, resolve, &c.bells, 0,
                          RECHECK_NS) == 0, "chan init");
    uint8_t buf[SLOT];
    for (uint64_t i = 0; i < n && !tc_failed(); i++) {
        make_msg(buf, i, SLOT);
        int rc = ivshm_chan_send(&ch, buf, msg_len(i, SLOT), LOST_NS);
        CHECK(rc != -ETIMEDOUT, "lost wake-up: publisher blocked at %" PRIu64, i);
        CHECK(rc == 0, "send %" PRIu64 ": %d (%s)", i, rc, p.why ? p.why : "");
        __atomic_store_n(&c.published, i + 1, __ATOMIC_RELEASE);
    }
    /* the subscribers stop by themselves at the end; a failed run cancels them */
    if (tc_failed()) {
        uint64_t one = 1;
        CHECK(write(c.cancel_fd, &one, 8) == 8, "cancel");
    }
    for (int i = 1; i <= nsubs; i++)
        pthread_join(th[i], NULL);
    uint64_t sleeps = 0, arms = 0;
    for (int i = 1; i <= nsubs && !tc_failed(); i++) {
        uint64_t want = c.n - c.first[i];
        if (leave_after && (i & 1))
            want = leave_after;
        CHECK(c.got[i] == want, "subscriber %d got %" PRIu64 " of %" PRIu64, i, c.got[i], want);
        if (!join_after)
            CHECK(c.first[i] == 0, "subscriber %d started at %" PRIu64, i, c.first[i]);
        sleeps += c.sleeps[i];
        arms += c.arms[i];
    }
    struct ivshm_chan_stats st;
    ivshm_chan_get_stats(&ch, &st);
    CHECK(p.cuts == 0, "the publisher cut %" PRIu64 " subscribers off", p.cuts);
    /* the publisher rings only subscribers that armed to sleep, each at most once per arming (a
     * streaming publisher whose subscribers keep up rings nothing).  Not "once per sleep": a
     * subscriber claimed between its arming and its re-check finds the message and never sleeps. */
    CHECK(st.doorbells <= arms, "%" PRIu64 " doorbells for %" PRIu64 " armings (%" PRIu64 " sleeps)",
          st.doorbells, arms, sleeps);
    snprintf(detail, dn, "%" PRIu64 " messages x %d subscribers, %" PRIu64 " subscriber sleeps, "
             "%" PRIu64 " doorbells, %" PRIu64 " publisher sleeps", n, nsubs, sleeps, st.doorbells,
             st.sleeps);
    close(c.cancel_fd);
    bells_close(&c.bells);
    tregion_free(&c.t);
}

static void stream_one(char *d, size_t n) { run_stream(d, n, 1, tc_count(200000, 20000), 64, 0, 0); }
static void stream_four(char *d, size_t n) { run_stream(d, n, 4, tc_count(100000, 10000), 64, 0, 0); }
/* a 4-slot ring: everyone sleeps all the time, every message needs doorbells both ways */
static void stream_tiny_ring(char *d, size_t n) { run_stream(d, n, 6, tc_count(10000, 2000), 4, 0, 0); }
static void leave_early(char *d, size_t n) { run_stream(d, n, 6, tc_count(50000, 5000), 16, 3000, 0); }
static void join_late(char *d, size_t n) { run_stream(d, n, 8, tc_count(50000, 5000), 16, 0, 20000); }

/* ---------------------------------------------------------------------------------------------- */
/* subscribers joining and leaving all the time while the publisher streams at full speed: each
 * stint must read a contiguous run starting where it joined (the join protocol) */

struct jctx {
    struct tregion t;
    struct ivshm_ring_info info;
    uint64_t n;
    int done;
    uint64_t stints;
};

static void *churner(void *p)
{
    struct jctx *c = p;
    uint8_t buf[SLOT];
    struct trng rng = {(uint64_t)(uintptr_t)&buf};
    while (!__atomic_load_n(&c->done, __ATOMIC_ACQUIRE) && !tc_failed()) {
        struct ivshm_pubsub_sub s;
        const char *why = NULL;
        int rc = ivshm_pubsub_subscribe(&s, &c->t.r, &c->info, 1, 0, 0, &why);
        CHECKP(rc == 0, "subscribe: %d %s", rc, why);
        uint64_t expect = s.joined_at, want = 1 + trng_below(&rng, 200);
        for (uint64_t k = 0; k < want && !__atomic_load_n(&c->done, __ATOMIC_ACQUIRE);) {
            int64_t len = ivshm_pubsub_try_recv(&s, buf, sizeof(buf), NULL);
            if (len == -EAGAIN) {
                tc_relax();
                continue;
            }
            CHECKP(len >= 0, "recv: %" PRId64 " (%s)", len, s.why ? s.why : "");
            const char *bad = bad_msg(buf, len, expect, SLOT);
            CHECKP(!*bad, "message %" PRIu64 " after joining at %" PRIu64 ": %s", expect,
                   s.joined_at, bad);
            expect++;
            k++;
        }
        ivshm_pubsub_unsubscribe(&s);
        __atomic_add_fetch(&c->stints, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

static void join_churn(char *detail, size_t dn)
{
    static struct jctx c;
    memset(&c, 0, sizeof(c));
    c.n = tc_count(300000, 30000);
    CHECK(tregion_new(&c.t, 1 << 17) == 0, "region");
    const char *why = NULL;
    CHECK(ivshm_pubsub_create(&c.t.r, "ps", SLOT, 32, IVSHM_PUBSUB_BLOCK, 1000000000ull, 1, 0,
                              &c.info, &why) == 0, "create: %s", why);
    struct ivshm_pubsub_pub p;
    CHECK(ivshm_pubsub_pub_attach(&p, &c.t.r, &c.info, 0, &why) == 0, "attach");
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, churner, &c);
    uint8_t buf[SLOT];
    int64_t t0 = ivshm_chan_now_ns();
    for (uint64_t i = 0; i < c.n && !tc_failed();) {
        make_msg(buf, i, SLOT);
        int rc = ivshm_pubsub_try_send(&p, buf, msg_len(i, SLOT));
        if (rc == -EAGAIN) {
            if (ivshm_chan_now_ns() - t0 > LOST_NS) {
                tc_fail(__FILE__, __LINE__, "publisher stuck at %" PRIu64, i);
                break;
            }
            tc_relax();
            continue;
        }
        CHECK(rc == 0, "send: %d (%s)", rc, p.why ? p.why : "");
        i++;
    }
    __atomic_store_n(&c.done, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    CHECK(p.cuts == 0, "%" PRIu64 " subscribers were cut off", p.cuts);
    snprintf(detail, dn, "%" PRIu64 " messages, %" PRIu64 " subscriptions", c.n, c.stints);
    tregion_free(&c.t);
}

/* ---------------------------------------------------------------------------------------------- */
/* single-threaded cases on a small ring */

struct ring1 {
    struct tregion t;
    struct ivshm_ring_info info;
    struct ivshm_pubsub_pub p;
};

static int ring1_new(struct ring1 *r, uint32_t policy, uint64_t slow_ns, uint32_t cap)
{
    const char *why = NULL;
    memset(r, 0, sizeof(*r));
    if (tregion_new(&r->t, 1 << 16))
        return -1;
    if (ivshm_pubsub_create(&r->t.r, "ps", 32, cap, policy, slow_ns, 1, 0, &r->info, &why))
        return -2;
    return ivshm_pubsub_pub_attach(&r->p, &r->t.r, &r->info, 0, &why);
}

static int send_idx(struct ring1 *r, uint64_t i) { return ivshm_pubsub_try_send(&r->p, &i, 8); }

static int64_t recv_idx(struct ivshm_pubsub_sub *s, uint64_t *v)
{
    return ivshm_pubsub_try_recv(s, v, 8, NULL);
}

static void block_waits_for_slowest(char *detail, size_t dn)
{
    struct ring1 r;
    CHECK(ring1_new(&r, IVSHM_PUBSUB_BLOCK, 1000000000ull, 8) == 0, "ring");
    uint64_t none = 0;
    CHECK(ivshm_pubsub_send_fixed(&r.p, &none, 8, 0) == 0 && r.p.ctrl->head == 0,
          "an empty burst before the first send moved the index to %" PRIu64, r.p.ctrl->head);
    struct ivshm_pubsub_sub a, b;
    CHECK(ivshm_pubsub_subscribe(&a, &r.t.r, &r.info, getpid(), ivshm_pubsub_ns_key(), 0, NULL) == 0, "a");
    CHECK(ivshm_pubsub_subscribe(&b, &r.t.r, &r.info, getpid(), ivshm_pubsub_ns_key(), 0, NULL) == 0, "b");
    for (uint64_t i = 0; i < 8; i++)
        CHECK(send_idx(&r, i) == 0, "send %" PRIu64, i);
    CHECK(send_idx(&r, 8) == -EAGAIN, "a full ring takes a ninth message");
    uint64_t v;
    for (uint64_t i = 0; i < 8; i++)
        CHECK(recv_idx(&a, &v) == 8 && v == i, "a: %" PRIu64, i);
    CHECK(send_idx(&r, 8) == -EAGAIN, "the publisher did not wait for b");
    CHECK(ivshm_pubsub_pending(&b) == 8, "b has %" PRIu64 " pending", ivshm_pubsub_pending(&b));
    CHECK(recv_idx(&b, &v) == 8 && v == 0, "b: 0");
    CHECK(send_idx(&r, 8) == 0, "room after b read one");
    CHECK(send_idx(&r, 9) == -EAGAIN, "one slot freed, two used");
    /* a blocking send through a channel times out while b stays behind */
    struct ivshm_chan ch;
    CHECK(ivshm_chan_init(&ch, IVSHM_KIND_PUBSUB, &r.p, -1, 0, -1, -1, NULL, NULL, 0, 1000000) == 0, "chan");
    CHECK(ivshm_chan_send(&ch, &v, 8, 30000000) == -ETIMEDOUT, "send did not time out");
    /* b leaves: the publisher goes on at a's pace */
    ivshm_pubsub_unsubscribe(&b);
    CHECK(send_idx(&r, 9) == 0, "b left, yet the publisher waits for it");
    CHECK(r.p.cuts == 0, "nobody was cut off");
    ivshm_pubsub_unsubscribe(&a);
    snprintf(detail, dn, "publisher waited for the slowest");
    tregion_free(&r.t);
}

static void drop_cuts_slow(char *detail, size_t dn)
{
    struct ring1 r;
    CHECK(ring1_new(&r, IVSHM_PUBSUB_DROP, 20000000ull /* 20 ms */, 8) == 0, "ring");
    struct ivshm_pubsub_sub fast, slow;
    uint64_t key = ivshm_pubsub_ns_key();
    CHECK(ivshm_pubsub_subscribe(&fast, &r.t.r, &r.info, getpid(), key, 0, NULL) == 0, "fast");
    CHECK(ivshm_pubsub_subscribe(&slow, &r.t.r, &r.info, getpid(), key, 0, NULL) == 0, "slow");
    uint64_t v;
    CHECK(recv_idx(&slow, &v) == -EAGAIN, "empty");
    int64_t t0 = ivshm_chan_now_ns();
    uint64_t i = 0;
    while (i < 100) {
        int rc = send_idx(&r, i);
        if (rc == -EAGAIN) {
            CHECK(ivshm_chan_now_ns() - t0 < LOST_NS, "the slow subscriber was never cut off");
            sched_yield();
            continue;
        }
        CHECK(rc == 0, "send: %d", rc);
        CHECK(recv_idx(&fast, &v) == 8 && v == i, "fast: %" PRIu64, i);
        i++;
    }
    double waited = (ivshm_chan_now_ns() - t0) / 1e9;
    CHECK(waited >= 0.02, "cut off after %.3f s, before its 20 ms", waited);
    CHECK(r.p.cuts == 1 && r.p.last_reason == IVSHM_SUB_CUT_SLOW, "cuts %" PRIu64, r.p.cuts);
    CHECK(recv_idx(&slow, &v) == -ECONNRESET, "the slow subscriber was not told");
    struct ivshm_pubsub_status st;
    CHECK(ivshm_pubsub_sub_status(&slow, &st) == -ECONNRESET, "status");
    CHECK(st.state == IVSHM_SUB_DROPPED && st.reason == IVSHM_SUB_CUT_SLOW, "state %u reason %u",
          st.state, st.reason);
    CHECK(st.cut_head - st.cut_cursor == 8 && st.cut_cursor == 0, "behind %" PRIu64 " from %" PRIu64,
          st.cut_head - st.cut_cursor, st.cut_cursor);
    ivshm_pubsub_unsubscribe(&slow);
    CHECK(IVSHM_SUB_STATE(slow.e->ctl) == IVSHM_SUB_FREE, "leaving freed the cut entry");
    ivshm_pubsub_unsubscribe(&fast);
    snprintf(detail, dn, "cut off after %.3f s, %" PRIu64 " behind", waited, st.cut_head - st.cut_cursor);
    tregion_free(&r.t);
}

static void dead_subscriber_freed(char *detail, size_t dn)
{
    pid_t child = fork();
    if (child == 0)
        _exit(0);
    CHECK(child > 0, "fork");
    CHECK(waitpid(child, NULL, 0) == child, "wait");
    struct ring1 r;
    CHECK(ring1_new(&r, IVSHM_PUBSUB_BLOCK, 3600ull * 1000000000ull, 4) == 0, "ring");
    struct ivshm_pubsub_sub ghost, live;
    uint64_t key = ivshm_pubsub_ns_key();
    CHECK(key != 0, "no namespace key here");
    CHECK(ivshm_pubsub_subscribe(&ghost, &r.t.r, &r.info, (uint32_t)child, key, 0, NULL) == 0, "ghost");
    CHECK(ivshm_pubsub_subscribe(&live, &r.t.r, &r.info, getpid(), key, 0, NULL) == 0, "live");
    uint64_t v;
    for (uint64_t i = 0; i < 20; i++) {
        CHECK(send_idx(&r, i) == 0, "send %" PRIu64 " blocked on a dead subscriber", i);
        CHECK(recv_idx(&live, &v) == 8 && v == i, "live %" PRIu64, i);
    }
    CHECK(r.p.cuts == 1 && r.p.last_reason == IVSHM_SUB_CUT_DEAD, "cuts %" PRIu64, r.p.cuts);
    CHECK(IVSHM_SUB_STATE(ghost.e->ctl) == IVSHM_SUB_FREE, "the dead one's entry was not freed");
    ivshm_pubsub_unsubscribe(&live);
    snprintf(detail, dn, "pid %d gone, entry freed", (int)child);
    tregion_free(&r.t);
}

static void silent_foreign_subscriber_cut(char *detail, size_t dn)
{
    /* a subscriber in another namespace (another VM): no pid to ask about, only its progress */
    struct ring1 r;
    CHECK(ring1_new(&r, IVSHM_PUBSUB_BLOCK, 30000000ull, 4) == 0, "ring");
    struct ivshm_pubsub_sub vm;
    CHECK(ivshm_pubsub_subscribe(&vm, &r.t.r, &r.info, 1, 0x1234, 0, NULL) == 0, "sub");
    uint64_t v;
    int64_t t0 = ivshm_chan_now_ns();
    for (uint64_t i = 0; i < 4; i++)
        CHECK(send_idx(&r, i) == 0, "send");
    CHECK(recv_idx(&vm, &v) == 8 && v == 0, "read one");
    CHECK(send_idx(&r, 4) == 0, "room for one");
    /* now it stays silent: the publisher waits slow_timeout, then takes it for dead */
    uint64_t i = 5;
    for (;;) {
        int rc = send_idx(&r, i);
        if (rc == 0)
            break;
        CHECK(rc == -EAGAIN, "send: %d", rc);
        CHECK(ivshm_chan_now_ns() - t0 < LOST_NS, "a silent subscriber blocks forever");
        sched_yield();
    }
    CHECK(r.p.last_reason == IVSHM_SUB_CUT_DEAD, "reason %u", r.p.last_reason);
    CHECK(recv_idx(&vm, &v) == -ECONNRESET, "it was not told");
    ivshm_pubsub_unsubscribe(&vm);
    snprintf(detail, dn, "cut after %.3f s of silence", (ivshm_chan_now_ns() - t0) / 1e9);
    tregion_free(&r.t);
}

static void hostile_cursors(char *detail, size_t dn)
{
    for (uint32_t policy = IVSHM_PUBSUB_BLOCK; policy <= IVSHM_PUBSUB_DROP; policy++) {
        for (int kind = 0; kind < 3; kind++) {
            struct ring1 r;
            CHECK(ring1_new(&r, policy, 1000000000ull, 8) == 0, "ring");
            struct ivshm_pubsub_sub good, bad;
            CHECK(ivshm_pubsub_subscribe(&good, &r.t.r, &r.info, getpid(), 0, 0, NULL) == 0, "good");
            CHECK(ivshm_pubsub_subscribe(&bad, &r.t.r, &r.info, getpid(), 0, 0, NULL) == 0, "bad");
            uint64_t v;
            for (uint64_t i = 0; i < 8; i++) {
                CHECK(send_idx(&r, i) == 0, "send");
                CHECK(recv_idx(&good, &v) == 8 && v == i, "good");
            }
            /* ahead of the publisher, a lap behind, wildly off */
            uint64_t forged = kind == 0 ? 9 : kind == 1 ? UINT64_MAX - 3 : 1ull << 62;
            __atomic_store_n(&bad.e->cursor, forged, __ATOMIC_RELEASE);
            int rc = send_idx(&r, 8);
            if (policy == IVSHM_PUBSUB_BLOCK) {
                CHECK(rc == -EPROTO && r.p.why_sub == (int32_t)bad.index,
                      "block: rc %d about entry %d", rc, r.p.why_sub);
                CHECK(send_idx(&r, 8) == 0, "the next send goes on");
            } else {
                CHECK(rc == 0, "drop: %d", rc);
            }
            CHECK(r.p.last_reason == IVSHM_SUB_CUT_CURSOR, "reason %u", r.p.last_reason);
            CHECK(recv_idx(&good, &v) == 8 && v == 8, "the good one's view changed");
            CHECK(recv_idx(&bad, &v) == -ECONNRESET, "the bad one was not told");
            for (uint64_t i = 9; i < 40; i++) {
                CHECK(send_idx(&r, i) == 0, "send %" PRIu64, i);
                CHECK(recv_idx(&good, &v) == 8 && v == i, "good %" PRIu64, i);
            }
            tregion_free(&r.t);
        }
    }
    snprintf(detail, dn, "3 forged cursors x 2 policies");
}

static void hostile_slots(char *detail, size_t dn)
{
    struct ring1 r;
    CHECK(ring1_new(&r, IVSHM_PUBSUB_BLOCK, 1000000000ull, 8) == 0, "ring");
    struct ivshm_pubsub_sub s;
    CHECK(ivshm_pubsub_subscribe(&s, &r.t.r, &r.info, getpid(), 0, 0, NULL) == 0, "sub");
    CHECK(send_idx(&r, 0) == 0, "send");
    struct ivshm_pubsub_slot_hdr *h = ivshm_pubsub_slot(s.slots, s.mask, s.stride, 0);
    uint8_t buf[64];
    h->len = 33; /* over the slot size */
    CHECK(ivshm_pubsub_try_recv(&s, buf, sizeof(buf), NULL) == -EPROTO, "long length accepted");
    h->len = 8;
    h->stamp = 1 + 8; /* a stamp from the future: an overrun nobody announced */
    CHECK(ivshm_pubsub_try_recv(&s, buf, sizeof(buf), NULL) == -EPROTO, "future stamp accepted");
    h->stamp = 1;
    /* a forged control word in my entry */
    uint64_t ctl = s.e->ctl;
    s.e->ctl = 0xdeadbeef02ull;
    CHECK(ivshm_pubsub_try_recv(&s, buf, sizeof(buf), NULL) == -ECONNRESET, "forged ctl");
    s.e->ctl = ctl;
    CHECK(ivshm_pubsub_try_recv(&s, buf, sizeof(buf), NULL) == 8, "recovered");
    /* a forged publisher index while joining: refused, nothing read out of bounds */
    ivshm_pubsub_unsubscribe(&s);
    snprintf(detail, dn, "lengths, stamps, control words");
    tregion_free(&r.t);
}

static void overrun_detected(char *detail, size_t dn)
{
    /* a cut-off subscriber reading a message as the publisher rewrites its slot sees the tear */
    struct ring1 r;
    CHECK(ring1_new(&r, IVSHM_PUBSUB_DROP, 0, 4) == 0, "ring");
    struct ivshm_pubsub_sub s;
    CHECK(ivshm_pubsub_subscribe(&s, &r.t.r, &r.info, getpid(), 0, 0, NULL) == 0, "sub");
    for (uint64_t i = 0; i < 4; i++)
        CHECK(send_idx(&r, i) == 0, "send");
    struct ivshm_pubsub_msg m;
    CHECK(ivshm_pubsub_next(&s, &m) == 0, "peek");
    CHECK(send_idx(&r, 4) == 0, "slow_timeout 0 cuts at once");
    CHECK(ivshm_pubsub_check(&s) == -ECONNRESET, "the rewritten slot passed the check");
    snprintf(detail, dn, "torn read reported");
    tregion_free(&r.t);
}

static void limits_and_config(char *detail, size_t dn)
{
    struct ring1 r;
    CHECK(ring1_new(&r, IVSHM_PUBSUB_BLOCK, 1000000000ull, 8) == 0, "ring");
    static struct ivshm_pubsub_sub subs[IVSHM_PUBSUB_MAX_SUBS + 1];
    for (uint32_t i = 0; i < IVSHM_PUBSUB_MAX_SUBS; i++)
        CHECK(ivshm_pubsub_subscribe(&subs[i], &r.t.r, &r.info, 1, 0, 0, NULL) == 0, "sub %u", i);
    const char *why = NULL;
    CHECK(ivshm_pubsub_subscribe(&subs[64], &r.t.r, &r.info, 1, 0, 0, &why) == -EBUSY, "65th");
    ivshm_pubsub_unsubscribe(&subs[10]);
    ivshm_pubsub_unsubscribe(&subs[10]); /* idempotent */
    CHECK(ivshm_pubsub_subscribe(&subs[64], &r.t.r, &r.info, 1, 0, 0, NULL) == 0, "after a leave");
    CHECK(subs[64].index == 10, "took entry %u", subs[64].index);
    struct ivshm_pubsub_subinfo list[IVSHM_PUBSUB_MAX_SUBS];
    CHECK(ivshm_pubsub_list(&r.p, list, IVSHM_PUBSUB_MAX_SUBS) == 64, "list");
    /* the same name with another policy, and with the same one */
    struct ivshm_ring_info info;
    CHECK(ivshm_pubsub_create(&r.t.r, "ps", 32, 8, IVSHM_PUBSUB_DROP, 1000000000ull, 2, 0, &info,
                              &why) == -EEXIST, "policy mismatch");
    CHECK(ivshm_pubsub_create(&r.t.r, "ps", 32, 8, IVSHM_PUBSUB_BLOCK, 1000000000ull, 2, 0, &info,
                              &why) == 1, "same shape");
    /* a second publisher is refused at its first send after the first one sent */
    struct ivshm_pubsub_pub p2;
    CHECK(ivshm_pubsub_pub_attach(&p2, &r.t.r, &r.info, 0, &why) == 0, "attach 2");
    for (uint32_t i = 0; i < IVSHM_PUBSUB_MAX_SUBS + 1; i++)
        ivshm_pubsub_unsubscribe(&subs[i]);
    CHECK(send_idx(&r, 0) == 0, "send 1");
    uint64_t v = 1;
    CHECK(ivshm_pubsub_try_send(&p2, &v, 8) == 0, "p2 takes over from the announced index");
    /* the first notices when it next announces its index, and reports it at the call after */
    CHECK(send_idx(&r, 1) == 0, "send 2");
    CHECK(send_idx(&r, 2) == -EPROTO && r.p.why_sub == -1, "the first publisher did not notice the second");
    /* the config is validated */
    struct ivshm_pubsub_cfg *cfg = (struct ivshm_pubsub_cfg *)(r.t.mem + r.info.offset + IVSHM_PUBSUB_CFG_OFF);
    cfg->policy = 7;
    uint32_t pol;
    uint64_t slow;
    CHECK(ivshm_pubsub_config(&r.t.r, &r.info, &pol, &slow, 0, &why) == -EPROTO, "bad policy");
    snprintf(detail, dn, "64 subscribers, config and publisher checks");
    tregion_free(&r.t);
}

static const struct tcase cases[] = {
    {"pubsub_stream_one_subscriber", stream_one, 0},
    {"pubsub_stream_four_subscribers", stream_four, 0},
    {"pubsub_stream_tiny_ring_doorbells", stream_tiny_ring, 0},
    {"pubsub_leave_early", leave_early, 0},
    {"pubsub_join_late", join_late, 0},
    {"pubsub_join_churn", join_churn, 0},
    {"pubsub_block_waits_for_slowest", block_waits_for_slowest, 0},
    {"pubsub_drop_cuts_slow", drop_cuts_slow, 0},
    {"pubsub_dead_subscriber_freed", dead_subscriber_freed, 0},
    {"pubsub_silent_foreign_subscriber_cut", silent_foreign_subscriber_cut, 0},
    {"pubsub_hostile_cursors", hostile_cursors, 0},
    {"pubsub_hostile_slots", hostile_slots, 0},
    {"pubsub_overrun_detected", overrun_detected, 0},
    {"pubsub_limits_and_config", limits_and_config, 0},
};

int main(int argc, char **argv) { return tc_main(argc, argv, cases, sizeof(cases) / sizeof(cases[0])); }
