/* ivshm_peer.c - receiving ivshmem server messages and checking what they carry
 * (see ivshm_peer.h).
 *
 * Each recvmsg() asks for exactly the bytes still missing from the current 8-byte message,
 * with a control buffer large enough for the most fds the kernel passes at once (253), so
 * that every fd that arrives is seen and can be closed when it is not wanted.  Fds arrive
 * close-on-exec (MSG_CMSG_CLOEXEC), so none can leak into a child process in between.
 * A message that breaks a transport rule is still read to its 8th byte (so its value can
 * be reported) but all its fds are closed at once.
 */
#define _GNU_SOURCE
#include "ivshm_peer.h"
#include "ivshm_doorbell.h"
#include "ivshm_time.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS_PER_MSG 253   /* the kernel's SCM_MAX_FD */

void ivshm_proto_msg_init(struct ivshm_proto_msg *msg)
{
    memset(msg, 0, sizeof *msg);
    msg->fd = -1;
}

void ivshm_proto_msg_reset(struct ivshm_proto_msg *msg)
{
    if (msg->fd >= 0)
        close(msg->fd);
    ivshm_proto_msg_init(msg);
}

static int msg_is_bad(const struct ivshm_proto_msg *msg)
{
    return msg->nfds > 1 || msg->ctrunc || msg->late_fd;
}

/* Take the fds out of one recvmsg()'s control data: keep the first fd of a message, close
 * everything else and record why. */
static void take_fds(struct ivshm_proto_msg *msg, struct msghdr *mh, int first_part)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *data = CMSG_DATA(c);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof(int), sizeof fd);
            if (!first_part)
                msg->late_fd = 1;
            msg->nfds++;
            if (first_part && msg->fd < 0 && msg->nfds == 1)
                msg->fd = fd;
            else
                close(fd);
        }
    }
    if (mh->msg_flags & MSG_CTRUNC)
        msg->ctrunc = 1;
    if (msg_is_bad(msg) && msg->fd >= 0) {
        close(msg->fd);
        msg->fd = -1;
    }
}

int ivshm_proto_recv(int sock, struct ivshm_proto_msg *msg, int timeout_ms, unsigned flags,
                     int *remaining_ms)
{
    int64_t deadline = ivshm_deadline_ms(timeout_ms);
    int rc = 0;
    while (msg->nbytes < 8) {
        union {
            char buf[CMSG_SPACE(sizeof(int) * MAX_FDS_PER_MSG)];
            struct cmsghdr align;
        } ctl;
        struct iovec iov = { msg->buf + msg->nbytes, (size_t)(8 - msg->nbytes) };
        struct msghdr mh = {
            .msg_iov = &iov,
            .msg_iovlen = 1,
            .msg_control = ctl.buf,
            .msg_controllen = sizeof ctl.buf,
        };
        ssize_t n = recvmsg(sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int left = ivshm_ms_left(deadline);
                if (left == 0) {        /* a poll of 0 ms would only say what recvmsg said */
                    rc = -ETIMEDOUT;
                    break;
                }
                int r = ivshm_wait_readable(sock, left, flags, NULL);
                if (r < 0) {
                    rc = r;
                    break;
                }
                if (r == 0) {
                    rc = -ETIMEDOUT;
                    break;
                }
                continue;
            }
            rc = -errno;
            if (rc == -EPIPE)
                rc = -ECONNRESET;
            break;
        }
        take_fds(msg, &mh, msg->nbytes == 0);
        if (n == 0) {
            rc = -ECONNRESET;
            break;
        }
        msg->nbytes += (int)n;
    }
    if (msg->nbytes == 8) {
        uint64_t v = 0;
        for (int i = 7; i >= 0; i--)
            v = (v << 8) | msg->buf[i];
        msg->value = (int64_t)v;
        if (rc == 0 && msg_is_bad(msg))
            rc = -EBADMSG;
    }
    if (remaining_ms)
        *remaining_ms = ivshm_ms_left(deadline);
    return rc;
}

int ivshm_proto_check_value(int64_t value, int allow_minus_one)
{
    if (value >= 0 && value <= IVSHM_PROTO_MAX_ID)
        return 0;
    if (value == -1 && allow_minus_one)
        return 0;
    return -ERANGE;
}

int ivshm_fd_describe(int fd, char *buf, size_t len)
{
    if (len == 0)
        return -EINVAL;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, buf, len - 1);
    if (n < 0) {
        buf[0] = 0;
        return -errno;
    }
    buf[n] = 0;
    return 0;
}

int ivshm_fd_check_eventfd(int fd)
{
    char what[256];
    int r = ivshm_fd_describe(fd, what, sizeof what);
    if (r < 0)
        return r;
    return strcmp(what, "anon_inode:[eventfd]") == 0 ? 0 : -ENOTSUP;
}

int ivshm_fd_check_shm(int fd, uint64_t *size)
{
    struct stat st;
    *size = 0;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISREG(st.st_mode))
        return -ENOTSUP;
    uint64_t s = st.st_size < 0 ? 0 : (uint64_t)st.st_size;
    *size = s;
    if (s == 0 || (s & (s - 1)) != 0)
        return -EINVAL;
    return 0;
}
