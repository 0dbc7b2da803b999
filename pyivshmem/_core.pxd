# Declarations of the C core (csrc/) for Cython.  The hot path is static inline in the headers.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, int32_t

cdef extern from "ivshm_layout.h" nogil:
    enum:
        IVSHM_NAME_MAX
        IVSHM_MAX_RINGS
        IVSHM_KIND_SPSC
        IVSHM_KIND_MPMC
        IVSHM_HDR_SIZE
        IVSHM_MIN_REGION_SIZE
        IVSHM_LAYOUT_VERSION
        IVSHM_CTRL_SIZE
        IVSHM_SLEEPERS
        IVSHM_MAX_VECTORS
        IVSHM_MAX_PEER_ID
    ctypedef struct ivshm_ring_ctrl "struct ivshm_ring_ctrl":
        uint64_t magic
        uint32_t kind
        uint64_t head
        uint32_t prod_waiting
        uint32_t prod_sleepers[30]
        uint64_t tail
        uint32_t cons_waiting
        uint32_t cons_sleepers[30]
    ctypedef struct ivshm_region_hdr "struct ivshm_region_hdr":
        uint64_t magic
        uint32_t version
        uint64_t region_size
        uint64_t generation
        uint32_t nrings
        uint64_t alloc_off
        uint64_t lock

cdef extern from "ivshm_region.h" nogil:
    ctypedef struct ivshm_region "struct ivshm_region":
        uint8_t *base
        uint64_t size
        uint64_t generation
    ctypedef struct ivshm_ring_info "struct ivshm_ring_info":
        char name[32]
        uint32_t index
        uint32_t kind
        uint32_t slot_size
        uint32_t capacity
        uint32_t stride
        uint64_t offset
        uint64_t size
    enum:
        IVSHM_ATTACH_FORMAT_IF_EMPTY
        IVSHM_ATTACH_FORMAT
    int ivshm_region_size_ok(uint64_t size)
    int ivshm_region_attach(ivshm_region *r, void *base, uint64_t size, unsigned flags,
                            uint64_t generation, int wait_ms)
    int ivshm_region_check(const ivshm_region *r)
    uint64_t ivshm_ring_bytes(uint32_t kind, uint32_t slot_size, uint32_t capacity)
    int ivshm_ring_shape_ok(uint32_t kind, uint32_t slot_size, uint32_t capacity, const char **why)
    int ivshm_region_ring_at(const ivshm_region *r, uint32_t index, ivshm_ring_info *out,
                             const char **why)
    int ivshm_region_find_ring(const ivshm_region *r, const char *name, ivshm_ring_info *out,
                               const char **why)
    int ivshm_region_create_ring(ivshm_region *r, const char *name, uint32_t kind,
                                 uint32_t slot_size, uint32_t capacity, uint64_t token, int wait_ms,
                                 ivshm_ring_info *out, const char **why)

cdef extern from "ivshm_spsc.h" nogil:
    ctypedef struct ivshm_spsc "struct ivshm_spsc":
        ivshm_ring_ctrl *ctrl
        uint32_t capacity
        uint32_t slot_size
        uint64_t head
        uint64_t tail
        const char *why
        uint64_t why_a
        uint64_t why_b
    ctypedef struct ivshm_spsc_msg "struct ivshm_spsc_msg":
        const uint8_t *data
        uint64_t len
        uint32_t nslots
    int ivshm_spsc_attach(ivshm_spsc *q, const ivshm_region *r, const ivshm_ring_info *info,
                          const char **why)
    uint64_t ivshm_spsc_slots_for(const ivshm_spsc *q, uint64_t len)
    int64_t ivshm_spsc_free(ivshm_spsc *q, uint64_t need)
    int ivshm_spsc_write(ivshm_spsc *q, const void *data, uint64_t len)
    void ivshm_spsc_publish(ivshm_spsc *q)
    int ivshm_spsc_try_send(ivshm_spsc *q, const void *data, uint64_t len)
    int ivshm_spsc_next(ivshm_spsc *q, ivshm_spsc_msg *m)
    void ivshm_spsc_copy(const ivshm_spsc *q, const ivshm_spsc_msg *m, void *dst)
    void ivshm_spsc_advance(ivshm_spsc *q, const ivshm_spsc_msg *m)
    void ivshm_spsc_release(ivshm_spsc *q)
    int ivshm_spsc_reserve(ivshm_spsc *q, uint64_t len, uint8_t **ptr)
    void ivshm_spsc_commit(ivshm_spsc *q, uint32_t len)
    uint64_t ivshm_spsc_count(const ivshm_spsc *q)

