/* ivshm_pubsub.c - the rare paths of publish-subscribe rings: creation, joining and leaving, the
 * publisher's look at the subscriber table with its cut-off policy, status.  The hot path is in
 * ivshm_pubsub.h; docs/pubsub.md explains the protocol and its argument. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "ivshm_pubsub.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const struct ivshm_pubsub_ops pub_ops, sub_ops;

#define PID_LIMIT 4194304u /* PID_MAX_LIMIT on 64-bit Linux */
#define SLOW_TIMEOUT_MAX (1000000ull * 1000000000ull) /* a million seconds */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void short_sleep(void)
{
    struct timespec ts = {0, 50000}; /* 50 us */
    nanosleep(&ts, NULL);
}

uint64_t ivshm_pubsub_ns_key(void)
{
    char boot[64] = {0};
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, boot, sizeof(boot) - 1);
    close(fd);
    struct stat st;
    if (n <= 0 || stat("/proc/self/ns/pid", &st) != 0)
        return 0;
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (ssize_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)boot[i]) * 0x100000001b3ull;
    uint64_t ids[2] = {(uint64_t)st.st_dev, (uint64_t)st.st_ino};
    const uint8_t *b = (const uint8_t *)ids;
    for (size_t i = 0; i < sizeof(ids); i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h ? h : 1;
}

static struct ivshm_pubsub_cfg *cfg_of(const struct ivshm_region *r, const struct ivshm_ring_info *info)
{
    return (struct ivshm_pubsub_cfg *)(r->base + info->offset + IVSHM_PUBSUB_CFG_OFF);
}

static struct ivshm_pubsub_entry *table_of(const struct ivshm_region *r, const struct ivshm_ring_info *info)
{
    return (struct ivshm_pubsub_entry *)(r->base + info->offset + IVSHM_PUBSUB_TABLE_OFF);
}

/* -- creation -------------------------------------------------------------------------------------- */

int ivshm_pubsub_config(const struct ivshm_region *r, const struct ivshm_ring_info *info,
                        uint32_t *policy, uint64_t *slow_timeout_ns, int wait_ms, const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    if (info->kind != IVSHM_KIND_PUBSUB) {
        *why = "not a publish-subscribe ring";
        return -EINVAL;
    }
    int rc = ivshm_ring_check_ctrl(r, info, why);
    if (rc)
        return rc;
    struct ivshm_pubsub_cfg *c = cfg_of(r, info);
    int64_t deadline = now_ns() + (int64_t)(wait_ms < 0 ? 0 : wait_ms) * 1000000;
    /* pairs with the creator's release store of the magic in ivshm_pubsub_create */
    while (IVSHM_LOAD_ACQUIRE(&c->magic) != IVSHM_PUBSUB_CFG_MAGIC) {
        if (IVSHM_READ_ONCE(&c->magic) != 0) {
            *why = "publish-subscribe config has a bad magic number";
            return -EPROTO;
        }
        if (now_ns() >= deadline) {
            *why = "the ring's creator never wrote its publish-subscribe config (it died creating it?)";
            return -ETIMEDOUT;
        }
        short_sleep();
    }
    uint32_t pol = IVSHM_READ_ONCE(&c->policy);
    uint64_t slow = IVSHM_READ_ONCE(&c->slow_timeout_ns);
    if ((pol != IVSHM_PUBSUB_BLOCK && pol != IVSHM_PUBSUB_DROP) ||
        IVSHM_READ_ONCE(&c->max_subs) != IVSHM_PUBSUB_MAX_SUBS || slow > SLOW_TIMEOUT_MAX) {
        *why = "publish-subscribe config is corrupt (policy, table size or slow timeout)";
        return -EPROTO;
    }
    *policy = pol;
    *slow_timeout_ns = slow;
    return 0;
}

