"""cffi build script for pyivshmem._ffi_doorbell: eventfd doorbells, the epoll wait loop, and
the client side of the ivshmem server protocol (csrc/ivshm_doorbell.c, csrc/ivshm_peer.c)."""
import importlib.util
import os

from cffi import FFI


def _build_helpers():
    # pyivshmem/_build/__init__.py loaded by path: importing the pyivshmem package would need
    # the extension modules this build is about to produce
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_pyivshmem_build",
                                                  os.path.join(here, "__init__.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_helpers = _build_helpers()
CSRC, compile_flags = _helpers.CSRC, _helpers.compile_flags

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define IVSHM_WS_DRAIN ...
    #define IVSHM_WAIT_RESTART ...
    #define IVSHM_WS_TAG_MAX ...
    #define IVSHM_PROTO_VERSION ...
    #define IVSHM_PROTO_MAX_ID ...
    #define IVSHM_PROTO_MAX_VECTORS ...

    struct ivshm_fired { uint32_t tag; uint32_t flags; uint64_t count; };

    int ivshm_eventfd_create(int nonblock);
    int ivshm_eventfd_ring(int fd);
    int ivshm_eventfd_drain(int fd, uint64_t *count);
    int ivshm_waitset_create(void);
    int ivshm_waitset_add(int epfd, int fd, uint32_t tag, unsigned flags);
    int ivshm_waitset_remove(int epfd, int fd);
    int ivshm_waitset_wait(int epfd, int timeout_ms, unsigned flags, struct ivshm_fired *out,
                           int max_out, int *remaining_ms);
    int ivshm_wait_readable(int fd, int timeout_ms, unsigned flags, int *remaining_ms);

    struct ivshm_proto_msg {
        int64_t value;
        int fd;
        int nbytes;
        int nfds;
        int ctrunc;
        int late_fd;
        ...;
    };
    void ivshm_proto_msg_init(struct ivshm_proto_msg *msg);
    void ivshm_proto_msg_reset(struct ivshm_proto_msg *msg);
    int ivshm_proto_recv(int sock, struct ivshm_proto_msg *msg, int timeout_ms, unsigned flags,
                         int *remaining_ms);
    int ivshm_proto_check_value(int64_t value, int allow_minus_one);
    int ivshm_fd_check_eventfd(int fd);
    int ivshm_fd_check_shm(int fd, uint64_t *size);
    int ivshm_fd_describe(int fd, char *buf, size_t len);

    int ivshm_ref_eventfd_rtt(int rx, int tx, int lead, uint64_t count, int64_t *lat_ns);
    int ivshm_ref_eventfd_wake(int rx, int tx, int lead, uint64_t count, uint64_t gap_ns,
                               int64_t *lat_ns);
    """
)

_cflags, _ldflags = compile_flags()
ffibuilder.set_source(
    "pyivshmem._ffi_doorbell",
    '#include "ivshm_doorbell.h"\n#include "ivshm_peer.h"\n#include "ivshm_bench_ref.h"\n',
    # relative paths: setuptools refuses absolute ones when building a wheel
    sources=[os.path.relpath(os.path.join(CSRC, f))
             for f in ("ivshm_doorbell.c", "ivshm_peer.c", "ivshm_bench_ref.c")],
    include_dirs=[CSRC],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
