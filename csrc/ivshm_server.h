/* ivshm_server.h - the sending side of the ivshmem server protocol.
 *
 * Every server -> client message is one little-endian int64 carrying at most one file
 * descriptor (SCM_RIGHTS). These helpers send such a message on a non-blocking stream socket,
 * resuming a partially sent message, and create the per-vector eventfds the server hands out.
 * No global state; every function returns 0 or a negative errno.
 */
#ifndef IVSHM_SERVER_H
#define IVSHM_SERVER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Size in bytes of one protocol message. */
#define IVSHM_SERVER_MSG_SIZE 8

/* Send what is left of one message on `sock` without blocking.
 *
 * `*done` is the number of bytes of this message already sent (0 for a fresh message, must be
 * < 8). `fd` (or -1 for none) travels with the first byte, so it is only passed when *done == 0.
 * Returns 0 when the whole message has been sent (*done == 8), -EAGAIN when the socket buffer is
 * full (*done updated with the progress made: call again when the socket is writable), or another
 * negative errno (-EPIPE, -ECONNRESET, -EBADF, -ETOOMANYREFS, ...) on failure. EINTR is retried.
 * Never raises SIGPIPE. */
int ivshm_server_send_msg(int sock, int64_t value, int fd, unsigned *done);

/* Create a non-blocking, close-on-exec eventfd with a zero count, stored in *fd_out. */
int ivshm_server_eventfd(int *fd_out);

#ifdef __cplusplus
}
#endif

#endif /* IVSHM_SERVER_H */
