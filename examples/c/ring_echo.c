/* ring_echo.c - a C program speaking the region ABI with no Python involved.
 *
 * Opens a region file, creates (or finds) two SPSC rings, and answers every message received on
 * ring IN with the same bytes reversed on ring OUT, until it receives the message "quit".  It
 * blocks in ivshm_chan_recv / ivshm_chan_send, the same wake-up protocol the Python Channel uses.
 *
 *   make -C csrc && cc -O2 -Icsrc examples/c/ring_echo.c csrc/libivshm.a -o ring_echo
 *   ./ring_echo /dev/shm/demo in out                 (no doorbells: the channel polls)
 *   ./ring_echo /dev/shm/demo in out MY_ID MY_FD PEER_ID PEER_FD
 *
 * With the last four arguments it sleeps on eventfd MY_FD (its vector 0, as peer MY_ID) and rings
 * eventfd PEER_FD to wake peer PEER_ID: fds inherited from the parent, which plays the peer (a host
 * peer of an ivshmem server gets such fds from the server).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ivshm.h"

/* The doorbell table of this example: one peer besides us. */
struct bells {
    int peer_id, peer_fd;
};

static int resolve(void *ctx, uint32_t peer, uint32_t vector, struct ivshm_bell *out)
{
    const struct bells *b = ctx;
    if ((int)peer != b->peer_id || vector != 0 || b->peer_fd < 0)
        return -ENOENT;
    out->kind = IVSHM_BELL_EVENTFD;
    out->fd = b->peer_fd;
    return 0;
}

static int open_ring(struct ivshm_region *r, const char *name, struct ivshm_spsc *q)
{
    struct ivshm_ring_info info;
    const char *why = NULL;
    int rc = ivshm_region_create_ring(r, name, IVSHM_KIND_SPSC, 256, 64, (uint64_t)getpid(), 2000,
                                      &info, &why);
    if (rc < 0) {
        fprintf(stderr, "ring %s: %s (%s)\n", name, strerror(-rc), why ? why : "");
        return rc;
    }
    rc = ivshm_spsc_attach(q, r, &info, &why);
    if (rc)
        fprintf(stderr, "attach %s: %s (%s)\n", name, strerror(-rc), why ? why : "");
    return rc;
}

int main(int argc, char **argv)
{
    if (argc != 4 && argc != 8) {
        fprintf(stderr, "usage: %s REGION_FILE IN_RING OUT_RING [MY_ID MY_FD PEER_ID PEER_FD]\n", argv[0]);
        return 2;
    }
    int my_id = -1, my_fd = -1;
    struct bells bells = {.peer_id = -1, .peer_fd = -1};
    if (argc == 8) {
        my_id = atoi(argv[4]);
        my_fd = atoi(argv[5]);
        bells.peer_id = atoi(argv[6]);
        bells.peer_fd = atoi(argv[7]);
        fcntl(my_fd, F_SETFL, fcntl(my_fd, F_GETFL) | O_NONBLOCK);
    }
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
    struct ivshm_region region;
    int rc = ivshm_region_attach(&region, base, (uint64_t)st.st_size, 0, 0, 1000);
    if (rc) {
        fprintf(stderr, "attach region: %s\n", strerror(-rc));
        return 1;
    }
    struct ivshm_spsc in, out;
    if (open_ring(&region, argv[2], &in) || open_ring(&region, argv[3], &out))
        return 1;
    /* re-check every second: a safety net only, every wake-up comes by doorbell */
    struct ivshm_chan rx, tx;
    if (ivshm_chan_init(&rx, IVSHM_KIND_SPSC, &in, my_id, 0, my_fd, -1, resolve, &bells, 50000,
                        1000000000) ||
        ivshm_chan_init(&tx, IVSHM_KIND_SPSC, &out, my_id, 0, my_fd, -1, resolve, &bells, 50000,
                        1000000000)) {
        fprintf(stderr, "bad channel arguments\n");
        return 2;
    }
    printf("ready\n");
    fflush(stdout);
    static uint8_t buf[256 * 64], rev[256 * 64];
    uint64_t answered = 0;
    for (;;) {
        int64_t n = ivshm_chan_recv(&rx, buf, sizeof(buf), NULL, -1);
        if (n < 0) {
            fprintf(stderr, "recv: %s (%s)\n", strerror((int)-n), in.why ? in.why : "");
            return 1;
        }
        if (n == 4 && memcmp(buf, "quit", 4) == 0)
            break;
        for (int64_t i = 0; i < n; i++)
            rev[i] = buf[n - 1 - i];
        rc = ivshm_chan_send(&tx, rev, (uint64_t)n, -1);
        if (rc) {
            fprintf(stderr, "send: %s (%s)\n", strerror(-rc), out.why ? out.why : "");
            return 1;
        }
        answered++;
    }
    printf("answered %llu\n", (unsigned long long)answered);
    struct ivshm_chan_stats cs;
    ivshm_chan_get_stats(&rx, &cs);
    printf("sleeps %llu wakeups %llu\n", (unsigned long long)cs.sleeps, (unsigned long long)cs.wakeups);
    munmap(base, (size_t)st.st_size);
    close(fd);
    return 0;
}
