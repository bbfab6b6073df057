"""The peers' own P-EAGLE training forward on the CPU, with and without peagle_ext.integrations.

    python benchmarks/bench_peer_training.py [--peers speculators automodel] [--lengths 2048 4096 8192]
        [--depths 8] [--heads 1] [--repeats 2] [--max-gb 10]

For each peer and original length S: a tiny draft (1 layer, hidden 64), one sequence of S tokens
in 4 documents, all supervised, COD over --depths depths; the peer's own forward and loss (speculators'
PEagleDraftModel.forward, NeMo Automodel's PEagleTrainerModule.forward) under no_grad, first with the
peer's own mask (create_block_mask over the dense N x N grid) and with enable(peer), alternating
step by step on the same COD samples (the losses are checked equal). After one warm-up pair, the
median of --repeats steps is reported, with the time spent building the mask inside them and the
peak RSS during them (sampled every 5 ms).

flex_attention has no CPU backward, and on the CPU it runs eagerly: it materializes the N x N score
matrix for every head and evaluates the mask_mod densely over it, whichever mask was built. So
the attention itself costs O(N^2) memory here (a compiled flex_attention on a GPU reads only the
block lists). Sizes whose estimated peak exceeds --max-gb are skipped, saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time

import torch

from peagle_ext import integrations

HIDDEN, VOCAB, AUX, DOCUMENTS = 64, 128, 3, 4
# Peak bytes above the baseline of one eager CPU step per element pair and head, measured here
# (both peers, both masks, S = 2048 and 4096: 13.6-13.8); the estimate that decides what is skipped.
BYTES_PER_PAIR_AND_HEAD = 14


def cod_elements(seq_len: int, depths: int, ratio: float = 0.7, floor: float = 0.2) -> int:
    """About how many elements COD samples (all positions supervised)."""
    return int(seq_len * sum(max(ratio**d, floor) for d in range(depths)))


def document_ids(seq_len: int) -> torch.Tensor:
    return torch.arange(seq_len) * DOCUMENTS // seq_len


def speculators_step(seq_len: int, depths: int, heads: int):
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.losses import resolve_loss_config
    from speculators.models.peagle import PEagleDraftModel, PEagleSpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig
    from transformers import LlamaConfig

    layers = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_attention_heads=heads,
                         num_key_value_heads=1, num_hidden_layers=1, vocab_size=VOCAB, max_position_embeddings=seq_len)
    layers._attn_implementation = "simple_flex_attention"
    model = PEagleDraftModel(PEagleSpeculatorConfig(
        transformer_layer_config=layers, draft_vocab_size=VOCAB, mask_token_id=VOCAB - 1,
        speculators_config=SpeculatorsConfig(
            algorithm="peagle", proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=depths)],
            default_proposal_method="greedy", verifier=VerifierConfig(name_or_path=None, architectures=[])))).eval()
    with torch.no_grad():
        for weight in (model.lm_head.weight, model.embed_tokens.weight, model.verifier_lm_head.weight):
            weight.normal_()
    batch = dict(hidden_states=torch.randn(1, seq_len, AUX * HIDDEN),
                 input_ids=torch.randint(0, VOCAB - 1, (1, seq_len)),
                 document_ids=document_ids(seq_len)[None], loss_mask=torch.ones(1, seq_len),
                 verifier_last_hidden_states=torch.randn(1, seq_len, HIDDEN), num_depths=depths,
                 loss_config=resolve_loss_config("kl_div", "eager"))  # the default loss is a Triton kernel

    def step():
        return model(**batch)[1]

    return step, model, "_create_mask_fn"


def automodel_step(seq_len: int, depths: int, heads: int):
    from nemo_automodel.components.speculative.eagle.draft_llama import LlamaEagle3DraftModel
    from nemo_automodel.components.speculative.eagle.peagle_trainer import PEagleTrainerModule
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_attention_heads=heads,
                         num_key_value_heads=1, num_hidden_layers=1, vocab_size=VOCAB, max_position_embeddings=seq_len)
    for key, value in dict(draft_vocab_size=VOCAB, target_hidden_size=HIDDEN, num_aux_hidden_states=AUX,
                           parallel_drafting=True, mask_token_id=VOCAB - 1, num_depths=depths,
                           attn_implementation="eager").items():
        setattr(config, key, value)
    draft = LlamaEagle3DraftModel(config).float().eval()
    trainer = PEagleTrainerModule(draft, selected_token_ids=torch.arange(VOCAB),
                                  selected_token_mask=torch.ones(VOCAB, dtype=torch.bool), num_depths=depths,
                                  mask_token_id=VOCAB - 1)
    # Automodel's mask has documents only as lengths from position 0: one row of S tokens.
    attention_mask = torch.ones(1, seq_len, dtype=torch.long)
    batch = dict(input_ids=torch.randint(0, VOCAB - 1, (1, seq_len)), attention_mask=attention_mask,
                 loss_mask=attention_mask.float(), aux_hidden_states=torch.randn(1, seq_len, AUX * HIDDEN),
                 target_logits=torch.randn(1, seq_len, VOCAB))

    def step():
        return trainer(**batch).loss

    return step, draft, "build_peagle_block_mask"


PEERS = {"speculators": speculators_step, "automodel": automodel_step}


@contextlib.contextmanager
def timing_calls(owner, name: str, builds: list):
    """Route owner.name (a mask builder) through a wrapper that appends (seconds, N) per call."""
    saved = owner.__dict__.get(name)
    builder = getattr(owner, name)  # the peer's own builder or, while enabled, peagle_ext's

    def timed(*args, **kwargs):
        start = time.perf_counter()
        block_mask = builder(*args, **kwargs)
        builds.append((time.perf_counter() - start, block_mask.seq_lengths[0]))
        return block_mask

    setattr(owner, name, timed)
    try:
        yield
    finally:
        if saved is None:
            delattr(owner, name)
        else:
            setattr(owner, name, saved)


class PeakRSS:
    """The largest resident set size seen while the block runs, sampled by a thread (Linux)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


