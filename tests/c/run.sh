#!/bin/sh
# run.sh - the C tests of the core under the plain, ASan/UBSan and TSan builds.
#
# Builds bin/test, bin/asan and bin/tsan (make), runs every test program of each variant through
# runtests.sh and ends with one line "N passed, M failed"; exits non-zero on any failure or build
# error.  About a minute on two cores (see docs/hardening.md).  MSan and fuzzing are separate:
# `make msan`, `make fuzz FUZZ_SECONDS=N`.
set -u
cd "$(dirname "$0")"
start=$(date +%s)
passed=0
failed=0
if ! make -s -j2 build-test build-asan build-tsan; then
    echo "0 passed, 1 failed (build error)"
    exit 1
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT INT TERM
for v in test asan tsan; do
    make -s "$v" 2>&1 | tee "$out"
    line=$(grep -E "^$v: [0-9]+ passed, [0-9]+ failed" "$out" | tail -n 1)
    if [ -z "$line" ]; then
        echo "FAIL $v: the runner gave no summary"
        failed=$((failed + 1))
        continue
    fi
    p=$(echo "$line" | sed -E 's/.*: ([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
    passed=$((passed + p))
    failed=$((failed + f))
done
echo "C tests (test, asan, tsan) took $(( $(date +%s) - start )) s"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
