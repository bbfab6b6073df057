"""``python -m peagle_ext eval``: a train-demo checkpoint against the tiny target, the JSON it writes,
and every usage mistake as one line and exit status 2 before any work."""

from __future__ import annotations

import json
import shutil

import pytest

from peagle_ext.cli import main
from peagle_ext.draft.speculative.lookup import INDEX_FILE, ContinuationIndex

from draft_helpers import single_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def demo_draft(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "draft"
    assert main(["train-demo", "--steps", "120", "--vocab", "64", "--device", "cpu", "--out", str(out)]) == 0
    return out


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("1 2 3\n5\n\n7 8 9 10\n")
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eval_on_the_tiny_target_writes_the_measurements(demo_draft, prompts, tmp_path, capsys, dtype):
    out = tmp_path / "eval.json"
    assert main(["eval", "--draft", str(demo_draft), "--target", "tiny", "--prompts", str(prompts), "-k", "3",
                 "--max-new-tokens", "20", "--json", str(out), "--draft-dtype", dtype]) == 0
    printed = capsys.readouterr().out
    assert "acceptance length" in printed and "greedy outputs against the plain decode: 3/3 equal\n" in printed
    assert f"peagle draft ({dtype})" in printed
    report = json.loads(out.read_text())
    assert report["draft_dtype"] == dtype
    assert report["method"] == "peagle" and report["num_speculative_tokens"] == 3
    # greedy: two alternative first tokens verified per step by default
    assert report["alternatives"] == 2 and 0 <= report["alternatives_taken"] <= report["target_forwards"]
    # and a prompt-lookup branch of 5 tokens
    assert report["lookup"] == 5 and 0 <= report["lookups_taken"] <= report["target_forwards"]
    assert (f"prompt-lookup branches verified per step, reaching 5 tokens; steps that took one: "
            f"{report['lookups_taken']}") in printed
    assert len(report["prompts"]) == 3
    for entry in report["prompts"]:
        assert len(entry["generated_ids"]) == 20 and all(isinstance(t, int) for t in entry["generated_ids"])
        assert 1 <= entry["acceptance_length"] <= 1 + 5 and entry["matches_target"]  # the branch reaches 5
    assert report["acceptance_length"] > 1.5  # the trained draft is accepted
    assert report["target_forwards"] == sum(e["target_forwards"] for e in report["prompts"])
    assert set(report["tokens_per_second"]) == {"speculative", "target"} and report["speedup"] > 0


def test_eval_verifies_the_drafts_index_by_default_or_the_one_given(demo_draft, prompts, tmp_path, capsys):
    """The draft folder's continuation index is verified where it holds one (greedy), --index gives
    another, --no-index none; the outputs stay the plain decode's either way."""
    sequences = [[t % 64 for t in range(start, start + 30)] for start in range(0, 60, 7)]
    draft = tmp_path / "draft"
    shutil.copytree(demo_draft, draft)
    ContinuationIndex.build(sequences).save(str(draft / INDEX_FILE))
    elsewhere = tmp_path / "other.pt"
    ContinuationIndex.build(sequences[:2]).save(str(elsewhere))
    base = ["eval", "--target", "tiny", "--prompts", str(prompts), "-k", "2", "--max-new-tokens", "12"]
    for extra, shown in [([], str(draft / INDEX_FILE)), (["--index", str(elsewhere)], str(elsewhere)),
                         (["--no-index"], None), (["--temperature", "0.7", "--no-baseline"], None)]:
        out = tmp_path / "eval.json"
        assert main(base + ["--draft", str(draft), "--json", str(out)] + extra) == 0
        printed, report = capsys.readouterr().out, json.loads(out.read_text())
        assert report["index"] == (shown is not None)
        if shown is not None:
            assert f"the continuation index's branch verified per step ({shown}); steps that ended in it: " in printed
            assert "greedy outputs against the plain decode: 3/3 equal" in printed
        else:
            assert "continuation index" not in printed
    (draft / INDEX_FILE).write_text("damaged")
    assert main(base + ["--draft", str(draft)]) == 2
    error = capsys.readouterr().err
    assert f"argument --draft: {draft / INDEX_FILE}: not a continuation index" in error


def test_eval_sampling_without_baseline(demo_draft, prompts, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--draft", str(demo_draft), "--target", "tiny", "--prompts", str(prompts), "-k", "2",
                 "--max-new-tokens", "8", "--temperature", "0.7", "--no-baseline", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "speedup" not in report and all(len(e["generated_ids"]) == 8 for e in report["prompts"])


@pytest.mark.parametrize("extra, option", [
    (["-k", "0"], "--num-speculative-tokens"),
    (["--draft-dtype", "float16"], "--draft-dtype"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--draft", "/nonexistent"], "--draft"),
    (["--target", "/nonexistent"], "--target"),
    (["--gguf-file", "x.gguf"], "--gguf-file"),
    (["--prompts", "/nonexistent"], "--prompts"),
    (["--prompts", "EMPTY"], "--prompts"),
    (["--prompts", "WORDS"], "--prompts"),
    (["--json", "/proc/no/such.json"], "--json"),
    (["--batch-size", "0"], "--batch-size"),
    (["--alternatives", "-1"], "--alternatives"),
    (["--alternatives", "1", "--temperature", "0.7"], "--alternatives"),
    (["--alternatives", "100000"], "--alternatives"),
    (["--lookup", "-1"], "--lookup"),
    (["--lookup", "2", "--temperature", "0.7"], "--lookup"),
    (["--lookup", "100000"], "--lookup"),
    (["--index", "INDEX", "--no-index"], "--index"),
    (["--index", "INDEX", "--temperature", "0.7"], "--index"),
    (["--index", "INDEX", "--lookup", "0"], "--index"),
    (["--index", "/nonexistent"], "--index"),
    (["--index", "WORDS"], "--index"),
    (["--index", "WIDE"], "--index"),
])
def test_eval_usage_mistakes(demo_draft, prompts, tmp_path, extra, option, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "words.txt").write_text("hello there\n")
    ContinuationIndex.build([[1, 2, 3, 1, 2]]).save(str(tmp_path / "index.pt"))
    ContinuationIndex.build([[1, 2, 100, 1, 2]]).save(str(tmp_path / "wide.pt"))  # past the draft's 64 tokens
    extra = [{"EMPTY": str(tmp_path / "empty.txt"), "WORDS": str(tmp_path / "words.txt"),
              "INDEX": str(tmp_path / "index.pt"), "WIDE": str(tmp_path / "wide.pt")}.get(a, a) for a in extra]
    args = ["eval", "--draft", str(demo_draft), "--target", "tiny", "--prompts", str(prompts)] + extra
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m peagle_ext eval: error:") and option in lines[0], lines
    assert captured.out == ""


def test_eval_says_which_draft_a_real_target_needs(demo_draft, prompts, tmp_path, capsys):
    """A train-demo draft against a model folder: refused before the model loads, saying what would do."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    args = ["eval", "--draft", str(demo_draft), "--target", str(tmp_path / "model"), "--prompts", str(prompts)]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "names no eagle_aux_hidden_state_layer_ids" in lines[0], lines
    assert "`python -m peagle_ext train`" in lines[0] and "--target tiny" in lines[0]
