"""Training data for a draft, made by its target alone: user instructions the target writes itself,
its greedy responses, and the hidden states the draft learns from, cached on disk.

- Prompts (:func:`synthesize_instructions`): the chat template's user turn is opened and the target
  samples what a user would write there, as Magpie does; the instructions are filtered (length,
  finished turn, no template tokens, not of the held-out kind) and deduplicated, and any seed
  prompts a user gives come first.
- Responses (:func:`generate_samples`): the target's greedy continuations (as speculators' data
  pipeline regenerates them), many prompts at once (left padding, attention mask, KV cache read
  once by all query heads of a key/value head; rows that finished leave the batch). The
  auxiliary states (the inputs of the decoder layers the draft reads, vLLM's capture point) and
  the last hidden state (after the final norm, what the lm_head reads) come from the same
  forwards through hooks.
- :class:`SampleCache`: shards of samples under a directory, so a second run reuses them.

Held-out evaluation prompts are of another kind than the training prompts: the shipped
:data:`HELD_OUT_PROMPTS` are programming and arithmetic questions, and instructions of that kind
(:func:`held_out_kind`) are filtered out of the synthesized ones.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import torch

from .hf import chat_template_ids, grouped_decode_attention

# Programming and arithmetic questions (a kind the synthesized chat instructions are kept free of).
HELD_OUT_PROMPTS = [
    "Write a Python function that returns the factorial of a number.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that reverses a list without using reverse().",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that returns the largest number in a list.",
    "Write a Python function that computes the n-th Fibonacci number.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Write a Python function that sums the even numbers of a list.",
    "Write a Python function that checks whether a number is prime.",
    "Write a JavaScript function that capitalizes the first letter of every word.",
    "Write a SQL query that selects all users older than 30 from a table named users.",
    "Explain what a Python list comprehension is, with an example.",
    "What does the Python keyword 'yield' do? Give a short example.",
    "How do I read a text file line by line in Python?",
    "What is the difference between a tuple and a list in Python?",
    "What is 17 multiplied by 23? Show the steps.",
    "A shop sells apples at 3 dollars each. How much do 12 apples cost?",
    "If a train travels 60 miles per hour for 2.5 hours, how far does it go?",
    "What is 15 percent of 240?",
    "Solve for x: 3x + 7 = 22.",
    "What is the sum of the numbers from 1 to 100?",
    "A rectangle is 8 cm long and 5 cm wide. What are its area and perimeter?",
    "Convert the fraction 3/8 to a decimal.",
    "What is the square root of 144, and why?",
    "If I have 45 candies and share them equally among 9 children, how many does each child get?",
    "What is 2 to the power of 10?",
    "A car uses 6 liters of fuel per 100 km. How much fuel does it need for 250 km?",
    "What is the average of 12, 18, 25 and 33?",
    "Round 3.14159 to two decimal places and explain the rule.",
    "How many minutes are there in 3.5 hours?",
    "What is the greatest common divisor of 48 and 36?",
]

_HELD_OUT_KIND = re.compile(
    r"\b(python|javascript|java|sql|c\+\+|code|coding|program|programming|function|script|algorithm|"
    r"calculate|compute|solve|equation|math|arithmetic|percent|sum|multiply|multiplied|divide|divided|"
    r"fraction|decimal|square root|average|power of|divisor|perimeter)\b|\d\s*[-+*/x=^]\s*\d"
    r"|\d[\d.,]*\D+\d",  # two numbers: an arithmetic question
    re.IGNORECASE,
)


def held_out_kind(text: str) -> bool:
    """Whether ``text`` is a programming or arithmetic question (the held-out kind): it names a
    language or a programming or arithmetic term, or holds an operation or two numbers."""
    return bool(_HELD_OUT_KIND.search(text))


# --- one batched decoding loop for both the instructions and the responses ---------------------


class _StateCapture:
    """Hooks that keep the inputs of the given decoder layers and the final norm's output of the
    model's forwards: ``aux`` [B, T, len(layers) * H] and ``last`` [B, T, H] of the latest one."""

    def __init__(self, model, layer_ids):
        body = model.model
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles = []
        for layer_id in layer_ids:
            if layer_id == len(body.layers):  # hidden_states[L]: the normed output
                self.handles.append(body.norm.register_forward_hook(self._keep_output(layer_id)))
            else:
                self.handles.append(body.layers[layer_id].register_forward_pre_hook(self._keep_input(layer_id),
                                                                                   with_kwargs=True))
        self.handles.append(body.norm.register_forward_hook(self._keep_output("last")))
        self.layer_ids = list(layer_ids)

    def _keep_input(self, key):
        def hook(module, args, kwargs):
            self.inputs[key] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _keep_output(self, key):
        def hook(module, args, output):
            self.inputs[key] = output

        return hook

    def take(self):
        aux = torch.cat([self.inputs[layer_id] for layer_id in self.layer_ids], dim=-1)
        return aux, self.inputs["last"]

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _decode(model, prompts, max_new_tokens, stop_ids, pad_id, capture=None, temperature=0.0, top_p=1.0,
            generator=None, deadline=None):
    """Decode token-id ``prompts`` together (left-padded, one KV cache) until each row emits a
    token of ``stop_ids`` (kept) or has ``max_new_tokens``, or ``deadline`` (time.monotonic)
    passes (the rows are then cut where they are); rows that finish leave the batch.
    Greedy at temperature 0, else nucleus sampling. Returns per row (new ids, finished, states):
    with ``capture`` (a _StateCapture) states is (aux, last) float16 over the row's prompt and all
    of its new tokens but the last (the tokens the forwards read), else None."""
    from transformers import DynamicCache

    batch = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.int64)
    mask = torch.zeros(batch, width, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    rows = list(range(batch))  # the batch index of each row still decoding
    new = [[] for _ in range(batch)]
    finished = [False] * batch
    states = [[] for _ in range(batch)]
    stop = torch.tensor(sorted(stop_ids))
    for step in range(max_new_tokens):
        with grouped_decode_attention(model):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        if capture is not None:
            aux, last = capture.take()
            for index, row in enumerate(rows):
                begin = width - len(prompts[row]) if step == 0 else 0
                states[row].append((aux[index, begin:].half(), last[index, begin:].half()))
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            token = _nucleus(logits / temperature, top_p, generator)
        done = torch.isin(token, stop)
        for index, row in enumerate(rows):
            new[row].append(int(token[index]))
            finished[row] = bool(done[index])
        out_of_time = deadline is not None and time.monotonic() >= deadline
        keep = ~done if step + 1 < max_new_tokens and not out_of_time else torch.zeros_like(done)
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            kept = torch.nonzero(keep).flatten()
            cache.batch_select_indices(kept)
            rows = [rows[i] for i in kept.tolist()]
            token, mask, positions = token[kept], mask[kept], positions[kept]
        ids = token.view(-1, 1)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
    if capture is None:
        return [(new[row], finished[row], None) for row in range(batch)]
    results = []
    for row in range(batch):
        aux = torch.cat([a for a, _ in states[row]])[: len(prompts[row]) + len(new[row]) - 1]
        last = torch.cat([h for _, h in states[row]])[: len(prompts[row]) + len(new[row]) - 1]
        results.append((new[row], finished[row], (aux, last)))
    return results


def _nucleus(logits, top_p, generator):
    """One draw per row from the smallest set of tokens whose probability reaches ``top_p``."""
    probs = torch.softmax(logits, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0)
    picked = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(1, picked).view(-1)


# --- prompts -----------------------------------------------------------------------------------

_SENTINEL = "\u2063PROMPT\u2063"


def user_turn_prefix(tokenizer) -> tuple[list[int], list[int]]:
    """(ids of the chat template up to where a user message starts, the token ids that end a user
    turn: the first token after the message, and EOS)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=False)
    if _SENTINEL not in text:
        raise ValueError("the tokenizer's chat template does not show the user message; cannot open a user turn")
    before, after = text.split(_SENTINEL, 1)
    prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
    stops = set()
    after_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if after_ids:
        stops.add(after_ids[0])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return prefix, sorted(stops)


def _normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def keep_instruction(text: str, special_tokens=()) -> bool:
    """The filter on synthesized instructions: 3 to 80 words, 15 to 400 characters, mostly
    letters, no template tokens, not of the held-out kind."""
    words = text.split()
    if not (3 <= len(words) <= 80 and 15 <= len(text) <= 400):
        return False
    if any(token and token in text for token in special_tokens):
        return False
    letters = sum(c.isalpha() for c in text)
    return letters >= 0.6 * len(text.replace(" ", "")) and not held_out_kind(text)


def synthesize_instructions(model, tokenizer, count: int, *, batch_size: int = 64, max_tokens: int = 40,
                            temperature: float = 1.0, top_p: float = 0.95, seed: int = 0, deadline=None,
                            seen=(), on_batch=None) -> list[str]:
    """Up to ``count`` distinct user instructions sampled by the target in its own user turn
    (Magpie; one cut off at ``max_tokens`` is kept up to its last question mark), filtered by
    :func:`keep_instruction` and deduplicated (among themselves and against
    ``seen``, compared on their words in lower case). Stops at ``deadline`` (time.monotonic)."""
    prefix, stops = user_turn_prefix(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    special = [t for t in tokenizer.all_special_tokens if t]
    known = {_normalized(text) for text in seen}
    kept: list[str] = []
    tries = 0
    while len(kept) < count and (deadline is None or time.monotonic() < deadline):
        rows = _decode(model, [prefix] * batch_size, max_tokens, stops, tokenizer.pad_token_id or 0,
                       temperature=temperature, top_p=top_p, generator=generator, deadline=deadline)
        tries += batch_size
        for new, finished, _ in rows:
            text = tokenizer.decode(new[:-1] if finished else new, skip_special_tokens=False).strip()
            if not finished:  # cut off: keep it up to its last question, if it has one
                text = text[: text.rfind("?") + 1]
            key = _normalized(text)
            if key in known or not keep_instruction(text, special):
                continue
            known.add(key)
            kept.append(text)
        if on_batch is not None:
            on_batch(len(kept), tries)
        if tries >= 50 * max(count, 1) and not kept:
            break  # the target does not write usable instructions
    return kept[:count]


# --- samples and their cache -------------------------------------------------------------------


@dataclass
class Sample:
    """One training sequence: the prompt's and the response's token ids, and the target's states
    over every token but the last (float16): ``aux`` [P + R - 1, num_aux * H], ``last`` [P + R - 1, H]."""

    message: str
    prompt_ids: list[int]
    response_ids: list[int]
    aux: torch.Tensor
    last: torch.Tensor


def generate_samples(model, tokenizer, messages: list[str], layer_ids, *, max_tokens: int, batch_size: int,
                     deadline=None, on_batch=None):
    """Yield :class:`Sample` batches (lists) of the target's greedy responses to ``messages`` (user
    messages, through the chat template), ``batch_size`` prompts decoded together (sorted by
    length so that little is padding), until ``deadline``: the batch decoding then is cut where
    it is (a response cut short is still the target's greedy text)."""
    prompts = [(chat_template_ids(tokenizer, [{"role": "user", "content": m}]), m) for m in messages]
    prompts.sort(key=lambda pair: len(pair[0]))
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    capture = _StateCapture(model, layer_ids)
    try:
        for begin in range(0, len(prompts), batch_size):
            if deadline is not None and time.monotonic() >= deadline:
                return
            chunk = prompts[begin:begin + batch_size]
            rows = _decode(model, [ids for ids, _ in chunk], max_tokens, stops, tokenizer.pad_token_id or 0,
                           capture=capture, deadline=deadline)
            # a response of one token (cut at the deadline) supervises nothing
            batch = [Sample(message, ids, new, aux, last) for (ids, message), (new, _, (aux, last)) in zip(chunk, rows)
                     if len(new) > 1]
            if on_batch is not None:
                on_batch(batch)
            yield batch
    finally:
        capture.remove()


class SampleCache:
    """Samples under ``directory``: ``meta.json`` (what made them: the cache refuses samples of
    another target, layers or response length), ``prompts.jsonl`` (the synthesized instructions)
    and ``samples-NNNNN.pt`` shards."""

    def __init__(self, directory: str, meta: dict):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "meta.json")
        if os.path.exists(path):
            with open(path) as handle:
                stored = json.load(handle)
            if stored != meta:
                raise ValueError(f"{directory} holds data made with {stored}, not {meta}; use another --out")
        else:
            with open(path, "w") as handle:
                json.dump(meta, handle, indent=1)

    def shards(self) -> list[str]:
        return sorted(f for f in os.listdir(self.directory) if f.startswith("samples-") and f.endswith(".pt"))

    def load(self) -> list[Sample]:
        samples = []
        for name in self.shards():
            for record in torch.load(os.path.join(self.directory, name), weights_only=True):
                samples.append(Sample(record["message"], record["prompt_ids"], record["response_ids"],
                                      record["aux"], record["last"]))
        return samples

    def save(self, samples: list[Sample]) -> None:
        records = [{"message": s.message, "prompt_ids": s.prompt_ids, "response_ids": s.response_ids,
                    "aux": s.aux, "last": s.last} for s in samples]
        name = f"samples-{len(self.shards()):05d}.pt"
        temporary = os.path.join(self.directory, name + ".tmp")
        torch.save(records, temporary)
        os.replace(temporary, os.path.join(self.directory, name))

    def prompts(self) -> list[str]:
        path = os.path.join(self.directory, "prompts.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def add_prompts(self, prompts: list[str]) -> None:
        with open(os.path.join(self.directory, "prompts.jsonl"), "a") as handle:
            for prompt in prompts:
                handle.write(json.dumps(prompt) + "\n")
