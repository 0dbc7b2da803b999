/* ivshm_vfio.c - the guest side of an ivshmem PCI device: VFIO ioctls and BAR0 register access.
 *
 * The VFIO sequence is the one in the kernel's Documentation/driver-api/vfio.rst: container
 * (API version, type1 extension), group (viable), attach the group, select the IOMMU, then the
 * device fd.  Regions are read/written/mmap'ed through the device fd at the offsets the kernel
 * reports; MSI-X vectors are bound to eventfds with VFIO_DEVICE_SET_IRQS.  Nothing here trusts
 * sizes it did not check: register offsets are bounds- and alignment-checked.
 */
#include "ivshm_vfio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define PCI_COMMAND_REG    0x04u
#define PCI_COMMAND_MEMORY 0x2u
#define PCI_COMMAND_MASTER 0x4u

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

void ivshm_vfio_init(struct ivshm_vfio *v)
{
    v->container_fd = -1;
    v->group_fd = -1;
    v->device_fd = -1;
    v->msix_count = 0;
}

int ivshm_vfio_open(struct ivshm_vfio *v, int group, const char *bdf, int *stage)
{
    char path[64];
    struct vfio_group_status status;
    int rc, iommu_type;

    ivshm_vfio_init(v);
    *stage = IVSHM_VFIO_STAGE_CONTAINER;
    if (group < 0 || bdf == NULL)
        return -EINVAL;
    v->container_fd = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
    if (v->container_fd < 0)
        return -errno;

    *stage = IVSHM_VFIO_STAGE_API;
    rc = ioctl(v->container_fd, VFIO_GET_API_VERSION);
    if (rc != VFIO_API_VERSION) {
        rc = rc < 0 ? -errno : -EPROTONOSUPPORT;
        goto fail;
    }
    *stage = IVSHM_VFIO_STAGE_TYPE1;
    if (ioctl(v->container_fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) > 0)
        iommu_type = VFIO_TYPE1v2_IOMMU;
    else if (ioctl(v->container_fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU) > 0)
        iommu_type = VFIO_TYPE1_IOMMU;
    else {
        rc = -ENODEV;
        goto fail;
    }

    *stage = IVSHM_VFIO_STAGE_GROUP;
    snprintf(path, sizeof path, "/dev/vfio/%d", group);
    v->group_fd = open(path, O_RDWR | O_CLOEXEC);
    if (v->group_fd < 0) {
        rc = -errno;
        goto fail;
    }
    *stage = IVSHM_VFIO_STAGE_GROUP_STATUS;
    memset(&status, 0, sizeof status);
    status.argsz = sizeof status;
    if (ioctl(v->group_fd, VFIO_GROUP_GET_STATUS, &status) < 0) {
        rc = -errno;
        goto fail;
    }
    *stage = IVSHM_VFIO_STAGE_VIABLE;
    if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
        rc = -EBUSY;
        goto fail;
    }
    *stage = IVSHM_VFIO_STAGE_SET_CONTAINER;
    if (ioctl(v->group_fd, VFIO_GROUP_SET_CONTAINER, &v->container_fd) < 0) {
        rc = -errno;
        goto fail;
    }
    *stage = IVSHM_VFIO_STAGE_SET_IOMMU;
    if (ioctl(v->container_fd, VFIO_SET_IOMMU, iommu_type) < 0) {
        rc = -errno;
        goto fail;
    }
    *stage = IVSHM_VFIO_STAGE_DEVICE;
    v->device_fd = ioctl(v->group_fd, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (v->device_fd < 0) {
        rc = -errno;
        v->device_fd = -1;
        goto fail;
    }
    *stage = IVSHM_VFIO_OK;
    return 0;

fail:
    ivshm_vfio_close(v);
    return rc;
}

int ivshm_vfio_close(struct ivshm_vfio *v)
{
    if (v->device_fd >= 0 && v->msix_count > 0)
        ivshm_vfio_msix_disable(v);
    close_fd(&v->device_fd);
    close_fd(&v->group_fd); /* closing the last group fd detaches it from the container */
    close_fd(&v->container_fd);
    v->msix_count = 0;
    return 0;
}

