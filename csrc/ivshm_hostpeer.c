/* ivshm_hostpeer.c - a host peer of an ivshmem server (see ivshm_hostpeer.h).
 *
 * Messages are received with ivshm_proto_recv() (transport rules, fds close-on-exec) and then
 * given their meaning here, in the order QEMU's ivshmem-server sends them:
 *   version 0 (no fd), my id (no fd), -1 with the memory fd,
 *   then per peer and vector: (id, eventfd), my own vectors last;
 *   later: (id, eventfd) for each vector of a peer that joins, (id, no fd) when it leaves.
 */
#define _GNU_SOURCE
#include "ivshm_hostpeer.h"
#include "ivshm_chan.h"
#include "ivshm_doorbell.h"
#include "ivshm_time.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static void hp_zero(struct ivshm_hostpeer *hp)
{
    memset(hp, 0, sizeof *hp);
    hp->sock = -1;
    hp->id = -1;
    hp->shm_fd = -1;
    ivshm_proto_msg_init(&hp->msg);
}

static struct ivshm_hostpeer_remote *find(const struct ivshm_hostpeer *hp, int id)
{
    for (int i = 0; i < hp->npeers; i++)
        if (hp->peers[i].id == id)
            return &hp->peers[i];
    return NULL;
}

const struct ivshm_hostpeer_remote *ivshm_hostpeer_find(const struct ivshm_hostpeer *hp, int id)
{
    return find(hp, id);
}

static void close_remote(struct ivshm_hostpeer_remote *r)
{
    for (int v = 0; v < r->nvec; v++)
        close(r->fds[v]);
    r->nvec = 0;
}

