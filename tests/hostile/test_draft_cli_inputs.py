"""Hostile command lines for the commands that write files and decode: empty and blank paths, an
output naming an existing file or an input, prompts that are not UTF-8 or longer than the models'
positions, new-token counts and temperatures past what decoding can do. Each ends in one line
naming the option and exit status 2, before any work, and writes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from peagle_ext.cli import main

ROOT = Path(__file__).resolve().parents[2]

# Every option of every command that names a path (written or read).
PATH_OPTIONS = {
    "demo": ["--out"],
    "bench": ["--json", "--markdown", "--plot"],
    "train-demo": ["--out", "--verifier"],
    "eval": ["--draft", "--target", "--prompts", "--gguf-file", "--json"],
}
# Paths that name nothing: empty, blank, or holding a NUL byte.
NO_PATH = st.one_of(st.text(alphabet=" \t\n\r\x0b\x0c", max_size=4),
                    st.text(max_size=6).map(lambda text: text + "\x00"))


def another_models_directory(directory: Path) -> dict[str, bytes]:
    """``directory`` holding another model's config.json and model.safetensors; returns their bytes."""
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"model.embed_tokens.weight": torch.arange(32, dtype=torch.float32).view(4, 8)},
              str(directory / "model.safetensors"))
    return files_in(directory)


def files_in(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() if path.is_file() else b"<dir>"
            for path in sorted(directory.rglob("*"))}


def assert_one_line_naming(err: str, command: str, option: str) -> None:
    assert "Traceback" not in err and err.count("\n") == 1, err
    named = re.match(rf"python -m peagle_ext {command}: error: argument ([^ :]+):", err)
    assert named and option in named.group(1).split("/"), err