int ivshm_pubsub_create(struct ivshm_region *r, const char *name, uint32_t slot_size,
                        uint32_t capacity, uint32_t policy, uint64_t slow_timeout_ns,
                        uint64_t token, int wait_ms, struct ivshm_ring_info *out, const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    if (policy != IVSHM_PUBSUB_BLOCK && policy != IVSHM_PUBSUB_DROP) {
        *why = "slow policy must be block or drop";
        return -EINVAL;
    }
    if (slow_timeout_ns > SLOW_TIMEOUT_MAX) {
        *why = "slow timeout must be at most a million seconds";
        return -EINVAL;
    }
    int rc = ivshm_region_create_ring(r, name, IVSHM_KIND_PUBSUB, slot_size, capacity, token,
                                      wait_ms, out, why);
    if (rc < 0)
        return rc;
    struct ivshm_pubsub_cfg *c = cfg_of(r, out);
    if (rc == 0) {
        /* the ring is ours and zeroed: nobody uses it before the magic says the config is there */
        c->policy = policy;
        c->max_subs = IVSHM_PUBSUB_MAX_SUBS;
        c->slow_timeout_ns = slow_timeout_ns;
        /* pairs with the acquire load of the magic in ivshm_pubsub_config */
        IVSHM_STORE_RELEASE(&c->magic, IVSHM_PUBSUB_CFG_MAGIC);
        return 0;
    }
    uint32_t pol;
    uint64_t slow;
    int crc = ivshm_pubsub_config(r, out, &pol, &slow, wait_ms, why);
    if (crc)
        return crc;
    if (pol != policy || slow != slow_timeout_ns) {
        *why = "a publish-subscribe ring of that name exists with another slow policy or slow_timeout";
        return -EEXIST;
    }
    return 1;
}

static void init_common(uint8_t *base, const struct ivshm_ring_info *info, struct ivshm_ring_ctrl **ctrl,
                        uint32_t *capacity, uint32_t *slot_size, uint32_t *stride, uint64_t *mask,
                        uint8_t **slots)
{
    *ctrl = (struct ivshm_ring_ctrl *)(base + info->offset);
    *capacity = info->capacity;
    *slot_size = info->slot_size;
    *stride = info->stride;
    *mask = (uint64_t)info->capacity - 1;
    *slots = base + info->offset + IVSHM_CTRL_SIZE + IVSHM_PUBSUB_EXTRA;
}

int ivshm_pubsub_pub_attach(struct ivshm_pubsub_pub *p, const struct ivshm_region *r,
                            const struct ivshm_ring_info *info, int wait_ms, const char **why)
{
    uint32_t policy;
    uint64_t slow;
    int rc = ivshm_pubsub_config(r, info, &policy, &slow, wait_ms, why);
    if (rc)
        return rc;
    memset(p, 0, sizeof(*p));
    init_common(r->base, info, &p->ctrl, &p->capacity, &p->slot_size, &p->stride, &p->mask, &p->slots);
    p->role = IVSHM_PUBSUB_ROLE_PUB;
    p->ops = &pub_ops;
    p->cfg = cfg_of(r, info);
    p->subs = table_of(r, info);
    p->policy = policy;
    p->slow_ns = (int64_t)slow;
    p->ns_key = ivshm_pubsub_ns_key();
    p->last_cut = -1;
    p->why_sub = -1;
    p->pending = 1; /* the first room check takes the slow path: it reads ctrl->head and looks */
    return 0;
}

/* -- the publisher's look at the table --------------------------------------------------------------- */

static int corrupt_pub(struct ivshm_pubsub_pub *p, const char *why, uint64_t a, uint64_t b, int sub)
{
    p->why = why;
    p->why_a = a;
    p->why_b = b;
    p->why_sub = sub;
    return -EPROTO;
}

/* Is the process behind entry e gone?  Only answerable in our own pid namespace. */
static int same_ns(const struct ivshm_pubsub_pub *p, uint64_t key)
{
    return key != 0 && key == p->ns_key;
}

static int process_gone(uint32_t pid)
{
    if (pid == 0 || pid > PID_LIMIT)
        return 0; /* not a pid we can ask about: the progress rule decides */
    return kill((pid_t)pid, 0) < 0 && errno == ESRCH;
}

/* Cut entry i (control word ctl, cursor c) off; `gone`: its process is known dead, so free the
 * entry instead of leaving it DROPPED for its owner to find.  1 if this call cut it. */
