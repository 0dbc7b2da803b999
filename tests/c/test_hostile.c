/* test_hostile.c - the C core against shared memory written by a buggy or malicious peer.
 *
 * Part 1 corrupts one field at a time on purpose (region header, directory entry, control block,
 * slot headers, MPMC sequence words) and expects the specific error code, an explanation in `why`,
 * no access outside the region (the region is a heap block of exactly its size, so ASan would
 * report one) and a second ring in the same region that keeps working.
 *
 * Part 2 lets a writer thread scribble random values over one SPSC and one MPMC ring while honest
 * threads send and receive on them, and a canary ring next to them carries a sequence-checked
 * stream that must arrive intact.  Every call must return (the threads are joined with a time
 * limit) with a valid result or -EPROTO, and every pointer and length handed out must lie inside
 * the attacked ring's slots.  This part races on purpose, so it is skipped under TSan.
 */
#include "tcommon.h"

struct fixture {
    struct tregion tr;
    struct ivshm_ring_info s, m, canary; /* SPSC under test, MPMC under test, bystander */
};

static int fixture_new(struct fixture *f)
{
    const char *why;
    if (tregion_new(&f->tr, 65536))
        return -1;
    if (ivshm_region_create_ring(&f->tr.r, "victim-spsc", IVSHM_KIND_SPSC, 32, 8, 1, 0, &f->s, &why) ||
        ivshm_region_create_ring(&f->tr.r, "victim-mpmc", IVSHM_KIND_MPMC, 32, 8, 1, 0, &f->m, &why) ||
        ivshm_region_create_ring(&f->tr.r, "canary", IVSHM_KIND_SPSC, 16, 4, 1, 0, &f->canary, &why))
        return -1;
    return 0;
}

static struct ivshm_ring_ctrl *ctrl_of(struct fixture *f, const struct ivshm_ring_info *i)
{
    return (struct ivshm_ring_ctrl *)(f->tr.mem + i->offset);
}

static uint8_t *slot_of(struct fixture *f, const struct ivshm_ring_info *i, uint64_t idx)
{
    return f->tr.mem + i->offset + IVSHM_CTRL_SIZE + (idx & (i->capacity - 1)) * i->stride;
}

/* The bystander still works: a round trip with fresh handles. */
static int canary_ok(struct fixture *f)
{
    struct ivshm_region r;
    struct ivshm_ring_info info;
    struct ivshm_spsc q;
    const char *why;
    if (ivshm_region_attach(&r, f->tr.mem, f->tr.size, 0, 0, 0) ||
        ivshm_region_find_ring(&r, "canary", &info, &why) || ivshm_spsc_attach(&q, &r, &info, &why))
        return 0;
    uint8_t buf[64];
    if (ivshm_spsc_try_send(&q, "still here", 10))
        return 0;
    return ivshm_spsc_try_recv(&q, buf, sizeof(buf), NULL) == 10 && memcmp(buf, "still here", 10) == 0;
}