cdef extern from "ivshm_mpmc.h" nogil:
    ctypedef struct ivshm_mpmc "struct ivshm_mpmc":
        ivshm_ring_ctrl *ctrl
        uint32_t capacity
        uint32_t slot_size
        const char *why
        uint64_t why_a
        uint64_t why_b
    int ivshm_mpmc_attach(ivshm_mpmc *q, const ivshm_region *r, const ivshm_ring_info *info,
                          const char **why)
    int64_t ivshm_mpmc_claim_send(ivshm_mpmc *q, uint64_t n, uint64_t *pos)
    void ivshm_mpmc_commit_one(ivshm_mpmc *q, uint64_t i, uint32_t len)
    int64_t ivshm_mpmc_claim_recv(ivshm_mpmc *q, uint64_t n, uint64_t *pos)
    int64_t ivshm_mpmc_msg_len(ivshm_mpmc *q, uint64_t i)
    void ivshm_mpmc_release_one(ivshm_mpmc *q, uint64_t i)
    uint8_t *ivshm_mpmc_payload(const ivshm_mpmc *q, uint64_t i)
    int ivshm_mpmc_try_send(ivshm_mpmc *q, const void *data, uint64_t len)
    uint64_t ivshm_mpmc_count(const ivshm_mpmc *q)
    int ivshm_mpmc_stalled(const ivshm_mpmc *q, uint64_t *pos)

cdef extern from "ivshm_doorbell.h" nogil:
    enum:
        IVSHM_BELL_NONE
        IVSHM_BELL_EVENTFD
        IVSHM_BELL_MMIO
    ctypedef struct ivshm_bell "struct ivshm_bell":
        int kind
        int fd
        volatile uint32_t *reg
        uint32_t value
    ctypedef struct ivshm_bell_table "struct ivshm_bell_table":
        pass
    int ivshm_bell_ring(const ivshm_bell *b)
    int ivshm_bell_table_stale(ivshm_bell_table *t, int force)
    uint32_t ivshm_bell_table_changes(const ivshm_bell_table *t, uint32_t peer)
    int ivshm_bell_table_resolve(void *table, uint32_t peer, uint32_t vector, ivshm_bell *out)

cdef extern from "ivshm_chan.h" nogil:
    enum:
        IVSHM_CHAN_RECV
        IVSHM_CHAN_SEND
    ctypedef int (*ivshm_chan_resolve_fn)(void *ctx, uint32_t peer, uint32_t vector, ivshm_bell *out)
    ctypedef struct ivshm_chan_stats "struct ivshm_chan_stats":
        uint64_t doorbells
        uint64_t sleeps
        uint64_t wakeups
        uint64_t unrouted
        uint64_t passes
        uint64_t arms
    ctypedef struct ivshm_fd_share "struct ivshm_fd_share":
        uint32_t count
    ctypedef struct ivshm_chan "struct ivshm_chan":
        uint32_t route
        int wait_fd
        int cancel_fd
        int cancel_fd2
        ivshm_fd_share *fd_share
        uint64_t spin_ns
        uint64_t recheck_ns
    ctypedef struct ivshm_chan_call "struct ivshm_chan_call":
        int64_t deadline_ns
        uint32_t slept
        uint64_t need
        int entry
    int ivshm_chan_init(ivshm_chan *ch, uint32_t kind, void *ring, int peer, int vector, int wait_fd,
                        int cancel_fd, ivshm_chan_resolve_fn resolve, void *resolve_ctx,
                        uint64_t spin_ns, uint64_t recheck_ns)
    int64_t ivshm_chan_now_ns()
    void ivshm_chan_call_init(ivshm_chan_call *call, uint32_t side, int64_t timeout_ns, uint64_t need)
    void ivshm_chan_call_progress(ivshm_chan_call *call)
    int ivshm_chan_ready(const ivshm_chan *ch, uint32_t side, uint64_t need)
    int ivshm_chan_wait(ivshm_chan *ch, ivshm_chan_call *call)
    int ivshm_chan_arm(ivshm_chan *ch, ivshm_chan_call *call)
    void ivshm_chan_disarm(ivshm_chan *ch, ivshm_chan_call *call)
    int ivshm_chan_absorb(ivshm_chan *ch, ivshm_chan_call *call)
    int ivshm_chan_sleep_begin(ivshm_chan *ch, ivshm_chan_call *call)
    void ivshm_chan_sleep_end(ivshm_chan *ch, ivshm_chan_call *call)
    int ivshm_chan_sleep_on_fd(ivshm_chan *ch, ivshm_chan_call *call)
    int64_t ivshm_chan_backoff_ns(ivshm_chan_call *call)
    int ivshm_chan_wake_other(ivshm_chan *ch, uint32_t my_side)
    void ivshm_chan_pass_on(ivshm_chan *ch, ivshm_chan_call *call)
    void ivshm_chan_get_stats(const ivshm_chan *ch, ivshm_chan_stats *out)

