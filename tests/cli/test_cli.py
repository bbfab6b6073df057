"""The command line: demo, info, bench, train-demo; every usage mistake as one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from peagle_ext.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args, cwd=ROOT):
    """`python -m peagle_ext ARGS` in a fresh process, from the repository root by default."""
    return subprocess.run([sys.executable, "-m", "peagle_ext", *args], capture_output=True, text=True, cwd=cwd)


def test_demo_checks_against_create_block_mask_and_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the picture needs matplotlib (the 'plot' extra)")
    picture = tmp_path / "mask.png"
    assert main(["demo", "--seq-len", "512", "--docs", "3", "--window", "64", "--out", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "identical partial and full blocks" in out
    assert "sparsity" in out and "x faster" in out
    # Both sides timed warm: each line says so.
    assert out.count("warm calls after a warm-up") == 2
    assert f"PNG picture of the tile layout written to {picture}" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_writes_exactly_the_path_it_names(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the picture needs matplotlib (the 'plot' extra)")
    assert main(["demo", "--seq-len", "64", "--out", str(tmp_path / "x")]) == 0
    assert f"PNG picture of the tile layout written to {tmp_path / 'x'}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_demo_says_when_the_check_is_skipped(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("peagle_ext._measure.eager_fits", lambda n, device: False)
    assert main(["demo", "--seq-len", "256", "--out", str(tmp_path / "m.png")]) == 0
    assert "check skipped: create_block_mask would need" in capsys.readouterr().out


def test_info_from_the_repository_root_finds_the_installed_kernels():
    """The checkout's root puts the source tree first on sys.path; the compiled top-level module
    peagle_ext_C is still found (installed, or built in place)."""
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert f"from {os.path.join(ROOT, 'peagle_ext')}" in result.stdout  # the source tree was imported
    if os.environ.get("PEAGLE_EXT_REQUIRE_NATIVE") != "1":
        pytest.skip("PEAGLE_EXT_REQUIRE_NATIVE is not set: a pure-Python install is allowed here")
    expected = "cpu, cuda" if torch.version.cuda else "cpu"
    assert f"compiled kernels: {expected}" in result.stdout, result.stdout
    assert "available backends: " in result.stdout and "cpu" in result.stdout.split("available backends: ")[1]


def test_bench_prints_table_and_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the 'plot' extra)")
    result, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--lengths", "128", "256", "--repeats", "1", "--no-memory", "--json", str(result),
                 "--plot", str(picture), "--backends", "python"]) == 0
    captured = capsys.readouterr()
    assert "x eager" in captured.out and "create_block_mask" in captured.out
    assert "[1/4] seq_len 128" in captured.err and "[4/4] seq_len 256" in captured.err  # progress lines
    rows = json.loads(result.read_text())["rows"]
    assert [row["seq_len"] for row in rows] == [128, 256] and rows[0]["methods"]["python"]["median_s"] > 0
    assert f"written to {picture}" in captured.out and picture.read_bytes()[:4] == b"\x89PNG"


def test_bench_stopped_midway_leaves_the_lengths_it_finished(tmp_path, monkeypatch):
    """gpu_check.sh runs the benchmark under a time limit: a run stopped at the second length must
    leave the first one's figures in both files, and say which lengths are missing."""
    from peagle_ext import _measure

    measured = []

    def time_call(fn, device, repeats, budget_s):
        if len(measured) == 2:  # python and create_block_mask at 128 done: stop in the next length
            raise KeyboardInterrupt
        measured.append(fn)
        return 1e-3, 1

    monkeypatch.setattr(_measure, "time_call", time_call)
    result, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--lengths", "128", "256", "512", "--no-memory", "--backends", "python",
              "--json", str(result), "--markdown", str(markdown)])
    assert [row["seq_len"] for row in json.loads(result.read_text())["rows"]] == [128]
    text = markdown.read_text()
    assert "| 128 |" in text and "| 256 |" not in text
    assert "Not measured: seq_len 256, 512 (the run stopped before them)." in text


