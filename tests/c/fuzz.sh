#!/bin/sh
# fuzz.sh SECONDS HARNESS... - run each libFuzzer harness (built by `make fuzz-build`) for a fixed
# time, starting from the seeds in corpus/<name>/ plus what earlier runs found (bin/fuzz/corpus-<name>/,
# filled from corpus/<name>.pack on a fresh checkout).  Prints the executions run per harness and exits non-zero if any
# harness crashed, timed out or broke an invariant: its input is then in bin/fuzz/artifacts-<name>/;
# copy it into corpus/<name>/ so that every C test run replays it from then on.
set -u
cd "$(dirname "$0")"
seconds=$1
shift
total=0
bad=0
for h in "$@"; do
    name=${h#fuzz_}
    mkdir -p "bin/fuzz/corpus-$name" "bin/fuzz/artifacts-$name"
    # start from what earlier fuzzing found (committed as a pack) on a fresh checkout
    if [ -f "corpus/$name.pack" ] && [ -z "$(ls -A "bin/fuzz/corpus-$name")" ]; then
        python3 make_seeds.py unpack "corpus/$name.pack" "bin/fuzz/corpus-$name" >/dev/null
    fi
    log="bin/fuzz/$h.log"
    echo "== $h: $seconds s"
    ./bin/fuzz/"$h" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="bin/fuzz/artifacts-$name/" "bin/fuzz/corpus-$name" "corpus/$name" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | sed -n 's/.*cov: \([0-9]*\).*ft: \([0-9]*\).*corp: \([0-9]*\).*/cov \1, features \2, corpus \3/p')
    if [ "$rc" -ne 0 ]; then
        bad=$((bad + 1))
        tail -n 60 "$log"
        echo "FAIL $h: exit status $rc after ${execs:-?} executions; input saved in bin/fuzz/artifacts-$name/"
        echo "     reproduce: bin/fuzz/$h bin/fuzz/artifacts-$name/<file>; then add it to corpus/$name/"
    else
        echo "$h: ${execs:-0} executions in $seconds s, 0 crashes (${cov:-no coverage line})"
    fi
    total=$((total + ${execs:-0}))
done
echo "fuzz: $total executions, $bad harness(es) failed"
[ "$bad" -eq 0 ]