#define EXPECT_CORRUPT(call, q)                                                                    \
    do {                                                                                           \
        int64_t rc_ = (call);                                                                      \
        CHECK(rc_ == -EPROTO, #call " = %" PRId64 ", expected -EPROTO", rc_);                      \
        CHECK((q)->why != NULL && (q)->why[0], "no explanation");                                  \
        n_detected++;                                                                              \
    } while (0)

static int n_detected;

/* ----------------------------------------------------------------------------------------------- */

static struct ivshm_spsc_slot_hdr *spsc_hdr_of(struct fixture *f, uint64_t idx)
{
    return (struct ivshm_spsc_slot_hdr *)slot_of(f, &f->s, idx);
}

static void hostile_spsc_consumer_side(char *detail, size_t dn)
{
    n_detected = 0;
    struct fixture f;
    CHECK(fixture_new(&f) == 0, "fixture");
    struct ivshm_spsc p, c;
    const char *why;
    uint8_t buf[512];
    CHECK(ivshm_spsc_attach(&p, &f.tr.r, &f.s, &why) == 0 && ivshm_spsc_attach(&c, &f.tr.r, &f.s, &why) == 0, "attach");
    struct ivshm_ring_ctrl *ctl = ctrl_of(&f, &f.s);
    for (int i = 0; i < 3; i++)
        CHECK(ivshm_spsc_try_send(&p, "abc", 3) == 0, "send");
    for (int i = 0; i < 3; i++)
        CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == 3, "recv");

    /* The consumer follows the slots' stamps, never the producer's index: a lie about head,
     * however far off, makes it receive nothing that was not published (and read nothing else). */
    struct ivshm_spsc_msg m;
    uint64_t lies[] = {3 + 8 + 1, UINT64_MAX - 5, 1, 3 + 5};
    for (size_t i = 0; i < sizeof(lies) / sizeof(lies[0]); i++) {
        ctl->head = lies[i];
        CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "head %" PRIu64 ": a message", lies[i]);
        CHECK(ivshm_spsc_recv_fixed(&c, buf, 3, 4) == 0, "head %" PRIu64 ": recv_fixed", lies[i]);
        CHECK(ivshm_spsc_next(&c, &m) == -EAGAIN, "head %" PRIu64 ": next", lies[i]);
        CHECK(ivshm_spsc_count(&c) <= 8, "count out of range");
    }
    CHECK(canary_ok(&f), "canary broken by head corruption");
    ctl->head = 3; /* what the producer published */

    /* our own index moved by someone else: a second consumer */
    ctl->tail = 2;
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    CHECK(strstr(c.why, "one consumer"), "why: %s", c.why);
    EXPECT_CORRUPT(ivshm_spsc_recv_fixed(&c, buf, 3, 4), &c);
    ctl->tail = 3;

    /* slot length larger than the slot */
    CHECK(ivshm_spsc_try_send(&p, "hello", 5) == 0, "send");
    struct ivshm_spsc_slot_hdr *sh = spsc_hdr_of(&f, 3);
    CHECK(sh->len == 5 && sh->stamp == 4, "slot header: len %u stamp %u", sh->len, sh->stamp);
    sh->len = 33;
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    CHECK(strstr(c.why, "length"), "why: %s", c.why);
    sh->len = 0xffffffffu;
    EXPECT_CORRUPT(ivshm_spsc_next(&c, &m), &c);
    /* recv_fixed does not trust it either: it stops there */
    CHECK(ivshm_spsc_recv_fixed(&c, buf, 5, 1) == -ENOMSG, "recv_fixed at a bad slot");
    sh->len = 5 | (1u << 30); /* a stray bit beside the length */
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    CHECK(strstr(c.why, "length"), "why: %s", c.why);
    /* a chain start whose chunk is not full */
    sh->len = 5 | IVSHM_SPSC_MORE;
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    CHECK(strstr(c.why, "not full"), "why: %s", c.why);
    /* a full chunk that says "more" but the next slot is not published */
    sh->len = 32 | IVSHM_SPSC_MORE;
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    CHECK(strstr(c.why, "past the published"), "why: %s", c.why);
    /* a stamp that is not this index's (the previous lap's, or off by one): not published */
    sh->len = 5;
    sh->stamp = 3;
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "stamp of index 2: not published");
    sh->stamp = 4 - 8;
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "last lap's stamp: not published");
    sh->stamp = 4;
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == 5 && memcmp(buf, "hello", 5) == 0, "healed");

    /* chains: a 3-slot message whose middle/last chunks are tampered with */
    uint8_t big[80];
    memset(big, 'x', sizeof(big));
    CHECK(ivshm_spsc_try_send(&p, big, 80) == 0, "send 3-slot message at index 4");
    struct ivshm_spsc_slot_hdr *c1 = spsc_hdr_of(&f, 5), *c2 = spsc_hdr_of(&f, 6);
    CHECK(c1->len == (32 | IVSHM_SPSC_MORE) && c2->len == 16 && c1->stamp == 6 && c2->stamp == 7,
          "chunk layout");
    c2->len = 32 | IVSHM_SPSC_MORE; /* the chain runs on past the published slots */
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    CHECK(strstr(c.why, "past the published"), "why: %s", c.why);
    c2->len = 16 | (1u << 29);
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    c2->len = 1000;
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    c2->len = 16;
    c1->len = 31 | IVSHM_SPSC_MORE; /* a middle chunk that is not full */
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    c1->len = 32 | IVSHM_SPSC_MORE;
    c1->stamp = 0; /* a middle chunk that was never published */
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    CHECK(strstr(c.why, "past the published"), "why: %s", c.why);
    c1->stamp = 6;
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == 80, "healed 3-slot message");
    /* a chain that wraps the whole ring: every slot stamped and saying "more" */
    CHECK(c.tail == 7, "tail %" PRIu64, c.tail);
    for (uint64_t i = 7; i < 7 + 8; i++) {
        spsc_hdr_of(&f, i)->len = 32 | IVSHM_SPSC_MORE;
        spsc_hdr_of(&f, i)->stamp = (uint32_t)(i + 1);
    }
    EXPECT_CORRUPT(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL), &c);
    CHECK(strstr(c.why, "longer than the ring"), "why: %s", c.why);
    CHECK(ivshm_spsc_recv_fixed(&c, buf, 32, 8) == -ENOMSG, "recv_fixed refuses chained slots");
    CHECK(canary_ok(&f), "canary broken by slot corruption");

    /* a consumer re-attaching to indices more than capacity apart is refused */
    ctl->head = 7 + 9;
    CHECK(ivshm_spsc_attach(&c, &f.tr.r, &f.s, &why) == -EPROTO, "attach with head - tail > capacity");
    n_detected++;
    ctl->tail = 20; /* tail ahead of head: also refused */
    CHECK(ivshm_spsc_attach(&c, &f.tr.r, &f.s, &why) == -EPROTO, "attach with tail > head");
    n_detected++;
    CHECK(canary_ok(&f), "canary");
    tregion_free(&f.tr);
    snprintf(detail, dn, "%d corruptions detected", n_detected);
}

