"""Text and formatters written once and used in several places (client help, bench formatters)."""
from __future__ import annotations

from pyivshmem.bench.report import fmt_ns, fmt_rate, fmt_us
from pyivshmem.client import COMMANDS, HELP, USAGE


def test_client_usage_and_help_list_the_same_commands():
    lines = [ln for ln in COMMANDS.splitlines() if ln.strip()]
    assert [ln.split()[0] for ln in lines] == ["dump", "int", "int", "int", "help", "quit"]
    for ln in lines:
        assert ln in USAGE and ln in HELP.splitlines()


def test_bench_duration_formatters_agree():
    assert fmt_ns(None) == "-"
    assert fmt_ns(3210) == f"{fmt_us(3210)} us" == "3.21 us"
    assert fmt_ns(415_000) == "415 us"
    assert fmt_ns(2_100_000) == "2.1 ms"
    assert fmt_rate(12_345_678) == "12.3M" and fmt_rate(None) == "-"