static int cut(struct ivshm_pubsub_pub *p, uint32_t i, uint64_t ctl, uint32_t reason, uint64_t c, int gone)
{
    struct ivshm_pubsub_entry *e = &p->subs[i];
    /* The details first, then the state with release: the subscriber reads them after it sees the
     * new state (acquire).  If the CAS fails the entry changed hands and these fields belong to the
     * next occupant, which reads them only once it is cut off itself (by us, rewriting them). */
    IVSHM_STORE_RELAXED(&e->reason, reason);
    IVSHM_STORE_RELAXED(&e->cut_head, p->head);
    IVSHM_STORE_RELAXED(&e->cut_cursor, c);
    uint64_t expect = ctl;
    uint64_t next = IVSHM_SUB_CTL(IVSHM_SUB_GEN(ctl), gone ? IVSHM_SUB_FREE : IVSHM_SUB_DROPPED);
    /* pairs with the subscriber's acquire loads of its ctl (ivshm_pubsub_next, miss) */
    if (!IVSHM_CAS(&e->ctl, &expect, next))
        return 0;
    atomic_fetch_add_explicit(IVSHM_ATOMIC(&p->cfg->cuts), 1, memory_order_relaxed);
    p->cuts++;
    p->last_cut = (int32_t)i;
    p->last_reason = reason;
    p->last_behind = p->head - c;
    p->trk[i].ctl = next;
    return 1;
}

static void recover(struct ivshm_pubsub_pub *p)
{
    if (!p->recovered) {
        /* A publisher's first look: go on from the index its predecessor announced. */
        p->head = p->head_published = IVSHM_LOAD_ACQUIRE(&p->ctrl->head);
        p->min_cache = p->head;
        p->recovered = 1;
        if (p->pending == 1)
            p->pending = 0;
    }
}

int64_t ivshm_pubsub_room_slow(struct ivshm_pubsub_pub *p, uint64_t need)
{
    if (p->pending < 0) {
        int rc = p->pending;
        p->pending = 0;
        return rc;
    }
    recover(p); /* pending == 1: the first call */
    return ivshm_pubsub_rescan(p, need);
}

/* Free a half-joined entry whose owner is gone; its CAS to ACTIVE then fails and it retries. */
static void free_joiner(struct ivshm_pubsub_pub *p, uint32_t i, uint64_t ctl)
{
    uint64_t expect = ctl;
    if (IVSHM_CAS(&p->subs[i].ctl, &expect, IVSHM_SUB_CTL(IVSHM_SUB_GEN(ctl), IVSHM_SUB_FREE)))
        p->trk[i].ctl = IVSHM_SUB_CTL(IVSHM_SUB_GEN(ctl), IVSHM_SUB_FREE);
}

