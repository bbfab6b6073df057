"""``python -m peagle_ext train`` end to end on a tiny random transformers target (seconds), its
argument checks, and the data engine's decoding against the target's own greedy decode."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from peagle_ext.cli import main  # noqa: E402
from peagle_ext.draft import data_engine  # noqa: E402
from peagle_ext.draft.hf import chat_template_ids, grouped_decode_attention  # noqa: E402

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man year "
         "came show every good me give our under name very through just form sentence great think say help low line "
         "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
         "small end put home read hand port large spell add even land here must big high such follow act why ask men "
         "change went light kind off need house picture try us again animal point mother world near build self earth "
         "father head stand own page should country found answer school grow study still learn plant cover food sun")
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def make_tiny_target(folder) -> str:
    """A random 8-layer Llama with a word-level tokenizer and a chat template, saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    words = list(dict.fromkeys(WORDS.split())) + ["user", "assistant", "system"]
    vocab = {token: index for index, token in enumerate(specials + words)}
    model = models.WordLevel(vocab, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                     eos_token="<|im_end|>", unk_token="<unk>",
                                                     additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, pad_token_id=0, eos_token_id=vocab["<|im_end|>"],
                                      tie_word_embeddings=False)
    lm = transformers.LlamaForCausalLM(config)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    return make_tiny_target(tmp_path_factory.mktemp("tiny_target"))


def run_cli(*args):
    return main(["train", *map(str, args)])


def test_train_end_to_end_then_resume(tiny_target, tmp_path, capsys):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("tell me about the water\nwhy is the sun so big\nhow do people learn to read\n")
    out = tmp_path / "run"
    assert run_cli("--target", tiny_target, "--out", out, "--budget-minutes", 0.5, "-k", 2, 3, "--prompts", seeds,
                   "--threads", 1, "--gen-batch", 8, "--response-tokens", 24, "--eval-tokens", 12,
                   "--draft-vocab", 64, "--draft-dtype", "bfloat16") == 0
    printed = capsys.readouterr().out
    assert "accept len" in printed and "draft in bfloat16" in printed
    assert "2 alternative first tokens verified per step; steps that took one: K = 2: " in printed
    assert "prompt-lookup branches reaching 5 tokens verified per step; steps that took one: K = 2: " in printed
    assert "the continuation index's branch (" in printed and "steps that ended in it: K = 2: " in printed
    summary = json.loads((out / "results.json").read_text())
    assert summary["total_seconds"] <= 30 + 5, "the budget was not kept"
    assert summary["data"]["sequences"] > 0 and summary["data"]["new_response_tokens"] > 0
    assert summary["training"]["training_steps"] > 0
    assert len(summary["training"]["depth_accuracy"]) == summary["config"]["depths"] == 3  # the default
    results = summary["evaluation"]["results"]
    assert set(results) == {"K=2", "K=3"} and summary["evaluation"]["draft_dtype"] == "bfloat16"
    for report in results.values():
        assert report["matches_target"], "speculative decoding changed the greedy output"
        assert report["acceptance_length"] >= 1
        assert report["alternatives"] == 2 and report["alternatives_taken"] >= 0
        assert report["lookup"] == 5 and report["lookups_taken"] >= 0
        assert report["index"] and report["indexed_taken"] >= 0
    assert (out / "results.png").is_file()
    messages = {json.loads(line) for line in (out / "data" / "prompts.jsonl").read_text().splitlines()}
    assert not any(data_engine.held_out_kind(m) for m in messages)

    from peagle_ext.draft.llama import LlamaEagle3DraftModel

    draft = LlamaEagle3DraftModel.from_pretrained(out / "draft")
    assert draft.config.parallel_drafting and draft.config.eagle_aux_hidden_state_layer_ids == [2, 4, 5]
    from peagle_ext.draft.speculative.lookup import INDEX_FILE, ContinuationIndex

    index = ContinuationIndex.load(str(out / "draft" / INDEX_FILE))  # the training responses' index
    assert sum(keys.numel() for keys in index.keys) == summary["data"]["index_keys"] > 0
    assert index.base <= draft.config.vocab_size

    # A second run starts from the first one's data.
    first = summary["data"]["response_tokens"]
    assert run_cli("--target", tiny_target, "--out", out, "--budget-minutes", 0.4, "-k", 2, "--threads", 1,
                   "--gen-batch", 8, "--response-tokens", 24, "--eval-tokens", 12, "--draft-vocab", 64,
                   "--method", "eagle3", "--no-index") == 0
    again = json.loads((out / "results.json").read_text())
    assert not (out / "draft" / INDEX_FILE).exists()  # the first draft's index went with it
    assert not again["evaluation"]["results"]["K=2"]["index"]
    assert again["data"]["cached_response_tokens"] == first
    assert again["method"] == "eagle3" and again["evaluation"]["results"]["K=2"]["matches_target"]
    assert again["evaluation"]["draft_dtype"] in ("float32", "bfloat16")  # auto: by this CPU


