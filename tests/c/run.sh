#!/bin/sh
# run.sh - the C tests of the core under the plain, ASan/UBSan and TSan builds (and MSan when
# clang is there).
#
# Builds bin/<variant> (make), runs every test program of each variant through runtests.sh and
# ends with one line "N passed, M failed"; exits non-zero on any failure or build error.  About a
# minute and a half on two cores (see docs/hardening.md).  Fuzzing and the soak are separate:
# `make fuzz FUZZ_SECONDS=N`, `make soak`.  IVSHM_VARIANTS="test asan" picks variants.
set -u
cd "$(dirname "$0")"
start=$(date +%s)
passed=0
failed=0
variants=${IVSHM_VARIANTS:-test asan tsan msan}
if ! command -v "${CLANG:-clang}" >/dev/null 2>&1; then
    variants=$(echo "$variants" | sed 's/msan//')
    echo "(no clang: MemorySanitizer build skipped)"
fi
builds=""
for v in $variants; do builds="$builds build-$v"; done
# shellcheck disable=SC2086
if ! make -s -j2 $builds; then
    echo "0 passed, 1 failed (build error)"
    exit 1
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT INT TERM
for v in $variants; do
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
echo "C tests ($(echo $variants | tr ' ' ',')) took $(( $(date +%s) - start )) s"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
