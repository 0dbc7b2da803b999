/* ivshm_hostpeer.h - a host peer of an ivshmem server, for C programs.
 *
 * Connects to a server's UNIX socket (pyivshmem-server or QEMU's ivshmem-server), receives
 * the protocol version, its own id, the shared-memory fd and the doorbell eventfds of every
 * peer (its own included), and keeps the table of peers up to date as they join and leave.
 * Everything received is checked (ivshm_peer.h): one fd per message at most, ids in range,
 * eventfds where eventfds belong, a regular file of power-of-two size as the memory.
 *
 * The server speaks first and only; nothing is ever written to its socket.  A program must
 * call ivshm_hostpeer_drain() (or ivshm_hostpeer_next()) from time to time, or whenever
 * ivshm_hostpeer_fileno() is readable, so the server never has to queue messages for it.
 *
 * Not thread-safe: one thread uses one struct ivshm_hostpeer (ringing from several threads
 * is fine while no other thread processes server messages).
 * Every function returns 0 (or a count) on success and -errno on failure.
 */
#ifndef IVSHM_HOSTPEER_H
#define IVSHM_HOSTPEER_H

#include <stddef.h>
#include <stdint.h>

#include "ivshm_peer.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ivshm_bell;

/* One other peer: its id and its doorbells (one eventfd per vector). */
struct ivshm_hostpeer_remote {
    int id;
    int nvec;
    int fds[IVSHM_PROTO_MAX_VECTORS];
};

struct ivshm_hostpeer {
    int sock;            /* the server connection (non-blocking), -1 once closed */
    int id;              /* my peer id */
    int shm_fd;          /* the shared memory (the caller may mmap it; closed by close()) */
    uint64_t shm_size;
    int nvec;            /* my vectors so far */
    int own[IVSHM_PROTO_MAX_VECTORS]; /* my eventfds: readable when another peer rings me */
    struct ivshm_hostpeer_remote *peers;
    int npeers, cap;
    int disconnected;    /* the server closed the connection */
    struct ivshm_proto_msg msg; /* the message being received */
};

/* What ivshm_hostpeer_next() reports. */
#define IVSHM_HP_JOINED 1   /* peer `peer` appeared (its first vector arrived) */
#define IVSHM_HP_VECTOR 2   /* one more vector of `peer` (or of mine, when peer == my id) */
#define IVSHM_HP_LEFT 3     /* peer `peer` left; its fds are closed */
#define IVSHM_HP_DISCONNECTED 4 /* the server closed the connection */

struct ivshm_hostpeer_event {
    int kind;
    int peer;
    int vector;          /* for JOINED and VECTOR: the vector that arrived */
};

/* Connect to the server at `path` and receive the set-up: version, id, memory, the existing
 * peers' vectors and mine.  `vectors`: how many vectors of mine to wait for (0..64), or -1
 * for "at least one, then as many as the other peers have, or until the server is quiet for
 * 100 ms when I am alone".  Waits at most timeout_ms in all (negative: no limit).
 * On failure *why (if not NULL) points at a static description and hp holds nothing.
 * Returns 0, -ETIMEDOUT, -EPROTO (the server broke the protocol), -ECONNRESET, or -errno of
 * socket(2)/connect(2) (-ENOENT, -ECONNREFUSED: no server there). */
int ivshm_hostpeer_connect(struct ivshm_hostpeer *hp, const char *path, int vectors,
                           int timeout_ms, const char **why);

/* Handle one server message, waiting up to timeout_ms for it (0: never block).
 * Returns 1 with *ev filled, 0 when no complete message arrived in time, -EPROTO when the
 * server broke the protocol, or -errno.  After IVSHM_HP_DISCONNECTED returns 0 at once. */
int ivshm_hostpeer_next(struct ivshm_hostpeer *hp, int timeout_ms, struct ivshm_hostpeer_event *ev);

/* Handle every message already waiting, without blocking.  Returns how many were handled, or
 * a negative errno as ivshm_hostpeer_next(). */
int ivshm_hostpeer_drain(struct ivshm_hostpeer *hp);

/* The known peer `id`, or NULL. */
const struct ivshm_hostpeer_remote *ivshm_hostpeer_find(const struct ivshm_hostpeer *hp, int id);

/* Ring vector `vector` of peer `peer`: 0, -ENOENT (no such peer or vector), -errno. */
int ivshm_hostpeer_notify(const struct ivshm_hostpeer *hp, int peer, int vector);

/* My eventfd for `vector`, or -1. */
int ivshm_hostpeer_vector_fd(const struct ivshm_hostpeer *hp, int vector);

/* The server socket: readable when a message waits (for a caller's own poll loop). */
int ivshm_hostpeer_fileno(const struct ivshm_hostpeer *hp);

/* A channel resolver (ivshm_chan_resolve_fn, ivshm_chan.h) over hp's peer table: pass hp as
 * the resolver's context.  Returns 0 or -ENOENT. */
int ivshm_hostpeer_resolve(void *hp, uint32_t peer, uint32_t vector, struct ivshm_bell *out);

/* Close every fd held and free the table. */
void ivshm_hostpeer_close(struct ivshm_hostpeer *hp);

#ifdef __cplusplus
}
#endif
#endif /* IVSHM_HOSTPEER_H */