int64_t ivshm_pubsub_rescan(struct ivshm_pubsub_pub *p, uint64_t need)
{
    const uint64_t cap = p->capacity;
    recover(p);
    uint64_t own = IVSHM_LOAD_RELAXED(&p->ctrl->head);
    if (IVSHM_UNLIKELY(own != p->head_published))
        return corrupt_pub(p, "another publisher moved this ring's index (one publisher per ring)",
                           own, p->head_published, -1);
    /* P: pairs with a joiner's fence J (ivshm_pubsub_subscribe); see docs/pubsub.md */
    IVSHM_FENCE();
    const uint64_t head = p->head;
    /* where a joiner first seen now will start, at the lowest: the head at our previous look,
     * which did not see its claim (so that look's fence came before the joiner's) */
    const uint64_t floor0 = p->looked ? p->look_head : (head >= cap ? head - cap : 0);
    uint64_t min = head;
    uint32_t active = 0;
    int64_t now = 0;
    int err = 0;
    for (uint32_t i = 0; i < IVSHM_PUBSUB_MAX_SUBS; i++) {
        struct ivshm_pubsub_entry *e = &p->subs[i];
        struct ivshm_pubsub_track *t = &p->trk[i];
        /* pairs with the joiner's release CAS to ACTIVE (its cursor) and its claim */
        uint64_t ctl = IVSHM_LOAD_ACQUIRE(&e->ctl);
        if (ctl != t->ctl) {
            t->ctl = ctl;
            t->cursor = UINT64_MAX;
            t->heartbeat = UINT64_MAX;
            t->behind_since = 0;
            t->quiet_since = 0;
            t->floor = floor0;
        }
        uint32_t st = IVSHM_SUB_STATE(ctl);
        uint64_t c;
        if (st == IVSHM_SUB_JOINING) {
            c = t->floor; /* its cursor will be >= this: do not overwrite what it will read */
        } else if (st == IVSHM_SUB_ACTIVE) {
            /* pairs with the subscriber's release store of its cursor: its reads are done */
            c = IVSHM_LOAD_ACQUIRE(&e->cursor);
            if (IVSHM_UNLIKELY(c > head || head - c > cap)) {
                if (cut(p, i, ctl, IVSHM_SUB_CUT_CURSOR, c, 0) && p->policy == IVSHM_PUBSUB_BLOCK && !err)
                    err = corrupt_pub(p, "a subscriber's cursor is outside the publisher's window; "
                                      "it was cut off", c, head, (int)i);
                continue;
            }
        } else {
            continue;
        }
        if (head + need - c > cap) { /* it holds us back */
            if (!now)
                now = now_ns();
            uint64_t hb = IVSHM_LOAD_RELAXED(&e->heartbeat);
            if (c != t->cursor || hb != t->heartbeat || t->quiet_since == 0)
                t->quiet_since = now;
            if (t->behind_since == 0)
                t->behind_since = now;
            t->cursor = c;
            t->heartbeat = hb;
            uint64_t key = IVSHM_LOAD_RELAXED(&e->ns_key);
            int dead = same_ns(p, key) ? process_gone(IVSHM_LOAD_RELAXED(&e->pid))
                                       : now - t->quiet_since >= p->slow_ns;
            if (st == IVSHM_SUB_JOINING) {
                if (dead)
                    free_joiner(p, i, ctl);
                else if (c < min)
                    min = c;
                continue;
            }
            if (dead && cut(p, i, ctl, IVSHM_SUB_CUT_DEAD, c, same_ns(p, key)))
                continue;
            if (p->policy == IVSHM_PUBSUB_DROP && now - t->behind_since >= p->slow_ns &&
                cut(p, i, ctl, IVSHM_SUB_CUT_SLOW, c, 0))
                continue;
        } else if (st == IVSHM_SUB_ACTIVE) {
            if (head - c <= cap / 2)
                t->behind_since = 0; /* caught up: a later fall behind is timed afresh */
            t->cursor = c;
        }
        active += st == IVSHM_SUB_ACTIVE;
        if (c < min)
            min = c;
    }
    p->min_cache = min;
    p->active = active;
    p->look_head = head;
    p->looked = 1;
    IVSHM_STORE_RELAXED(&p->ctrl->tail, min); /* for inspection only */
    if (err)
        return err;
    return (int64_t)(cap - (head - min));
}

int ivshm_pubsub_cut(struct ivshm_pubsub_pub *p, uint32_t index)
{
    if (index >= IVSHM_PUBSUB_MAX_SUBS)
        return 0;
    recover(p);
    uint64_t ctl = IVSHM_LOAD_ACQUIRE(&p->subs[index].ctl);
    if (IVSHM_SUB_STATE(ctl) != IVSHM_SUB_ACTIVE)
        return 0;
    uint64_t c = IVSHM_LOAD_ACQUIRE(&p->subs[index].cursor);
    int done = cut(p, index, ctl, IVSHM_SUB_CUT_BY_PUBLISHER, c, 0);
    if (done) {
        /* forget the cached minimum: the next send looks again, without this one */
        p->min_cache = p->head >= p->capacity ? p->head - p->capacity : 0;
    }
    return done;
}

