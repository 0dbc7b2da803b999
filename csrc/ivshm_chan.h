/* ivshm_chan.h - a ring bound to doorbells: the wake-up protocol, written once.
 *
 * A channel is one side's view of a ring (SPSC or MPMC) plus the doorbells that wake sleepers.
 * Any number of consumers may sleep on an empty ring and any number of producers on a full one,
 * in any processes or VMs: each sleeper claims an entry of its side's sleeper table in the ring's
 * control block (ivshm_layout.h, lines 3 and 4) and writes its route word there (its peer id and
 * vector).  The protocol, proved in docs/wakeup.md:
 *
 *   sleeper: S1 count itself in `waiting`, then claim a free entry (CAS 0 -> route; counting
 *            first keeps `waiting` >= the armed entries, see ivshm_chan_arm);  F1 full fence;
 *            L1 re-check the ring; sleep only if it still is not ready; on waking, take the entry
 *            back (CAS route -> 0; a failed CAS means a waker claimed it and rang us).
 *   waker:   S2 publish (or release slots);  F2 full fence;  L2 load `waiting`; if non-zero,
 *            claim ONE armed entry (CAS route -> 0) and ring its route.
 *   pass-on: a sleeper that woke and leaves while its side of the ring is still ready (messages
 *            remain for consumers, room remains for producers) wakes one more sleeper of its side.
 *
 * F1/F2 give the Dekker guarantee (either the sleeper sees the publish or the waker sees the
 * entry); claiming by CAS makes every ring reach a different sleeper, at most one ring per sleep;
 * pass-on covers publishes that found every sleeper already claimed.  A doorbell that arrives
 * between the re-check and the sleep is kept by the eventfd's counter.  Doorbells can still be
 * lost outside the protocol (a peer not connected yet, MSI-X not enabled), so sleepers wake every
 * `recheck_ns` and look again: a safety net that no correct path depends on.
 *
 * Sleepers that find the table full, and channels without a doorbell fd, poll with back-off
 * (50 us doubling to 1 ms) instead of sleeping on a doorbell.
 *
 * Trust: the sleeper table is shared memory.  A route word is used only if it has the armed bit,
 * a peer id <= IVSHM_MAX_PEER_ID and a vector < IVSHM_MAX_VECTORS; the resolver decides whether
 * the peer exists.  A hostile peer can make us ring doorbells that exist (a hint, never harm) or
 * skip a ring (the re-check bounds the cost); every scan is bounded by IVSHM_SLEEPERS.
 *
 * Threads: one struct ivshm_chan may be used by several threads at once (a ring's own rules on
 * who may produce and consume still apply); per-call state lives in struct ivshm_chan_call.
 */
#ifndef IVSHM_CHAN_H
#define IVSHM_CHAN_H

#include <errno.h>
#include <stdint.h>

#include "ivshm_atomic.h"
#include "ivshm_doorbell.h"
#include "ivshm_layout.h"
#include "ivshm_mpmc.h"
#include "ivshm_pubsub.h"
#include "ivshm_spsc.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Doorbells (struct ivshm_bell, ivshm_bell_ring, the bell table) are ivshm_doorbell.h's. */

/* The doorbell interface: fill *out with how to ring `vector` of peer `peer`; return 0, or a
 * negative value when that peer or vector is unknown (the ring is then lost, and the sleeper's
 * re-check covers it).  Called while a channel wakes someone: rarely, never per message while
 * both sides are awake.  Host peers resolve to eventfds, guests to their BAR0 register;
 * ivshm_bell_table_resolve (ivshm_doorbell.h) is one, over a provider's bell table. */
typedef int (*ivshm_chan_resolve_fn)(void *ctx, uint32_t peer, uint32_t vector, struct ivshm_bell *out);

/* Which side of the ring a call acts for. */
#define IVSHM_CHAN_RECV 0u /* a consumer: waits until a message is there, wakes producers */
#define IVSHM_CHAN_SEND 1u /* a producer: waits until there is room, wakes consumers */

