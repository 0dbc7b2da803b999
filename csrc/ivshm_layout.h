/* ivshm_layout.h - the shared-memory ABI of a pyivshmem region.
 *
 * Everything another process or another VM sees is defined here and nowhere else: the region
 * header with its ring directory, the ring control block and the slot headers.  All fields are
 * little-endian, naturally aligned, fixed-width.  docs/layout.md is the prose twin of this file;
 * the static asserts at the bottom pin every offset the documentation names.
 *
 * Region:  [ header, 4096 bytes ][ ring 0 ][ ring 1 ] ...   (rings are 128-byte aligned)
 * Ring:    [ control block, 640 bytes: info | head | tail | consumer sleepers | producer sleepers ][ slots ]
 * Slot:    SPSC: [ u32 len | u32 stamp | payload ]   MPMC: [ u32 seq | u32 len | payload ]
 *
 * Nothing in this file is trusted when read from a mapping: see ivshm_region.c and the rings.
 */
#ifndef IVSHM_LAYOUT_H
#define IVSHM_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#define IVSHM_MAGIC            0x314d485356495950ULL /* "PYIVSHM1" as little-endian bytes */
#define IVSHM_MAGIC_FORMATTING 0x2a2a2a2a2a2a2a2aULL /* "********": a formatter is at work */
#define IVSHM_LAYOUT_VERSION   3u
#define IVSHM_HDR_SIZE         4096u
#define IVSHM_MIN_REGION_SIZE  8192u           /* header + one small ring */
#define IVSHM_NAME_MAX         32u             /* bytes including the terminating NUL */
#define IVSHM_MAX_RINGS        62u             /* (4096 - 128) / 64 directory entries */
#define IVSHM_LINE             128u            /* separation of producer/consumer fields */
#define IVSHM_RING_ALIGN       128u
#define IVSHM_SLEEPERS         30u             /* sleeper entries per side of a ring */
#define IVSHM_MAX_PEER_ID      65535u          /* ivshmem peer ids are 16-bit */
#define IVSHM_MAX_VECTORS      64u
#define IVSHM_RING_MAGIC       0x474e495248535649ULL /* "IVSHRING" */

#define IVSHM_KIND_SPSC 1u
#define IVSHM_KIND_MPMC 2u
#define IVSHM_KIND_PUBSUB 3u /* one publisher, every subscriber reads every message (ivshm_pubsub.h) */

#define IVSHM_DESC_FREE  0u
#define IVSHM_DESC_READY 1u

/* SPSC slot `len`: the top bit says the message continues in the next slot; the rest is the
 * chunk's length (at most IVSHM_MAX_SLOT_SIZE, which needs 31 bits). */
#define IVSHM_SPSC_MORE     0x80000000u
#define IVSHM_SPSC_LEN_MASK 0x7fffffffu

#define IVSHM_SPSC_SLOT_HDR 8u
#define IVSHM_MPMC_SLOT_HDR 8u
#define IVSHM_MAX_SLOT_SIZE (1u << 30)         /* payload bytes per slot */
#define IVSHM_MAX_CAPACITY  (1u << 30)         /* slots per ring */

/* One directory entry.  `state` is the only field written after creation; it is published with a
 * release store once every other field (and the ring's control block) is in place, and read with
 * an acquire load (ivshm_region.c). */
struct ivshm_ring_desc {
    char     name[IVSHM_NAME_MAX]; /*  0: NUL-terminated, NUL-padded */
    uint32_t state;                /* 32: IVSHM_DESC_FREE / IVSHM_DESC_READY */
    uint32_t kind;                 /* 36: IVSHM_KIND_* */
    uint64_t offset;               /* 40: of the control block, from the region's base */
    uint64_t size;                 /* 48: control block + slots, bytes */
    uint32_t slot_size;            /* 56: largest payload of one slot, bytes */
    uint32_t capacity;             /* 60: slots, a power of two */
};

