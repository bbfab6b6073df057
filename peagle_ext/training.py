"""Training a P-EAGLE draft: the flat COD inputs, the loss, and the ``train-demo`` command.

One training step over one packed sequence of S positions (documents packed from position 0):

    out = peagle_training_step(model, input_ids, aux_hidden_states, loss_mask, target_logits=logits)
    out.loss.backward(); optimizer.step()

Alignment contract: position p of the inputs pairs the token the draft reads, ``input_ids[p]``,
with the target's auxiliary states ``aux_hidden_states[p]``, and ``target[p]`` (logits, or last
hidden state through the target's lm_head) is the distribution the draft must match there. A COD
element with anchor a and depth d has reference position r = a + d and is supervised by
``target[r]`` where ``loss_mask[r]`` is set. :func:`eagle_pairs` builds this pairing from raw
target outputs the EAGLE way (token t+1 with the states that produced it).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cod import generate_cod_sample_indices
from .draft_llama import Eagle3DraftConfig, LlamaEagle3DraftModel


@dataclass
class PeagleStepOutput:
    """What one training step returns.

    loss: scalar, KL(target || draft) summed over supervised elements / their total count;
    depth_accuracy: float [num_depths], top-1 agreement per COD depth (NaN: none supervised);
    depth_count: int64 [num_depths], supervised elements per depth.
    """

    loss: torch.Tensor
    depth_accuracy: torch.Tensor
    depth_count: torch.Tensor

    @property
    def num_supervised(self) -> int:
        return int(self.depth_count.sum())


def eagle_pairs(tokens, aux_hidden_states, target_logits, loss_mask=None):
    """Pair raw target outputs the EAGLE way: position p reads token ``tokens[p+1]`` with the
    states the target computed at p, and must match the target's logits at p+1.

    tokens: [S+1]; aux_hidden_states: [S+1, A]; target_logits: [S+1, V]; loss_mask: [S+1] or None.
    Returns (input_ids [S], aux_hidden_states [S, A], target_logits [S, V], loss_mask [S] or None).
    """
    shifted_mask = None if loss_mask is None else loss_mask[1:]
    return tokens[1:], aux_hidden_states[:-1], target_logits[1:], shifted_mask


def build_peagle_inputs(model, input_ids, aux_hidden_states, anchor_pos, depth):
    """The flat P-EAGLE inputs for N COD elements of one sequence.

    input_ids: [S]; aux_hidden_states: [S, num_aux * target_hidden]; anchor_pos, depth: int [N].
    Returns (ids [1, N]: real ids at depth 0, ``mask_token_id`` deeper; projected [1, N, H]:
    ``fc``-projected aux states at depth 0, the projected ``mask_hidden`` deeper;
    position_ids [1, N]: ``anchor_pos + depth``).
    """
    real = (depth == 0).unsqueeze(-1)
    mask_id = torch.full_like(anchor_pos, model.config.mask_token_id)
    ids = torch.where(real.squeeze(-1), input_ids[anchor_pos], mask_id)
    projected = model.project_hidden_states(aux_hidden_states)[anchor_pos]
    projected = torch.where(real, projected, model.masked_projected_hidden().to(projected.dtype))
    return ids.unsqueeze(0), projected.unsqueeze(0), (anchor_pos + depth).unsqueeze(0)


def _target_draft_logits(model, rows, target_logits, target_last_hidden, target_lm_head):
    """The target's logits over the draft vocabulary at reference positions ``rows``: [M, draft_vocab]."""
    vocab = model.draft_to_target_ids()
    if target_logits is not None:
        return target_logits[rows][:, vocab]
    if target_last_hidden is None or target_lm_head is None:
        raise ValueError("give target_logits, or target_last_hidden together with target_lm_head")
    weight = getattr(target_lm_head, "weight", target_lm_head)
    bias = getattr(target_lm_head, "bias", None)
    return F.linear(target_last_hidden[rows], weight[vocab], None if bias is None else bias[vocab])