MODES = ("own", "peagle_ext")


def timed_step(peer: str, mode: str, step, owner, name: str, seed: int) -> dict:
    """One step in `mode`: its time and the mask builds' (ms), peak RSS (GiB), N and loss."""
    (integrations.enable if mode == "peagle_ext" else integrations.disable)(peer)
    builds = []
    torch.manual_seed(seed)  # the same COD sample in both modes
    with torch.no_grad(), PeakRSS() as rss, timing_calls(owner, name, builds):
        start = time.perf_counter()
        loss = step()
        step_ms = 1e3 * (time.perf_counter() - start)
    return dict(step=step_ms, mask=1e3 * sum(seconds for seconds, _ in builds), rss=rss.peak / 2**30,
                n=builds[-1][1], loss=float(loss))


def run(peer: str, seq_len: int, args) -> str:
    n_estimate = cod_elements(seq_len, args.depths)
    need_gb = BYTES_PER_PAIR_AND_HEAD * args.heads * n_estimate**2 / 2**30
    if need_gb > args.max_gb:
        return (f"{peer:<12} {seq_len:>6} {n_estimate:>7}  skipped: the eager CPU step needs about {need_gb:.1f} GiB "
                f"(N^2 scores and dense mask_mod per head), over --max-gb {args.max_gb:g}")
    torch.manual_seed(0)
    step, owner, name = PEERS[peer](seq_len, args.depths, args.heads)
    # The modes alternate step by step, so that a busy machine slows both alike; the first
    # pair warms up (first-touch page faults, lazy imports, loading the compiled library).
    steps = {mode: [] for mode in MODES}
    for repeat in range(1 + args.repeats):
        pair = {mode: timed_step(peer, mode, step, owner, name, seed=repeat) for mode in MODES}
        assert pair["own"]["loss"] == pair["peagle_ext"]["loss"], pair
        for mode in MODES[: 2 if repeat else 0]:
            steps[mode].append(pair[mode])
    integrations.disable(peer)
    own, ours = ({key: statistics.median(r[key] for r in steps[mode]) for key in ("step", "mask", "rss", "n")}
                 for mode in MODES)
    return (f"{peer:<12} {seq_len:>6} {own['n']:>7.0f} {own['mask']:>9.1f} {ours['mask']:>9.1f} {own['step']:>9.0f} "
            f"{ours['step']:>9.0f} {100 * own['mask'] / own['step']:>6.1f}% {100 * ours['mask'] / ours['step']:>6.1f}% "
            f"{own['rss']:>6.2f} {ours['rss']:>6.2f} {own['step'] / ours['step']:>6.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--peers", nargs="+", choices=sorted(PEERS), default=["speculators", "automodel"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--depths", type=int, default=8)
    parser.add_argument("--heads", type=int, default=1, help="attention heads (one KV head)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=10.0, help="skip sizes estimated to need more")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; draft: 1 layer, hidden {HIDDEN}, "
          f"{args.heads} head(s); {args.depths} depths; no_grad; median of {args.repeats} warm steps, "
          "modes alternating")
    print("mask: ms building the BlockMask inside one step; step: ms of the whole forward and loss; "
          "share: mask / step; RSS: peak GiB during the steps; speedup: own step / peagle_ext step")
    print(f"{'peer':<12} {'S':>6} {'N':>7} {'mask own':>9} {'mask ext':>9} {'step own':>9} {'step ext':>9} "
          f"{'share':>7} {'share':>7} {'RSS':>6} {'RSS':>6} {'speedup':>7}")
    print(f"{'':<12} {'':>6} {'':>7} {'':>9} {'':>9} {'':>9} {'':>9} {'own':>7} {'ext':>7} {'own':>6} {'ext':>6}")
    for peer in args.peers:
        for seq_len in args.lengths:
            print(run(peer, seq_len, args), flush=True)


if __name__ == "__main__":
    main()