@pytest.mark.parametrize("out, message", [("", "--out: must name a path"), (" ", "--out: must name a path"),
                                          ("FILE", "exists and is not a directory")])
def test_out_refused_in_one_line(tiny_target, tmp_path, capsys, monkeypatch, out, message):
    """An empty or blank --out names no directory: refused, and nothing is written in the current
    directory, which here holds another model's files."""
    here = tmp_path / "another_model"
    here.mkdir()
    (here / "config.json").write_text('{"model_type": "llama"}')
    (here / "model.safetensors").write_bytes(b"weights")
    monkeypatch.chdir(here)
    if out == "FILE":
        out = tmp_path / "a_file"
        out.write_text("x")
    assert run_cli("--target", tiny_target, "--out", out, "--budget-minutes", 1) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert sorted(os.listdir(here)) == ["config.json", "model.safetensors"]
    assert (here / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize("option, value, message", [
    ("--target", "", "--target: must name a path"),
    ("--prompts", " ", "--prompts: must name a path"),
    ("--threads", str(10 * (os.cpu_count() or 1)), "--threads"),
    ("--data-share", "0.9", "leave a training share"),
    ("--draft-dtype", "float16", "--draft-dtype"),
    ("--init", "pretrained", "--init")])
def test_train_options_refused_in_one_line(tiny_target, tmp_path, capsys, option, value, message):
    arguments = {"--target": tiny_target, "--out": tmp_path / "o", "--budget-minutes": 1, option: value}
    assert run_cli(*[item for pair in arguments.items() for item in pair]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert not (tmp_path / "o").exists()


def test_budget_too_small_is_refused_before_any_work(tiny_target, tmp_path, capsys):
    out = tmp_path / "never"
    assert run_cli("--target", tiny_target, "--out", out, "--budget-minutes", 0.05) == 2
    error = capsys.readouterr().err
    assert "--budget-minutes 0.05" in error and "to train" in error
    assert not out.exists()


@pytest.mark.parametrize("field, value", [("init", "pretrained"), ("init", None), ("method", "medusa")])
def test_an_unknown_method_or_init_is_refused_before_any_work(field, value):
    from peagle_ext.draft import recipe

    config = recipe.TrainConfig(target="t", out="o", budget_minutes=60, **{field: value})
    with pytest.raises(ValueError, match=f"{field} must be one of .*, got {value!r}"):
        recipe.check_budget(config)
    recipe.check_budget(recipe.TrainConfig(target="t", out="o", budget_minutes=60))  # the defaults run


def test_abbreviated_options_are_refused(tiny_target, tmp_path, capsys):
    assert run_cli("--target", tiny_target, "--out", tmp_path / "o", "--budget", 1) == 2
    assert "--budget" in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        run_cli("--help")
    text = capsys.readouterr().out
    assert "(default peagle)" in text and "(default [1, 3, 5, 7])" in text


def test_held_out_prompts_are_of_another_kind():
    assert all(data_engine.held_out_kind(p) for p in data_engine.HELD_OUT_PROMPTS)
    assert not data_engine.keep_instruction("Write a Python function that sorts a list of words.")
    assert data_engine.keep_instruction("Can you suggest a few places to visit in Berlin this summer?")


def test_decode_equals_greedy_and_states_equal_a_full_forward(tiny_target):
    """Batched, left-padded decoding with rows leaving the batch gives each prompt's own greedy
    decode, and the hooked states equal hidden_states[l] and the last hidden state of one
    unpadded forward over the prompt and the response."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_target)
    messages = ["tell me", "why is the sun so big and the water so blue", "how do people learn to read a page"]
    layer_ids = [2, 4, 5]
    samples = next(data_engine.generate_samples(model, tokenizer, messages, layer_ids, max_tokens=20, batch_size=3))
    for sample in samples:
        prompt = torch.tensor([chat_template_ids(tokenizer, [{"role": "user", "content": sample.message}])])
        assert sample.prompt_ids == prompt[0].tolist()
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=20,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        assert sample.response_ids == expected
        read = torch.tensor([sample.prompt_ids + sample.response_ids[:-1]])
        with torch.no_grad():
            out = model(read, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[layer][0] for layer in layer_ids], -1)
        assert sample.aux.shape == aux.shape
        torch.testing.assert_close(sample.aux.float(), aux, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(sample.last.float(), out.hidden_states[-1][0], atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("padded", [True, False])
def test_grouped_decode_attention_equals_transformers_sdpa(tiny_target, padded):
    """One decode step of a left-padded batch gives the logits of transformers' own SDPA attention,
    and the model is back on SDPA after the block."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = mask[1, :1] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)

    def step():
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                  past_key_values=cache, use_cache=True)
            return model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                         past_key_values=cache, use_cache=True).logits

    expected = step()
    with grouped_decode_attention(model):
        assert model.config._attn_implementation != "sdpa"
        got = step()
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sample_cache_round_trip_and_refuses_other_data(tmp_path):
    meta = {"target": "a", "aux_layer_ids": [1, 2, 3]}
    cache = data_engine.SampleCache(str(tmp_path), meta)
    sample = data_engine.Sample("hi", [1, 2], [3, 4, 5], torch.randn(4, 6).half(), torch.randn(4, 2).half())
    cache.save([sample])
    cache.add_prompts(["hi", "there"])
    loaded = data_engine.SampleCache(str(tmp_path), meta).load()
    assert len(loaded) == 1 and loaded[0].response_ids == [3, 4, 5] and torch.equal(loaded[0].aux, sample.aux)
    assert cache.prompts() == ["hi", "there"]
    with pytest.raises(ValueError, match="use another --out"):
        data_engine.SampleCache(str(tmp_path), {**meta, "aux_layer_ids": [0, 1, 2]})
    assert os.listdir(tmp_path)


