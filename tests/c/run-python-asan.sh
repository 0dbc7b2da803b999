#!/bin/sh
# run-python-asan.sh [PYTEST ARGS...] - a chosen part of the Python test suite under ASan/UBSan.
#
# Builds a copy of the package with PYIVSHMEM_SANITIZE=address,undefined (setup.py) in
# build/pyasan/ (ignored by git and by pytest's collection; the source tree's own build is left
# alone), then runs pytest there with
# libasan preloaded into CPython (which is not instrumented itself; leak checking is off, as
# CPython keeps memory until exit), PYTHONMALLOC=malloc so that Python objects live in ASan's heap,
# and every sanitizer report written to a log file.  Child processes (spawned tests, the malicious
# peer, crash tests) inherit all of it.  Exits non-zero if pytest fails or any process of the run
# wrote a sanitizer report.  Without arguments it runs DEFAULT_TESTS below.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=$root/build/pyasan
logs=$build/logs
PYTHON=${PYTHON:-python3}
CC=${CC:-gcc}
DEFAULT_TESTS="tests/test_hostile_memory.py tests/test_malicious_peer.py tests/test_crash.py
tests/test_fuzz_python.py tests/test_rings.py tests/test_region.py tests/test_cross_process.py
tests/test_chan_wakeup.py tests/test_channel.py tests/test_mapping_lifetime.py tests/test_ring_defects.py
tests/test_ring_model.py tests/test_mpmc_kill.py tests/test_region_lost.py tests/test_send_many_changing_list.py
tests/test_uninitialised_objects.py tests/test_subscriber_close.py tests/test_close_wakes_channels.py"
start=$(date +%s)

rm -rf "$build"
mkdir -p "$build" "$logs"
# the sources only: no compiled modules, no generated C, no earlier build products
(cd "$root" && tar cf - --exclude='*.so' --exclude='pyivshmem/_ring.c' --exclude='__pycache__' \
    --exclude='tests/c/bin' --exclude='build' csrc pyivshmem tests setup.py pyproject.toml README.md \
    $( [ -d examples ] && echo examples )) | (cd "$build" && tar xf -) || exit 1
echo "== building the extension with -fsanitize=address,undefined in $build"
if ! (cd "$build" && PYIVSHMEM_SANITIZE=address,undefined CC="$CC" "$PYTHON" setup.py -q build_ext --inplace \
        >"$logs/build.txt" 2>&1); then
    tail -n 40 "$logs/build.txt"
    echo "FAIL: the sanitizer build failed"
    exit 1
fi
libasan=$("$CC" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
    echo "FAIL: $CC has no libasan.so ($libasan)"
    exit 1
fi

if [ $# -eq 0 ]; then
    # shellcheck disable=SC2086
    set -- -q -p no:cacheprovider $DEFAULT_TESTS
fi
echo "== pytest $* (libasan preloaded)"
(cd "$build" && \
    LD_PRELOAD="$libasan" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=0:log_path=$logs/asan" \
    UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$logs/ubsan" \
    PYTHONMALLOC=malloc PYTHONPATH="$build" PYTHONDONTWRITEBYTECODE=1 \
    "$PYTHON" -m pytest "$@")
rc=$?

reports=$(find "$logs" -name 'asan.*' -o -name 'ubsan.*' | sort)
if [ -n "$reports" ]; then
    for f in $reports; do
        echo "== sanitizer report $f"
        cat "$f"
    done
    echo "FAIL: $(echo "$reports" | wc -l) sanitizer report(s)"
    rc=1
fi
echo "Python tests under ASan/UBSan took $(( $(date +%s) - start )) s (pytest exit status $rc)"
[ "$rc" -eq 0 ] && echo "no sanitizer reports"
exit "$rc"