static void hostile_spsc_producer_side(char *detail, size_t dn)
{
    n_detected = 0;
    struct fixture f;
    CHECK(fixture_new(&f) == 0, "fixture");
    struct ivshm_spsc p, c;
    const char *why;
    uint8_t buf[512];
    CHECK(ivshm_spsc_attach(&p, &f.tr.r, &f.s, &why) == 0 && ivshm_spsc_attach(&c, &f.tr.r, &f.s, &why) == 0, "attach");
    struct ivshm_ring_ctrl *ctl = ctrl_of(&f, &f.s);
    for (int i = 0; i < 8; i++)
        CHECK(ivshm_spsc_try_send(&p, "abc", 3) == 0, "send");
    CHECK(ivshm_spsc_try_send(&p, "abc", 3) == -EAGAIN, "full");
    ctl->tail = 9; /* tail beyond head (8) */
    EXPECT_CORRUPT(ivshm_spsc_try_send(&p, "abc", 3), &p);
    CHECK(strstr(p.why, "consumer index"), "why: %s", p.why);
    EXPECT_CORRUPT(ivshm_spsc_send_fixed(&p, "abc", 3, 1), &p);
    uint8_t *ptr;
    EXPECT_CORRUPT(ivshm_spsc_reserve(&p, 3, &ptr), &p);
    ctl->tail = UINT64_MAX;
    EXPECT_CORRUPT(ivshm_spsc_try_send(&p, "abc", 3), &p);
    ctl->tail = 4; /* the consumer took 4 */
    CHECK(ivshm_spsc_try_send(&p, "abc", 3) == 0, "send after a legitimate tail");
    /* head 9, the producer's cache says tail 4: moving tail back to 3 stays inside the window
     * (head - tail <= capacity) but is still a lie, seen when a 4-slot message needs a re-read */
    ctl->tail = 3;
    uint8_t four[100];
    memset(four, 'q', sizeof(four));
    EXPECT_CORRUPT(ivshm_spsc_try_send(&p, four, sizeof(four)), &p);
    CHECK(strstr(p.why, "backwards"), "why: %s", p.why);
    ctl->tail = 2; /* and further back: outside the window */
    EXPECT_CORRUPT(ivshm_spsc_try_send(&p, four, sizeof(four)), &p);
    CHECK(canary_ok(&f), "canary");
    (void)c;
    (void)buf;
    tregion_free(&f.tr);
    snprintf(detail, dn, "%d corruptions detected", n_detected);
}

/* Producers that are replaced: a second one moving our index, one dying with a batch written
 * but not published, one dying between stamping a batch and storing head. */
static void hostile_spsc_producer_restarts(char *detail, size_t dn)
{
    n_detected = 0;
    struct fixture f;
    CHECK(fixture_new(&f) == 0, "fixture");
    struct ivshm_spsc p, c, dead, next;
    const char *why;
    uint8_t buf[64];
    CHECK(ivshm_spsc_attach(&p, &f.tr.r, &f.s, &why) == 0 && ivshm_spsc_attach(&c, &f.tr.r, &f.s, &why) == 0, "attach");
    struct ivshm_ring_ctrl *ctl = ctrl_of(&f, &f.s);
    int sent = 0;
    for (int i = 0; i < 8; i++)
        sent += ivshm_spsc_try_send(&p, "b", 1) == 0;
    CHECK(sent == 8, "sent %d", sent);
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == 1, "recv");
    /* somebody else publishing on our ring, seen when the producer next reads the indices */
    ctl->head = 5;
    EXPECT_CORRUPT(ivshm_spsc_try_send(&p, "b", 1), &p);
    CHECK(strstr(p.why, "one producer"), "why: %s", p.why);
    ctl->head = p.head_published;
    sent--;
    for (int i = 0; i < sent; i++)
        CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == 1, "recv %d of %d", i, sent);
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "empty");
    uint64_t h0 = ctl->head;

    /* dies with three messages written, none published: the later two slots carry stamps */
    CHECK(ivshm_spsc_attach(&dead, &f.tr.r, &f.s, &why) == 0, "attach");
    CHECK(ivshm_spsc_write(&dead, "ghost1", 6) == 0 && ivshm_spsc_write(&dead, "ghost2", 6) == 0 &&
              ivshm_spsc_write(&dead, "ghost3", 6) == 0, "write");
    CHECK(spsc_hdr_of(&f, h0 + 1)->stamp == (uint32_t)(h0 + 2), "later slots of a batch are stamped");
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "an unpublished batch is invisible");
    /* its successor's first message must not bring them to light */
    CHECK(ivshm_spsc_attach(&next, &f.tr.r, &f.s, &why) == 0, "attach");
    CHECK(ivshm_spsc_try_send(&next, "real", 4) == 0, "send");
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == 4 && memcmp(buf, "real", 4) == 0, "recv");
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "a dead producer's unpublished message arrived");

    /* dies after stamping a batch of two, before storing head: the batch was published */
    CHECK(ivshm_spsc_attach(&dead, &f.tr.r, &f.s, &why) == 0, "attach");
    CHECK(ivshm_spsc_write(&dead, "x1", 2) == 0 && ivshm_spsc_write(&dead, "x2", 2) == 0, "write");
    uint64_t before = ctl->head;
    ivshm_spsc_publish(&dead);
    ctl->head = before;
    /* the consumer follows the stamps past head; a new producer may attach after that */
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == 2 && memcmp(buf, "x1", 2) == 0, "recv x1");
    CHECK(ivshm_spsc_attach(&next, &f.tr.r, &f.s, &why) == 0, "attach with the consumer ahead of head");
    CHECK(ivshm_spsc_try_send(&next, "after", 5) == 0, "send");
    CHECK(ctl->head == before + 3, "head %" PRIu64 ", expected %" PRIu64, ctl->head, before + 3);
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == 2 && memcmp(buf, "x2", 2) == 0, "recv x2");
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == 5 && memcmp(buf, "after", 5) == 0, "recv after");
    CHECK(ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL) == -EAGAIN, "empty");
    /* but a consumer index ahead of slots nobody stamped is a lie */
    ctl->tail = ctl->head + 2;
    CHECK(ivshm_spsc_attach(&next, &f.tr.r, &f.s, &why) == -EPROTO, "attach with tail ahead over unstamped slots");
    n_detected++;
    CHECK(canary_ok(&f), "canary");
    tregion_free(&f.tr);
    snprintf(detail, dn, "%d corruptions detected", n_detected);
}