# MPMC: short buffers, stalls, recovery (csrc/ivshm_mpmc.h)
cdef extern from "ivshm_mpmc.h" nogil:
    enum:
        IVSHM_MPMC_RECOVERED_CONSUMER
        IVSHM_MPMC_RECOVERED_PRODUCER
    int64_t ivshm_mpmc_claim_recv_max(ivshm_mpmc *q, uint64_t n, uint64_t max_len, uint64_t *pos,
                                      uint64_t *needed)
    int ivshm_mpmc_consumer_stalled(const ivshm_mpmc *q, uint64_t *pos)
    int ivshm_mpmc_abandon(ivshm_mpmc *q, uint64_t i)
    int ivshm_mpmc_recover(ivshm_mpmc *q, uint64_t i)
    void ivshm_mpmc_indices(const ivshm_mpmc *q, uint64_t *head, uint64_t *tail)
    int ivshm_mpmc_claim_state(const ivshm_mpmc *q, uint64_t i)
    int ivshm_mpmc_next_claim(const ivshm_mpmc *q, int consumer, uint64_t start, uint64_t *pos)
    int64_t ivshm_mpmc_read_claimed(ivshm_mpmc *q, uint64_t i, void *buf, uint64_t cap,
                                    uint64_t *needed)
    int ivshm_mpmc_recover_with(ivshm_mpmc *q, uint64_t i, const void *data, uint32_t len)

cdef extern from "ivshm_region.h" nogil:
    enum:
        IVSHM_DIR_LEASE_MS
        IVSHM_MAX_SLOT_SIZE
        IVSHM_MAX_CAPACITY

cdef extern from "ivshm_layout.h" nogil:
    enum:
        IVSHM_KIND_PUBSUB
        IVSHM_PUBSUB_MAX_SUBS
        IVSHM_PUBSUB_BLOCK
        IVSHM_PUBSUB_DROP
        IVSHM_SUB_FREE
        IVSHM_SUB_JOINING
        IVSHM_SUB_ACTIVE
        IVSHM_SUB_DROPPED
        IVSHM_SUB_CUT_SLOW
        IVSHM_SUB_CUT_DEAD
        IVSHM_SUB_CUT_CURSOR
        IVSHM_SUB_CUT_BY_PUBLISHER

