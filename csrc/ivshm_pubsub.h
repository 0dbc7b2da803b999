/* ivshm_pubsub.h - publish-subscribe ring: one publisher, every subscriber reads every message.
 *
 * The publisher writes each message once, into slot i & mask, stamped i + 1.  Each subscriber has
 * an entry in the ring's subscriber table (ivshm_layout.h) holding its cursor: the next index it
 * reads; it finds messages by the stamp of the slot at its cursor, never by the publisher's index.
 * The publisher may overwrite slot i (with message i + capacity) once every ACTIVE subscriber's
 * cursor is past i.  It keeps the lowest cursor it saw in private memory and looks at the table
 * again only when that cached minimum says the ring is full, so a publisher ahead of its
 * subscribers by less than a ring reads no subscriber line at all.
 *
 * Slow subscribers (the ring's policy, chosen at creation):
 *   BLOCK: the publisher waits for the slowest live subscriber (its callers' timeouts apply).
 *   DROP:  a subscriber that has held the publisher back for slow_timeout (continuously behind by a
 *          full ring, without catching up to within half a ring) is cut off: its entry becomes
 *          DROPPED and its next call fails with -ECONNRESET, saying how far behind it was.
 *   Either way a dead subscriber never holds the publisher for good: one in the publisher's pid
 *   namespace whose process is gone is cut off at once (kill(pid, 0)); one in another VM or
 *   namespace that holds the publisher back without any progress (nor heartbeat) for slow_timeout
 *   is taken for dead and cut off.
 *
 * Joining (proved in docs/pubsub.md): a subscriber claims a FREE entry (CAS to JOINING, the
 * generation grows), issues a full fence (J), sets its cursor to ctrl->head and CASes the entry to
 * ACTIVE.  The publisher issues a full fence (P) before each look at the table, and looks only
 * while ctrl->head equals its own index.  A look whose P precedes J did not see the claim, and the
 * joiner's read returns at least the index that look saw, past every slot the publisher can
 * overwrite before its next look; that next look sees the entry, and treats a JOINING one as a
 * subscriber whose cursor is the index at the look before.
 *
 * Reading is a sequence lock per slot: the publisher stores stamp 0, a release fence, the payload,
 * then stamp i + 1 (release).  A subscriber loads the stamp (acquire), copies, issues an acquire
 * fence and loads the stamp again: the copy is whole if both loads gave i + 1.  Under BLOCK only a
 * subscriber that was cut off can meet a slot being rewritten; it learns so from the second load.
 *
 * Trust: everything read from the region is validated.  The publisher keeps its index privately; a
 * subscriber cursor outside [head - capacity, head] cuts that subscriber off (DROP) or is reported
 * as -EPROTO naming the entry, and cut off, so the next call goes on (BLOCK).  A subscriber checks
 * stamps and lengths, and its own entry's control word on every call.  A peer that writes another
 * subscriber's entry can at worst get that subscriber cut off (which it is told), never make it
 * read a torn or out-of-bounds message.  Every scan is bounded by IVSHM_PUBSUB_MAX_SUBS.
 *
 * Functions return 0 / counts, or -errno: -EAGAIN (full / empty), -EMSGSIZE, -EPROTO (corruption:
 * `why`, `why_a`, `why_b` say what), -ECONNRESET (this subscriber was cut off: see
 * ivshm_pubsub_sub_status), -EBUSY (no free subscriber entry), -EEXIST (a ring of that name with
 * another policy), -ETIMEDOUT (a creator never finished writing the config).
 */
#ifndef IVSHM_PUBSUB_H
#define IVSHM_PUBSUB_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ivshm_atomic.h"
#include "ivshm_copy.h"
#include "ivshm_layout.h"
#include "ivshm_region.h"

