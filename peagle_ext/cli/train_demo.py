"""``python -m peagle_ext train-demo``: train a tiny P-EAGLE draft on synthetic data from a tiny
random target, with a progress bar, then save a checkpoint."""

from __future__ import annotations

import gc
import math
import os
import sys
import time
import warnings

import torch

from ..draft.tiny_target import EVAL_PROMPTS, TARGET_HIDDEN, demo_acceptance, demo_target
from . import (
    UsageError,
    add_device_option,
    check_checkpoint_out,
    check_directory_writable,
    check_memory,
    check_path,
    int_at_least,
    parser_for,
    positive_float,
    resolve_device,
)

# The demo draft's attention heads (key/value heads: half as many).
DEMO_HEADS = 4
def _progress(step: int, total: int, loss: float, accuracy: torch.Tensor, width: int = 24) -> str:
    filled = width * step // total
    depths = " ".join("--" if math.isnan(a) else f"{a:.2f}" for a in accuracy.tolist())
    return f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total} loss {loss:.4f} acc/depth {depths}"


def _save_noting_interop(model, out: str, verifier: str | None) -> None:
    """Save the checkpoint; when speculators or vLLM will lack something to load it (InteropWarning:
    the demo's target is no real model), say so in one ``note:`` line on stderr."""
    from ..draft.checkpoint import InteropWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InteropWarning)
        model.save_pretrained(out, verifier=verifier)
    for warning in caught:
        if not issubclass(warning.category, InteropWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if any(issubclass(warning.category, InteropWarning) for warning in caught):
        print(f"note: {out} is for peagle_ext (eval --draft {out} --target tiny); speculators and vLLM need a "
              "draft of a real target (train, or train-demo --verifier)", file=sys.stderr)


def demo_config(args):
    """The demo draft's Eagle3DraftConfig for these options."""
    from ..draft.llama import Eagle3DraftConfig

    return Eagle3DraftConfig(
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_attention_heads=DEMO_HEADS,
        num_key_value_heads=DEMO_HEADS // 2,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        draft_vocab_size=args.vocab,
        target_hidden_size=TARGET_HIDDEN,
        parallel_drafting=True,
        num_depths=args.depths,
        max_position_embeddings=args.seq_len,
    )


def check_out(out: str, overwrite: bool) -> None:
    """--out must be new, an empty directory, or (with --overwrite) a draft checkpoint (see
    :func:`peagle_ext.cli.check_checkpoint_out`)."""
    check_checkpoint_out("--out", out, overwrite)


def check_resources(args) -> None:
    """Usage errors, before any work, for a model or a step that would not fit in memory, or a
    checkpoint that would not fit on --out's file system."""
    from ..draft.llama import LlamaEagle3DraftModel

    with torch.device("meta"):  # sizes only: nothing is allocated
        parameters = sum(p.numel() for p in LlamaEagle3DraftModel(demo_config(args)).parameters())
    elements = args.seq_len * args.depths  # at most: every depth keeps every position
    # Weights, gradients and AdamW's two moments; the target's transition table (vocab x vocab) and
    # logits; activations per element and layer; on the CPU the dense attention fallback's N x N mask
    # and scores.
    needed = (16 * parameters + 8 * args.vocab**2 + 16 * args.seq_len * args.vocab
              + 64 * elements * args.hidden_size * args.layers)
    if args.device == "cpu":
        needed += 4 * DEMO_HEADS * 8 * elements**2 // args.sequence_partitions
    check_memory("--seq-len/--hidden-size/--layers/--vocab", needed, args.device,
                 f"training a {parameters}-parameter draft on up to {elements} elements per step")
    check_directory_writable("--out", args.out, needed_bytes=4 * parameters + (1 << 20))


def parse_args(argv: list[str]):
    parser = parser_for("train-demo")
    parser.add_argument("--steps", type=int_at_least(1), default=200, help="optimizer steps (default 200)")
    parser.add_argument("--seq-len", type=int_at_least(2), default=64,
                        help="positions per training sequence (default 64)")
    parser.add_argument("--depths", type=int_at_least(1), default=4, help="COD depths, depth 0 included (default 4)")
    add_device_option(parser)
    parser.add_argument("--out", default="peagle_demo_checkpoint", help="checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoint at --out (its config.json and model.safetensors; "
                             "other files stay)")
    parser.add_argument("--verifier", metavar="NAME_OR_PATH", default=None,
                        help="the target model's hub id or local directory, recorded in the checkpoint as "
                             "speculators' verifier (speculators' from_pretrained needs it)")
    parser.add_argument("--seed", type=int_at_least(0, 2**63 - 1 - 2**16), default=0, help="random seed (default 0)")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--vocab", type=int_at_least(2), default=128, help="vocabulary size (default 128)")
    parser.add_argument("--hidden-size", type=int_at_least(1, 1 << 16), default=64,
                        help=f"draft hidden size, a multiple of {2 * DEMO_HEADS} (default 64)")
    parser.add_argument("--layers", type=int_at_least(1, 256), default=2, help="draft layers (default 2)")
    parser.add_argument("--sequence-partitions", type=int_at_least(1), default=1,
                        help="segments per sequence, each with its own forward and backward (default 1: flat)")
    args = parser.parse_args(argv)
    if args.hidden_size % (2 * DEMO_HEADS):
        raise UsageError(f"argument --hidden-size: must be a multiple of {2 * DEMO_HEADS} ({DEMO_HEADS} attention "
                         f"heads of an even head dim, as rotary embeddings need), got {args.hidden_size}")
    check_out(args.out, args.overwrite)
    if args.verifier is not None:
        check_path("--verifier", args.verifier)
    args.device = resolve_device(args.device)
    check_resources(args)
    return args


def start_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) under torchrun (WORLD_SIZE > 1): joins the process group, gloo on
    CPU and nccl on GPU, one GPU per local rank; (0, 1, device) otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world_size, device