@pytest.mark.parametrize("init", ["target", "random"])
def test_a_draft_started_from_the_target_computes_its_next_layer(tiny_target, init):
    """With init "target", depth 0 of a fresh draft over a sequence computes the target's layer
    after the last auxiliary one: its states (before the final norm) equal the target's
    hidden_states[last + 1], whatever the input tokens; at random they do not. A second draft
    layer continues with the target's next layer."""
    from peagle_ext.draft import recipe
    from peagle_ext.draft.speculative.draft import DraftCache, draft_forward
    from peagle_ext.draft.speculative.slots import DraftSlots

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()
    layer_ids = [2, 4, 5]
    tokens = torch.randint(4, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = model(tokens, output_hidden_states=True).hidden_states
    aux = torch.cat([states[layer] for layer in layer_ids], -1)
    for layers in (1, 2):
        config = recipe.TrainConfig(target="", out="", budget_minutes=1, method="eagle3", init=init, layers=layers)
        draft = recipe.make_draft(model, config, list(range(model.config.vocab_size)), layer_ids, "t").eval()
        ones = torch.ones_like(tokens, dtype=torch.bool)
        other_tokens = torch.randint(4, model.config.vocab_size, tokens.shape, generator=torch.Generator())
        slots = DraftSlots(other_tokens, draft.project_hidden_states(aux), torch.arange(12).view(1, -1), ones, ones,
                           torch.zeros(1, 1, dtype=torch.int64))
        out = draft_forward(draft, slots, DraftCache(layers))
        expected = states[layer_ids[-1] + layers]
        if init == "target":
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
            assert torch.equal(draft.model.norm.weight, model.model.norm.weight)
        else:
            assert not torch.allclose(out, expected, atol=1e-2)
    assert recipe.start_from_target_layers(draft, model, model.config.num_hidden_layers) == 0  # no such layer
