"""Errors an embedded Server raises when it cannot start are pyivshmem errors (IvshmemError,
and still the builtin OSError a caller would catch), and say what was wrong and what to do."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pyivshmem.errors import IvshmemError
from pyivshmem.server import Server


@pytest.mark.parametrize(
    "where,kw,err,hint",
    [
        ("socket in a missing directory", {"socket_path": "{tmp}/missing/s.sock"},
         errno.ENOENT, "create it"),
        ("memory in a missing directory", {"shm_dir": "{tmp}/missing"}, errno.ENOENT,
         "create it"),
        ("memory file in a missing directory", {"shm_path": "{tmp}/missing/mem"}, errno.ENOENT,
         "create it"),
        ("memory file that is a directory", {"shm_path": "{tmp}"}, errno.EISDIR,
         "is a directory"),
        ("memory directory that is a file", {"shm_dir": "{tmp}/file"}, errno.ENOTDIR,
         "not a directory"),
    ],
)
def test_a_server_that_cannot_start_raises_an_ivshmem_error(tmp_path, where, kw, err, hint):
    (tmp_path / "file").write_bytes(b"")
    args = {"socket_path": str(tmp_path / "s.sock")}
    for k, v in kw.items():
        args[k] = v.format(tmp=tmp_path)
    server = Server(args.pop("socket_path"), **args)
    with pytest.raises(IvshmemError) as info:
        server.listen()
    assert isinstance(info.value, OSError), where
    assert info.value.errno == err, (where, info.value)
    assert hint in str(info.value), (where, str(info.value))
    assert not os.path.lexists(tmp_path / "s.sock")


def test_running_out_of_fds_at_start_is_an_ivshmem_error(tmp_path):
    """With no fd left for the eventfd, the pipe or the selector, listen() fails with a pyivshmem
    error that names the limit (checked in a child, whose fd limit can be lowered safely)."""
    code = textwrap.dedent(f"""
        import os, resource, sys
        from pyivshmem.errors import IvshmemError
        from pyivshmem.server import Server
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        server = Server({str(tmp_path / "s.sock")!r}, size=4096)
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 2, hard))  # socket + memory only
        try:
            server.listen()
        except IvshmemError as exc:
            print("IVSHMEM", type(exc).__name__, exc)
        except Exception as exc:
            print("OTHER", type(exc).__name__, exc)
        else:
            print("STARTED")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("IVSHMEM"), r
    assert "file descriptors" in r.stdout, r.stdout
    assert not os.path.lexists(tmp_path / "s.sock")


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the server as another user")
def test_another_users_stale_socket_is_named_with_the_remedy():
    import pwd
    import socket
    import tempfile

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    sticky = tempfile.mkdtemp(prefix="pyivshmem-sticky-", dir="/tmp")
    try:
        os.chmod(sticky, 0o1777)                     # like /tmp
        path = os.path.join(sticky, "ivshmem.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)                                 # root's socket, nobody listening: stale
        s.close()
        os.chmod(path, 0o777)                        # anyone may connect: the probe is refused
        # The server drops to nobody after its imports: nobody need not be able to read the
        # interpreter's installation (under /root when CI installs into pyenv's Python).
        code = textwrap.dedent(f"""
            import os, sys
            import pyivshmem.cli, pyivshmem.server
            os.setgroups([])
            os.setgid({nobody.pw_gid})
            os.setuid({nobody.pw_uid})
            assert os.geteuid() == {nobody.pw_uid}
            sys.exit(pyivshmem.cli.main(["server", "-F", "-S", {path!r}, "-m", {sticky!r},
                                         "-l", "64K"]))
        """)
        r = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 1, r
        assert "stale socket file" in r.stderr and "uid 0" in r.stderr, r.stderr
        assert "choose another socket path" in r.stderr
        assert os.path.exists(path)                  # still root's
    finally:
        shutil.rmtree(sticky, ignore_errors=True)


@pytest.mark.timeout(60)
def test_serve_forever_with_signals_outside_the_main_thread_is_refused_before_listening(tmp_path):
    import threading

    from pyivshmem.errors import ConfigError

    path = tmp_path / "s.sock"
    server = Server(str(path), size=4096)
    caught = []

    def run() -> None:
        try:
            server.serve_forever(handle_signals=True)
        except Exception as exc:
            caught.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert len(caught) == 1 and isinstance(caught[0], ConfigError), caught
    assert "main thread" in str(caught[0])
    assert not path.exists()             # nothing was bound or created
    server.close()
