/* tchan.h - what the channel tests share: their time limits and a blocking ping-pong.
 *
 * Included after tcommon.h by test_chan.c and test_bell.c. */
#ifndef TCHAN_H
#define TCHAN_H

#include "ivshm_chan.h"
#include "tcommon.h"

#define RECHECK_NS (60ull * 1000000000ull) /* re-checks never rescue a lost doorbell here */
#define LOST_NS (20ll * 1000000000ll)      /* far below the re-check: only a doorbell is this fast */

/* Two parties ping-pong an 8-byte counter `rounds` times over the SPSC rings "a" (ping) and "b"
 * (pong) of a fresh region, both blocking on channels that never spin, so that every message is
 * a sleep and a doorbell.  The pong thread is peer 1 and sleeps on fd_pong, the caller is peer 2
 * and sleeps on fd_ping, both on `vector`; both ring through resolve(ctx). */
struct tchan_pp {
    ivshm_chan_resolve_fn resolve;
    void *ctx;
    int fd_ping, fd_pong;
    int vector;
    uint64_t rounds;
    /* filled in by tchan_pingpong */
    struct tregion t;
    struct ivshm_ring_info a, b;
    struct ivshm_chan_stats tx, rx; /* the caller's two channels */
};

static int tchan_pair(struct tchan_pp *p, int peer, int fd, const struct ivshm_ring_info *out_info,
                       const struct ivshm_ring_info *in_info, struct ivshm_spsc *out,
                       struct ivshm_spsc *in, struct ivshm_chan *tx, struct ivshm_chan *rx)
{
    const char *why = NULL;
    if (ivshm_spsc_attach(out, &p->t.r, out_info, &why) != 0 ||
        ivshm_spsc_attach(in, &p->t.r, in_info, &why) != 0) {
        tc_fail(__FILE__, __LINE__, "peer %d cannot attach its rings: %s", peer, why ? why : "?");
        return -1;
    }
    ivshm_chan_init(tx, IVSHM_KIND_SPSC, out, peer, p->vector, fd, -1, p->resolve, p->ctx, 0,
                    RECHECK_NS);
    ivshm_chan_init(rx, IVSHM_KIND_SPSC, in, peer, p->vector, fd, -1, p->resolve, p->ctx, 0,
                    RECHECK_NS);
    return 0;
}

static void *tchan_pong(void *p_)
{
    struct tchan_pp *p = p_;
    struct ivshm_spsc in, out;
    struct ivshm_chan rx, tx;
    if (tchan_pair(p, 1, p->fd_pong, &p->b, &p->a, &out, &in, &tx, &rx) != 0)
        return NULL;
    for (uint64_t i = 0; i < p->rounds; i++) {
        uint64_t v;
        CHECKP(ivshm_chan_recv(&rx, &v, sizeof(v), NULL, LOST_NS) == 8, "pong recv %" PRIu64, i);
        CHECKP(v == i, "pong got %" PRIu64, v);
        v++;
        CHECKP(ivshm_chan_send(&tx, &v, sizeof(v), LOST_NS) == 0, "pong send");
    }
    return NULL;
}

static void tchan_pingpong(struct tchan_pp *p)
{
    CHECK(tregion_new(&p->t, 1 << 16) == 0, "region");
    const char *why = NULL;
    CHECK(ivshm_region_create_ring(&p->t.r, "a", IVSHM_KIND_SPSC, 8, 4, 1, 0, &p->a, &why) == 0, "a");
    CHECK(ivshm_region_create_ring(&p->t.r, "b", IVSHM_KIND_SPSC, 8, 4, 1, 0, &p->b, &why) == 0, "b");
    pthread_t th;
    pthread_create(&th, NULL, tchan_pong, p);
    struct ivshm_spsc out, in;
    struct ivshm_chan tx, rx;
    int ok = tchan_pair(p, 2, p->fd_ping, &p->a, &p->b, &out, &in, &tx, &rx) == 0;
    for (uint64_t i = 0; ok && i < p->rounds && !tc_failed(); i++) {
        uint64_t v;
        int64_t n = -1;
        if (ivshm_chan_send(&tx, &i, sizeof(i), LOST_NS) == 0)
            n = ivshm_chan_recv(&rx, &v, sizeof(v), NULL, LOST_NS);
        if (n != 8 || v != i + 1) {
            tc_fail(__FILE__, __LINE__, "ping round %" PRIu64 ": %s", i,
                    n == -ETIMEDOUT ? "lost wake-up" : n == -1 ? "send failed" : "wrong answer");
            ok = 0;
        }
    }
    /* a failed ping leaves the pong thread waiting: it gives up after LOST_NS */
    pthread_join(th, NULL);
    if (ok) {
        ivshm_chan_get_stats(&tx, &p->tx);
        ivshm_chan_get_stats(&rx, &p->rx);
    }
    tregion_free(&p->t);
}

#endif /* TCHAN_H */
