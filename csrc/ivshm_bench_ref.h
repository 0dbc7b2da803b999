/* ivshm_bench_ref.h - the floor that doorbell figures are compared with: a bare eventfd
 * ping-pong between two processes, in C, with nothing else around it (no ring, no fences, no
 * language runtime).  `pyivshmem bench` runs it in the same run as the Channel figures, so a
 * reader sees how much of a wake-up is the kernel's and how much is pyivshmem's.
 *
 * Two blocking eventfds: `tx` is rung by this side, `rx` is read by it (read() blocks until the
 * other side rings).  Each function returns 0 or -errno; EINTR is retried.
 */
#ifndef IVSHM_BENCH_REF_H
#define IVSHM_BENCH_REF_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Round trips: the leader rings tx and blocks in read(rx) until the echo; lat_ns[i] is the time
 * of round trip i (CLOCK_MONOTONIC).  The echo side (lead == 0) blocks in read(rx) and rings tx,
 * `count` times; it leaves lat_ns alone (may be NULL). */
int ivshm_ref_eventfd_rtt(int rx, int tx, int lead, uint64_t count, int64_t *lat_ns);

/* Wake-ups of a sleeping reader: the sender (lead != 0) sleeps gap_ns, then writes its
 * CLOCK_MONOTONIC time as the eventfd value and waits for an acknowledgement on rx, `count`
 * times.  The reader (lead == 0), asleep in read(rx), records its own clock minus that value in
 * lat_ns[i] (one way), then acknowledges on tx. */
int ivshm_ref_eventfd_wake(int rx, int tx, int lead, uint64_t count, uint64_t gap_ns,
                           int64_t *lat_ns);

#ifdef __cplusplus
}
#endif

#endif /* IVSHM_BENCH_REF_H */