struct ivshm_region_hdr {
    uint64_t magic;        /*   0: IVSHM_MAGIC once formatted */
    uint32_t version;      /*   8: IVSHM_LAYOUT_VERSION */
    uint32_t hdr_size;     /*  12: IVSHM_HDR_SIZE */
    uint64_t region_size;  /*  16: bytes, a power of two */
    uint64_t generation;   /*  24: new random value on every (re)format */
    uint32_t max_rings;    /*  32: IVSHM_MAX_RINGS */
    uint32_t nrings;       /*  36: entries handed out (informational) */
    uint64_t alloc_off;    /*  40: first free byte for the next ring; only under `lock` */
    uint64_t lock;         /*  48: directory lock, 0 = free, else the holder's token */
    uint64_t lock_time;    /*  56: holder's heartbeat (CLOCK_MONOTONIC ns; ivshm_region.c) */
    uint8_t  reserved[64]; /*  64 */
    struct ivshm_ring_desc rings[IVSHM_MAX_RINGS]; /* 128 */
};

/* A ring's control block.  Line 0 is written once by the creator, before the directory entry is
 * published.  Line 1 is written only by producers (the index), line 2 only by consumers.  Lines 3
 * and 4 hold the wake-up protocol's state (ivshm_chan.h): a count of armed sleepers and a table of
 * their routes, one table per side.  Each line is written only when someone of its side goes to
 * sleep (or by a waker that claims a sleeper to ring it), so while both sides are awake the check
 * that follows every publish reads a line that stays in the local cache. */
struct ivshm_ring_ctrl {
    /* line 0: immutable description, checked against the directory on attach */
    uint64_t magic;          /*   0: IVSHM_RING_MAGIC */
    uint32_t kind;           /*   8 */
    uint32_t slot_size;      /*  12 */
    uint32_t capacity;       /*  16 */
    uint32_t stride;         /*  20: bytes from one slot to the next */
    uint64_t generation;     /*  24: the region's generation when the ring was made */
    uint8_t  pad0[IVSHM_LINE - 32]; /*  32: zero (layout version 1 kept an MPMC hint at 64) */
    /* line 1: producer index */
    uint64_t head;           /* 128: SPSC: next index to publish; MPMC: next index to claim */
    uint8_t  pad1[IVSHM_LINE - 8];
    /* line 2: consumer index */
    uint64_t tail;           /* 256: SPSC: next index to consume; MPMC: next index to claim */
    uint8_t  pad2[IVSHM_LINE - 8];
    /* line 3: the consumers asleep on an empty ring (ivshm_chan.h) */
    uint32_t cons_waiting;   /* 384: entries armed in cons_sleepers (a hint for the waker) */
    uint32_t cons_pad;       /* 388: zero */
    uint32_t cons_sleepers[IVSHM_SLEEPERS]; /* 392: 0 free, else an armed sleeper's route word */
    /* line 4: the producers asleep on a full ring */
    uint32_t prod_waiting;   /* 512 */
    uint32_t prod_pad;       /* 516 */
    uint32_t prod_sleepers[IVSHM_SLEEPERS]; /* 520 */
};

/* A sleeper's route word: how a waker rings it.  Bit 31 marks an armed entry; bits 24..30 are a
 * ticket that makes each arming's word differ from every other live arming of the same route
 * (ivshm_chan.c: ticket_take); bits 8..23
 * are the sleeper's peer id, bits 0..7 its vector.  Words without bit 31, or with a vector of
 * IVSHM_MAX_VECTORS or more, are not routes (a waker skips them). */
#define IVSHM_SLEEPER_ARMED 0x80000000u
#define IVSHM_SLEEPER_PEER(w) (((w) >> 8) & 0xffffu)
#define IVSHM_SLEEPER_VECTOR(w) ((w) & 0xffu)
#define IVSHM_SLEEPER_WORD(peer, vector) (IVSHM_SLEEPER_ARMED | ((uint32_t)(peer) << 8) | (uint32_t)(vector))

/* SPSC slot header.  `stamp` is what publishes a slot: once slot i holds the message of index i,
 * the producer stores the low 32 bits of i + 1 there, after every other byte of the slot (see
 * ivshm_spsc.h for the order inside a batch).  Any other value (the previous lap's i + 1 -
 * capacity, zero in a new ring) means "not published": capacity <= 2^30, so the two never meet. */
struct ivshm_spsc_slot_hdr {
    uint32_t len;   /* payload bytes in this slot, | IVSHM_SPSC_MORE if the message continues */
    uint32_t stamp; /* (uint32_t)(i + 1) once the message of index i is published here */
};

/* MPMC slot header: a Vyukov sequence word, 32 bits of it (indices differ by at most a capacity,
 * <= 2^30, so the low 32 bits order them), and the payload length (no flag bits). */