int ivshm_vfio_region(int device_fd, uint32_t index, uint64_t *offset, uint64_t *size, uint32_t *flags)
{
    struct vfio_region_info info;

    memset(&info, 0, sizeof info);
    info.argsz = sizeof info;
    info.index = index;
    if (ioctl(device_fd, VFIO_DEVICE_GET_REGION_INFO, &info) < 0)
        return -errno;
    *offset = info.offset;
    *size = info.size;
    *flags = info.flags;
    return 0;
}

int ivshm_vfio_irq_info(int device_fd, uint32_t index, uint32_t *count, uint32_t *flags)
{
    struct vfio_irq_info info;

    memset(&info, 0, sizeof info);
    info.argsz = sizeof info;
    info.index = index;
    if (ioctl(device_fd, VFIO_DEVICE_GET_IRQ_INFO, &info) < 0)
        return -errno;
    *count = info.count;
    *flags = info.flags;
    return 0;
}

static int config_offset(int device_fd, uint64_t *offset, uint64_t *size)
{
    uint32_t flags;
    return ivshm_vfio_region(device_fd, VFIO_PCI_CONFIG_REGION_INDEX, offset, size, &flags);
}

static int pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    ssize_t n = pread(fd, buf, len, (off_t)off);
    if (n < 0)
        return -errno;
    return (size_t)n == len ? 0 : -EIO;
}

static int pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    ssize_t n = pwrite(fd, buf, len, (off_t)off);
    if (n < 0)
        return -errno;
    return (size_t)n == len ? 0 : -EIO;
}

int ivshm_vfio_config_read(int device_fd, uint32_t off, uint32_t len, uint32_t *value)
{
    uint64_t base, size;
    uint8_t b[4] = {0, 0, 0, 0};
    int rc;

    if ((len != 1 && len != 2 && len != 4) || off % len != 0)
        return -EINVAL;
    rc = config_offset(device_fd, &base, &size);
    if (rc)
        return rc;
    if ((uint64_t)off + len > size)
        return -ERANGE;
    rc = pread_full(device_fd, b, len, base + off);
    if (rc)
        return rc;
    *value = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    return 0;
}

int ivshm_vfio_config_write(int device_fd, uint32_t off, uint32_t len, uint32_t value)
{
    uint64_t base, size;
    uint8_t b[4] = {(uint8_t)value, (uint8_t)(value >> 8), (uint8_t)(value >> 16), (uint8_t)(value >> 24)};
    int rc;

    if ((len != 1 && len != 2 && len != 4) || off % len != 0)
        return -EINVAL;
    rc = config_offset(device_fd, &base, &size);
    if (rc)
        return rc;
    if ((uint64_t)off + len > size)
        return -ERANGE;
    return pwrite_full(device_fd, b, len, base + off);
}

int ivshm_vfio_enable_master(int device_fd, uint32_t *before)
{
    uint32_t cmd;
    int rc = ivshm_vfio_config_read(device_fd, PCI_COMMAND_REG, 2, &cmd);
    if (rc)
        return rc;
    *before = cmd;
    if ((cmd & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)) == (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER))
        return 0;
    return ivshm_vfio_config_write(device_fd, PCI_COMMAND_REG, 2,
                                   cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
}

