/* ivshm_guard.h - survive a peer that shrinks the shared memory under our mappings.
 *
 * A mapping of a file (a /dev/shm file, a hugetlbfs file, a memfd without F_SEAL_SHRINK) faults
 * with SIGBUS on every page past the file's end once another process truncates the file.  Any
 * process that shares the memory can do that, so a guarded mapping does what compositors do with
 * clients' shared pools: a SIGBUS handler that finds the faulting address in a guarded mapping
 * maps private anonymous zero pages over the whole mapping (MAP_FIXED), sets that mapping's
 * `lost` flag, writes 1 to its `wake_fd` (an eventfd that sleepers watch) and returns; the
 * faulting instruction is then retried on the zero pages.  Callers check the flag after each
 * operation on the mapping and turn a set flag into an error, so nothing read from the zero pages
 * is ever handed out.
 *
 * A SIGBUS at any other address goes to the handler that was installed before the guard's
 * (SA_SIGINFO or plain); where that was the default action (or ignore), the default is restored
 * and the signal raised again, so the process dies of SIGBUS as it would have without the guard.
 *
 * Limits: the registry holds IVSHM_GUARD_MAX mappings.  The handler is process-wide: a SIGBUS
 * handler installed later by the application takes the guard's place; ivshm_guard_install()
 * (called by every ivshm_guard_add) puts the guard back on top and chains to that handler.  A
 * later handler that itself re-raises into the guard (as Python's faulthandler does when enabled
 * after the guard) is detected after a few self-raised rounds and the default action is taken.
 * The handler runs in the faulting thread; the `lost` flag and the wake_fd tell the others.
 */
#ifndef IVSHM_GUARD_H
#define IVSHM_GUARD_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define IVSHM_GUARD_MAX 256

/* Guard `len` bytes mapped at `base` (page-aligned).  On a lost mapping, the handler stores 1 to
 * *lost (if not NULL) and writes an 8-byte 1 to wake_fd (if >= 0; an eventfd).  Installs the
 * handler if it is not the current one.  Returns a slot id >= 0, -EINVAL (bad range), -ENOSPC
 * (registry full), or -errno of sigaction.  *lost and wake_fd must stay valid until
 * ivshm_guard_remove(id). */
int ivshm_guard_add(void *base, size_t len, volatile int *lost, int wake_fd);

/* Stop guarding slot `id` (before the memory is unmapped).  No fault in that mapping may be in
 * progress (callers remove only once nobody uses the memory). */
void ivshm_guard_remove(int id);

/* Install the handler if SIGBUS does not lead to it now (saving the current disposition to chain
 * to).  0 or -errno. */
int ivshm_guard_install(void);

/* 1 if the SIGBUS disposition is the guard's handler now, else 0. */
int ivshm_guard_installed(void);

/* How many times the guard replaced a lost mapping since the process started. */
unsigned long ivshm_guard_hits(void);

#ifdef __cplusplus
}
#endif
#endif /* IVSHM_GUARD_H */