/* Give one complete message its meaning (after the set-up's first three).  Takes msg->fd. */
static int handle(struct ivshm_hostpeer *hp, struct ivshm_hostpeer_event *ev, const char **why)
{
    int64_t value = hp->msg.value;
    int fd = hp->msg.fd;
    hp->msg.fd = -1;
    ivshm_proto_msg_init(&hp->msg);
    if (ivshm_proto_check_value(value, 0) != 0) {
        if (fd >= 0)
            close(fd);
        *why = "a value that is not a peer id (0..65535)";
        return -EPROTO;
    }
    int id = (int)value;
    ev->peer = id;
    ev->vector = -1;
    if (fd < 0) {                       /* a leave */
        if (id == hp->id) {
            *why = "my own id without an fd (a leave of myself)";
            return -EPROTO;
        }
        struct ivshm_hostpeer_remote *r = find(hp, id);
        if (r == NULL) {
            *why = "a leave of a peer that never joined";
            return -EPROTO;
        }
        close_remote(r);
        *r = hp->peers[--hp->npeers];
        ev->kind = IVSHM_HP_LEFT;
        return 1;
    }
    if (ivshm_fd_check_eventfd(fd) != 0) {
        close(fd);
        *why = "a doorbell fd that is not an eventfd";
        return -EPROTO;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    if (id == hp->id) {
        if (hp->nvec >= IVSHM_PROTO_MAX_VECTORS) {
            close(fd);
            *why = "more than 64 vectors of mine";
            return -EPROTO;
        }
        ev->vector = hp->nvec;
        hp->own[hp->nvec++] = fd;
        ev->kind = IVSHM_HP_VECTOR;
        return 1;
    }
    struct ivshm_hostpeer_remote *r = find(hp, id);
    if (r == NULL) {
        if (hp->npeers == hp->cap) {
            int cap = hp->cap ? hp->cap * 2 : 8;
            void *p = realloc(hp->peers, (size_t)cap * sizeof *hp->peers);
            if (p == NULL) {
                close(fd);
                *why = "out of memory";
                return -ENOMEM;
            }
            hp->peers = p;
            hp->cap = cap;
        }
        r = &hp->peers[hp->npeers++];
        r->id = id;
        r->nvec = 0;
        ev->kind = IVSHM_HP_JOINED;
    } else {
        ev->kind = IVSHM_HP_VECTOR;
    }
    if (r->nvec >= IVSHM_PROTO_MAX_VECTORS) {
        close(fd);
        *why = "more than 64 vectors for one peer";
        return -EPROTO;
    }
    ev->vector = r->nvec;
    r->fds[r->nvec++] = fd;
    return 1;
}

static int next(struct ivshm_hostpeer *hp, int timeout_ms, struct ivshm_hostpeer_event *ev,
                const char **why)
{
    memset(ev, 0, sizeof *ev);
    if (hp->disconnected || hp->sock < 0)
        return 0;
    int rc = ivshm_proto_recv(hp->sock, &hp->msg, timeout_ms, IVSHM_WAIT_RESTART, NULL);
    if (rc == -ETIMEDOUT)
        return 0;
    if (rc == -ECONNRESET) {
        hp->disconnected = 1;
        ivshm_proto_msg_reset(&hp->msg);
        ev->kind = IVSHM_HP_DISCONNECTED;
        ev->peer = -1;
        return 1;
    }
    if (rc == -EBADMSG) {
        ivshm_proto_msg_reset(&hp->msg);
        *why = "a message with several fds or truncated control data";
        return -EPROTO;
    }
    if (rc < 0) {
        *why = "receiving from the server socket failed";
        return rc;
    }
    return handle(hp, ev, why);
}

int ivshm_hostpeer_next(struct ivshm_hostpeer *hp, int timeout_ms, struct ivshm_hostpeer_event *ev)
{
    const char *why = NULL;
    return next(hp, timeout_ms, ev, &why);
}

int ivshm_hostpeer_drain(struct ivshm_hostpeer *hp)
{
    struct ivshm_hostpeer_event ev;
    int n = 0;
    for (;;) {
        int rc = ivshm_hostpeer_next(hp, 0, &ev);
        if (rc < 0)
            return rc;
        if (rc == 0)
            return n;
        n++;
    }
}

/* One set-up message that must carry no meaning beyond its value (version, id, memory). */
static int setup_recv(struct ivshm_hostpeer *hp, int64_t deadline, const char **why, const char *what)
{
    int left = ivshm_ms_left(deadline);
    int rc = ivshm_proto_recv(hp->sock, &hp->msg, left, IVSHM_WAIT_RESTART, NULL);
    if (rc == 0)
        return 0;
    ivshm_proto_msg_reset(&hp->msg);
    *why = what;
    if (rc == -EBADMSG)
        return -EPROTO;
    return rc;
}

int ivshm_hostpeer_connect(struct ivshm_hostpeer *hp, const char *path, int vectors,
                           int timeout_ms, const char **why)
{
    const char *dummy;
    if (why == NULL)
        why = &dummy;
    *why = NULL;
    hp_zero(hp);
    if (path == NULL || vectors < -1 || vectors > IVSHM_PROTO_MAX_VECTORS) {
        *why = "bad arguments (vectors must be -1..64)";
        return -EINVAL;
    }
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) {
        *why = "socket path too long";
        return -ENAMETOOLONG;
    }
    strcpy(sa.sun_path, path);
    int64_t deadline = ivshm_deadline_ms(timeout_ms);
    int rc;
    hp->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (hp->sock < 0) {
        *why = "cannot create a socket";
        return -errno;
    }
    if (connect(hp->sock, (struct sockaddr *)&sa, sizeof sa) < 0) {
        rc = -errno;
        *why = "cannot connect to the server socket (is a server running there?)";
        goto fail;
    }
    fcntl(hp->sock, F_SETFL, fcntl(hp->sock, F_GETFL) | O_NONBLOCK);

    rc = setup_recv(hp, deadline, why, "waiting for the protocol version");
    if (rc < 0)
        goto fail;
    if (hp->msg.value != IVSHM_PROTO_VERSION || hp->msg.fd >= 0) {
        *why = "the first message is not protocol version 0 without an fd";
        rc = -EPROTO;
        goto fail;
    }
    ivshm_proto_msg_init(&hp->msg);
    rc = setup_recv(hp, deadline, why, "waiting for my peer id");
    if (rc < 0)
        goto fail;
    if (hp->msg.fd >= 0 || ivshm_proto_check_value(hp->msg.value, 0) != 0) {
        *why = "the second message is not a peer id (0..65535) without an fd";
        rc = -EPROTO;
        goto fail;
    }
    hp->id = (int)hp->msg.value;
    ivshm_proto_msg_init(&hp->msg);
    rc = setup_recv(hp, deadline, why, "waiting for the shared memory");
    if (rc < 0)
        goto fail;
    if (hp->msg.value != -1 || hp->msg.fd < 0) {
        *why = "the third message is not the shared memory (-1 with an fd)";
        rc = -EPROTO;
        goto fail;
    }
    hp->shm_fd = hp->msg.fd;
    hp->msg.fd = -1;
    ivshm_proto_msg_init(&hp->msg);
    if (ivshm_fd_check_shm(hp->shm_fd, &hp->shm_size) != 0) {
        *why = "the shared memory is not a regular file of power-of-two size";
        rc = -EPROTO;
        goto fail;
    }

    /* The existing peers' vectors, then mine. */
    int want = vectors < 0 ? 1 : vectors;
    struct ivshm_hostpeer_event ev;
    while (hp->nvec < want) {
        rc = next(hp, ivshm_ms_left(deadline), &ev, why);
        if (rc < 0)
            goto fail;
        if (rc == 0) {
            *why = "timed out waiting for my vectors";
            rc = -ETIMEDOUT;
            goto fail;
        }
        if (ev.kind == IVSHM_HP_DISCONNECTED) {
            *why = "the server closed the connection during set-up";
            rc = -ECONNRESET;
            goto fail;
        }
    }
    if (vectors < 0) {
        /* Every peer of a server has the same number of vectors, sent back to back. */
        for (;;) {
            int others = hp->npeers ? hp->peers[0].nvec : 0;
            if (others && hp->nvec >= others)
                break;
            int left = ivshm_ms_left(deadline);
            int wait = others ? left : (left < 0 || left > 100 ? 100 : left);
            rc = next(hp, wait, &ev, why);
            if (rc < 0)
                goto fail;
            if (rc == 0) {
                if (others) {
                    *why = "timed out waiting for as many vectors as the other peers have";
                    rc = -ETIMEDOUT;
                    goto fail;
                }
                break;      /* alone and the server is quiet: that was all */
            }
            if (ev.kind == IVSHM_HP_DISCONNECTED) {
                *why = "the server closed the connection during set-up";
                rc = -ECONNRESET;
                goto fail;
            }
        }
    }
    return 0;
fail:
    ivshm_hostpeer_close(hp);
    return rc;
}

