/* ivshm_server.c - sending ivshmem protocol messages and creating doorbell eventfds.
 *
 * The server never blocks on a client: sockets are non-blocking and a message that does not fit
 * stays queued by the caller, who resumes it with the byte count this code reports. The file
 * descriptor of a message is attached to its first byte only, so a message split by the kernel
 * (possible in principle on a stream socket) is completed without sending the fd twice.
 */
#include "ivshm_server.h"

#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>

int ivshm_server_send_msg(int sock, int64_t value, int fd, unsigned *done)
{
    unsigned char buf[IVSHM_SERVER_MSG_SIZE];
    uint64_t v = (uint64_t)value;
    unsigned off;

    if (done == NULL || *done >= IVSHM_SERVER_MSG_SIZE || sock < 0)
        return -EINVAL;
    for (int i = 0; i < IVSHM_SERVER_MSG_SIZE; i++)
        buf[i] = (unsigned char)(v >> (8 * i));   /* little-endian whatever the host */

    off = *done;
    while (off < IVSHM_SERVER_MSG_SIZE) {
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(sizeof(int))];
        } control;
        struct iovec iov = { .iov_base = buf + off, .iov_len = IVSHM_SERVER_MSG_SIZE - off };
        struct msghdr msg;
        ssize_t n;

        memset(&msg, 0, sizeof(msg));
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        if (off == 0 && fd >= 0) {
            struct cmsghdr *cmsg;

            memset(&control, 0, sizeof(control));
            msg.msg_control = control.buf;
            msg.msg_controllen = sizeof(control.buf);
            cmsg = CMSG_FIRSTHDR(&msg);
            cmsg->cmsg_level = SOL_SOCKET;
            cmsg->cmsg_type = SCM_RIGHTS;
            cmsg->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
        }
        n = sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *done = off;
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        }
        if (n == 0) {           /* cannot happen for a non-empty stream send; do not spin */
            *done = off;
            return -EAGAIN;
        }
        off += (unsigned)n;
    }
    *done = off;
    return 0;
}

int ivshm_server_eventfd(int *fd_out)
{
    int fd;

    if (fd_out == NULL)
        return -EINVAL;
    fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    *fd_out = fd;
    return 0;
}
