#!/usr/bin/env python3
"""The bridge against ZeroMQ used directly, over loopback, in one run with alternated trials:
`python3 bench/bridge_bench.py --help` (the code is pyivshmem/bench/bridge.py, installed with the
package as `python -m pyivshmem.bench.bridge`)."""
import sys

from pyivshmem.bench.bridge import main

if __name__ == "__main__":
    sys.exit(main())
