# The C core's sources, listed once: csrc/Makefile (libivshm.a), tests/c/Makefile, bench/c/Makefile,
# setup.py and the tests that compile C programs all read this line.
CORE_SRCS := ivshm_region.c ivshm_spsc.c ivshm_mpmc.c ivshm_doorbell.c ivshm_chan.c ivshm_pubsub.c ivshm_guard.c
# (ivshm_doorbell.c is core: the wake-up protocol rings and sleeps through it; the cffi doorbell
# module builds it too, for Peer and PciDevice.)
# What libivshm.a adds for C programs (csrc/Makefile only; the Python binding builds these into its
# cffi modules instead): the server protocol's both ends, and a host peer that joins an ivshmem
# server (ivshm_hostpeer.h).
LIB_EXTRA_SRCS := ivshm_peer.c ivshm_server.c ivshm_hostpeer.c
