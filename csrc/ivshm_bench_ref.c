/* ivshm_bench_ref.c - the bare eventfd ping-pong of ivshm_bench_ref.h. */
#define _GNU_SOURCE
#include "ivshm_bench_ref.h"
#include "ivshm_time.h"

#include <errno.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static int put(int fd, uint64_t v)
{
    for (;;) {
        ssize_t n = write(fd, &v, sizeof v);
        if (n == (ssize_t)sizeof v)
            return 0;
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 ? -errno : -EIO;
    }
}

static int get(int fd, uint64_t *v)
{
    for (;;) {
        ssize_t n = read(fd, v, sizeof *v);
        if (n == (ssize_t)sizeof *v)
            return 0;
        if (n < 0 && errno == EINTR)
            continue;
        return n < 0 ? -errno : -EIO;
    }
}

int ivshm_ref_eventfd_rtt(int rx, int tx, int lead, uint64_t count, int64_t *lat_ns)
{
    uint64_t v;
    int rc;
    for (uint64_t i = 0; i < count; i++) {
        if (lead) {
            int64_t t0 = ivshm_now_ns();
            if ((rc = put(tx, 1)) || (rc = get(rx, &v)))
                return rc;
            lat_ns[i] = ivshm_now_ns() - t0;
        } else if ((rc = get(rx, &v)) || (rc = put(tx, 1))) {
            return rc;
        }
    }
    return 0;
}

int ivshm_ref_eventfd_wake(int rx, int tx, int lead, uint64_t count, uint64_t gap_ns,
                           int64_t *lat_ns)
{
    uint64_t v;
    int rc;
    for (uint64_t i = 0; i < count; i++) {
        if (lead) {
            struct timespec gap = {(time_t)(gap_ns / 1000000000u), (long)(gap_ns % 1000000000u)};
            while (nanosleep(&gap, &gap) != 0 && errno == EINTR)
                ;
            if ((rc = put(tx, (uint64_t)ivshm_now_ns())) || (rc = get(rx, &v)))
                return rc;
        } else {
            if ((rc = get(rx, &v)))
                return rc;
            int64_t t = ivshm_now_ns();
            lat_ns[i] = t - (int64_t)v;
            if ((rc = put(tx, 1)))
                return rc;
        }
    }
    return 0;
}
