/* ring_echo.c - a C program speaking the region ABI with no Python involved.
 *
 * Opens a region file, creates (or finds) two SPSC rings, and answers every message received on
 * ring IN with the same bytes reversed on ring OUT, until it receives the message "quit".
 *
 *   make -C csrc && cc -O2 -Icsrc examples/c/ring_echo.c csrc/libivshm.a -o ring_echo
 *   ./ring_echo /dev/shm/demo in out
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
    if (argc != 4) {
        fprintf(stderr, "usage: %s REGION_FILE IN_RING OUT_RING\n", argv[0]);
        return 2;
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
    printf("ready\n");
    fflush(stdout);
    static uint8_t buf[256 * 64], rev[256 * 64];
    uint64_t answered = 0;
    for (;;) {
        int64_t n = ivshm_spsc_try_recv(&in, buf, sizeof(buf), NULL);
        if (n == -EAGAIN) {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (n < 0) {
            fprintf(stderr, "recv: %s (%s)\n", strerror((int)-n), in.why ? in.why : "");
            return 1;
        }
        if (n == 4 && memcmp(buf, "quit", 4) == 0)
            break;
        for (int64_t i = 0; i < n; i++)
            rev[i] = buf[n - 1 - i];
        while ((rc = ivshm_spsc_try_send(&out, rev, (uint64_t)n)) == -EAGAIN) {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
        if (rc) {
            fprintf(stderr, "send: %s\n", strerror(-rc));
            return 1;
        }
        answered++;
    }
    printf("answered %llu\n", (unsigned long long)answered);
    munmap(base, (size_t)st.st_size);
    close(fd);
    return 0;
}