@pytest.mark.parametrize("out", ["", " ", "\t", ".", "./", "config.json", "model.safetensors"])
def test_train_demo_never_writes_over_another_models_files(tmp_path, out):
    """In a directory holding another model's files, an --out that is empty, blank, the directory
    itself or one of its files is refused in one line, in a real process, and every byte stays."""
    before = another_models_directory(tmp_path)
    result = subprocess.run([sys.executable, "-m", "peagle_ext", "train-demo", "--steps", "1", "--seq-len", "16",
                             "--device", "cpu", "--out", out], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_line_naming(result.stderr, "train-demo", "--out")
    assert result.stdout == ""
    assert files_in(tmp_path) == before


def test_train_demo_with_overwrite_still_refuses_an_empty_out(tmp_path):
    before = another_models_directory(tmp_path)
    result = subprocess.run([sys.executable, "-m", "peagle_ext", "train-demo", "--steps", "1", "--seq-len", "16",
                             "--device", "cpu", "--out", "", "--overwrite"], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 2 and "argument --out: must name a path" in result.stderr, result.stderr
    assert files_in(tmp_path) == before


@pytest.fixture
def eval_inputs(tmp_path):
    """A directory holding a stand-in draft (its config.json is all eval's argument checks read) and a
    prompts file: enough for every check that comes before the draft is loaded."""
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text("{}")
    (tmp_path / "prompts.txt").write_text("1 2 3\n")
    return {"--draft": str(draft), "--target": "tiny", "--prompts": str(tmp_path / "prompts.txt")}


def command_line(command: str, option: str, value: str, eval_inputs: dict) -> list[str]:
    """A command line that would run (or fail only later) but for ``option``'s ``value``, given as
    ``option=value`` so that a value starting with '-' reaches the option (as its own word argparse
    would take it for another option)."""
    if command == "eval":
        given_inputs = {**eval_inputs}
        if option == "--gguf-file":  # only with a model folder as the target
            given_inputs["--target"] = str(Path(eval_inputs["--draft"]).parent)
        given_inputs.pop(option, None)
        return ["eval", *[part for pair in given_inputs.items() for part in pair], f"{option}={value}"]
    sizes = {"demo": ["--seq-len", "64"], "bench": ["--lengths", "128", "--repeats", "1", "--backends", "python"],
             "train-demo": ["--steps", "1", "--seq-len", "16"]}[command]
    return [command, *sizes, "--device", "cpu", f"{option}={value}"]


@settings(max_examples=80)
@given(st.sampled_from([(command, option) for command, options in PATH_OPTIONS.items() for option in options]),
       NO_PATH)
@example(("demo", "--out"), "0.\x00")  # a suffix of one NUL byte: the path check, not the picture format, answers
@example(("demo", "--out"), "-\x00")  # a leading '-': the value still reaches the path check
def test_every_path_option_refuses_a_path_that_names_nothing(capsys, monkeypatch, tmp_path_factory, command_option,
                                                              value):
    """Empty, blank or NUL-holding values of every path option: one line naming the option, exit
    status 2, and nothing written in the working directory."""
    command, option = command_option
    work = tmp_path_factory.mktemp("work")
    before = another_models_directory(work)
    inputs = {}
    if command == "eval":
        inputs = {"--draft": str(work / "draft"), "--target": "tiny", "--prompts": str(work / "prompts.txt")}
        (work / "draft").mkdir()
        (work / "draft" / "config.json").write_text("{}")
        (work / "prompts.txt").write_text("1 2 3\n")
        before = files_in(work)
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert main(command_line(command, option, value, inputs)) == 2
    captured = capsys.readouterr()
    assert_one_line_naming(captured.err, command, option)
    assert "must name a path" in captured.err or "NUL byte" in captured.err, captured.err
    assert captured.out == ""
    assert files_in(work) == before


@pytest.mark.parametrize(("argv", "option", "says"), [
    (["bench", "--json", "r.json", "--markdown", "r.json"], "--markdown", "is the file --json names"),
    (["bench", "--json", "r.json", "--plot", "./r.json"], "--plot", "is the file --json names"),
    (["eval", "--json", "PROMPTS"], "--json", "is the file --prompts names"),
    (["eval", "--json", "DRAFT/config.json"], "--json", "is the file --draft names"),
    (["eval", "--json", "DRAFT"], "--json", "is a directory"),
])
def test_an_output_is_never_an_input_or_another_output(capsys, monkeypatch, tmp_path, eval_inputs, argv, option,
                                                       says):
    monkeypatch.chdir(tmp_path)
    argv = [{"PROMPTS": eval_inputs["--prompts"], "DRAFT/config.json": eval_inputs["--draft"] + "/config.json",
             "DRAFT": eval_inputs["--draft"]}.get(part, part) for part in argv]
    if argv[0] == "eval":
        argv = ["eval", *[part for pair in eval_inputs.items() for part in pair], *argv[1:]]
    else:
        argv += ["--lengths", "128", "--repeats", "1", "--backends", "python"]
    before = files_in(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert_one_line_naming(err, argv[0], option)
    assert says in err, err
    assert files_in(tmp_path) == before


# --- eval against a real (tiny) draft: prompts and new tokens bounded by the positions ----------

DRAFT_POSITIONS, K = 16, 3


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    """A train-demo draft of DRAFT_POSITIONS positions (its max_position_embeddings)."""
    out = tmp_path_factory.mktemp("eval") / "draft"
    assert main(["train-demo", "--steps", "1", "--seq-len", str(DRAFT_POSITIONS), "--vocab", "64",
                 "--device", "cpu", "--out", str(out)]) == 0
    return out


def run_eval(draft, tmp_path, prompt_lines: bytes, *extra: str) -> int:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(prompt_lines)
    return main(["eval", "--draft", str(draft), "--target", "tiny", "--prompts", str(prompts), "-k", str(K),
                 "--no-baseline", *extra])


@settings(max_examples=30)
@given(prompt_length=st.integers(1, DRAFT_POSITIONS - K), excess=st.integers(1, 2**31 - 1))
def test_max_new_tokens_past_the_position_limit_is_refused_with_the_bound(capsys, tmp_path_factory, tiny_draft,
                                                                           prompt_length, excess):
    bound = DRAFT_POSITIONS - prompt_length - K + 1
    wanted = min(bound + excess, 2**31 - 1)
    tmp_path = tmp_path_factory.mktemp("prompts")
    capsys.readouterr()
    lines = f"2\n{' '.join(['1'] * prompt_length)}\n".encode()
    assert run_eval(tiny_draft, tmp_path, lines, "--max-new-tokens", str(wanted)) == 2
    err = capsys.readouterr().err
    assert_one_line_naming(err, "eval", "--max-new-tokens")
    assert f"must be <= {bound}, got {wanted}" in err and f"max_position_embeddings {DRAFT_POSITIONS}" in err, err


def test_the_bound_is_enough_for_every_position_decoding_reaches(capsys, tmp_path, tiny_draft):
    """At the bound, decoding runs to the end and no draft position reaches max_position_embeddings;
    without --max-new-tokens the default is brought down to the bound, and stderr says so."""
    from peagle_ext.draft.llama import LlamaRotaryEmbedding

    reached = []

    def record(module, args, kwargs, output):
        if isinstance(module, LlamaRotaryEmbedding):
            reached.append(int((args[2] if len(args) > 2 else kwargs["position_ids"]).max()))

    hook = torch.nn.modules.module.register_module_forward_hook(record, with_kwargs=True)
    try:
        prompt_length = 6
        bound = DRAFT_POSITIONS - prompt_length - K + 1
        out = tmp_path / "eval.json"
        assert run_eval(tiny_draft, tmp_path, b"1 2 3 4 5 6\n7\n", "--json", str(out)) == 0
    finally:
        hook.remove()
    assert f"eval: {bound} new tokens per prompt" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert [len(entry["generated_ids"]) for entry in report["prompts"]] == [bound, bound]
    assert reached and max(reached) < DRAFT_POSITIONS


@pytest.mark.parametrize(("lines", "option", "says"), [
    (" ".join(["1"] * 30_000).encode() + b"\n", "--prompts", "line 1 has 30000 tokens"),
    (b"1 2\n" + b"1 " * (DRAFT_POSITIONS - K + 1) + b"\n", "--prompts", f"line 2 has {DRAFT_POSITIONS - K + 1} tokens"),
    (b"1 2\n\xff\xfe 3\n", "--prompts", "is not UTF-8 text (byte 0xff on line 2)"),
    (b"\xc3\n", "--prompts", "is not UTF-8 text"),
])
def test_prompts_the_draft_cannot_hold_are_refused_by_line(capsys, tmp_path, tiny_draft, lines, option, says):
    assert run_eval(tiny_draft, tmp_path, lines) == 2
    captured = capsys.readouterr()
    assert_one_line_naming(captured.err, "eval", option)
    assert says in captured.err and captured.out == "", captured.err


@pytest.mark.parametrize("temperature", ["1e-40", "5e-324", "0.000009"])
def test_temperatures_below_the_greedy_bound_decode_greedily(capsys, tmp_path, tiny_draft, temperature):
    assert run_eval(tiny_draft, tmp_path, b"1 2 3\n", "--temperature", temperature, "--max-new-tokens", "4") == 0
    captured = capsys.readouterr()
    assert "acceptance length" in captured.out, captured.err


@pytest.mark.parametrize("temperature", ["-1", "nan", "inf", "-0.5"])
def test_temperatures_that_are_no_temperature_are_refused(capsys, tmp_path, tiny_draft, temperature):
    assert run_eval(tiny_draft, tmp_path, b"1 2 3\n", "--temperature", temperature) == 2
    err = capsys.readouterr().err
    assert_one_line_naming(err, "eval", "--temperature")
    assert "must be a finite number >= 0" in err


def test_threads_past_the_cpus_are_refused(capsys, tmp_path, tiny_draft):
    assert run_eval(tiny_draft, tmp_path, b"1 2 3\n", "--threads", str(10 * (os.cpu_count() or 1))) == 2
    assert_one_line_naming(capsys.readouterr().err, "eval", "--threads")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero, a stream without end")
def test_a_prompts_stream_without_end_is_refused_at_a_bound(capsys, tiny_draft):
    assert main(["eval", "--draft", str(tiny_draft), "--target", "tiny", "--prompts", "/dev/zero"]) == 2
    err = capsys.readouterr().err
    assert_one_line_naming(err, "eval", "--prompts")
    assert "is longer than 64 MiB" in err


def test_a_first_forward_past_the_memory_here_is_refused_with_the_estimate(capsys, monkeypatch, tmp_path,
                                                                           tiny_draft):
    monkeypatch.setattr("peagle_ext._inputs.available_memory_bytes", lambda device: 1000)
    assert run_eval(tiny_draft, tmp_path, b"1 2 3 4 5\n6 7\n") == 2
    err = capsys.readouterr().err
    assert_one_line_naming(err, "eval", "--prompts")
    assert "the first forward over 2 prompt(s) of 5 tokens (line 1) would need about" in err, err


def test_saving_a_checkpoint_to_an_empty_path_is_refused(monkeypatch, tmp_path):
    """The API too: Path("") is the current directory, so an empty directory argument is refused."""
    from peagle_ext.draft.checkpoint import save_checkpoint

    before = another_models_directory(tmp_path)
    monkeypatch.chdir(tmp_path)
    for directory in ("", "  "):
        with pytest.raises(ValueError, match="directory must name a directory"):
            save_checkpoint(directory, {"speculators_model_type": "eagle3"}, {"w": torch.zeros(2)})
    assert files_in(tmp_path) == before