int ivshm_pubsub_list(const struct ivshm_pubsub_pub *p, struct ivshm_pubsub_subinfo *out, int max)
{
    int n = 0;
    for (uint32_t i = 0; i < IVSHM_PUBSUB_MAX_SUBS && n < max; i++) {
        const struct ivshm_pubsub_entry *e = &p->subs[i];
        uint64_t ctl = IVSHM_LOAD_ACQUIRE(&e->ctl);
        if (IVSHM_SUB_STATE(ctl) == IVSHM_SUB_FREE)
            continue;
        struct ivshm_pubsub_subinfo *o = &out[n++];
        o->index = i;
        o->state = IVSHM_SUB_STATE(ctl) <= IVSHM_SUB_DROPPED ? IVSHM_SUB_STATE(ctl) : 0xffu;
        o->generation = IVSHM_SUB_GEN(ctl);
        o->cursor = IVSHM_LOAD_RELAXED(&e->cursor);
        o->pid = IVSHM_LOAD_RELAXED(&e->pid);
        o->reason = IVSHM_LOAD_RELAXED(&e->reason);
        o->ns_key = IVSHM_LOAD_RELAXED(&e->ns_key);
        o->heartbeat = IVSHM_LOAD_RELAXED(&e->heartbeat);
        o->cut_head = IVSHM_LOAD_RELAXED(&e->cut_head);
        o->cut_cursor = IVSHM_LOAD_RELAXED(&e->cut_cursor);
        o->joined_at = IVSHM_LOAD_RELAXED(&e->joined_at);
    }
    return n;
}

/* -- subscribers ----------------------------------------------------------------------------------- */

static int claim_entry(struct ivshm_pubsub_entry *table, uint64_t my_key, uint32_t *index, uint64_t *ctl)
{
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < IVSHM_PUBSUB_MAX_SUBS; i++) {
            struct ivshm_pubsub_entry *e = &table[i];
            uint64_t c = IVSHM_LOAD_ACQUIRE(&e->ctl);
            uint32_t st = IVSHM_SUB_STATE(c);
            /* pass 0: free entries; pass 1: entries cut off whose owner is known to be gone */
            if (pass == 0 ? st != IVSHM_SUB_FREE
                          : !((st == IVSHM_SUB_DROPPED || st == IVSHM_SUB_JOINING) && my_key != 0 &&
                              IVSHM_LOAD_RELAXED(&e->ns_key) == my_key &&
                              process_gone(IVSHM_LOAD_RELAXED(&e->pid))))
                continue;
            uint64_t next = IVSHM_SUB_CTL(IVSHM_SUB_GEN(c) + 1, IVSHM_SUB_JOINING);
            /* claims among joiners (and against a publisher's cut) */
            if (IVSHM_CAS(&e->ctl, &c, next)) {
                *index = i;
                *ctl = next;
                return 0;
            }
        }
    }
    return -EBUSY;
}

int ivshm_pubsub_subscribe(struct ivshm_pubsub_sub *s, const struct ivshm_region *r,
                           const struct ivshm_ring_info *info, uint32_t pid, uint64_t ns_key,
                           int wait_ms, const char **why)
{
    const char *dummy;
    if (!why)
        why = &dummy;
    uint32_t policy;
    uint64_t slow;
    int rc = ivshm_pubsub_config(r, info, &policy, &slow, wait_ms, why);
    if (rc)
        return rc;
    memset(s, 0, sizeof(*s));
    init_common(r->base, info, &s->ctrl, &s->capacity, &s->slot_size, &s->stride, &s->mask, &s->slots);
    s->role = IVSHM_PUBSUB_ROLE_SUB;
    s->ops = &sub_ops;
    s->cfg = cfg_of(r, info);
    s->closed = 1;
    struct ivshm_pubsub_entry *table = table_of(r, info);
    /* A retry happens only when the publisher freed our half-made entry (it took the previous
     * occupant's pid, still there, for ours): rare, and bounded. */
    for (int attempt = 0; attempt < 16; attempt++) {
        uint32_t index;
        uint64_t ctl;
        if (claim_entry(table, ns_key, &index, &ctl)) {
            *why = "all 64 subscriber entries of the ring are taken";
            return -EBUSY;
        }
        struct ivshm_pubsub_entry *e = &table[index];
        IVSHM_STORE_RELAXED(&e->pid, pid);
        IVSHM_STORE_RELAXED(&e->ns_key, ns_key);
        IVSHM_STORE_RELAXED(&e->heartbeat, 0);
        IVSHM_STORE_RELAXED(&e->reason, 0);
        IVSHM_STORE_RELAXED(&e->cut_head, 0);
        IVSHM_STORE_RELAXED(&e->cut_cursor, 0);
        IVSHM_FENCE(); /* J: pairs with the publisher's fence P in ivshm_pubsub_rescan */
        uint64_t h = IVSHM_LOAD_SEQCST(&s->ctrl->head);
        IVSHM_STORE_RELAXED(&e->cursor, h);
        IVSHM_STORE_RELAXED(&e->joined_at, h);
        uint64_t expect = ctl;
        uint64_t active = IVSHM_SUB_CTL(IVSHM_SUB_GEN(ctl), IVSHM_SUB_ACTIVE);
        /* release: the cursor before the state (pairs with the publisher's acquire load of ctl) */
        if (!IVSHM_CAS(&e->ctl, &expect, active))
            continue;
        atomic_fetch_add_explicit(IVSHM_ATOMIC(&s->cfg->joins), 1, memory_order_relaxed);
        s->e = e;
        s->index = index;
        s->ctl = active;
        s->cursor = s->cursor_published = s->joined_at = h;
        s->closed = 0;
        return 0;
    }
    *why = "the publisher kept freeing this subscriber's entry while it joined";
    return -EAGAIN;
}

