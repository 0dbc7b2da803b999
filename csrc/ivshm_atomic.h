/* ivshm_atomic.h - C11 atomic access to fields of the shared-memory layout.
 *
 * The layout structs (ivshm_layout.h) declare plain fixed-width integers so that their size and
 * offsets are an ABI; these macros view one field as _Atomic for one access.  Every use names,
 * in a comment at the call site, the access it pairs with.  Single reads of untrusted fields go
 * through IVSHM_READ_ONCE so the compiler cannot re-read a value after it was validated.
 */
#ifndef IVSHM_ATOMIC_H
#define IVSHM_ATOMIC_H

#include <stdatomic.h>

#define IVSHM_ATOMIC(p) ((_Atomic __typeof__(*(p)) *)(p))
#define IVSHM_LOAD_ACQUIRE(p) atomic_load_explicit(IVSHM_ATOMIC(p), memory_order_acquire)
#define IVSHM_LOAD_RELAXED(p) atomic_load_explicit(IVSHM_ATOMIC(p), memory_order_relaxed)
#define IVSHM_STORE_RELEASE(p, v) atomic_store_explicit(IVSHM_ATOMIC(p), (v), memory_order_release)
#define IVSHM_STORE_RELAXED(p, v) atomic_store_explicit(IVSHM_ATOMIC(p), (v), memory_order_relaxed)
#define IVSHM_LOAD_SEQCST(p) atomic_load_explicit(IVSHM_ATOMIC(p), memory_order_seq_cst)
#define IVSHM_STORE_SEQCST(p, v) atomic_store_explicit(IVSHM_ATOMIC(p), (v), memory_order_seq_cst)
#define IVSHM_CAS(p, expected_ptr, desired)                                                    \
    atomic_compare_exchange_strong_explicit(IVSHM_ATOMIC(p), (expected_ptr), (desired),         \
                                            memory_order_acq_rel, memory_order_acquire)
#define IVSHM_FENCE() atomic_thread_fence(memory_order_seq_cst)
#define IVSHM_READ_ONCE(p) IVSHM_LOAD_RELAXED(p)

#if defined(__x86_64__) || defined(__i386__)
#define IVSHM_CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define IVSHM_CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define IVSHM_CPU_RELAX() ((void)0)
#endif

#define IVSHM_LIKELY(x) __builtin_expect(!!(x), 1)
#define IVSHM_UNLIKELY(x) __builtin_expect(!!(x), 0)

#endif /* IVSHM_ATOMIC_H */
