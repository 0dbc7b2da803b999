/* ivshm_time.h - the monotonic clock helpers the C files share (header-only). */
#ifndef IVSHM_TIME_H
#define IVSHM_TIME_H

#include <limits.h>
#include <stdint.h>
#include <time.h>

/* CLOCK_MONOTONIC in nanoseconds. */
static inline int64_t ivshm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* An absolute deadline (ivshm_now_ns() units) timeout_ms from now; -1 (none) when timeout_ms < 0. */
static inline int64_t ivshm_deadline_ms(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : ivshm_now_ns() + (int64_t)timeout_ms * 1000000;
}

/* Milliseconds left until `deadline` (rounded up, capped at INT_MAX); -1 when deadline < 0
 * (no limit), 0 once it passed. */
static inline int ivshm_ms_left(int64_t deadline)
{
    if (deadline < 0)
        return -1;
    int64_t left = deadline - ivshm_now_ns();
    if (left <= 0)
        return 0;
    int64_t ms = (left + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

#endif /* IVSHM_TIME_H */
