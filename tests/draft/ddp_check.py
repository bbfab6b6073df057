"""Run under `torchrun --nproc-per-node 2` (gloo, CPU) by test_distributed.py.

Each rank trains on its own sequence and COD layout through DistributedDataParallel, flat and
partitioned; rank 0 compares the averaged gradients with one process's gradient of the global
batch's loss (both sequences, normalized by their total supervised count). Prints one line per
check and exits non-zero on a mismatch.
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (draft_helpers)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout
import peagle_ext  # noqa: E402
from peagle_ext.draft.training import peagle_training_step  # noqa: E402

from draft_helpers import random_sequence, tiny_model  # noqa: E402

SEQ = 36


def sequence(model, rank: int):
    """Rank `rank`'s inputs: its own tokens, loss mask, target and COD layout."""
    ids, aux = random_sequence(model, SEQ, seed=10 + rank)
    loss_mask = (torch.rand(SEQ, generator=torch.Generator().manual_seed(20 + rank)) < 0.7 + 0.2 * rank).float()
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(SEQ, loss_mask, 4, down_sample_ratio=0.9,
                                                               generator=torch.Generator().manual_seed(30 + rank))
    target = torch.randn(SEQ, model.config.vocab_size, generator=torch.Generator().manual_seed(40 + rank))
    return (ids, aux, loss_mask), dict(target_logits=target, anchor_pos=anchor_pos, depth=depth,
                                       lengths=torch.tensor([20, 12 - 4 * rank]))


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = tiny_model(num_hidden_layers=2).train()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    reference = tiny_model(num_hidden_layers=2).train()
    reference.load_state_dict(model.state_dict())

    # One process, the global batch: sum of both sequences' KL / their total supervised count.
    total_kl, total_count = 0.0, 0
    for r in range(world):
        args, kwargs = sequence(reference, r)
        out = peagle_training_step(reference, *args, **kwargs)
        total_kl = total_kl + out.loss * out.num_supervised
        total_count += out.num_supervised
    (total_kl / total_count).backward()
    expected = {name: p.grad for name, p in reference.named_parameters()}

    ddp = DistributedDataParallel(model)
    failures = 0
    for partitions in (1, 3):
        ddp.zero_grad(set_to_none=True)
        args, kwargs = sequence(model, rank)
        out = peagle_training_step(ddp, *args, sequence_partitions=partitions, **kwargs)
        if out.loss.requires_grad:
            out.loss.backward()
        worst = max((p.grad - expected[name]).abs().max().item() for name, p in model.named_parameters())
        mean_loss = out.loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        loss_error = abs(mean_loss.item() - (total_kl / total_count).item())
        ok = worst <= 1e-5 and loss_error <= 1e-5
        failures += not ok
        if rank == 0:
            print(f"partitions {partitions}: max gradient difference {worst:.2e}, loss difference {loss_error:.2e}: "
                  f"{'ok' if ok else 'MISMATCH'}", flush=True)
    del ddp  # the reducer (and its hold on the group) goes first: gloo threads left at exit abort
    gc.collect()
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
