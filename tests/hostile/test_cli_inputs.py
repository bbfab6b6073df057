"""Hostile command lines: every numeric option given extreme, malformed or huge values, and sizes
that parse but would not fit. Each ends in one line naming the option and exit status 2, before
any work, never in a traceback."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peagle_ext.cli import main

NUMERIC_OPTIONS = {
    "demo": ["--seq-len", "--depths", "--docs", "--window", "--block-size", "--seed"],
    "train-demo": ["--steps", "--seq-len", "--depths", "--seed", "--lr", "--vocab", "--hidden-size", "--layers",
                   "--sequence-partitions"],
    "bench": ["--lengths", "--depths", "--compiled-max-len", "--repeats", "--budget-s"],
    "eval": ["-k", "--max-new-tokens", "--batch-size", "--temperature", "--seed", "--target-seed", "--threads",
             "--alternatives"],
}
# An output that fails its check, so a value that happens to be valid ends in that refusal instead of work.
BAD_OUT = {"demo": ("--out", "/nonexistent-dir/mask.png"), "train-demo": ("--out", "/proc/version"),
           "bench": ("--json", "/nonexistent-dir/bench.json"),
           "eval": ("--draft", "/nonexistent-dir", "--target", "tiny", "--prompts", "/nonexistent-dir/p.txt")}

HOSTILE_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "3000000000", "2147483648", "18446744073709551615", "-9223372036854775809",
                     "1e9", "nan", "inf", "-inf", "", " ", "0x10", "1_000", "abc", "9" * 5000, "\x00", "--",
                     "1.5", "-0"]),
    st.integers(-2**80, 2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)


@settings(max_examples=120)
@given(st.sampled_from([(command, option) for command, options in NUMERIC_OPTIONS.items() for option in options]),
       HOSTILE_VALUES)
def test_every_numeric_option_refuses_hostile_values_in_one_line(capsys, command_option, value):
    command, option = command_option
    capsys.readouterr()
    device = [] if command == "eval" else ["--device", "cpu"]
    status = main([command, f"{option}={value}", *BAD_OUT[command], *device])
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err and err.count("\n") == 1, err
    named = re.match(rf"python -m peagle_ext {command}: error: argument ([^ :]+)", err)
    assert named, err
    assert option in named.group(1).split("/") or named.group(1) == BAD_OUT[command][0], err


@pytest.mark.parametrize(
    ("argv", "option", "says"),
    [
        (["demo", "--seq-len", "3000000000"], "--seq-len", "must be <= 2147483647"),
        (["demo", "--seq-len", "2000000000"], "--seq-len/--depths/--block-size", "more than 2147483647 COD elements"),
        (["demo", "--seq-len", "1000000", "--block-size", "1"], "--seq-len/--depths/--block-size",
         "GiB, more than the"),
        (["train-demo", "--seq-len", "1000000"], "--seq-len/--hidden-size/--layers/--vocab", "GiB, more than the"),
        (["train-demo", "--vocab", "2147483647"], "--seq-len/--hidden-size/--layers/--vocab", "GiB, more than the"),
        (["train-demo", "--layers", "257"], "--layers", "must be <= 256"),
        (["train-demo", "--out", "/proc/new-checkpoint"], "--out", "cannot write in /proc"),
    ],
)
def test_sizes_past_the_machine_are_refused_before_any_work(capsys, tmp_path, argv, option, says):
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / ("mask.png" if argv[0] == "demo" else "ckpt"))]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: " in err and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "mask.png").exists()


def test_train_demo_never_replaces_a_directory_of_other_things(capsys, tmp_path):
    """--out holding other files (not a draft checkpoint) is refused even with --overwrite; a
    checkpoint with neighbours is replaced with --overwrite, its neighbours kept."""
    other = tmp_path / "work"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["train-demo", "--out", str(other), "--device", "cpu", *extra]) == 2
        assert "holds other files and is not a draft checkpoint" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    run = ["train-demo", "--steps", "1", "--seq-len", "12", "--depths", "2", "--device", "cpu", "--out"]
    checkpoint = tmp_path / "ckpt"
    assert main([*run, str(checkpoint)]) == 0
    (checkpoint / "tokenizer.json").write_text("{}")
    (checkpoint / "runs").mkdir()
    (checkpoint / "runs" / "log.txt").write_text("step 1")
    assert main([*run, str(checkpoint), "--overwrite"]) == 0
    assert sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")) == [
        "config.json", "model.safetensors", "runs", "runs/log.txt", "tokenizer.json"]