struct ivshm_chan_stats {
    uint64_t doorbells; /* rings sent */
    uint64_t sleeps;    /* blocking waits entered (doorbell or polling) */
    uint64_t wakeups;   /* waits ended by a doorbell */
    uint64_t unrouted;  /* sleepers claimed whose route the resolver did not know */
    uint64_t passes;    /* rings sent to pass a wake-up on to a sleeper of one's own side */
    uint64_t arms;      /* entries taken: each can cost the other side at most one ring (a waker
                           may claim an entry whose sleeper then finds work in its re-check and
                           never sleeps, so rings are bounded by arms, not by sleeps) */
};

/* A process's sleepers on one doorbell fd (an eventfd is one counter for all of them; each ring
 * is one unit meant for the sleeper whose entry the waker claimed).  Process-local memory, all
 * zero when unused (no set-up, nothing to free).  Each sleeper on the fd is counted in `count`
 * and is linked in `head` with its armed entry (the node lives in its struct ivshm_chan_call): so
 * a sleeper that took units it was not rung for can tell how many of them other sleepers here
 * still need (those whose entry a waker claimed and who have not taken a unit yet), put back
 * that many, and drop the rest, rather than pass a stray unit back and forth with another idle
 * sleeper.  Changed only under `lock` (a spin lock: held for a walk of the list, never across a
 * system call). */
struct ivshm_fd_sleeper {
    const uint32_t *entry; /* the sleeper table entry it armed */
    uint32_t word;         /* the word it wrote there (another value: a waker claimed it) */
    uint32_t took;         /* it took its ring's unit (atomic, written by its owner) */
    struct ivshm_fd_sleeper *next, *prev;
};
struct ivshm_fd_share {
    uint32_t lock;   /* 0 free, 1 held */
    uint32_t count;  /* sleepers on the fd, all in the list (atomic; changed under lock) */
    uint32_t unread; /* rings left in the fd by sleepers that woke alone (atomic; see
                        ivshm_chan_wait) */
    struct ivshm_fd_sleeper *head;
};

struct ivshm_chan {
    uint32_t kind;             /* IVSHM_KIND_SPSC or IVSHM_KIND_MPMC */
    uint32_t route;            /* my route word (IVSHM_SLEEPER_WORD), 0: I cannot be rung */
    struct ivshm_ring_ctrl *ctrl;
    struct ivshm_spsc *spsc;   /* exactly one of these, after the kind */
    struct ivshm_mpmc *mpmc;
    void *pubsub;              /* IVSHM_KIND_PUBSUB: a struct ivshm_pubsub_pub or _sub (its role) */
    int wait_fd;               /* readable when my vector is rung (non-blocking); -1: poll */
    int cancel_fd;             /* readable once waits must stop (owner closing); -1: none */
    int cancel_fd2;            /* a second such fd (e.g. the region's and the channel's); -1 */
    ivshm_chan_resolve_fn resolve;
    void *resolve_ctx;
    uint64_t spin_ns;          /* busy-poll this long before sleeping (per blocking call) */
    uint64_t recheck_ns;       /* sleepers look at the ring at least this often */
    uint32_t start_cons, start_prod; /* where wakers start their scans (fairness), a hint */
    /* The sleepers of this process on wait_fd, shared by every channel of this process that
     * sleeps on the same fd (NULL: this channel is alone on it).  A sleeper woken by a ring meant
     * for another one puts it back only for sleepers there that were rung and have not taken
     * their ring yet.  Set by the owner after init: channels (or threads) of one process that
     * sleep on one fd must share one struct here, or a sleeper that thinks itself alone can take
     * a ring meant for another. */
    struct ivshm_fd_share *fd_share;
    uint32_t unread;           /* as fd_share->unread, for a channel without fd_share */
    struct ivshm_chan_stats st; /* updated with relaxed atomics */
};

/* One blocking call's state (on the caller's stack).  ivshm_chan_call_init() sets the deadline:
 * an absolute CLOCK_MONOTONIC time in ns, or IVSHM_CHAN_FOREVER. */