void ivshm_pubsub_unsubscribe(struct ivshm_pubsub_sub *s)
{
    if (s->closed || s->e == NULL)
        return;
    s->closed = 1;
    uint64_t expect = s->ctl;
    uint64_t gen = IVSHM_SUB_GEN(s->ctl);
    /* release: nothing of ours is read after this (pairs with a joiner's acquire in claim_entry) */
    if (!IVSHM_CAS(&s->e->ctl, &expect, IVSHM_SUB_CTL(gen, IVSHM_SUB_FREE))) {
        /* cut off meanwhile: free the DROPPED entry too (a reclaimed one is someone else's) */
        if (expect == IVSHM_SUB_CTL(gen, IVSHM_SUB_DROPPED))
            IVSHM_CAS(&s->e->ctl, &expect, IVSHM_SUB_CTL(gen, IVSHM_SUB_FREE));
    }
}

int ivshm_pubsub_miss(struct ivshm_pubsub_sub *s, uint64_t stamp)
{
    if (s->closed || s->e == NULL) {
        s->why = "this subscriber has left the ring";
        return -EPIPE;
    }
    /* pairs with the release CAS in cut() (and the stamp stores made after it) */
    uint64_t ctl = IVSHM_LOAD_ACQUIRE(&s->e->ctl);
    if (ctl != s->ctl) {
        if (ctl == IVSHM_SUB_CTL(IVSHM_SUB_GEN(s->ctl), IVSHM_SUB_DROPPED) ||
            IVSHM_SUB_GEN(ctl) != IVSHM_SUB_GEN(s->ctl) || IVSHM_SUB_STATE(ctl) == IVSHM_SUB_FREE) {
            s->why = "this subscriber was cut off by the publisher";
            return -ECONNRESET;
        }
        s->why = "this subscriber's entry holds an invalid control word";
        s->why_a = ctl;
        s->why_b = s->ctl;
        return -EPROTO;
    }
    if (stamp == 0 || stamp <= s->cursor) {
        /* nothing new (0: a slot not written yet): say we are alive, for the publisher's look */
        IVSHM_STORE_RELAXED(&s->e->heartbeat, IVSHM_LOAD_RELAXED(&s->e->heartbeat) + 1);
        return -EAGAIN;
    }
    s->why = "the publisher overwrote a message this subscriber had not read, without cutting it off";
    s->why_a = stamp == UINT64_MAX ? s->cursor + 1 + s->capacity : stamp - 1;
    s->why_b = s->cursor;
    return -EPROTO;
}

uint64_t ivshm_pubsub_pending(const struct ivshm_pubsub_sub *s)
{
    if (s->closed || s->e == NULL || IVSHM_LOAD_RELAXED(&s->e->ctl) != s->ctl)
        return 0;
    uint64_t h = IVSHM_LOAD_ACQUIRE(&s->ctrl->head);
    return h >= s->cursor && h - s->cursor <= s->capacity ? h - s->cursor : 0;
}

