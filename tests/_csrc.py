"""The C core's source list for tests that compile C programs: csrc/core.mk holds it once."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def c_core_sources():
    """File names of the C core's sources (relative to csrc/)."""
    with open(os.path.join(ROOT, "csrc", "core.mk")) as f:
        for line in f:
            if line.startswith("CORE_SRCS"):
                return line.split(":=", 1)[1].split()
    raise RuntimeError("csrc/core.mk has no CORE_SRCS line")


def c_lib_sources():
    """File names (relative to csrc/) of everything libivshm.a holds: the core plus the extras
    for C programs (LIB_EXTRA_SRCS: doorbells, the server protocol, the host peer)."""
    out = list(c_core_sources())
    with open(os.path.join(ROOT, "csrc", "core.mk")) as f:
        for line in f:
            if line.startswith("LIB_EXTRA_SRCS"):
                return out + line.split(":=", 1)[1].split()
    raise RuntimeError("csrc/core.mk has no LIB_EXTRA_SRCS line")


def build_example(name, out_dir, *, lib=False, static=False, warnings=()):
    """Compile examples/c/<name>.c with the C core (``lib``: with everything libivshm.a holds) into
    ``out_dir``; the executable's path.  Skips the calling test without a C compiler or the source
    tree; fails it, with the compiler's output, when the example does not build.  ``static``: try
    a static executable first (for a guest, which lacks the host's libc when libc.a is missing)."""
    import shutil
    import subprocess

    import pytest

    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    csrc = os.path.join(ROOT, "csrc")
    src = os.path.join(ROOT, "examples", "c", name + ".c")
    if not cc or not os.path.isfile(src) or not os.path.isfile(os.path.join(csrc, "core.mk")):
        pytest.skip(f"needs the source tree (csrc/, examples/c/{name}.c) and a C compiler")
    out = os.path.join(str(out_dir), name)
    sources = [src] + [os.path.join(csrc, f) for f in (c_lib_sources() if lib else c_core_sources())]
    p = None
    for link in ((["-static"], []) if static else ([],)):
        p = subprocess.run([cc, "-std=gnu11", "-O2", *warnings, *link, "-I", csrc, *sources, "-o", out],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode == 0:
            return out
    pytest.fail(f"cannot build examples/c/{name}.c:\n{p.stdout}")
