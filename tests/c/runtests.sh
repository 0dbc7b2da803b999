#!/bin/sh
# runtests.sh VARIANT BINDIR - run every C test program built for one variant and count results.
#
# Each program prints "PASS name (...)" / "FAIL name: why" / "SKIP name (why)" lines.  A program
# that exits non-zero without a FAIL line (a sanitizer report, a crash, the time limit) counts as
# one failure.  The last line is "VARIANT: N passed, M failed"; the exit status is 0 only if M = 0.
set -u
cd "$(dirname "$0")"
variant=$1
bindir=$2
limit=${IVSHM_TEST_TIMEOUT:-600}
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT INT TERM
for prog in test_spsc test_mpmc test_region test_hostile test_chan test_wake test_bell test_pubsub test_guard replay_region replay_rings; do
    exe=$bindir/$prog
    case $prog in
        replay_*)
            name=${prog#replay_}
            args="-n $prog-corpus -r ${REPLAY_RUNS:-20000} corpus/$name"
            [ -f "corpus/$name.pack" ] && args="$args corpus/$name.pack" ;;
        *) args="" ;;
    esac
    echo "== $variant/$prog"
    # TSan: report races as failures; ASan/UBSan abort on the first report anyway
    REPLAY_CRASH_FILE="$bindir/crash-$prog-input" \
    TSAN_OPTIONS="halt_on_error=1 exitcode=66 ${TSAN_OPTIONS:-}" \
    UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1 ${UBSAN_OPTIONS:-}" \
        timeout "$limit" "$exe" $args >"$log" 2>&1
    rc=$?
    cat "$log"
    p=$(grep -c '^PASS ' "$log")
    f=$(grep -c '^FAIL ' "$log")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        if [ "$rc" -eq 124 ]; then why="did not finish within $limit s"; else why="exited with status $rc"; fi
        echo "FAIL $prog: $why (see the output above)"
        f=1
    fi
    passed=$((passed + p))
    failed=$((failed + f))
done
echo "$variant: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
