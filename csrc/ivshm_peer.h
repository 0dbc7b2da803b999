/* ivshm_peer.h - the client side of the ivshmem server protocol: receiving one message.
 *
 * The server speaks first and only: each message is an 8-byte little-endian signed integer
 * carrying zero or one file descriptor (SCM_RIGHTS).  ivshm_proto_recv() receives exactly one
 * such message from a UNIX stream socket, resumably (a message split across several segments
 * is assembled over calls), and enforces the transport rules: at most one fd per message,
 * no fd on the continuation of a message, no truncated control data.  A violation closes
 * every fd that arrived and reports what was seen in the message struct, so the caller can
 * say exactly what was wrong.  The meaning of the values (version, ids, order) is checked by
 * the caller; ivshm_proto_check_value() and the fd helpers below do the per-value checks.
 *
 * Every function returns 0 on success and -errno on failure.
 */
#ifndef IVSHM_PEER_H
#define IVSHM_PEER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define IVSHM_PROTO_VERSION 0
#define IVSHM_PROTO_MAX_ID 65535
#define IVSHM_PROTO_MAX_VECTORS 64

/* One message being received.  Initialise with ivshm_proto_msg_init(); release with
 * ivshm_proto_msg_reset() (closes an fd still held). */
struct ivshm_proto_msg {
    int64_t value;     /* the decoded value, valid when nbytes == 8 */
    int fd;            /* the fd that came with it, or -1; owned by the struct until taken */
    int nbytes;        /* bytes received so far (0..8) */
    int nfds;          /* fds that arrived with this message (all closed when more than 1) */
    int ctrunc;        /* the kernel reported truncated control data (MSG_CTRUNC) */
    int late_fd;       /* an fd arrived on the continuation of a split message */
    uint8_t buf[8];    /* raw little-endian bytes */
};

void ivshm_proto_msg_init(struct ivshm_proto_msg *msg);

/* Close the fd still held (if any) and re-initialise. */
void ivshm_proto_msg_reset(struct ivshm_proto_msg *msg);

/* Receive (the rest of) one message from sock, waiting up to timeout_ms (negative: no limit).
 *   0            complete: msg->value, msg->fd (-1 when none; the caller takes it over and
 *                should set msg->fd = -1)
 *   -ETIMEDOUT   not complete yet; msg keeps what arrived, call again to continue
 *   -ECONNRESET  the server closed the connection (msg->nbytes says whether mid-message)
 *   -EBADMSG     transport violation (msg->nfds > 1, msg->ctrunc or msg->late_fd): every fd
 *                that arrived is closed
 *   -EINTR       a signal arrived (unless IVSHM_WAIT_RESTART in flags); call again to continue
 *   other        -errno from poll/recvmsg
 * remaining_ms (may be NULL) receives the time left, as in ivshm_waitset_wait(). */
int ivshm_proto_recv(int sock, struct ivshm_proto_msg *msg, int timeout_ms, unsigned flags,
                     int *remaining_ms);

/* A value is valid when it is -1 (only as the shared-memory marker) or a peer id 0..65535.
 * Returns 0, or -ERANGE. */
int ivshm_proto_check_value(int64_t value, int allow_minus_one);

/* 0 when fd is an eventfd, -ENOTSUP when it is something else, -errno when it cannot be told. */
int ivshm_fd_check_eventfd(int fd);

/* The shared-memory fd: must be a regular file (memfd, /dev/shm, hugetlbfs) whose size is a
 * non-zero power of two.  *size receives the size whenever fstat worked.
 * Returns 0, -ENOTSUP (not a regular file), -EINVAL (size not a power of two) or -errno. */
int ivshm_fd_check_shm(int fd, uint64_t *size);

/* What an fd is, for error messages: the /proc/self/fd link text ("anon_inode:[eventfd]",
 * "socket:[1234]", "/dev/null", ...), NUL-terminated in buf.  Returns 0 or -errno. */
int ivshm_fd_describe(int fd, char *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* IVSHM_PEER_H */