struct ivshm_mpmc_slot_hdr {
    uint32_t seq;   /* (uint32_t)i: free for the producer of index i; (uint32_t)(i + 1): holds message i */
    uint32_t len;   /* payload bytes */
};

#define IVSHM_CTRL_SIZE ((uint32_t)sizeof(struct ivshm_ring_ctrl))

_Static_assert(sizeof(struct ivshm_ring_desc) == 64, "directory entry is 64 bytes");
_Static_assert(sizeof(struct ivshm_region_hdr) == IVSHM_HDR_SIZE, "region header is 4096 bytes");
_Static_assert(offsetof(struct ivshm_region_hdr, rings) == 128, "directory starts at 128");
_Static_assert(offsetof(struct ivshm_region_hdr, generation) == 24, "generation at 24");
_Static_assert(offsetof(struct ivshm_region_hdr, lock) == 48, "lock at 48");
_Static_assert(sizeof(struct ivshm_ring_ctrl) == 5 * IVSHM_LINE, "control block is 640 bytes");
_Static_assert(offsetof(struct ivshm_ring_ctrl, head) == IVSHM_LINE, "head on line 1");
_Static_assert(offsetof(struct ivshm_ring_ctrl, tail) == 2 * IVSHM_LINE, "tail on line 2");
_Static_assert(offsetof(struct ivshm_ring_ctrl, cons_waiting) == 3 * IVSHM_LINE, "cons_waiting on line 3");
_Static_assert(offsetof(struct ivshm_ring_ctrl, prod_waiting) == 4 * IVSHM_LINE, "prod_waiting on line 4");
_Static_assert(offsetof(struct ivshm_ring_ctrl, cons_sleepers) == 392, "cons_sleepers at 392");
_Static_assert(offsetof(struct ivshm_ring_ctrl, prod_sleepers) == 520, "prod_sleepers at 520");
_Static_assert(IVSHM_MAX_VECTORS <= 256 && IVSHM_MAX_PEER_ID <= 0xffffu, "a route word holds a peer id and a vector");
_Static_assert(sizeof(struct ivshm_spsc_slot_hdr) == IVSHM_SPSC_SLOT_HDR, "spsc slot header");
_Static_assert(offsetof(struct ivshm_spsc_slot_hdr, stamp) == 4, "spsc stamp at 4");
_Static_assert(IVSHM_MAX_SLOT_SIZE <= IVSHM_SPSC_LEN_MASK, "an SPSC length fits beside the MORE bit");
_Static_assert(IVSHM_MAX_CAPACITY <= (1u << 30), "32-bit SPSC stamps and MPMC sequence words tell a lap from the next");
_Static_assert(sizeof(struct ivshm_mpmc_slot_hdr) == IVSHM_MPMC_SLOT_HDR, "mpmc slot header");

/* -- publish-subscribe rings (IVSHM_KIND_PUBSUB; ivshm_pubsub.h, docs/pubsub.md) ---------------------
 *
 * Ring: [ control block, 640 bytes ][ config, 128 ][ subscriber table, 64 x 128 ][ slots ]
 * The control block is the one above: line 1's `head` is the publisher's published index, line 2's
 * `tail` the lowest subscriber cursor the publisher last saw (informational), lines 3 and 4 the
 * sleepers (subscribers on line 3, the publisher on line 4).  Each subscriber entry sits on its own
 * 128-byte line, written by that subscriber (its cursor, its heartbeat) and by the publisher only
 * when it cuts the subscriber off. */
#define IVSHM_PUBSUB_MAX_SUBS  64u
#define IVSHM_PUBSUB_SLOT_HDR  16u
#define IVSHM_PUBSUB_CFG_MAGIC 0x4255534255505649ULL /* "IVPUBSUB": the config is written */
#define IVSHM_PUBSUB_BLOCK 1u /* slow policy: the publisher waits for the slowest live subscriber */
#define IVSHM_PUBSUB_DROP  2u /* slow policy: a subscriber that holds it back too long is cut off */

/* A subscriber entry's `ctl` word: (generation << 8) | state.  The generation grows each time the
 * entry is claimed, so a compare-and-swap by the publisher can never act on a later occupant. */