cdef extern from "ivshm_pubsub.h" nogil:
    ctypedef struct ivshm_pubsub_pub "struct ivshm_pubsub_pub":
        ivshm_ring_ctrl *ctrl
        uint32_t capacity
        uint32_t slot_size
        uint32_t policy
        uint32_t recovered
        int64_t slow_ns
        uint64_t head
        uint64_t min_cache
        uint32_t active
        uint64_t cuts
        int32_t last_cut
        uint32_t last_reason
        uint64_t last_behind
        const char *why
        uint64_t why_a
        uint64_t why_b
        int32_t why_sub
    ctypedef struct ivshm_pubsub_sub "struct ivshm_pubsub_sub":
        ivshm_ring_ctrl *ctrl
        uint32_t index
        uint32_t closed
        uint64_t cursor
        uint64_t joined_at
        const char *why
        uint64_t why_a
        uint64_t why_b
    ctypedef struct ivshm_pubsub_msg "struct ivshm_pubsub_msg":
        const uint8_t *data
        uint64_t len
    ctypedef struct ivshm_pubsub_status "struct ivshm_pubsub_status":
        uint32_t state
        uint32_t reason
        uint64_t cursor
        uint64_t head
        uint64_t cut_head
        uint64_t cut_cursor
    ctypedef struct ivshm_pubsub_subinfo "struct ivshm_pubsub_subinfo":
        uint32_t index
        uint32_t state
        uint64_t generation
        uint64_t cursor
        uint32_t pid
        uint32_t reason
        uint64_t ns_key
        uint64_t heartbeat
        uint64_t cut_head
        uint64_t cut_cursor
        uint64_t joined_at
    uint64_t ivshm_pubsub_ns_key()
    int ivshm_pubsub_create(ivshm_region *r, const char *name, uint32_t slot_size, uint32_t capacity,
                            uint32_t policy, uint64_t slow_timeout_ns, uint64_t token, int wait_ms,
                            ivshm_ring_info *out, const char **why)
    int ivshm_pubsub_config(const ivshm_region *r, const ivshm_ring_info *info, uint32_t *policy,
                            uint64_t *slow_timeout_ns, int wait_ms, const char **why)
    int ivshm_pubsub_pub_attach(ivshm_pubsub_pub *p, const ivshm_region *r, const ivshm_ring_info *info,
                                int wait_ms, const char **why)
    int ivshm_pubsub_subscribe(ivshm_pubsub_sub *s, const ivshm_region *r, const ivshm_ring_info *info,
                               uint32_t pid, uint64_t ns_key, int wait_ms, const char **why)
    void ivshm_pubsub_unsubscribe(ivshm_pubsub_sub *s)
    int64_t ivshm_pubsub_room(ivshm_pubsub_pub *p, uint64_t need)
    uint8_t *ivshm_pubsub_begin(ivshm_pubsub_pub *p)
    void ivshm_pubsub_end(ivshm_pubsub_pub *p, uint32_t len)
    void ivshm_pubsub_publish(ivshm_pubsub_pub *p)
    int ivshm_pubsub_try_send(ivshm_pubsub_pub *p, const void *data, uint64_t len)
    int ivshm_pubsub_reserve(ivshm_pubsub_pub *p, uint64_t len, uint8_t **ptr)
    void ivshm_pubsub_commit(ivshm_pubsub_pub *p, uint32_t len)
    int ivshm_pubsub_cut(ivshm_pubsub_pub *p, uint32_t index)
    int ivshm_pubsub_list(const ivshm_pubsub_pub *p, ivshm_pubsub_subinfo *out, int max)
    int ivshm_pubsub_next(ivshm_pubsub_sub *s, ivshm_pubsub_msg *m)
    int ivshm_pubsub_check(ivshm_pubsub_sub *s)
    void ivshm_pubsub_advance(ivshm_pubsub_sub *s)
    void ivshm_pubsub_release(ivshm_pubsub_sub *s)
    uint64_t ivshm_pubsub_pending(const ivshm_pubsub_sub *s)
    int ivshm_pubsub_sub_status(const ivshm_pubsub_sub *s, ivshm_pubsub_status *st)

cdef extern from "ivshm_chan.h" nogil:
    int ivshm_chan_wake_all(ivshm_chan *ch, uint32_t my_side)

cdef extern from "ivshm_guard.h" nogil:
    enum:
        IVSHM_GUARD_MAX
    int ivshm_guard_add(void *base, size_t len, int *lost, int wake_fd)
    void ivshm_guard_remove(int id)
    int ivshm_guard_install()
    int ivshm_guard_installed()
    unsigned long ivshm_guard_hits()
