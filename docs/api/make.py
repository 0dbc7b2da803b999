"""Build pyivshmem's API reference (HTML) from its docstrings and its .pyi stubs, with pdoc.

    pip install . pdoc
    python docs/api/make.py [OUTPUT_DIR]        # default: docs/api/html (not committed)

It documents the *installed* package (the compiled modules carry the docstrings, and pdoc takes
their signatures and types from pyivshmem/_ring.pyi), so run it with the interpreter of an
environment where pyivshmem is installed.  Any warning pdoc gives (an annotation it cannot
resolve, a stub that does not match the module, a broken cross-reference) fails the build:
CI (.ci/packaging.sh) runs it.
"""
import inspect
import os
import sys
import warnings
from pathlib import Path

# The public modules.  pyivshmem's __all__ lists the classes it re-exports (Region, the rings and
# Channel come from the compiled module pyivshmem._ring); pdoc follows __all__ and so documents no
# submodule unless it is named here.  The command-line modules (cli, client, info, bench) are
# documented by their --help, not here.
MODULES = [
    "pyivshmem",
    "pyivshmem.errors",
    "pyivshmem.doorbell",
    "pyivshmem.peer",
    "pyivshmem.server",
    "pyivshmem.pci",
    "pyivshmem.bridge",
]


def _namedtuple_constructors(modules):
    """Give each NamedTuple's generated ``__new__`` its class's module.

    collections.namedtuple compiles ``__new__`` in a scratch namespace (``__module__`` is
    "namedtuple_<Name>"), so pdoc cannot resolve postponed annotations (``from __future__ import
    annotations``) of its parameters and warns (pdoc issue #765).  Only this process sees the
    change."""
    import importlib

    for name in modules:
        for obj in vars(importlib.import_module(name)).values():
            new = getattr(obj, "__new__", None)
            if (isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")
                    and getattr(new, "__module__", "").startswith("namedtuple_")):
                new.__module__ = obj.__module__


def _stub_types_for_reexports():
    """Let re-exported names carry their stub's types.

    pdoc reads a module's own ``.pyi`` only: ``pyivshmem`` re-exports Region, the rings, Channel
    and parse_size from the compiled ``pyivshmem._ring``, whose types are in ``_ring.pyi``, so
    without this their signatures would show no types.  After pdoc's own stub pass over a module,
    each member taken from another module gets the signatures and annotations that module's
    documentation (stub applied) has for it."""
    import pdoc.doc
    import pdoc.doc_pyi

    own = pdoc.doc_pyi.include_typeinfo_from_stub_files

    def copy_types(target, source):
        if isinstance(target, pdoc.doc.Function) and isinstance(source, pdoc.doc.Function):
            target.signature = merged_signature(source, target.signature)
            target.funcdef = source.funcdef
        elif isinstance(target, pdoc.doc.Variable) and isinstance(source, pdoc.doc.Variable):
            target.annotation = source.annotation
        elif isinstance(target, pdoc.doc.Class) and isinstance(source, pdoc.doc.Class):
            for name, member in target.members.items():
                if name in source.members:
                    copy_types(member, source.members[name])

    class StubDefault:
        """A default the stub writes as ``...`` and the compiled function does not report."""

        def __repr__(self):
            return "..."

    def merged_signature(stub, runtime):
        """The stub's signature, with the defaults a stub writes as ``...`` taken from the
        compiled function's own signature (Cython reports one for most functions)."""
        actual = runtime.parameters

        def default(p):
            if p.default is not Ellipsis:
                return p
            if p.name in actual and actual[p.name].default is not inspect.Parameter.empty:
                return p.replace(default=actual[p.name].default)
            return p.replace(default=StubDefault())

        return stub.signature.replace(
            parameters=[default(p) for p in stub.signature.parameters.values()])

    def with_reexports(module):
        own(module)
        for member in module.members.values():
            origin, qualname = member.taken_from
            if origin == module.modulename or not origin.startswith("pyivshmem."):
                continue
            source = pdoc.doc.Module.from_name(origin).get(qualname)
            if source is not None:
                copy_types(member, source)

    pdoc.doc_pyi.include_typeinfo_from_stub_files = with_reexports


def main(argv):
    out = Path(argv[0] if argv else Path(__file__).resolve().parent / "html")
    try:
        import pdoc
        import pdoc.render
    except ImportError:
        print("docs/api/make.py: pdoc is not installed (pip install pdoc)", file=sys.stderr)
        return 2
    import pyivshmem

    here = Path(__file__).resolve().parents[2]
    if Path(pyivshmem.__file__).resolve().parent == here / "pyivshmem" and not list(
            (here / "pyivshmem").glob("_ring*.so")):
        print(f"docs/api/make.py: {pyivshmem.__file__} is the source tree without its compiled "
              f"modules; install the package (pip install .) and run from another directory",
              file=sys.stderr)
        return 2

    _namedtuple_constructors(MODULES)
    _stub_types_for_reexports()
    import pdoc.doc_pyi

    if pdoc.doc_pyi.find_stub_file("pyivshmem._ring") is None:
        print("docs/api/make.py: pdoc cannot find pyivshmem/_ring.pyi on sys.path (an editable "
              "install?); install the package with `pip install .`", file=sys.stderr)
        return 2
    pdoc.render.configure(
        docformat="restructuredtext",
        show_source=False,
        footer_text=f"pyivshmem {pyivshmem.__version__}",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*MODULES, output_directory=out)
    # only pdoc's own warnings count: those of libraries it imports are not the reference's
    problems = [w for w in caught if "pdoc" in (w.filename or "") or issubclass(w.category, UserWarning)]
    for w in problems:
        print(f"warning: {w.message} ({os.path.basename(w.filename)}:{w.lineno})", file=sys.stderr)
    if problems:
        print(f"docs/api/make.py: {len(problems)} warning(s); the reference must build cleanly",
              file=sys.stderr)
        return 1
    pages = sorted(p.name for p in out.rglob("*.html"))
    print(f"API reference: {len(pages)} pages in {out} (open {out / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
