# The C core's sources, listed once: csrc/Makefile (libivshm.a), tests/c/Makefile, bench/c/Makefile,
# setup.py and the tests that compile C programs all read this line.
CORE_SRCS := ivshm_region.c ivshm_spsc.c ivshm_mpmc.c ivshm_chan.c ivshm_pubsub.c