def main(argv: list[str]) -> int:
    """Train a tiny draft on CPU or GPU with a progress bar (stderr) of loss and per-depth accuracy,
    print a summary, save a checkpoint. Returns 0."""
    args = parse_args(argv)
    from torch.nn.parallel import DistributedDataParallel

    from ..draft.llama import LlamaEagle3DraftModel
    from ..draft.training import eagle_pairs, peagle_training_step

    rank, world_size, device = start_distributed(args.device)
    device = torch.device(device)
    target = demo_target(args.vocab, args.seed, device)  # seeds torch: the same target and initial draft on every rank
    generator = torch.Generator().manual_seed(args.seed + rank)  # each rank its own sequences and layouts
    config = demo_config(args)
    model = LlamaEagle3DraftModel(config).to(device).train()
    initial_state = {name: tensor.clone() for name, tensor in model.state_dict().items()} if rank == 0 else None
    trained = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_mask = torch.ones(args.seq_len, device=device)
    report = rank == 0  # rank 0 alone prints and saves
    interactive = report and sys.stderr.isatty()
    if report:
        print(f"train-demo: {args.steps} steps on {device}"
              + (f" x {world_size} processes (DistributedDataParallel)" if world_size > 1 else "")
              + f", seq-len {args.seq_len}, {args.depths} depths, {args.sequence_partitions} segment(s) per sequence",
              file=sys.stderr)
    losses, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        with torch.no_grad():
            tokens = target.sample(args.seq_len + 1, generator)
            input_ids, aux, logits, _ = eagle_pairs(tokens, *target(tokens))
        optimizer.zero_grad(set_to_none=True)
        out = peagle_training_step(trained, input_ids, aux, loss_mask, target_logits=logits, generator=generator,
                                   sequence_partitions=args.sequence_partitions)
        if out.loss.requires_grad:  # a partitioned step has run its backward already
            out.loss.backward()
        optimizer.step()
        loss = out.loss.detach()
        if world_size > 1:  # the global batch's loss is the mean of the ranks' losses
            torch.distributed.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
        if report and (interactive or step % max(1, args.steps // 10) == 0 or step == args.steps):
            line = _progress(step, args.steps, losses[-1], out.depth_accuracy)
            print(("\r" + line) if interactive else line, end="" if interactive else "\n", file=sys.stderr, flush=True)
    if interactive:
        print(file=sys.stderr)
    if world_size > 1:
        del trained  # the reducer (and its hold on the group) goes first: gloo threads left at exit abort
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not report:
        return 0
    window = max(1, min(5, len(losses) // 4))
    _save_noting_interop(model, args.out, args.verifier)
    accuracy = " ".join(f"d{d}={a:.2f}" for d, a in enumerate(out.depth_accuracy.tolist()))
    print(f"loss: first {window} steps {sum(losses[:window]) / window:.4f}, "
          f"last {window} steps {sum(losses[-window:]) / window:.4f}")
    print(f"last-step accuracy per depth: {accuracy}")
    print(f"trained in {time.perf_counter() - started:.1f} s; checkpoint (config.json, model.safetensors) "
          f"written to {args.out}")
    trained_length = demo_acceptance(model, target, args.depths, args.seed)
    if math.isnan(trained_length):
        print(f"acceptance length not measured: {model.config.max_position_embeddings} positions leave no room "
              f"for a prompt, {args.depths} proposals and a new token")
        return 0
    model.load_state_dict(initial_state)
    untrained_length = demo_acceptance(model, target, args.depths, args.seed)
    print(f"acceptance length at K = {args.depths} (tokens per target forward, greedy, {EVAL_PROMPTS} prompts drawn "
          f"from the target): trained {trained_length:.2f}, untrained {untrained_length:.2f}")
    return 0