int ivshm_vfio_msix_enable(struct ivshm_vfio *v, uint32_t count, int *fds)
{
    struct vfio_irq_set *set;
    size_t argsz;
    uint32_t i = 0, have = 0, flags = 0;
    int rc;

    if (count == 0 || count > 2048)
        return -EINVAL;
    rc = ivshm_vfio_irq_info(v->device_fd, VFIO_PCI_MSIX_IRQ_INDEX, &have, &flags);
    if (rc)
        return rc;
    if (!(flags & VFIO_IRQ_INFO_EVENTFD) || count > have)
        return -ENOTSUP;
    argsz = sizeof *set + count * sizeof(int32_t);
    set = calloc(1, argsz);
    if (set == NULL)
        return -ENOMEM;
    for (i = 0; i < count; i++) {
        fds[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (fds[i] < 0) {
            rc = -errno;
            goto fail;
        }
    }
    set->argsz = (uint32_t)argsz;
    set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->index = VFIO_PCI_MSIX_IRQ_INDEX;
    set->start = 0;
    set->count = count;
    memcpy(set->data, fds, count * sizeof(int32_t));
    if (ioctl(v->device_fd, VFIO_DEVICE_SET_IRQS, set) < 0) {
        rc = -errno;
        goto fail;
    }
    free(set);
    v->msix_count = (int)count;
    return 0;

fail:
    while (i-- > 0) {
        close(fds[i]);
        fds[i] = -1;
    }
    free(set);
    return rc;
}

int ivshm_vfio_msix_disable(struct ivshm_vfio *v)
{
    struct vfio_irq_set set;

    if (v->device_fd < 0)
        return -EBADF;
    memset(&set, 0, sizeof set);
    set.argsz = sizeof set;
    set.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
    set.index = VFIO_PCI_MSIX_IRQ_INDEX;
    set.start = 0;
    set.count = 0;
    if (ioctl(v->device_fd, VFIO_DEVICE_SET_IRQS, &set) < 0)
        return -errno;
    v->msix_count = 0;
    return 0;
}

int ivshm_vfio_read32(int device_fd, uint64_t offset, uint32_t *value)
{
    if (offset % 4)
        return -EINVAL;
    return pread_full(device_fd, value, 4, offset);
}

int ivshm_vfio_write32(int device_fd, uint64_t offset, uint32_t value)
{
    if (offset % 4)
        return -EINVAL;
    /* full fence: shared-memory stores before the doorbell (pairs with the woken peer's fence) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return pwrite_full(device_fd, &value, 4, offset);
}

int ivshm_mmio_map(int fd, uint64_t offset, size_t size, int writable, uintptr_t *addr)
{
    void *p;

    if (size == 0)
        return -EINVAL;
    p = mmap(NULL, size, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, (off_t)offset);
    if (p == MAP_FAILED)
        return -errno;
    *addr = (uintptr_t)p;
    return 0;
}

int ivshm_mmio_unmap(uintptr_t addr, size_t size)
{
    if (addr == 0 || size == 0)
        return -EINVAL;
    return munmap((void *)addr, size) == 0 ? 0 : -errno;
}

int ivshm_mmio_read32(uintptr_t base, size_t size, uint32_t off, uint32_t *value)
{
    if (base == 0 || off % 4 || (size_t)off + 4 > size)
        return -EINVAL;
    *value = *(volatile const uint32_t *)(base + off);
    return 0;
}

int ivshm_mmio_write32(uintptr_t base, size_t size, uint32_t off, uint32_t value)
{
    if (base == 0 || off % 4 || (size_t)off + 4 > size)
        return -EINVAL;
    /* full fence: shared-memory stores before the doorbell (pairs with the woken peer's fence) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *(volatile uint32_t *)(base + off) = value;
    return 0;
}

int ivshm_mmio_doorbell(uintptr_t bar0, uint32_t peer, uint32_t vector)
{
    if (peer > 0xffffu || vector > 0xffffu)
        return -EINVAL;
    return ivshm_mmio_write32(bar0, IVSHM_BAR0_SIZE, IVSHM_REG_DOORBELL, peer << 16 | vector);
}

int ivshm_poll_timer_create(uint32_t interval_us, int *fd)
{
    struct itimerspec its;
    int t;

    if (interval_us == 0)
        return -EINVAL;
    t = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (t < 0)
        return -errno;
    memset(&its, 0, sizeof its);
    its.it_interval.tv_sec = interval_us / 1000000u;
    its.it_interval.tv_nsec = (long)(interval_us % 1000000u) * 1000;
    its.it_value = its.it_interval;
    if (timerfd_settime(t, 0, &its, NULL) < 0) {
        int rc = -errno;
        close(t);
        return rc;
    }
    *fd = t;
    return 0;
}
