/* pubsub_fanout.c - a publish-subscribe ring from C: one publisher, any number of subscribers,
 * each in its own process (or VM), every subscriber receiving every message.
 *
 *   make -C csrc && cc -O2 -Icsrc examples/c/pubsub_fanout.c csrc/libivshm.a -o pubsub_fanout
 *   ./pubsub_fanout /dev/shm/demo fan pub 1000000     publish N messages, each its stream index
 *   ./pubsub_fanout /dev/shm/demo fan sub 1000000     receive up to stream index N-1, check each
 *
 * A message's stream index is its position in everything ever published on the ring (the first
 * publisher starts at 0; a later one goes on from where the last one stopped).
 *
 * The region file must exist (Region.create, `truncate -s 4M`, or a guest's BAR2:
 * /sys/bus/pci/devices/BDF/resource2).  The ring is created (or found: the shape must match) with
 * 8-byte slots, 4096 of them, slow="block" and slow_timeout SLOW seconds (default 1; the last,
 * optional argument): the publisher waits for the slowest subscriber.  Start
 * the subscribers first: each one receives what is published after it joined ("ready" on stdout).
 * Both ends block through ivshm_chan without doorbells here (they poll with back-off); with a
 * doorbell table, as in ring_echo.c, sleeping subscribers are rung by the publisher.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ivshm.h"

#define SECOND 1000000000ll

int main(int argc, char **argv)
{
    if ((argc != 5 && argc != 6) || (strcmp(argv[3], "pub") != 0 && strcmp(argv[3], "sub") != 0)) {
        fprintf(stderr, "usage: %s REGION_FILE RING pub|sub COUNT [SLOW_TIMEOUT_SECONDS]\n", argv[0]);
        return 2;
    }
    uint64_t count = strtoull(argv[4], NULL, 10);
    uint64_t slow_ns = argc == 6 ? strtoull(argv[5], NULL, 10) * (uint64_t)SECOND : (uint64_t)SECOND;
    int fd = open(argv[1], O_RDWR | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(argv[1]);
        return 1;
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    struct ivshm_region r;
    int rc = ivshm_region_attach(&r, base, (uint64_t)st.st_size, IVSHM_ATTACH_FORMAT_IF_EMPTY,
                                 (uint64_t)getpid() * 2654435761u | 1, 2000);
    if (rc) {
        fprintf(stderr, "attach: %s\n", strerror(-rc));
        return 1;
    }
    struct ivshm_ring_info info;
    const char *why = NULL;
    rc = ivshm_pubsub_create(&r, argv[2], 8, 4096, IVSHM_PUBSUB_BLOCK, slow_ns, (uint64_t)getpid(),
                             2000, &info, &why);
    if (rc < 0) {
        fprintf(stderr, "ring %s: %s (%s)\n", argv[2], strerror(-rc), why ? why : "");
        return 1;
    }
    struct ivshm_chan ch;
    if (strcmp(argv[3], "pub") == 0) {
        static struct ivshm_pubsub_pub p; /* large: the publisher tracks every table entry */
        rc = ivshm_pubsub_pub_attach(&p, &r, &info, 2000, &why);
        if (rc == 0)
            rc = ivshm_chan_init(&ch, IVSHM_KIND_PUBSUB, &p, -1, 0, -1, -1, NULL, NULL, 0, SECOND / 20);
        if (rc) {
            fprintf(stderr, "publisher: %s (%s)\n", strerror(-rc), why ? why : "");
            return 1;
        }
        /* where this publisher goes on from: the index its predecessor announced */
        uint64_t first = IVSHM_LOAD_ACQUIRE(&p.ctrl->head);
        for (uint64_t i = first; i < first + count; i++) {
            rc = ivshm_chan_send(&ch, &i, sizeof(i), 60 * SECOND);
            if (rc) {
                fprintf(stderr, "send %" PRIu64 ": %s (%s)\n", i, strerror(-rc), p.why ? p.why : "");
                return 1;
            }
        }
        printf("published %" PRIu64 ", %" PRIu64 " subscribers cut off\n", count, p.cuts);
        return 0;
    }
    struct ivshm_pubsub_sub s;
    rc = ivshm_pubsub_subscribe(&s, &r, &info, (uint32_t)getpid(), ivshm_pubsub_ns_key(), 2000, &why);
    if (rc == 0)
        rc = ivshm_chan_init(&ch, IVSHM_KIND_PUBSUB, &s, -1, 0, -1, -1, NULL, NULL, 0, SECOND / 20);
    if (rc) {
        fprintf(stderr, "subscribe: %s (%s)\n", strerror(-rc), why ? why : "");
        return 1;
    }
    printf("ready %" PRIu64 "\n", s.joined_at);
    fflush(stdout);
    uint64_t expect = s.joined_at, got = 0;
    while (expect < count) {
        uint64_t v = 0;
        int64_t n = ivshm_chan_recv(&ch, &v, sizeof(v), NULL, 60 * SECOND);
        if (n == -ECONNRESET) {
            struct ivshm_pubsub_status stt;
            ivshm_pubsub_sub_status(&s, &stt);
            fprintf(stderr, "cut off by the publisher (reason %u), %" PRIu64 " messages behind\n",
                    stt.reason, stt.cut_head - stt.cut_cursor);
            return 1;
        }
        if (n != (int64_t)sizeof(v) || v != expect) {
            fprintf(stderr, "at %" PRIu64 ": got %" PRId64 " bytes, value %" PRIu64 " (%s)\n", expect,
                    n, v, n < 0 ? strerror((int)-n) : "");
            return 1;
        }
        expect++;
        got++;
    }
    ivshm_pubsub_unsubscribe(&s);
    printf("received %" PRIu64 " in order\n", got);
    return 0;
}