#define IVSHM_CHAN_FOREVER INT64_MAX
struct ivshm_chan_call {
    int64_t deadline_ns;
    int64_t spin_until_ns; /* 0 until the spin phase began */
    uint32_t side;
    uint32_t slept;        /* sleeps entered during this call */
    uint64_t need;         /* SPSC producers: slots needed for the message waited for */
    int entry;             /* the table entry this call holds while armed, -1 when none */
    uint32_t word;         /* the word it wrote there: route and ticket */
    uint32_t backoff_us;   /* polling back-off */
    int fd_counted;        /* while sleeping: 1 if counted and linked in ch->fd_share */
    struct ivshm_fd_sleeper fd_node; /* its node in ch->fd_share's list, while counted */
    int claimed_early;     /* sleep_begin found the entry claimed: no ring is this call's */
    int crowded;           /* it put back rings other sleepers of the fd have not taken: its
                              next sleep is a back-off step, not a poll of the readable fd */
};

/* Set up a channel over `ring` (a struct ivshm_spsc * or struct ivshm_mpmc *, per `kind`; for
 * IVSHM_KIND_PUBSUB a publisher's or a subscriber's handle: the publisher sleeps on the producer
 * side, subscribers on the consumer side, and the publisher's sends ring every sleeper).
 * `peer`/`vector`: my route, or peer < 0 for a channel that cannot be rung (it polls).
 * Returns 0 or -EINVAL (bad kind, route out of range, recheck of 0). */
int ivshm_chan_init(struct ivshm_chan *ch, uint32_t kind, void *ring, int peer, int vector,
                    int wait_fd, int cancel_fd, ivshm_chan_resolve_fn resolve, void *resolve_ctx,
                    uint64_t spin_ns, uint64_t recheck_ns);
/* (ch->cancel_fd2 is -1 after init; set it directly to watch a second fd.) */

int64_t ivshm_chan_now_ns(void);

/* Start a blocking call: `timeout_ns` < 0 waits forever.  `need` is the number of slots an SPSC
 * producer waits for (ivshm_spsc_slots_for), 1 otherwise. */
void ivshm_chan_call_init(struct ivshm_chan_call *call, uint32_t side, int64_t timeout_ns,
                          uint64_t need);

/* The call made progress (part of a batch went, or came): its next wait spins again, and a
 * polling back-off starts again from its shortest step, as a new call's would; the deadline
 * stays.  A batch that waits for room slot after slot would otherwise spin only before its
 * first slot and sleep on the doorbell before every later one. */
void ivshm_chan_call_progress(struct ivshm_chan_call *call);

/* 1 if the call's side of the ring is ready: a message at the consumers' index, room for `need`
 * slots at the producers'.  Never consumes anything.  A corrupt ring reads as ready (the caller's
 * next ring operation reports the corruption). */
int ivshm_chan_ready(const struct ivshm_chan *ch, uint32_t side, uint64_t need);

/* Wait until the call's side may be ready, the deadline passes, or cancel_fd fires: spin (once
 * per call), then arm, re-check, sleep up to recheck_ns, disarm.  A sleeper rung for itself and
 * alone on wait_fd leaves the ring's unit in the fd and goes at once to the ring; the next sleep
 * on the fd takes it before arming (so that the read is not on the wake-up's path).  Returns 1
 * (try the ring again), 0 (deadline passed), -ECANCELED, -EINTR (a signal: handle it and call
 * again), or -errno.  The call holds no table entry when this returns. */
int ivshm_chan_wait(struct ivshm_chan *ch, struct ivshm_chan_call *call);

/* The two halves of ivshm_chan_wait's sleep, for event loops that sleep on wait_fd themselves
 * (asyncio): arm claims an entry and fences, then the caller re-checks the ring, sleeps, and
 * disarms.  Arm returns 1 if armed, 0 if no entry was free (poll instead). */
