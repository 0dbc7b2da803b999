/* peer_doorbell.c - a C program that joins an ivshmem server and exchanges doorbells.
 *
 * Joins the server listening on SOCKET (pyivshmem-server, an embedded pyivshmem Server, or QEMU's
 * ivshmem-server) as a host peer, maps the shared memory, then plays ping-pong with peer PEER_ID
 * ROUNDS times: ring PEER_ID's vector 0, then sleep on my own vector 0 until PEER_ID rings back.
 * Server messages (peers joining and leaving) are handled between rounds so the server never has
 * to queue for this program.
 *
 *   make -C csrc && cc -O2 -Icsrc examples/c/peer_doorbell.c csrc/libivshm.a -o peer_doorbell
 *   ./peer_doorbell /tmp/ivshmem_socket PEER_ID [ROUNDS [TIMEOUT_MS]]
 *
 * Prints one line when joined ("joined id=N size=BYTES peers=K word0=HEX": the first 8 bytes of
 * the memory, little-endian), one per round, and "done"; exits 1 on any failure with the reason.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "ivshm_doorbell.h"
#include "ivshm_hostpeer.h"

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: %s SOCKET PEER_ID [ROUNDS [TIMEOUT_MS]]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    int peer = atoi(argv[2]);
    int rounds = argc > 3 ? atoi(argv[3]) : 10;
    int timeout_ms = argc > 4 ? atoi(argv[4]) : 10000;

    struct ivshm_hostpeer hp;
    const char *why = NULL;
    int rc = ivshm_hostpeer_connect(&hp, path, -1, timeout_ms, &why);
    if (rc < 0) {
        fprintf(stderr, "cannot join the server at %s: %s (%s)\n", path, strerror(-rc),
                why ? why : "");
        return 1;
    }
    if (hp.nvec < 1) {
        fprintf(stderr, "the server gave me no vectors: start it with at least one (-n 1)\n");
        ivshm_hostpeer_close(&hp);
        return 1;
    }
    void *mem = mmap(NULL, (size_t)hp.shm_size, PROT_READ | PROT_WRITE, MAP_SHARED, hp.shm_fd, 0);
    if (mem == MAP_FAILED) {
        perror("mmap of the shared memory");
        ivshm_hostpeer_close(&hp);
        return 1;
    }
    uint64_t word0 = 0;
    const volatile unsigned char *b = mem;
    for (int i = 7; i >= 0; i--)
        word0 = (word0 << 8) | b[i];
    printf("joined id=%d size=%" PRIu64 " peers=%d word0=%016" PRIx64 "\n", hp.id, hp.shm_size,
           hp.npeers, word0);
    fflush(stdout);

    int status = 0;
    for (int i = 0; i < rounds && status == 0; i++) {
        rc = ivshm_hostpeer_drain(&hp);
        if (rc < 0) {
            fprintf(stderr, "server message: %s\n", strerror(-rc));
            status = 1;
            break;
        }
        if (hp.disconnected) {
            fprintf(stderr, "the server closed the connection\n");
            status = 1;
            break;
        }
        rc = ivshm_hostpeer_notify(&hp, peer, 0);
        if (rc < 0) {
            fprintf(stderr, "cannot ring peer %d vector 0: %s\n", peer,
                    rc == -ENOENT ? "no such peer (did it leave?)" : strerror(-rc));
            status = 1;
            break;
        }
        uint64_t count = 0;
        while (count == 0) {
            rc = ivshm_wait_readable(ivshm_hostpeer_vector_fd(&hp, 0), timeout_ms,
                                     IVSHM_WAIT_RESTART, NULL);
            if (rc <= 0) {
                fprintf(stderr, "round %d: peer %d did not ring back within %d ms%s%s\n", i,
                        peer, timeout_ms, rc < 0 ? ": " : "", rc < 0 ? strerror(-rc) : "");
                status = 1;
                break;
            }
            rc = ivshm_eventfd_drain(ivshm_hostpeer_vector_fd(&hp, 0), &count);
            if (rc < 0) {
                fprintf(stderr, "drain: %s\n", strerror(-rc));
                status = 1;
                break;
            }
        }
        if (status == 0) {
            printf("round %d\n", i);
            fflush(stdout);
        }
    }
    if (status == 0)
        printf("done\n");
    munmap(mem, (size_t)hp.shm_size);
    ivshm_hostpeer_close(&hp);
    return status;
}