int ivshm_pubsub_sub_status(const struct ivshm_pubsub_sub *s, struct ivshm_pubsub_status *st)
{
    memset(st, 0, sizeof(*st));
    st->cursor = s->cursor;
    st->head = IVSHM_LOAD_ACQUIRE(&s->ctrl->head);
    if (s->e == NULL) {
        st->state = IVSHM_SUB_FREE;
        return -ECONNRESET;
    }
    uint64_t ctl = IVSHM_LOAD_ACQUIRE(&s->e->ctl); /* pairs with the release CAS in cut() */
    if (ctl == s->ctl && !s->closed) {
        st->state = IVSHM_SUB_ACTIVE;
        return 0;
    }
    if (ctl == IVSHM_SUB_CTL(IVSHM_SUB_GEN(s->ctl), IVSHM_SUB_DROPPED)) {
        st->state = IVSHM_SUB_DROPPED;
        st->reason = IVSHM_LOAD_RELAXED(&s->e->reason);
        st->cut_head = IVSHM_LOAD_RELAXED(&s->e->cut_head);
        st->cut_cursor = IVSHM_LOAD_RELAXED(&s->e->cut_cursor);
    } else {
        st->state = IVSHM_SUB_FREE; /* freed (or reclaimed): the details went with it */
    }
    return -ECONNRESET;
}

/* -- for ivshm_chan --------------------------------------------------------------------------------- */

static int pub_try_send(void *ring, const void *data, uint64_t len)
{
    return ivshm_pubsub_try_send(ring, data, len);
}

static int64_t pub_try_recv(void *ring, void *buf, uint64_t cap, uint64_t *needed)
{
    (void)ring, (void)buf, (void)cap, (void)needed;
    return -EINVAL; /* the publisher does not receive */
}

static int sub_try_send(void *ring, const void *data, uint64_t len)
{
    (void)ring, (void)data, (void)len;
    return -EINVAL; /* a subscriber does not send */
}

static int64_t sub_try_recv(void *ring, void *buf, uint64_t cap, uint64_t *needed)
{
    return ivshm_pubsub_try_recv(ring, buf, cap, needed);
}

static uint64_t pub_recheck_ns(const void *ring)
{
    /* a quarter of slow_timeout, so a cut-off comes at most a quarter late; at least 1 ms */
    uint64_t q = (uint64_t)((const struct ivshm_pubsub_pub *)ring)->slow_ns / 4;
    return q < 1000000u ? 1000000u : q;
}

static uint64_t sub_recheck_ns(const void *ring)
{
    (void)ring;
    return UINT64_MAX; /* a subscriber is judged only while it has messages: never asleep then */
}

static const struct ivshm_pubsub_ops pub_ops = {ivshm_pubsub_ready, pub_recheck_ns, pub_try_send,
                                                pub_try_recv};
static const struct ivshm_pubsub_ops sub_ops = {ivshm_pubsub_ready, sub_recheck_ns, sub_try_send,
                                                sub_try_recv};

int ivshm_pubsub_ready(void *ring, uint64_t need)
{
    if (ivshm_pubsub_role_of(ring) == IVSHM_PUBSUB_ROLE_PUB) {
        struct ivshm_pubsub_pub *p = ring;
        int64_t room = ivshm_pubsub_room(p, need);
        if (room < 0) {
            p->pending = (int32_t)room; /* the next send reports it */
            return 1;
        }
        return (uint64_t)room >= need;
    }
    struct ivshm_pubsub_sub *s = ring;
    if (s->closed || s->e == NULL || IVSHM_LOAD_RELAXED(&s->e->ctl) != s->ctl)
        return 1; /* the next receive reports it */
    /* pairs with the publisher's release store of the stamp */
    uint64_t st = IVSHM_LOAD_ACQUIRE(&ivshm_pubsub_slot(s->slots, s->mask, s->stride, s->cursor)->stamp);
    return st > s->cursor; /* the message, or an overrun to report */
}
