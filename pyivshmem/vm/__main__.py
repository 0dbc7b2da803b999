"""``python -m pyivshmem.vm build|smoke|probe`` (see :func:`pyivshmem.vm.harness.main`)."""
import sys

from .harness import main

sys.exit(main())
