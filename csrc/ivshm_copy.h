/* ivshm_copy.h - copies of message payloads into and out of slots.
 *
 * Most ring traffic is small messages of a size known only at run time (a parameter, a slot
 * length).  A call to memcpy for 8 bytes costs more than the ring operation around it, so sizes
 * up to 16 bytes are copied inline with at most two overlapping loads and stores; larger ones go
 * to memcpy.  Never reads or writes outside [src, src+n) and [dst, dst+n).
 */
#ifndef IVSHM_COPY_H
#define IVSHM_COPY_H

#include <stdint.h>
#include <string.h>

static inline void ivshm_copy(void *dst, const void *src, uint64_t n)
{
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    if (n > 16) {
        memcpy(d, s, n);
    } else if (n >= 8) {
        uint64_t a, b;
        memcpy(&a, s, 8);
        memcpy(&b, s + n - 8, 8);
        memcpy(d, &a, 8);
        memcpy(d + n - 8, &b, 8);
    } else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        memcpy(d, &a, 4);
        memcpy(d + n - 4, &b, 4);
    } else {
        for (uint64_t k = 0; k < n; k++)
            d[k] = s[k];
    }
}

#endif /* IVSHM_COPY_H */