static void hostile_mpmc(char *detail, size_t dn)
{
    n_detected = 0;
    struct fixture f;
    CHECK(fixture_new(&f) == 0, "fixture");
    struct ivshm_mpmc q;
    const char *why;
    uint8_t buf[512];
    CHECK(ivshm_mpmc_attach(&q, &f.tr.r, &f.m, &why) == 0, "attach");
    struct ivshm_ring_ctrl *ctl = ctrl_of(&f, &f.m);
    CHECK(ivshm_mpmc_try_send(&q, "one", 3) == 0, "send");
    struct ivshm_mpmc_slot_hdr *s0 = (struct ivshm_mpmc_slot_hdr *)slot_of(&f, &f.m, 0);
    s0->len = 33; /* longer than the slot */
    EXPECT_CORRUPT(ivshm_mpmc_try_recv(&q, buf, sizeof(buf), NULL), &q);
    /* the bad slot was handed back: the ring continues */
    CHECK(ivshm_mpmc_try_send(&q, "two", 3) == 0, "send");
    struct ivshm_mpmc_slot_hdr *s1 = (struct ivshm_mpmc_slot_hdr *)slot_of(&f, &f.m, 1);
    s1->len = 3 | (1u << 31); /* a high bit beside the length */
    EXPECT_CORRUPT(ivshm_mpmc_recv_fixed(&q, buf, 32, 4), &q);
    CHECK(strstr(q.why, "length"), "why: %s", q.why);
    CHECK(ivshm_mpmc_try_send(&q, "three", 5) == 0, "send");
    CHECK(ivshm_mpmc_try_recv(&q, buf, sizeof(buf), NULL) == 5, "recv after the bad slots");

    /* sequence word ahead of the consumer's index: a "consumed by someone else" that never ends */
    CHECK(ivshm_mpmc_try_send(&q, "four", 4) == 0, "send");
    struct ivshm_mpmc_slot_hdr *s3 = (struct ivshm_mpmc_slot_hdr *)slot_of(&f, &f.m, 3);
    s3->seq = 1000;
    double t0 = tc_now();
    EXPECT_CORRUPT(ivshm_mpmc_try_recv(&q, buf, sizeof(buf), NULL), &q);
    double dt = tc_now() - t0;
    /* behind: looks empty, never a message */
    s3->seq = 0;
    CHECK(ivshm_mpmc_try_recv(&q, buf, sizeof(buf), NULL) == -EAGAIN, "seq behind = empty");
    uint64_t pos;
    CHECK(ivshm_mpmc_stalled(&q, &pos) == 0, "not reported as a stall");
    s3->seq = 4;
    CHECK(ivshm_mpmc_try_recv(&q, buf, sizeof(buf), NULL) == 4, "healed");
    /* producer side: a sequence word ahead of head */
    struct ivshm_mpmc_slot_hdr *s4 = (struct ivshm_mpmc_slot_hdr *)slot_of(&f, &f.m, 4);
    s4->seq = 77;
    EXPECT_CORRUPT(ivshm_mpmc_try_send(&q, "x", 1), &q);
    s4->seq = 1; /* behind: looks full */
    CHECK(ivshm_mpmc_try_send(&q, "x", 1) == -EAGAIN, "seq behind = full");
    s4->seq = 4;
    /* indices anywhere: only masked slot accesses, results stay bounded */
    uint64_t vals[] = {0, 1, 7, 8, 9, 1u << 31, UINT64_MAX, UINT64_MAX - 8, 0x8000000000000000ull};
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++)
        for (size_t j = 0; j < sizeof(vals) / sizeof(vals[0]); j++) {
            ctl->head = vals[i];
            ctl->tail = vals[j];
            int64_t r1 = ivshm_mpmc_try_send(&q, "y", 1);
            CHECK(r1 == 0 || r1 == -EAGAIN || r1 == -EPROTO, "send = %" PRId64, r1);
            int64_t r2 = ivshm_mpmc_try_recv(&q, buf, sizeof(buf), NULL);
            CHECK(r2 == -EAGAIN || r2 == -EPROTO || (r2 >= 0 && r2 <= 32), "recv = %" PRId64, r2);
            CHECK(ivshm_mpmc_count(&q) <= 8, "count out of range");
            ivshm_mpmc_stalled(&q, &pos);
        }
    CHECK(canary_ok(&f), "canary");
    tregion_free(&f.tr);
    snprintf(detail, dn, "%d corruptions detected, seq-ahead detected in %.1f ms", n_detected, dt * 1e3);
}