int ivshm_chan_arm(struct ivshm_chan *ch, struct ivshm_chan_call *call);
void ivshm_chan_disarm(struct ivshm_chan *ch, struct ivshm_chan_call *call);

/* Take a doorbell from wait_fd after an event loop saw it readable, while `call` still holds
 * its entry and is counted (between sleep_begin and sleep_end): keeps one ring if the entry was
 * claimed, puts back the rings that other sleepers of this process on the fd were rung with and
 * have not taken (see fd_share), and drops the rest.  1 if a ring for this call was taken (or the
 * call is alone on the fd: any ring there is its own or a stray), 0 if not, -errno. */
int ivshm_chan_absorb(struct ivshm_chan *ch, struct ivshm_chan_call *call);

/* Bracket a sleep that an event loop makes on wait_fd itself (ivshm_chan_wait does its own):
 * begin counts the sleep and, if the call is armed, counts it among the sleepers on the fd
 * (fd_share), then looks at the call's entry once more.
 * It returns 1 if a waker claimed the entry already: then do not sleep, but absorb (which now
 * keeps no ring for this call: another sleeper of this fd that read its ring before this one
 * was counted may have dropped it, and a ring taken now could be another sleeper's; see
 * docs/wakeup.md) and look at the ring.  0: sleep on wait_fd, then absorb.  sleep_end follows
 * in both cases. */
int ivshm_chan_sleep_begin(struct ivshm_chan *ch, struct ivshm_chan_call *call);
void ivshm_chan_sleep_end(struct ivshm_chan *ch, struct ivshm_chan_call *call);

/* After sleep_begin returned 0: 1 if the call sleeps on wait_fd, 0 if it sleeps one back-off
 * step (ivshm_chan_backoff_ns: 50 us doubling to 1 ms per call) with only the cancel fds and
 * then absorbs as if woken (absorb then looks at its entry).  0 when it is not armed, or when
 * its last absorb put back rings that other sleepers of the fd had not taken yet (the fd stays
 * readable until they do, so polling it would end at once, again and again). */
int ivshm_chan_sleep_on_fd(struct ivshm_chan *ch, struct ivshm_chan_call *call);
int64_t ivshm_chan_backoff_ns(struct ivshm_chan_call *call);

/* After publishing (IVSHM_CHAN_SEND side woke consumers) or releasing slots (RECV side wakes
 * producers): ring one sleeper of the OTHER side, if any sleeps.  1 rung, 0 nobody to ring. */
int ivshm_chan_wake_other(struct ivshm_chan *ch, uint32_t my_side);

/* Publish-subscribe: every subscriber needs every message, so after a publish the publisher rings
 * EVERY armed sleeper of the other side, not one (each claimed by CAS as in wake_other, so a
 * sleeper is rung at most once per sleep).  The number rung. */
int ivshm_chan_wake_all(struct ivshm_chan *ch, uint32_t my_side);

/* At the end of a blocking call that slept: if the call's side is still ready, wake one more
 * sleeper of the same side (pass-on).  Cheap; a no-op for calls that never slept. */
void ivshm_chan_pass_on(struct ivshm_chan *ch, struct ivshm_chan_call *call);

/* Blocking send and receive for C programs (any signal restarts the wait).  timeout_ns < 0 waits
 * forever.  Send: 0, -ETIMEDOUT, -EMSGSIZE, -ECANCELED, -EPROTO.  Receive: the message length,
 * -ETIMEDOUT, -ENOBUFS (buf too small: the message stays queued; *needed says how large),
 * -ECANCELED, -EPROTO. */
int ivshm_chan_send(struct ivshm_chan *ch, const void *data, uint64_t len, int64_t timeout_ns);
int64_t ivshm_chan_recv(struct ivshm_chan *ch, void *buf, uint64_t cap, uint64_t *needed,
                        int64_t timeout_ns);

/* A snapshot of the counters. */
void ivshm_chan_get_stats(const struct ivshm_chan *ch, struct ivshm_chan_stats *out);

#ifdef __cplusplus
}
#endif
#endif /* IVSHM_CHAN_H */