def peagle_training_step(
    model: LlamaEagle3DraftModel,
    input_ids: torch.Tensor,
    aux_hidden_states: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    target_logits: torch.Tensor | None = None,
    target_last_hidden: torch.Tensor | None = None,
    target_lm_head=None,
    lengths: torch.Tensor | None = None,
    num_depths: int | None = None,
    down_sample_ratio: float = 0.7,
    down_sample_ratio_min: float = 0.2,
    max_anchors: int | None = None,
    generator: torch.Generator | None = None,
    anchor_pos: torch.Tensor | None = None,
    depth: torch.Tensor | None = None,
) -> PeagleStepOutput:
    """Forward one packed sequence through the draft's P-EAGLE pass and compute the loss.

    input_ids: [S]; aux_hidden_states: [S, num_aux * target_hidden]; loss_mask: [S];
    target_logits: [S, vocab] or target_last_hidden: [S, target_hidden] with target_lm_head (a
    Linear or its weight [vocab, target_hidden]); lengths: document lengths packed from 0
    (default: one document of S). COD indices are sampled (``num_depths`` default
    ``config.num_depths``) unless anchor_pos and depth are given. Does not call backward.
    """
    seq_len = input_ids.numel()
    device = input_ids.device
    if lengths is None:
        lengths = torch.tensor([seq_len], device=device)
    num_depths = model.config.num_depths if num_depths is None else num_depths
    if anchor_pos is None or depth is None:
        anchor_pos, depth = generate_cod_sample_indices(
            seq_len, loss_mask, num_depths, down_sample_ratio, down_sample_ratio_min, max_anchors, generator
        )
    ids, projected, position_ids = build_peagle_inputs(model, input_ids, aux_hidden_states, anchor_pos, depth)
    block_mask = model.build_peagle_block_mask(anchor_pos, depth, lengths, seq_len)
    hidden = model.forward_peagle(ids, projected, position_ids, block_mask)[0]

    reference = anchor_pos + depth
    supervised = (loss_mask[reference] != 0) & (reference < lengths.sum())
    rows = supervised.nonzero().squeeze(-1)
    draft_log_probs = F.log_softmax(model.compute_logits(hidden[rows]).float(), dim=-1)
    with torch.no_grad():
        target = _target_draft_logits(model, reference[rows], target_logits, target_last_hidden, target_lm_head)
        target_log_probs = F.log_softmax(target.float(), dim=-1)
    kl = F.kl_div(draft_log_probs, target_log_probs, reduction="sum", log_target=True)
    loss = kl / max(rows.numel(), 1)

    with torch.no_grad():
        num_depths = max(num_depths, int(depth.max()) + 1)
        correct = (draft_log_probs.argmax(-1) == target_log_probs.argmax(-1)).float()
        count = torch.bincount(depth[rows], minlength=num_depths)
        hits = torch.bincount(depth[rows], weights=correct, minlength=num_depths)
        accuracy = hits / count.clamp(min=1)
        accuracy[count == 0] = math.nan
    return PeagleStepOutput(loss, accuracy, count)