static void hostile_directory_and_header(char *detail, size_t dn)
{
    n_detected = 0;
    struct fixture f;
    CHECK(fixture_new(&f) == 0, "fixture");
    struct ivshm_region_hdr *h = (struct ivshm_region_hdr *)f.tr.mem;
    struct ivshm_ring_desc *d = &h->rings[f.s.index];
    struct ivshm_ring_desc saved = *d;
    struct ivshm_ring_info info;
    const char *why = NULL;
#define DIR_CASE(stmt, expect_why)                                                                 \
    do {                                                                                           \
        *d = saved;                                                                                \
        stmt;                                                                                      \
        why = NULL;                                                                                \
        int rc_ = ivshm_region_find_ring(&f.tr.r, "victim-spsc", &info, &why);                     \
        int rc2_ = ivshm_region_ring_at(&f.tr.r, f.s.index, &info, &why);                          \
        CHECK(rc_ == -EPROTO && rc2_ == -EPROTO, #stmt ": find = %d, ring_at = %d", rc_, rc2_);    \
        CHECK(why && strstr(why, expect_why), #stmt ": why = %s", why ? why : "(none)");           \
        CHECK(ivshm_region_find_ring(&f.tr.r, "canary", &info, &why) == 0, "canary lookup");       \
        CHECK(canary_ok(&f), "canary after " #stmt);                                               \
        n_detected++;                                                                              \
    } while (0)
    DIR_CASE(d->offset = f.tr.size, "outside");
    DIR_CASE(d->offset = f.tr.size - 128, "outside");
    DIR_CASE(d->offset = UINT64_MAX - 127, "outside");
    DIR_CASE(d->offset = 0, "outside");
    DIR_CASE(d->offset = 128, "outside");
    DIR_CASE(d->offset += 8, "outside");
    DIR_CASE(d->size += 128, "size");
    DIR_CASE(d->size = 0, "size");
    DIR_CASE(d->capacity = 6, "capacity");
    DIR_CASE(d->capacity = 0x80000000u, "capacity");
    DIR_CASE(d->slot_size = 0, "slot size");
    DIR_CASE(d->slot_size = 0xffffffffu, "slot size");
    DIR_CASE(d->kind = 7, "kind");
    DIR_CASE(d->state = 9, "state");
    /* a name without its NUL: it cannot be found by name, and listing reports it */
    *d = saved;
    memset(d->name, 'z', IVSHM_NAME_MAX);
    CHECK(ivshm_region_find_ring(&f.tr.r, "victim-spsc", &info, &why) == -ENOENT, "unterminated name");
    CHECK(ivshm_region_ring_at(&f.tr.r, f.s.index, &info, &why) == -EPROTO, "unterminated name listed");
    n_detected++;
    *d = saved;
    CHECK(ivshm_region_find_ring(&f.tr.r, "victim-spsc", &info, &why) == 0, "restored");

    /* control block line 0 against the directory */
    struct ivshm_ring_ctrl *ctl = ctrl_of(&f, &f.s);
    struct ivshm_spsc q;
    ctl->magic ^= 1;
    CHECK(ivshm_spsc_attach(&q, &f.tr.r, &f.s, &why) == -EPROTO && strstr(why, "magic"), "ring magic");
    n_detected++;
    ctl->magic ^= 1;
    ctl->stride = 8;
    CHECK(ivshm_spsc_attach(&q, &f.tr.r, &f.s, &why) == -EPROTO, "ring stride");
    n_detected++;
    ctl->stride = f.s.stride;
    ctl->capacity = 16;
    CHECK(ivshm_spsc_attach(&q, &f.tr.r, &f.s, &why) == -EPROTO, "ring capacity");
    n_detected++;
    ctl->capacity = 8;
    struct ivshm_mpmc mq;
    CHECK(ivshm_mpmc_attach(&mq, &f.tr.r, &f.s, &why) == -EINVAL, "wrong kind");
    CHECK(ivshm_spsc_attach(&q, &f.tr.r, &f.s, &why) == 0, "restored");

    /* header */
    struct ivshm_region r2;
    h->magic ^= 0x100;
    CHECK(ivshm_region_attach(&r2, f.tr.mem, f.tr.size, 0, 0, 0) == -EBADMSG, "bad magic");
    CHECK(ivshm_region_attach(&r2, f.tr.mem, f.tr.size, IVSHM_ATTACH_FORMAT_IF_EMPTY, 3, 0) == -EBADMSG,
          "bad magic is not 'empty'");
    CHECK(ivshm_region_check(&f.tr.r) == -EBADMSG, "check sees the magic gone");
    n_detected += 3;
    h->magic ^= 0x100;
    h->version = IVSHM_LAYOUT_VERSION + 1;
    CHECK(ivshm_region_attach(&r2, f.tr.mem, f.tr.size, 0, 0, 0) == -ENOEXEC, "version");
    h->version = IVSHM_LAYOUT_VERSION - 1; /* a region of the previous layout */
    CHECK(ivshm_region_attach(&r2, f.tr.mem, f.tr.size, 0, 0, 0) == -ENOEXEC, "old version");
    h->version = IVSHM_LAYOUT_VERSION;
    h->region_size = f.tr.size * 2;
    CHECK(ivshm_region_attach(&r2, f.tr.mem, f.tr.size, 0, 0, 0) == -EPROTO, "region size");
    h->region_size = f.tr.size;
    h->hdr_size = 8192;
    CHECK(ivshm_region_attach(&r2, f.tr.mem, f.tr.size, 0, 0, 0) == -EPROTO, "header size");
    h->hdr_size = IVSHM_HDR_SIZE;
    h->max_rings = 1000;
    CHECK(ivshm_region_attach(&r2, f.tr.mem, f.tr.size, 0, 0, 0) == -EPROTO, "max rings");
    h->max_rings = IVSHM_MAX_RINGS;
    n_detected += 4;
    h->generation++;
    CHECK(ivshm_region_check(&f.tr.r) == -ESTALE, "generation change");
    h->generation--;
    n_detected++;
    CHECK(ivshm_region_attach(&r2, f.tr.mem, f.tr.size, 0, 0, 0) == 0, "restored header");

    /* the allocation pointer: never lets a new ring land outside the region or on the header */
    uint64_t allocs[] = {0, 100, f.tr.size, f.tr.size - 64, UINT64_MAX, UINT64_MAX - 100};
    for (size_t i = 0; i < sizeof(allocs) / sizeof(allocs[0]); i++) {
        h->alloc_off = allocs[i];
        int rc = ivshm_region_create_ring(&f.tr.r, "new", IVSHM_KIND_SPSC, 64, 16, 1, 0, &info, &why);
        CHECK(rc == -ENOSPC, "alloc_off %" PRIu64 ": create = %d", allocs[i], rc);
        n_detected++;
    }
    CHECK(canary_ok(&f), "canary");
    /* a directory lock held by nobody: creators give up */
    h->alloc_off = 16384;
    h->lock = 42;
    CHECK(ivshm_region_create_ring(&f.tr.r, "new", IVSHM_KIND_SPSC, 64, 16, 1, 0, &info, &why) == -ETIMEDOUT,
          "held lock");
    h->lock = 0;
    tregion_free(&f.tr);
    snprintf(detail, dn, "%d corruptions detected", n_detected);
}

/* ----------------------------------------------------------------------------------------------- */
/* Part 2: a concurrent scribbler */

struct attack {
    struct fixture f;
    double until;
    int stop; /* atomic */
    uint64_t pokes, detected, sent, received, canary_msgs, reattach;
};

static void *scribbler(void *arg)
{
    struct attack *a = arg;
    struct trng rng = {42};
    const struct ivshm_ring_info *targets[2] = {&a->f.s, &a->f.m};
    while (!__atomic_load_n(&a->stop, __ATOMIC_RELAXED)) {
        const struct ivshm_ring_info *t = targets[trng_next(&rng) & 1];
        uint8_t *base = a->f.tr.mem + t->offset;
        uint64_t *head = (uint64_t *)(base + 128), *tail = (uint64_t *)(base + 256);
        uint64_t r = trng_next(&rng), cap = t->capacity;
        uint64_t h = __atomic_load_n(head, __ATOMIC_RELAXED), tl = __atomic_load_n(tail, __ATOMIC_RELAXED);
        switch (r % 8) {
        case 0: /* plausible lies: indices that look consistent, give or take one */
            __atomic_store_n(head, tl + trng_below(&rng, cap + 2), __ATOMIC_RELAXED);
            break;
        case 1:
            __atomic_store_n(tail, h - trng_below(&rng, cap + 2), __ATOMIC_RELAXED);
            break;
        case 2: /* wild values */
            __atomic_store_n(trng_next(&rng) & 1 ? head : tail, trng_next(&rng), __ATOMIC_RELAXED);
            break;
        default: { /* a slot header or payload word */
            uint64_t idx = trng_below(&rng, cap);
            uint8_t *slot = base + IVSHM_CTRL_SIZE + idx * t->stride;
            uint64_t off = trng_below(&rng, t->stride / 8) * 8;
            uint64_t *w = (uint64_t *)(slot + off);
            uint64_t cur = __atomic_load_n(w, __ATOMIC_RELAXED), v;
            switch ((r >> 8) % 5) {
            case 0: v = trng_next(&rng); break;
            case 1: v = cur + trng_below(&rng, 5) - 2; break; /* an MPMC seq, nearly right */
            case 2: v = (trng_below(&rng, 3) << 32) | trng_below(&rng, t->slot_size + 3); break; /* a length (and a stamp or flags) */
            case 3: v = cur ^ (1ull << trng_below(&rng, 64)); break;
            default: v = cur + cap; break;
            }
            __atomic_store_n(w, v, __ATOMIC_RELAXED);
        }
        }
        a->pokes++;
        if ((a->pokes & 15) == 0) {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

static int in_slots(const struct attack *a, const struct ivshm_ring_info *t, const uint8_t *p, uint64_t n)
{
    const uint8_t *lo = a->f.tr.mem + t->offset + IVSHM_CTRL_SIZE;
    const uint8_t *hi = lo + (uint64_t)t->capacity * t->stride;
    return p >= lo && p <= hi && n <= (uint64_t)(hi - p);
}

static void *honest_spsc(void *arg)
{
    struct attack *a = arg;
    struct ivshm_spsc p, c;
    const char *why;
    uint8_t buf[300], src[300];
    memset(src, 'h', sizeof(src));
    struct trng rng = {7};
    int attached = 0;
    while (tc_now() < a->until && !tc_failed()) {
        if (!attached) {
            attached = ivshm_spsc_attach(&p, &a->f.tr.r, &a->f.s, &why) == 0 &&
                       ivshm_spsc_attach(&c, &a->f.tr.r, &a->f.s, &why) == 0;
            a->reattach++;
            if (!attached)
                continue;
        }
        int op = (int)trng_below(&rng, 6);
        int64_t rc = 0;
        struct ivshm_spsc_msg m;
        uint8_t *ptr;
        switch (op) {
        case 0: rc = ivshm_spsc_try_send(&p, src, trng_below(&rng, 257)); break;
        case 1: rc = ivshm_spsc_send_fixed(&p, src, 8, 1 + trng_below(&rng, 8)); break;
        case 2:
            rc = ivshm_spsc_reserve(&p, 32, &ptr);
            if (rc == 0) {
                CHECKP(in_slots(a, &a->f.s, ptr, 32), "reserve pointer outside the slots");
                memset(ptr, 'r', 32);
                ivshm_spsc_commit(&p, 32);
            }
            break;
        case 3:
            rc = ivshm_spsc_try_recv(&c, buf, sizeof(buf), NULL);
            CHECKP(rc < 0 || rc <= 256, "received %" PRId64 " bytes from a ring of 256", rc);
            break;
        case 4:
            rc = ivshm_spsc_next(&c, &m);
            if (rc == 0) {
                CHECKP(m.len <= 256 && m.nslots <= 8, "message of %" PRIu64 " bytes in %u slots", m.len, m.nslots);
                CHECKP(in_slots(a, &a->f.s, m.data, m.nslots == 1 ? m.len : 32), "message outside the slots");
                ivshm_spsc_copy(&c, &m, buf);
                ivshm_spsc_advance(&c, &m);
                ivshm_spsc_release(&c);
            }
            break;
        default: rc = ivshm_spsc_recv_fixed(&c, buf, 8, 1 + trng_below(&rng, 8)); break;
        }
        CHECKP(rc >= 0 || rc == -EPROTO || rc == -EAGAIN || rc == -ENOMSG, "unexpected rc %" PRId64, rc);
        if (rc == -EPROTO) {
            a->detected++;
            attached = 0; /* what a Python caller does after CorruptionError: re-open the ring */
        } else if (rc >= 0 && op < 3) {
            a->sent++;
        } else if (rc >= 0) {
            a->received++;
        }
    }
    return NULL;
}

static void *honest_mpmc(void *arg)
{
    struct attack *a = arg;
    struct ivshm_mpmc q;
    const char *why;
    uint8_t buf[32 * 8], src[32 * 8];
    memset(src, 'm', sizeof(src));
    struct trng rng = {8};
    CHECKP(ivshm_mpmc_attach(&q, &a->f.tr.r, &a->f.m, &why) == 0, "attach");
    while (tc_now() < a->until && !tc_failed()) {
        int op = (int)trng_below(&rng, 6);
        int64_t rc = 0;
        uint64_t pos;
        switch (op) {
        case 0: rc = ivshm_mpmc_try_send(&q, src, trng_below(&rng, 33)); break;
        case 1: rc = ivshm_mpmc_send_fixed(&q, src, 32, 1 + trng_below(&rng, 8)); break;
        case 2:
            rc = ivshm_mpmc_try_recv(&q, buf, 32, NULL);
            CHECKP(rc < 0 || rc <= 32, "received %" PRId64 " bytes from 32-byte slots", rc);
            break;
        case 3: rc = ivshm_mpmc_recv_fixed(&q, buf, 32, 1 + trng_below(&rng, 8)); break;
        case 4:
            rc = ivshm_mpmc_claim_recv(&q, 1 + trng_below(&rng, 8), &pos);
            for (int64_t i = 0; i < rc; i++) {
                int64_t len = ivshm_mpmc_msg_len(&q, pos + (uint64_t)i);
                CHECKP(len <= 32, "length %" PRId64, len);
                if (len >= 0) {
                    CHECKP(in_slots(a, &a->f.m, ivshm_mpmc_payload(&q, pos + (uint64_t)i), (uint64_t)len), "outside");
                    memcpy(buf, ivshm_mpmc_payload(&q, pos + (uint64_t)i), (uint64_t)len);
                }
                ivshm_mpmc_release_one(&q, pos + (uint64_t)i);
            }
            break;
        default: ivshm_mpmc_stalled(&q, &pos); (void)ivshm_mpmc_count(&q); break;
        }
        if (rc == -EPROTO)
            a->detected++;
        else if (rc > 0 || (rc == 0 && op == 0))
            op < 2 ? a->sent++ : a->received++;
    }
    return NULL;
}

static void *canary_producer(void *arg)
{
    struct attack *a = arg;
    struct ivshm_spsc q;
    CHECKP(ivshm_spsc_attach(&q, &a->f.tr.r, &a->f.canary, NULL) == 0, "attach");
    uint8_t buf[64];
    uint64_t seq = 0;
    while (!__atomic_load_n(&a->stop, __ATOMIC_RELAXED) && !tc_failed()) {
        uint64_t len = seq % 49;
        tc_fill(buf, 3, seq, len);
        int rc = ivshm_spsc_try_send(&q, buf, len);
        CHECKP(rc == 0 || rc == -EAGAIN, "canary send = %d (%s)", rc, q.why);
        if (rc == 0)
            seq++;
        else
            sched_yield();
    }
    return NULL;
}

static void *canary_consumer(void *arg)
{
    struct attack *a = arg;
    struct ivshm_spsc q;
    CHECKP(ivshm_spsc_attach(&q, &a->f.tr.r, &a->f.canary, NULL) == 0, "attach");
    uint8_t buf[64];
    uint64_t seq = 0;
    while (!__atomic_load_n(&a->stop, __ATOMIC_RELAXED) && !tc_failed()) {
        int64_t n = ivshm_spsc_try_recv(&q, buf, sizeof(buf), NULL);
        CHECKP(n >= 0 || n == -EAGAIN, "canary recv = %" PRId64 " (%s)", n, q.why);
        if (n < 0) {
            sched_yield();
            continue;
        }
        CHECKP((uint64_t)n == seq % 49 && tc_verify(buf, 3, seq, (uint64_t)n) < 0, "canary message %" PRIu64, seq);
        seq++;
    }
    a->canary_msgs = seq;
    return NULL;
}

static void hostile_concurrent_scribbler(char *detail, size_t dn)
{
    struct attack *a = calloc(1, sizeof(*a));
    CHECK(a && fixture_new(&a->f) == 0, "fixture");
    a->until = tc_now() + 1.5 * (tc_scale() < 1 ? 1 : tc_scale());
    pthread_t th[5];
    void *(*fns[5])(void *) = {scribbler, honest_spsc, honest_mpmc, canary_producer, canary_consumer};
    for (int i = 0; i < 5; i++)
        pthread_create(&th[i], NULL, fns[i], a);
    /* honest threads end by themselves; a call that never returns shows up here */
    for (int i = 1; i <= 2; i++) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 60;
        int rc = pthread_timedjoin_np(th[i], NULL, &ts);
        CHECK(rc == 0, "an honest thread did not return within 60 s of its deadline (hang)");
    }
    __atomic_store_n(&a->stop, 1, __ATOMIC_RELAXED);
    pthread_join(th[0], NULL);
    pthread_join(th[3], NULL);
    pthread_join(th[4], NULL);
    if (!tc_failed()) {
        CHECK(a->canary_msgs > 0, "the canary moved no messages");
        CHECK(a->detected > 0, "no corruption was ever detected: is the scribbler writing?");
    }
    snprintf(detail, dn,
             "%" PRIu64 " pokes, %" PRIu64 " corruptions detected, %" PRIu64 " sends and %" PRIu64
             " receives survived, canary %" PRIu64 " messages intact",
             a->pokes, a->detected, a->sent, a->received, a->canary_msgs);
    tregion_free(&a->f.tr);
    free(a);
}

int main(int argc, char **argv)
{
    static const struct tcase cases[] = {
        {"hostile_spsc_consumer_side", hostile_spsc_consumer_side, 0},
        {"hostile_spsc_producer_side", hostile_spsc_producer_side, 0},
        {"hostile_spsc_producer_restarts", hostile_spsc_producer_restarts, 0},
        {"hostile_mpmc", hostile_mpmc, 0},
        {"hostile_directory_and_header", hostile_directory_and_header, 0},
        {"hostile_concurrent_scribbler", hostile_concurrent_scribbler, 1},
    };
    return tc_main(argc, argv, cases, sizeof(cases) / sizeof(cases[0]));
}
