"""The command line: demo, info, bench, and the usage text."""

from __future__ import annotations

import json

import pytest

from peagle_ext.__main__ import main


def test_demo_checks_against_create_block_mask_and_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the picture needs matplotlib (the 'plot' extra)")
    picture = tmp_path / "mask.png"
    assert main(["demo", "--seq-len", "512", "--docs", "3", "--window", "64", "--out", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "identical partial and full blocks" in out
    assert "speedup" in out and "sparsity" in out
    assert picture.stat().st_size > 1000


def test_demo_says_when_the_check_is_skipped(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("peagle_ext.benchmark.eager_fits", lambda n, device: False)
    assert main(["demo", "--seq-len", "256", "--out", str(tmp_path / "m.png")]) == 0
    assert "check skipped: create_block_mask would need" in capsys.readouterr().out


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "available backends:" in out and "python" in out and "compiled kernels:" in out


def test_bench_prints_table_and_writes_json(tmp_path, capsys):
    result = tmp_path / "bench.json"
    assert main(["bench", "--lengths", "256", "--repeats", "1", "--no-memory", "--json", str(result)]) == 0
    out = capsys.readouterr().out
    assert "x eager" in out and "create_block_mask" in out
    rows = json.loads(result.read_text())["rows"]
    assert rows[0]["seq_len"] == 256 and rows[0]["methods"]["python"]["median_s"] > 0


def test_bench_measures_peak_memory_in_a_subprocess():
    from peagle_ext.benchmark import peak_memory_bytes

    assert peak_memory_bytes("python", 256, 4, "cpu") is not None


def test_usage_on_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "demo" in capsys.readouterr().out
