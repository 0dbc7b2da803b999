"""cffi build scripts (API mode, out-of-line).  Each ffi_*.py defines `ffibuilder`."""
import os

# relative to the working directory (the project root during a build): setuptools refuses
# absolute source paths when it builds a wheel
CSRC_ABS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "csrc")
CSRC = os.path.relpath(CSRC_ABS)


def compile_flags():
    """The same debug/sanitizer switches as setup.py, for cffi modules."""
    cflags = ["-std=gnu11", "-Wall", "-Wno-unused-parameter", "-Wno-unused-function"]
    ldflags = []
    cflags += ["-O0", "-g"] if os.environ.get("PYIVSHMEM_DEBUG") else ["-O2"]
    san = os.environ.get("PYIVSHMEM_SANITIZE")
    if san:
        cflags += ["-fsanitize=" + san, "-fno-omit-frame-pointer", "-g"]
        ldflags += ["-fsanitize=" + san]
    return cflags, ldflags



def cdef_from_header(name, *, defines=None):
    """The cffi ``cdef`` text for csrc/``name``, taken from the header itself (never a copy).

    When the header marks a region with ``/* cffi:begin`` ... ``/* cffi:end */`` comments, only
    that region is used; otherwise the whole header.  Comments are dropped; object-like
    ``#define NAME value`` lines become ``#define NAME ...`` (cffi takes the value from the
    compiled header), other preprocessor lines (include guards, ``#include``, ``extern "C"``
    brackets) are dropped.  ``defines``: keep only these constants and nothing else (for a header
    such as the layout's, whose inline functions cffi cannot parse)."""
    import re

    with open(os.path.join(CSRC_ABS, name)) as f:
        text = f.read()
    begin = re.search(r"/\*\s*cffi:begin\b.*?\*/", text, re.S)
    if begin:
        end = text.find("cffi:end", begin.end())
        if end < 0:
            raise RuntimeError(f"csrc/{name}: cffi:begin without cffi:end")
        text = text[begin.end():text.rfind("/*", 0, end)]
    # comments out (keeping line breaks), then line by line
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out = []
    skip_brace = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            m = re.match(r"#\s*define\s+([A-Za-z_]\w*)(\s+(.*))?$", s)
            if m and m.group(3) and '"' not in m.group(3) and (defines is None or m.group(1) in defines):
                out.append(f"#define {m.group(1)} ...")
            if s.startswith("#ifdef __cplusplus"):
                skip_brace = True
            continue
        if defines is not None:
            continue
        if s == 'extern "C" {':
            continue
        if skip_brace and s == "}":
            skip_brace = False
            continue
        out.append(line)
    if defines is not None:
        missing = set(defines) - {ln.split()[1] for ln in out}
        if missing:
            raise RuntimeError(f"csrc/{name} defines none of {sorted(missing)}")
    return "\n".join(out) + "\n"
