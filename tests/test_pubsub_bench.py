"""The publish-subscribe benchmark (pyivshmem/bench/pubsub.py) runs and checks its own figures:
every subscriber must get every message of a lossless run, or it raises."""
import json

import pytest


@pytest.mark.timeout(120)
def test_pubsub_bench_quick_run(tmp_path, capsys):
    from pyivshmem.bench import pubsub

    out = tmp_path / "r.json"
    assert pubsub.main(["--quick", "--subscribers", "2", "--sizes", "64", "--modes",
                        "copy,zero-copy", "--peers", "pyivshmem", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["subscribers"], r["size"], r["mode"]) for r in rows] == [(2, 64, "copy"),
                                                                       (2, 64, "zero-copy")]
    assert all(r["pyivshmem"]["rate"] > 0 and r["pyivshmem"]["p99"] >= r["pyivshmem"]["p50"] > 0
               for r in rows)
    assert "2 sub" in capsys.readouterr().out


def test_pubsub_bench_refuses_sizes_below_the_stamp():
    from pyivshmem.bench import pubsub

    with pytest.raises(SystemExit):
        pubsub.main(["--sizes", "8"])


def test_pyivshmem_bench_pubsub_dispatches(capsys):
    from pyivshmem.bench import main

    with pytest.raises(SystemExit) as e:
        main(["pubsub", "--help"])
    assert e.value.code == 0
    assert "iceoryx2" in capsys.readouterr().out
