/* ivshm_vfio.h - the guest side of an ivshmem PCI device: VFIO and register access.
 *
 * Inside a Linux guest, an ivshmem device (1af4:1110) shows its registers in BAR0, the MSI-X table
 * in BAR1 (doorbell flavour only) and the shared memory in BAR2.  This file gives a C program (and
 * pyivshmem.PciDevice) what it needs without a kernel module of its own:
 *   - VFIO: open the container and the device's IOMMU group, check the group is viable, select the
 *     type1 IOMMU, get the device fd, look up regions (BARs, config space) and interrupts, enable
 *     memory decoding and bus mastering, bind MSI-X vectors to eventfds, and tear all of it down;
 *   - BAR0 registers: map them (sysfs resource0 or the VFIO device fd) and do aligned 32-bit
 *     volatile loads and stores (QEMU only honours exact 4-byte accesses);
 *   - a periodic timerfd for guests without interrupts (bounded polling).
 * Every function returns 0 or -errno.  No global state: the caller owns struct ivshm_vfio.
 */
#ifndef IVSHM_VFIO_H
#define IVSHM_VFIO_H

#include <stddef.h>
#include <stdint.h>

/* BAR0 register offsets (IVSHMEM.md section 1) */
#define IVSHM_REG_INTRMASK   0x00u
#define IVSHM_REG_INTRSTATUS 0x04u
#define IVSHM_REG_IVPOSITION 0x08u
#define IVSHM_REG_DOORBELL   0x0Cu
#define IVSHM_BAR0_SIZE      256u

/* VFIO region / irq indexes of a PCI device (same values as linux/vfio.h) */
#define IVSHM_VFIO_BAR0_INDEX   0u
#define IVSHM_VFIO_BAR1_INDEX   1u
#define IVSHM_VFIO_BAR2_INDEX   2u
#define IVSHM_VFIO_CONFIG_INDEX 7u
#define IVSHM_VFIO_MSIX_INDEX   2u

#define IVSHM_VFIO_REGION_READ  (1u << 0)
#define IVSHM_VFIO_REGION_WRITE (1u << 1)
#define IVSHM_VFIO_REGION_MMAP  (1u << 2)

/* Where ivshm_vfio_open() stopped, so callers can explain the failure precisely. */
enum ivshm_vfio_stage {
    IVSHM_VFIO_OK = 0,
    IVSHM_VFIO_STAGE_CONTAINER,     /* open /dev/vfio/vfio */
    IVSHM_VFIO_STAGE_API,           /* VFIO_GET_API_VERSION mismatch */
    IVSHM_VFIO_STAGE_TYPE1,         /* no type1 IOMMU support */
    IVSHM_VFIO_STAGE_GROUP,         /* open /dev/vfio/<group> */
    IVSHM_VFIO_STAGE_GROUP_STATUS,  /* VFIO_GROUP_GET_STATUS */
    IVSHM_VFIO_STAGE_VIABLE,        /* group not viable: another device in it has a host driver */
    IVSHM_VFIO_STAGE_SET_CONTAINER, /* VFIO_GROUP_SET_CONTAINER */
    IVSHM_VFIO_STAGE_SET_IOMMU,     /* VFIO_SET_IOMMU */
    IVSHM_VFIO_STAGE_DEVICE         /* VFIO_GROUP_GET_DEVICE_FD */
};

struct ivshm_vfio {
    int container_fd; /* /dev/vfio/vfio, or -1 */
    int group_fd;     /* /dev/vfio/<group>, or -1 */
    int device_fd;    /* the device, or -1 */
    int msix_count;   /* vectors bound by ivshm_vfio_msix_enable(), 0 if none */
};

/* Set every fd to -1; call before ivshm_vfio_open() so ivshm_vfio_close() is always safe. */
void ivshm_vfio_init(struct ivshm_vfio *v);

/* Open container, group `group` and device `bdf` ("0000:00:03.0").  On failure everything opened so
 * far is closed again, *stage says which step failed, and -errno is returned. */
int ivshm_vfio_open(struct ivshm_vfio *v, int group, const char *bdf, int *stage);

/* Disable MSI-X if enabled, close device, group and container.  Idempotent. */
int ivshm_vfio_close(struct ivshm_vfio *v);

/* Region `index`: offset on the device fd, size in bytes, IVSHM_VFIO_REGION_* flags. */
int ivshm_vfio_region(int device_fd, uint32_t index, uint64_t *offset, uint64_t *size, uint32_t *flags);

/* Interrupt index `index`: number of vectors and VFIO_IRQ_INFO_* flags. */
int ivshm_vfio_irq_info(int device_fd, uint32_t index, uint32_t *count, uint32_t *flags);

/* Read / write `len` bytes (1, 2 or 4) of PCI config space at `off`, through the device fd. */
int ivshm_vfio_config_read(int device_fd, uint32_t off, uint32_t len, uint32_t *value);
int ivshm_vfio_config_write(int device_fd, uint32_t off, uint32_t len, uint32_t value);

/* Set memory-space decoding and bus mastering in the command register (MSI-X writes go nowhere
 * without bus mastering). *before receives the previous command register value. */
int ivshm_vfio_enable_master(int device_fd, uint32_t *before);

/* Create `count` eventfds (non-blocking, close-on-exec) into fds[0..count-1] and bind MSI-X vectors
 * 0..count-1 to them.  On failure no fd is left open. */
int ivshm_vfio_msix_enable(struct ivshm_vfio *v, uint32_t count, int *fds);

/* Unbind every MSI-X vector (the eventfds stay open; the caller closes them). */
int ivshm_vfio_msix_disable(struct ivshm_vfio *v);

/* A 32-bit access through the device fd (pread/pwrite), for a BAR that cannot be mmap'ed. */
int ivshm_vfio_read32(int device_fd, uint64_t offset, uint32_t *value);
int ivshm_vfio_write32(int device_fd, uint64_t offset, uint32_t value);

/* mmap `size` bytes of `fd` at `offset` (shared, read+write unless !writable). */
int ivshm_mmio_map(int fd, uint64_t offset, size_t size, int writable, uintptr_t *addr);
int ivshm_mmio_unmap(uintptr_t addr, size_t size);

/* Aligned 32-bit volatile register access at base+off (off < size, off % 4 == 0).  write32 issues a
 * full fence first, so every store to shared memory made before it (BAR2, possibly write-combined)
 * is visible before the doorbell reaches the peer; it pairs with the fence a woken peer issues
 * before re-reading shared memory. */
int ivshm_mmio_read32(uintptr_t base, size_t size, uint32_t off, uint32_t *value);
int ivshm_mmio_write32(uintptr_t base, size_t size, uint32_t off, uint32_t value);

/* Ring `peer`'s `vector` through the Doorbell register of a mapped BAR0. */
int ivshm_mmio_doorbell(uintptr_t bar0, uint32_t peer, uint32_t vector);

/* A periodic CLOCK_MONOTONIC timerfd (non-blocking, close-on-exec) firing every `interval_us`. */
int ivshm_poll_timer_create(uint32_t interval_us, int *fd);

#endif