#ifdef __cplusplus
extern "C" {
#endif

#define IVSHM_PUBSUB_ROLE_PUB 1u
#define IVSHM_PUBSUB_ROLE_SUB 2u

/* What a channel (ivshm_chan.c) calls on either handle, through pointers so that programs which
 * link the channel without this file still link: ready (see ivshm_pubsub_ready), and the one-message
 * send or receive of the handle's side (-EINVAL on the other side). */
struct ivshm_pubsub_ops {
    int (*ready)(void *ring, uint64_t need);
    /* the longest a sleeper of this handle may go without a look: a publisher must look again
     * within its slow_timeout to cut off subscribers that hold it back (nobody rings it then) */
    uint64_t (*recheck_ns)(const void *ring);
    int (*try_send)(void *ring, const void *data, uint64_t len);
    int64_t (*try_recv)(void *ring, void *buf, uint64_t cap, uint64_t *needed);
};

/* What the publisher remembers of one table entry (private). */
struct ivshm_pubsub_track {
    uint64_t ctl;          /* the control word this is about; another one resets the rest */
    uint64_t cursor;       /* its cursor at the last look */
    uint64_t heartbeat;
    int64_t behind_since;  /* ns: first seen holding the publisher back, 0 when not */
    int64_t quiet_since;   /* ns: last progress (cursor or heartbeat) seen while behind */
    uint64_t floor;        /* a joiner's cursor will be at least this (docs/pubsub.md) */
};

/* The publisher's handle (private memory).  `ctrl`, `role` and `ops` come first in both handles:
 * a channel tells them apart by `role`. */
struct ivshm_pubsub_pub {
    struct ivshm_ring_ctrl *ctrl;
    uint32_t role;
    uint32_t _pad0;
    const struct ivshm_pubsub_ops *ops;
    uint32_t capacity;
    uint32_t slot_size;
    uint32_t stride;
    uint64_t mask;
    uint8_t *slots;
    struct ivshm_pubsub_cfg *cfg;
    struct ivshm_pubsub_entry *subs;
    uint32_t policy;
    uint32_t recovered;      /* the first look at ctrl->head was made */
    int64_t slow_ns;
    uint64_t ns_key;         /* this process's pid namespace key (ivshm_pubsub_ns_key) */
    uint64_t head;           /* next index to write */
    uint64_t head_published; /* last value stored to ctrl->head */
    uint64_t min_cache;      /* lowest cursor at the last look (head if none) */
    uint64_t look_head;      /* head at the last look at the table */
    uint32_t looked;         /* look_head is valid */
    uint32_t active;         /* ACTIVE subscribers at the last look */
    int32_t pending;         /* 1: no look yet; < 0: an error found by a look made for
                              * ivshm_chan_ready, for the next call; 0 otherwise */
    uint64_t cuts;           /* subscribers this handle cut off */
    int32_t last_cut;        /* entry of the last cut, -1 none */
    uint32_t last_reason;
    uint64_t last_behind;    /* messages that subscriber was behind */
    const char *why;
    uint64_t why_a, why_b;
    int32_t why_sub;         /* the entry the corruption is about, -1 none */
    uint32_t _pad;
    struct ivshm_pubsub_track trk[IVSHM_PUBSUB_MAX_SUBS];
};

/* One subscriber's handle (private memory). */
struct ivshm_pubsub_sub {
    struct ivshm_ring_ctrl *ctrl;
    uint32_t role;
    uint32_t _pad0;
    const struct ivshm_pubsub_ops *ops;
    uint32_t capacity;
    uint32_t slot_size;
    uint32_t stride;
    uint64_t mask;
    uint8_t *slots;
    struct ivshm_pubsub_cfg *cfg;
    struct ivshm_pubsub_entry *e; /* my entry */
    uint32_t index;               /* its number in the table */
    uint32_t closed;
    uint64_t ctl;                 /* my entry's control word while I own it */
    uint64_t cursor;              /* next index to read */
    uint64_t cursor_published;    /* last value stored to e->cursor */
    uint64_t joined_at;
    const char *why;
    uint64_t why_a, why_b;
};

/* A message found by ivshm_pubsub_next: valid until the caller moves on (and, under DROP, only if
 * ivshm_pubsub_check still says so after it was read). */
struct ivshm_pubsub_msg {
    const uint8_t *data;
    uint64_t len;
};

/* How a subscriber stands (ivshm_pubsub_sub_status). */
struct ivshm_pubsub_status {
    uint32_t state;      /* IVSHM_SUB_* of my entry, or IVSHM_SUB_FREE if it was taken from me */
    uint32_t reason;     /* IVSHM_SUB_CUT_* when cut off */
    uint64_t cursor;     /* my cursor */
    uint64_t head;       /* the publisher's published index now */
    uint64_t cut_head;   /* when cut off: the publisher's index then */
    uint64_t cut_cursor; /* and my cursor then */
};

/* One publisher-side view of an entry (ivshm_pubsub_list), copied and validated. */
struct ivshm_pubsub_subinfo {
    uint32_t index;
    uint32_t state;
    uint64_t generation;
    uint64_t cursor;
    uint32_t pid;
    uint32_t reason;
    uint64_t ns_key;
    uint64_t heartbeat;
    uint64_t cut_head;
    uint64_t cut_cursor;
    uint64_t joined_at;
};

/* -- creation and attaching ----------------------------------------------------------------------- */

/* A key for this process's pid namespace on this boot (boot id and the namespace's inode, hashed):
 * two processes with the same key can check each other's pids with kill(pid, 0).  0 if unknown. */
uint64_t ivshm_pubsub_ns_key(void);

/* Create the ring (or find it) and write its config.  As ivshm_region_create_ring, plus: -EEXIST
 * when it exists with another policy or slow_timeout, -ETIMEDOUT when its creator never wrote the
 * config (waited up to wait_ms), -EINVAL for a policy that is neither BLOCK nor DROP. */
int ivshm_pubsub_create(struct ivshm_region *r, const char *name, uint32_t slot_size,
                        uint32_t capacity, uint32_t policy, uint64_t slow_timeout_ns,
                        uint64_t token, int wait_ms, struct ivshm_ring_info *out, const char **why);

/* Read and validate a ring's config (waiting up to wait_ms for its creator to finish). */
int ivshm_pubsub_config(const struct ivshm_region *r, const struct ivshm_ring_info *info,
                        uint32_t *policy, uint64_t *slow_timeout_ns, int wait_ms, const char **why);

/* The publisher's handle.  One publisher per ring: a second one is detected at its first send
 * (-EPROTO, "another publisher"). */
int ivshm_pubsub_pub_attach(struct ivshm_pubsub_pub *p, const struct ivshm_region *r,
                            const struct ivshm_ring_info *info, int wait_ms, const char **why);

/* Join as a subscriber: claims an entry; the first message it reads is the first published after
 * this returns (or slightly earlier).  `pid`/`ns_key` identify this process for the liveness check
 * (ns_key 0: only the progress rule applies).  -EBUSY when all entries are taken. */
int ivshm_pubsub_subscribe(struct ivshm_pubsub_sub *s, const struct ivshm_region *r,
                           const struct ivshm_ring_info *info, uint32_t pid, uint64_t ns_key,
                           int wait_ms, const char **why);

/* Leave: frees the entry (also one that was cut off).  Idempotent. */
void ivshm_pubsub_unsubscribe(struct ivshm_pubsub_sub *s);

/* -- the publisher --------------------------------------------------------------------------------- */

/* The look at the subscriber table behind ivshm_pubsub_room (not inline: rare). */
int64_t ivshm_pubsub_rescan(struct ivshm_pubsub_pub *p, uint64_t need);

/* ivshm_pubsub_room's slow path: a pending report, the first look, or a look for room. */
int64_t ivshm_pubsub_room_slow(struct ivshm_pubsub_pub *p, uint64_t need);

/* Free slots, looking at the table only when the cached minimum says fewer than `need` are free.
 * May cut subscribers off as the policy says.  -EPROTO (BLOCK: a misbehaving subscriber, now cut
 * off; another publisher). */
static inline int64_t ivshm_pubsub_room(struct ivshm_pubsub_pub *p, uint64_t need)
{
    uint64_t used = p->head - p->min_cache; /* <= capacity: min_cache is a validated cursor */
    if (IVSHM_LIKELY(p->pending == 0 && used + need <= p->capacity))
        return (int64_t)(p->capacity - used);
    return ivshm_pubsub_room_slow(p, need);
}

static inline struct ivshm_pubsub_slot_hdr *ivshm_pubsub_slot(const uint8_t *slots, uint64_t mask,
                                                              uint32_t stride, uint64_t i)
{
    return (struct ivshm_pubsub_slot_hdr *)(slots + (i & mask) * (uint64_t)stride);
}

/* Open slot `p->head` for writing: its payload.  The stamp is cleared first, so a subscriber that
 * was cut off and still reads the previous message there sees its copy is torn. */
static inline uint8_t *ivshm_pubsub_begin(struct ivshm_pubsub_pub *p)
{
    struct ivshm_pubsub_slot_hdr *h = ivshm_pubsub_slot(p->slots, p->mask, p->stride, p->head);
    /* release: a reader that loads this 0 (acquire) also sees a cut-off made before it */
    IVSHM_STORE_RELEASE(&h->stamp, 0);
    /* orders the cleared stamp before the payload stores: pairs with the acquire fence a reader
     * issues between its copy and its second load of the stamp (ivshm_pubsub_check) */
    atomic_thread_fence(memory_order_release);
    return (uint8_t *)h + IVSHM_PUBSUB_SLOT_HDR;
}

/* Close the slot opened by ivshm_pubsub_begin with `len` bytes: the message is readable now. */
static inline void ivshm_pubsub_end(struct ivshm_pubsub_pub *p, uint32_t len)
{
    struct ivshm_pubsub_slot_hdr *h = ivshm_pubsub_slot(p->slots, p->mask, p->stride, p->head);
    h->len = len;
    /* publishes the payload: pairs with the subscriber's acquire load in ivshm_pubsub_next */
    IVSHM_STORE_RELEASE(&h->stamp, p->head + 1);
    p->head++;
}

/* Announce what was written in ctrl->head (for joiners and inspection; subscribers go by stamps). */
static inline void ivshm_pubsub_publish(struct ivshm_pubsub_pub *p)
{
    if (p->head != p->head_published) {
        /* a line only we write, so this load hits our cache: another publisher's store shows */
        uint64_t own = IVSHM_LOAD_RELAXED(&p->ctrl->head);
        if (IVSHM_UNLIKELY(own != p->head_published)) {
            p->why = "another publisher moved this ring's index (one publisher per ring)";
            p->why_a = own;
            p->why_b = p->head_published;
            p->why_sub = -1;
            p->pending = -EPROTO; /* reported by the next call */
        }
        /* pairs with a joiner's loads of ctrl->head (ivshm_pubsub_subscribe) */
        IVSHM_STORE_RELEASE(&p->ctrl->head, p->head);
        p->head_published = p->head;
    }
}

static inline int ivshm_pubsub_try_send(struct ivshm_pubsub_pub *p, const void *data, uint64_t len)
{
    if (IVSHM_UNLIKELY(len > p->slot_size))
        return -EMSGSIZE;
    int64_t room = ivshm_pubsub_room(p, 1);
    if (IVSHM_UNLIKELY(room <= 0))
        return room < 0 ? (int)room : -EAGAIN;
    ivshm_copy(ivshm_pubsub_begin(p), data, len);
    ivshm_pubsub_end(p, (uint32_t)len);
    ivshm_pubsub_publish(p);
    return 0;
}

/* Send up to n messages of `elem` bytes each from `data` (one announce): the count sent (0 when
 * full), or -errno. */
static inline int64_t ivshm_pubsub_send_fixed(struct ivshm_pubsub_pub *p, const void *data,
                                              uint32_t elem, uint64_t n)
{
    if (IVSHM_UNLIKELY(elem > p->slot_size))
        return -EMSGSIZE;
    /* asking for all n looks at the table when the cached room is smaller: a burst is cut short
     * only by a real lack of room */
    int64_t room = ivshm_pubsub_room(p, n < p->capacity ? n : p->capacity);
    if (room <= 0)
        return room < 0 ? room : 0;
    uint64_t m = (uint64_t)room < n ? (uint64_t)room : n;
    for (uint64_t k = 0; k < m; k++) {
        ivshm_copy(ivshm_pubsub_begin(p), (const uint8_t *)data + k * elem, elem);
        ivshm_pubsub_end(p, elem);
    }
    ivshm_pubsub_publish(p);
    return (int64_t)m;
}

/* Zero copy: a pointer to `len` bytes of the next slot (-EAGAIN full, -EMSGSIZE); then commit. */
static inline int ivshm_pubsub_reserve(struct ivshm_pubsub_pub *p, uint64_t len, uint8_t **ptr)
{
    if (len > p->slot_size)
        return -EMSGSIZE;
    int64_t room = ivshm_pubsub_room(p, 1);
    if (room <= 0)
        return room < 0 ? (int)room : -EAGAIN;
    *ptr = ivshm_pubsub_begin(p);
    return 0;
}

static inline void ivshm_pubsub_commit(struct ivshm_pubsub_pub *p, uint32_t len)
{
    ivshm_pubsub_end(p, len);
    ivshm_pubsub_publish(p);
}

/* Cut subscriber `index` off now (IVSHM_SUB_CUT_BY_PUBLISHER).  1 if it was active, 0 if not. */
int ivshm_pubsub_cut(struct ivshm_pubsub_pub *p, uint32_t index);

/* Copy the table's non-free entries into out[] (at most max); their number. */
int ivshm_pubsub_list(const struct ivshm_pubsub_pub *p, struct ivshm_pubsub_subinfo *out, int max);

/* -- a subscriber ---------------------------------------------------------------------------------- */

/* The slow path of ivshm_pubsub_next: nothing readable at the cursor, or my entry changed. */
int ivshm_pubsub_miss(struct ivshm_pubsub_sub *s, uint64_t stamp);

/* The message at my cursor, without consuming it: 0, -EAGAIN, -ECONNRESET, -EPROTO. */
static inline int ivshm_pubsub_next(struct ivshm_pubsub_sub *s, struct ivshm_pubsub_msg *m)
{
    /* my own line: the publisher writes it only to cut me off (then with release, see cut()) */
    if (IVSHM_UNLIKELY(IVSHM_LOAD_ACQUIRE(&s->e->ctl) != s->ctl))
        return ivshm_pubsub_miss(s, 0);
    struct ivshm_pubsub_slot_hdr *h = ivshm_pubsub_slot(s->slots, s->mask, s->stride, s->cursor);
    /* pairs with the publisher's release store of the stamp in ivshm_pubsub_end */
    uint64_t st = IVSHM_LOAD_ACQUIRE(&h->stamp);
    if (IVSHM_UNLIKELY(st != s->cursor + 1))
        return ivshm_pubsub_miss(s, st);
    uint32_t len = IVSHM_READ_ONCE(&h->len);
    if (IVSHM_UNLIKELY(len > s->slot_size)) {
        s->why = "slot length exceeds the slot size";
        s->why_a = len;
        s->why_b = s->slot_size;
        return -EPROTO;
    }
    m->data = (const uint8_t *)h + IVSHM_PUBSUB_SLOT_HDR;
    m->len = len;
    return 0;
}

/* After copying the message ivshm_pubsub_next found: 0 if the copy is whole (the slot was not
 * rewritten meanwhile), else -ECONNRESET (I was cut off) or -EPROTO. */
static inline int ivshm_pubsub_check(struct ivshm_pubsub_sub *s)
{
    const struct ivshm_pubsub_slot_hdr *h = ivshm_pubsub_slot(s->slots, s->mask, s->stride, s->cursor);
    /* pairs with the release fence in ivshm_pubsub_begin: a copy that saw any byte of a rewrite
     * sees the cleared stamp here */
    atomic_thread_fence(memory_order_acquire);
    uint64_t st = IVSHM_LOAD_ACQUIRE(&h->stamp);
    if (IVSHM_LIKELY(st == s->cursor + 1))
        return 0;
    return ivshm_pubsub_miss(s, st == 0 ? UINT64_MAX : st);
}

/* Move past the message found (private); ivshm_pubsub_release tells the publisher. */
static inline void ivshm_pubsub_advance(struct ivshm_pubsub_sub *s)
{
    s->cursor++;
}

static inline void ivshm_pubsub_release(struct ivshm_pubsub_sub *s)
{
    if (s->cursor != s->cursor_published) {
        /* my reads of those slots are done: pairs with the publisher's acquire load in rescan */
        IVSHM_STORE_RELEASE(&s->e->cursor, s->cursor);
        s->cursor_published = s->cursor;
    }
}

/* Receive one message into buf: its length, -EAGAIN, -ENOBUFS (buf too small: it stays, *needed
 * says how large), -ECONNRESET, -EPROTO. */
static inline int64_t ivshm_pubsub_try_recv(struct ivshm_pubsub_sub *s, void *buf, uint64_t cap,
                                            uint64_t *needed)
{
    struct ivshm_pubsub_msg m = {NULL, 0};
    int rc = ivshm_pubsub_next(s, &m);
    if (rc)
        return rc;
    if (needed)
        *needed = m.len;
    if (m.len > cap)
        return -ENOBUFS;
    ivshm_copy(buf, m.data, m.len);
    rc = ivshm_pubsub_check(s);
    if (rc)
        return rc;
    ivshm_pubsub_advance(s);
    ivshm_pubsub_release(s);
    return (int64_t)m.len;
}

/* Messages published that I have not read yet (0 if I was cut off or the index is corrupt). */
uint64_t ivshm_pubsub_pending(const struct ivshm_pubsub_sub *s);

/* Where I stand: 0, or -ECONNRESET if I was cut off (st says why and how far behind). */
int ivshm_pubsub_sub_status(const struct ivshm_pubsub_sub *s, struct ivshm_pubsub_status *st);

/* -- for ivshm_chan --------------------------------------------------------------------------------- */

/* 1 if the handle's side is ready (a subscriber: a message at its cursor, or an error to report; the
 * publisher: room for `need`, or an error to report).  `ring` is either handle. */
int ivshm_pubsub_ready(void *ring, uint64_t need);

static inline struct ivshm_ring_ctrl *ivshm_pubsub_ctrl_of(void *ring)
{
    return ((struct ivshm_pubsub_pub *)ring)->ctrl; /* both handles start with ctrl, role, ops */
}

static inline const struct ivshm_pubsub_ops *ivshm_pubsub_ops_of(const void *ring)
{
    return ((const struct ivshm_pubsub_pub *)ring)->ops;
}

static inline uint32_t ivshm_pubsub_role_of(const void *ring)
{
    return ((const struct ivshm_pubsub_pub *)ring)->role;
}

#ifdef __cplusplus
}
#endif
#endif /* IVSHM_PUBSUB_H */
