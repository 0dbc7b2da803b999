"""``python -m pyivshmem.server``: the same as ``pyivshmem-server``."""
import sys

from .cli import main

sys.exit(main())
