/* fuzz_common.h - helpers shared by the fuzz harnesses (fuzz_region.c, fuzz_rings.c).
 *
 * The harnesses build with libFuzzer (clang -fsanitize=fuzzer,address,undefined: `make fuzz`) or
 * with replay_main.c and any compiler (`make test|asan|tsan|msan` replay the saved corpus).
 * Under AddressSanitizer, the parts of the region that an operation has no business touching are
 * poisoned around it, so reading or writing another ring's bytes, or the header, is reported like
 * any out-of-bounds access.  FUZZ_ASSERT turns a broken invariant into a crash with a message.
 */
#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ivshm.h"

#if defined(__SANITIZE_ADDRESS__)
#define FZ_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FZ_ASAN 1
#endif
#endif

#ifdef FZ_ASAN
#include <sanitizer/asan_interface.h>
#define FZ_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define FZ_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define FZ_POISON(p, n) ((void)(p), (void)(n))
#define FZ_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define FUZZ_ASSERT(cond, ...)                                                                     \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant broken: %s: ", __FILE__, __LINE__, #cond);          \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Allow only [lo, lo+n) of the region to be touched (ASan builds); fz_open_all() undoes it. */
static inline void fz_only(uint8_t *mem, uint64_t size, uint64_t lo, uint64_t n)
{
    FZ_POISON(mem, size);
    if (lo < size) {
        if (n > size - lo)
            n = size - lo;
        FZ_UNPOISON(mem + lo, n);
    }
}

static inline void fz_open_all(uint8_t *mem, uint64_t size) { FZ_UNPOISON(mem, size); }

/* A small cursor over the fuzzer's bytes; reads past the end return zeros. */
struct fz_in {
    const uint8_t *p;
    size_t n, i;
};

static inline int fz_more(const struct fz_in *in) { return in->i < in->n; }

static inline uint8_t fz_u8(struct fz_in *in) { return in->i < in->n ? in->p[in->i++] : 0; }

static inline uint16_t fz_u16(struct fz_in *in)
{
    uint16_t v = fz_u8(in);
    return (uint16_t)(v | (uint16_t)fz_u8(in) << 8);
}

static inline uint32_t fz_u32(struct fz_in *in)
{
    uint32_t v = fz_u16(in);
    return v | (uint32_t)fz_u16(in) << 16;
}

static inline uint64_t fz_u64(struct fz_in *in)
{
    uint64_t v = fz_u32(in);
    return v | (uint64_t)fz_u32(in) << 32;
}

static inline uint8_t fz_byte(uint64_t seq, uint64_t j) { return (uint8_t)(seq * 131u + j * 7u + (seq >> 8)); }

#endif /* FUZZ_COMMON_H */