class TinyTarget(nn.Module):
    """A tiny random target model for the demo: the next-token distribution depends on the
    current token only (a random Markov chain computed by residual MLP layers).

    ``forward(tokens [S])`` returns (aux_hidden_states [S, num_aux * hidden]: the outputs of its
    ``num_aux`` layers, logits [S, vocab]).
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_aux: int = 3, sharpness: float = 8.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.RMSNorm(hidden_size), nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(), nn.Linear(2 * hidden_size, hidden_size))
            for _ in range(num_aux)
        )
        self.norm = nn.RMSNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.sharpness = sharpness

    def forward(self, tokens: torch.Tensor):
        hidden = self.embed(tokens)
        aux = []
        for layer in self.layers:
            hidden = hidden + layer(hidden)
            aux.append(hidden)
        logits = self.sharpness * self.lm_head(self.norm(hidden)) / self.lm_head.weight.norm(dim=-1)
        return torch.cat(aux, dim=-1), logits

    @torch.no_grad()
    def sample(self, length: int, generator: torch.Generator) -> torch.Tensor:
        """A token sequence [length] drawn from the model's own next-token distribution (on CPU)."""
        table = self(torch.arange(self.embed.num_embeddings, device=self.embed.weight.device))[1].softmax(-1).cpu()
        tokens = [int(torch.randint(table.size(0), (1,), generator=generator))]
        for _ in range(length - 1):
            tokens.append(int(torch.multinomial(table[tokens[-1]], 1, generator=generator)))
        return torch.tensor(tokens, device=self.embed.weight.device)


def _progress(step: int, total: int, loss: float, accuracy: torch.Tensor, width: int = 24) -> str:
    filled = width * step // total
    depths = " ".join("--" if math.isnan(a) else f"{a:.2f}" for a in accuracy.tolist())
    return f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total} loss {loss:.4f} acc/depth {depths}"


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m peagle_ext train-demo",
        description="Train a tiny P-EAGLE draft on synthetic data from a tiny random target, then save it.",
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--seq-len", type=int, default=64, help="positions per training sequence (default 64)")
    parser.add_argument("--depths", type=int, default=4, help="COD depths, depth 0 included (default 4)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--out", default="peagle_demo_checkpoint", help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--vocab", type=int, default=128, help="vocabulary size (default 128)")
    parser.add_argument("--hidden-size", type=int, default=64, help="draft hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="draft layers (default 2)")
    args = parser.parse_args(argv)
    for name in ("steps", "seq_len", "depths", "vocab", "hidden_size", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        parser.error("--seq-len must be >= 2")
    return args


def train_demo_main(argv: list[str] | None = None) -> int:
    """``python -m peagle_ext train-demo``: train a tiny draft on CPU or GPU with a progress bar
    (stderr) of loss and per-depth accuracy, print a summary, save a checkpoint. Returns 0."""
    args = _parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    target_hidden = 32
    target = TinyTarget(args.vocab, target_hidden).to(device).eval()
    config = Eagle3DraftConfig(
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        draft_vocab_size=args.vocab,
        target_hidden_size=target_hidden,
        parallel_drafting=True,
        num_depths=args.depths,
        max_position_embeddings=args.seq_len,
    )
    model = LlamaEagle3DraftModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_mask = torch.ones(args.seq_len, device=device)
    interactive = sys.stderr.isatty()
    print(f"train-demo: {args.steps} steps on {device}, seq-len {args.seq_len}, {args.depths} depths", file=sys.stderr)
    losses, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        with torch.no_grad():
            tokens = target.sample(args.seq_len + 1, generator)
            input_ids, aux, logits, _ = eagle_pairs(tokens, *target(tokens))
        out = peagle_training_step(model, input_ids, aux, loss_mask, target_logits=logits, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if interactive or step % max(1, args.steps // 10) == 0 or step == args.steps:
            line = _progress(step, args.steps, losses[-1], out.depth_accuracy)
            print(("\r" + line) if interactive else line, end="" if interactive else "\n", file=sys.stderr, flush=True)
    if interactive:
        print(file=sys.stderr)
    window = max(1, min(5, len(losses) // 4))
    model.save_pretrained(args.out)
    accuracy = " ".join(f"d{d}={a:.2f}" for d, a in enumerate(out.depth_accuracy.tolist()))
    print(f"loss: first {window} steps {sum(losses[:window]) / window:.4f}, last {window} steps {sum(losses[-window:]) / window:.4f}")
    print(f"last-step accuracy per depth: {accuracy}")
    print(f"trained in {time.perf_counter() - started:.1f} s; checkpoint written to {args.out}")
    return 0
