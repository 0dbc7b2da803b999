"""cffi build script (API mode, out-of-line) for pyivshmem._ffi_vfio: csrc/ivshm_vfio.c.

The guest side of an ivshmem PCI device: VFIO ioctls, BAR0 register access, the polling timer.
"""
import importlib.util
import os

from cffi import FFI


def _build_helpers():
    # load pyivshmem/_build/__init__.py by path: importing the package would need the extension
    # modules this build is about to produce
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_pyivshmem_build", os.path.join(here, "__init__.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_b = _build_helpers()
_cflags, _ldflags = _b.compile_flags()

ffibuilder = FFI()
ffibuilder.cdef(
    """
#define IVSHM_REG_INTRMASK ...
#define IVSHM_REG_INTRSTATUS ...
#define IVSHM_REG_IVPOSITION ...
#define IVSHM_REG_DOORBELL ...
#define IVSHM_BAR0_SIZE ...
#define IVSHM_VFIO_BAR0_INDEX ...
#define IVSHM_VFIO_BAR1_INDEX ...
#define IVSHM_VFIO_BAR2_INDEX ...
#define IVSHM_VFIO_CONFIG_INDEX ...
#define IVSHM_VFIO_MSIX_INDEX ...
#define IVSHM_VFIO_REGION_READ ...
#define IVSHM_VFIO_REGION_WRITE ...
#define IVSHM_VFIO_REGION_MMAP ...

enum ivshm_vfio_stage {
    IVSHM_VFIO_OK,
    IVSHM_VFIO_STAGE_CONTAINER,
    IVSHM_VFIO_STAGE_API,
    IVSHM_VFIO_STAGE_TYPE1,
    IVSHM_VFIO_STAGE_GROUP,
    IVSHM_VFIO_STAGE_GROUP_STATUS,
    IVSHM_VFIO_STAGE_VIABLE,
    IVSHM_VFIO_STAGE_SET_CONTAINER,
    IVSHM_VFIO_STAGE_SET_IOMMU,
    IVSHM_VFIO_STAGE_DEVICE,
    ...
};

struct ivshm_vfio {
    int container_fd;
    int group_fd;
    int device_fd;
    int msix_count;
};

void ivshm_vfio_init(struct ivshm_vfio *v);
int ivshm_vfio_open(struct ivshm_vfio *v, int group, const char *bdf, int *stage);
int ivshm_vfio_close(struct ivshm_vfio *v);
int ivshm_vfio_region(int device_fd, uint32_t index, uint64_t *offset, uint64_t *size, uint32_t *flags);
int ivshm_vfio_irq_info(int device_fd, uint32_t index, uint32_t *count, uint32_t *flags);
int ivshm_vfio_config_read(int device_fd, uint32_t off, uint32_t len, uint32_t *value);
int ivshm_vfio_config_write(int device_fd, uint32_t off, uint32_t len, uint32_t value);
int ivshm_vfio_enable_master(int device_fd, uint32_t *before);
int ivshm_vfio_msix_enable(struct ivshm_vfio *v, uint32_t count, int *fds);
int ivshm_vfio_msix_disable(struct ivshm_vfio *v);
int ivshm_vfio_read32(int device_fd, uint64_t offset, uint32_t *value);
int ivshm_vfio_write32(int device_fd, uint64_t offset, uint32_t value);
int ivshm_mmio_map(int fd, uint64_t offset, size_t size, int writable, uintptr_t *addr);
int ivshm_mmio_unmap(uintptr_t addr, size_t size);
int ivshm_mmio_read32(uintptr_t base, size_t size, uint32_t off, uint32_t *value);
int ivshm_mmio_write32(uintptr_t base, size_t size, uint32_t off, uint32_t value);
int ivshm_mmio_doorbell(uintptr_t bar0, uint32_t peer, uint32_t vector);
int ivshm_poll_timer_create(uint32_t interval_us, int *fd);
"""
)
ffibuilder.set_source(
    "pyivshmem._ffi_vfio",
    '#include "ivshm_vfio.h"\n',
    sources=[os.path.join(_b.CSRC, "ivshm_vfio.c")],
    include_dirs=[_b.CSRC],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