int ivshm_hostpeer_notify(const struct ivshm_hostpeer *hp, int peer, int vector)
{
    const struct ivshm_hostpeer_remote *r = find(hp, peer);
    if (peer == hp->id && peer >= 0) {
        if (vector < 0 || vector >= hp->nvec)
            return -ENOENT;
        return ivshm_eventfd_ring(hp->own[vector]);
    }
    if (r == NULL || vector < 0 || vector >= r->nvec)
        return -ENOENT;
    return ivshm_eventfd_ring(r->fds[vector]);
}

int ivshm_hostpeer_vector_fd(const struct ivshm_hostpeer *hp, int vector)
{
    return vector >= 0 && vector < hp->nvec ? hp->own[vector] : -1;
}

int ivshm_hostpeer_fileno(const struct ivshm_hostpeer *hp)
{
    return hp->sock;
}

int ivshm_hostpeer_resolve(void *ctx, uint32_t peer, uint32_t vector, struct ivshm_bell *out)
{
    const struct ivshm_hostpeer *hp = ctx;
    if (peer > IVSHM_PROTO_MAX_ID || vector >= IVSHM_PROTO_MAX_VECTORS)
        return -ENOENT;
    int fd = -1;
    if ((int)peer == hp->id) {
        if ((int)vector < hp->nvec)
            fd = hp->own[vector];
    } else {
        const struct ivshm_hostpeer_remote *r = find(hp, (int)peer);
        if (r && (int)vector < r->nvec)
            fd = r->fds[vector];
    }
    if (fd < 0)
        return -ENOENT;
    out->kind = IVSHM_BELL_EVENTFD;
    out->fd = fd;
    out->reg = NULL;
    out->value = 0;
    return 0;
}

void ivshm_hostpeer_close(struct ivshm_hostpeer *hp)
{
    for (int i = 0; i < hp->npeers; i++)
        close_remote(&hp->peers[i]);
    free(hp->peers);
    for (int v = 0; v < hp->nvec; v++)
        close(hp->own[v]);
    if (hp->shm_fd >= 0)
        close(hp->shm_fd);
    if (hp->sock >= 0)
        close(hp->sock);
    ivshm_proto_msg_reset(&hp->msg);
    hp_zero(hp);
}
