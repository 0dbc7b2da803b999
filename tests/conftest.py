import os
import uuid

import pytest


@pytest.fixture
def shm_path():
    """A unique /dev/shm path, removed after the test."""
    path = f"/dev/shm/pyivshmem-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield path
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@pytest.fixture
def region(shm_path):
    from pyivshmem import Region

    r = Region.create(shm_path, "4M")
    yield r
    r.close()