def test_profile_script_splits_a_build_into_host_and_ops():
    """benchmarks/profile_build.py, which gpu_check.sh runs on the GPU, here on the CPU backend."""
    script = os.path.join(ROOT, "benchmarks", "profile_build.py")
    env = dict(os.environ, PYTHONPATH=ROOT)  # as gpu_check.sh runs it: the checkout, built in place
    result = subprocess.run([sys.executable, script, "--device", "cpu", "--lengths", "512", "--builds", "3"],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert "== S = 512 (N " in result.stdout and "us per build" in result.stdout
    assert "peagle_ext::build_block_index" in result.stdout  # the op's own row in the profiler's table
    assert f"peagle_ext from {os.path.join(ROOT, 'peagle_ext')}" in result.stdout


def test_bench_peak_memory_tells_the_dense_builder_from_ours():
    """Peak memory is measured in a fresh process: eager create_block_mask materializes the N x N
    grid (N = 3441 here: ~12 M pairs), the python builder only O(N + tiles)."""
    from peagle_ext._measure import peak_memory_bytes

    ours = peak_memory_bytes("python", 1024, 8, "cpu")
    dense = peak_memory_bytes("create_block_mask", 1024, 8, "cpu")
    assert ours is not None and dense is not None
    assert 0 <= ours < 64 * 2**20
    assert dense > 3441 * 3441  # at least a byte per pair of the dense mask
    assert dense > 10 * max(ours, 2**20)


def test_bench_gpu_table_and_targets_from_figures(tmp_path, monkeypatch):
    """What gpu_check.sh writes to benchmarks/results/h200.md, from figures given here (the GPU
    measurement itself runs on a GPU only): the host-sync column, the notes, and then
    benchmarks/targets.py's verdicts, each target met or missed from the measured numbers."""
    from peagle_ext.cli import bench

    def row(seq_len, ours_s, compiled_s, syncs, matches):
        return {"seq_len": seq_len, "num_elements": 3 * seq_len, "tiles": "1x1", "methods": {
            "cuda": {"median_s": ours_s, "runs": 50, "host_syncs": syncs, "matches_cpu": matches, "peak_bytes": 2**20},
            "compiled_create_block_mask": {"median_s": compiled_s, "runs": 5, "host_syncs": 1, "compile_s": 9.5},
            "create_block_mask": {"skipped": "needs ~500 GiB for the dense mask"}}}

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    path, results = tmp_path / "h200.md", tmp_path / "h200.json"
    rows = [row(8192, 80e-6, 2e-3, 0, True), row(65536, 3e-3, 50e-3, 0, True)]
    bench.write_markdown(rows, str(path), "cuda", "python -m peagle_ext bench --device cuda")
    text = path.read_text()
    assert text.startswith("# `python -m peagle_ext bench` on NVIDIA H200")
    assert "| 8192 | 24576 | 1x1 | cuda | 0.080 | 1.0 |  | 25.0 | 0 | (same blocks as the CPU kernel) |" in text
    assert "| compiled_create_block_mask | 2.000 | - |  |  | 1 | (compile 9.5 s) |" in text
    assert "Targets" not in text and "-> met" not in text  # the package states no targets

    results.write_text(json.dumps({"rows": rows}))
    script = os.path.join(ROOT, "benchmarks", "targets.py")
    checked = subprocess.run([sys.executable, script, str(results), "--markdown", str(path)], capture_output=True,
                             text=True)
    assert checked.returncode == 1, checked.stderr  # one target missed
    text = path.read_text()
    assert "- S = 8192 in <= 100 us per build: 80.0 us -> met" in text
    assert "- >= 10x faster than compiled create_block_mask at S = 8192: 25.0x -> met" in text
    assert "- S = 65536 in <= 2 ms: 3.000 ms -> MISSED" in text
    assert "- zero host syncs (validate=False): 0 over 2 lengths -> met" in text
    assert "- the CPU kernel's blocks at every length: 2 of 2 lengths -> met" in text
    results.write_text(json.dumps({"rows": [row(8192, 150e-6, 1e-3, 1, False)]}))
    checked = subprocess.run([sys.executable, script, str(results)], capture_output=True, text=True)
    assert checked.stdout.splitlines()[1:] == [
        "- S = 8192 in <= 100 us per build: 150.0 us -> MISSED",
        "- >= 10x faster than compiled create_block_mask at S = 8192: 6.7x -> MISSED",
        "- zero host syncs (validate=False): 1 over 1 lengths -> MISSED",
        "- the CPU kernel's blocks at every length: 0 of 1 lengths -> MISSED",
    ]


def test_train_demo_runs_and_saves_a_loadable_checkpoint(tmp_path, capsys):
    from peagle_ext.draft.llama import LlamaEagle3DraftModel

    out = tmp_path / "ckpt"
    assert main(["train-demo", "--steps", "3", "--seq-len", "12", "--depths", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "3/3 loss" in captured.err and "acc/depth" in captured.err
    # What speculators would lack (no real target) is one line saying what the draft is for.
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {out} is for peagle_ext (eval --draft {out} --target tiny); speculators and vLLM need "
                     "a draft of a real target (train, or train-demo --verifier)"]
    assert "loss: first" in captured.out and f"written to {out}" in captured.out
    assert "acceptance length at K = 2" in captured.out and "trained" in captured.out
    model = LlamaEagle3DraftModel.from_pretrained(out)
    assert model.config.num_depths == 2 and model.config.parallel_drafting
    # An existing checkpoint is kept unless --overwrite is given.
    before = (out / "model.safetensors").read_bytes()
    assert main(["train-demo", "--steps", "1", "--seq-len", "12", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["train-demo", "--steps", "1", "--seq-len", "12", "--depths", "3", "--out", str(out),
                 "--overwrite", "--device", "cpu"]) == 0
    assert LlamaEagle3DraftModel.from_pretrained(out).config.num_depths == 3


NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize(
    "args, option",
    [
        (["demo", "--seq-len", "0"], "--seq-len"),
        (["demo", "--seq-len", "-5"], "--seq-len"),
        (["demo", "--seq-len", "ten"], "--seq-len"),
        (["demo", "--depths", "0"], "--depths"),
        (["demo", "--block-size", "0"], "--block-size"),
        (["demo", "--window", "0"], "--window"),
        (["demo", "--docs", "0"], "--docs"),
        (["demo", "--backend", "nope"], "--backend"),
        (["demo", "--out", "mask.xyz"], "--out"),
        (["demo", "--out", "/nonexistent-dir/mask.png"], "--out"),
        (["demo", "--out", "/"], "--out"),
        (["bench", "--lengths", "-5"], "--lengths"),
        (["bench", "--backends", "nope"], "--backends"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["bench", "--budget-s", "nan"], "--budget-s"),
        (["bench", "--json", "/proc/no/such.json"], "--json"),
        (["bench", "--plot", "/nonexistent-dir/p.png"], "--plot"),
        (["train-demo", "--hidden-size", "3"], "--hidden-size"),
        (["train-demo", "--lr", "-1"], "--lr"),
        (["train-demo", "--lr", "inf"], "--lr"),
        (["train-demo", "--device", "foo"], "--device"),
        (["train-demo", "--steps", "0"], "--steps"),
        (["train-demo", "--seq-len", "1"], "--seq-len"),
        (["train-demo", "--out", "/proc/version"], "--out"),
        (["info", "--verbose"], "--verbose"),
        pytest.param(["demo", "--device", "cuda"], "--device",
                     marks=pytest.mark.skipif(not NO_GPU, reason="a GPU is here")),
        pytest.param(["bench", "--device", "cuda"], "--device",
                     marks=pytest.mark.skipif(not NO_GPU, reason="a GPU is here")),
        pytest.param(["train-demo", "--device", "cuda"], "--device",
                     marks=pytest.mark.skipif(not NO_GPU, reason="a GPU is here")),
    ],
)
def test_usage_mistakes_give_one_line_naming_the_option(args, option, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"python -m peagle_ext {args[0]}: error:") and option in lines[0]
    assert captured.out == ""


def test_a_mistake_in_a_real_process_has_no_traceback():
    result = run_cli("bench", "--lengths", "-5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "python -m peagle_ext bench: error: argument --lengths: must be >= 1, got -5 (see --help)"
    ]


def test_usage_on_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    captured = capsys.readouterr()
    assert "unknown command 'frobnicate'" in captured.err and "demo" in captured.out


@pytest.mark.parametrize(("command", "option", "default"), [
    ("demo", "--seq-len", "4096"), ("bench", "--repeats", "25"), ("train-demo", "--lr", "3e-3"),
    ("eval", "--batch-size", "8")])
def test_options_are_not_abbreviated_and_help_shows_the_defaults(command, option, default, capsys):
    required = ["--draft", "d", "--target", "tiny", "--prompts", "p"] if command == "eval" else []
    assert main([command, *required, option[:-2], "5"]) == 2  # a prefix of an option is not that option
    assert f"unrecognized arguments: {option[:-2]}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command, "--help"])
    options = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
    option_help = options.split(f" {option} ", 1)[1].split(" --", 1)[0]
    assert f"default: {default})" in option_help or f"(default {default})" in option_help, option_help