#define IVSHM_SUB_FREE    0u /* nobody */
#define IVSHM_SUB_JOINING 1u /* claimed, cursor not yet set */
#define IVSHM_SUB_ACTIVE  2u /* reading; the publisher waits for (or drops) it */
#define IVSHM_SUB_DROPPED 3u /* cut off by the publisher; the subscriber learns it at its next call */
#define IVSHM_SUB_STATE(ctl) ((uint32_t)((ctl) & 0xffu))
#define IVSHM_SUB_GEN(ctl) ((ctl) >> 8)
#define IVSHM_SUB_CTL(gen, state) (((uint64_t)(gen) << 8) | (uint64_t)(state))

/* Why a subscriber was cut off (entry `reason`). */
#define IVSHM_SUB_CUT_SLOW   1u /* held the publisher back for slow_timeout (slow="drop") */
#define IVSHM_SUB_CUT_DEAD   2u /* its process is gone, or silent past slow_timeout in another VM */
#define IVSHM_SUB_CUT_CURSOR 3u /* its cursor was outside the publisher's window (misbehaving) */
#define IVSHM_SUB_CUT_BY_PUBLISHER 4u /* the publisher dropped it on request */

/* The config line, written once by the creator before `magic` is stored (release). */
struct ivshm_pubsub_cfg {
    uint64_t magic;           /*   0: IVSHM_PUBSUB_CFG_MAGIC once written */
    uint32_t policy;          /*   8: IVSHM_PUBSUB_BLOCK / IVSHM_PUBSUB_DROP */
    uint32_t max_subs;        /*  12: IVSHM_PUBSUB_MAX_SUBS */
    uint64_t slow_timeout_ns; /*  16 */
    uint64_t joins;           /*  24: subscribers that joined (informational) */
    uint64_t cuts;            /*  32: subscribers cut off (informational) */
    uint8_t  pad[IVSHM_LINE - 40];
};

struct ivshm_pubsub_entry {
    uint64_t ctl;         /*   0: IVSHM_SUB_CTL(generation, state) */
    uint64_t cursor;      /*   8: next index this subscriber reads; all below are done */
    uint64_t heartbeat;   /*  16: bumped by the subscriber while it waits (liveness across VMs) */
    uint64_t ns_key;      /*  24: its pid namespace (boot id + ns inode hash), 0 unknown */
    uint32_t pid;         /*  32: its process id in that namespace */
    uint32_t reason;      /*  36: IVSHM_SUB_CUT_* once cut off */
    uint64_t cut_head;    /*  40: the publisher's index when it cut the subscriber off */
    uint64_t cut_cursor;  /*  48: the subscriber's cursor then */
    uint64_t joined_at;   /*  56: the first index it was to read */
    uint8_t  pad[IVSHM_LINE - 64];
};

/* Slot: `stamp` is (i + 1) once slot holds message i, 0 while the publisher rewrites it; a reader
 * that sees the same stamp before and after copying read an untorn message (a sequence lock). */
struct ivshm_pubsub_slot_hdr {
    uint64_t stamp;
    uint32_t len;
    uint32_t reserved;
};

#define IVSHM_PUBSUB_CFG_OFF   IVSHM_CTRL_SIZE
#define IVSHM_PUBSUB_TABLE_OFF (IVSHM_CTRL_SIZE + IVSHM_LINE)
#define IVSHM_PUBSUB_EXTRA     (IVSHM_LINE + IVSHM_PUBSUB_MAX_SUBS * IVSHM_LINE) /* before the slots */

_Static_assert(sizeof(struct ivshm_pubsub_cfg) == IVSHM_LINE, "pubsub config is one line");
_Static_assert(sizeof(struct ivshm_pubsub_entry) == IVSHM_LINE, "a subscriber entry is one line");
_Static_assert(offsetof(struct ivshm_pubsub_entry, cursor) == 8, "cursor at 8");
_Static_assert(offsetof(struct ivshm_pubsub_entry, pid) == 32, "pid at 32");
_Static_assert(offsetof(struct ivshm_pubsub_entry, joined_at) == 56, "joined_at at 56");
_Static_assert(sizeof(struct ivshm_pubsub_slot_hdr) == IVSHM_PUBSUB_SLOT_HDR, "pubsub slot header");
_Static_assert(IVSHM_PUBSUB_EXTRA == 8320, "pubsub config + table");

#endif /* IVSHM_LAYOUT_H */
