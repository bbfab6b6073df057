"""Worker processes for test_context_parallel.py (gloo, CPU), started by torch.multiprocessing.

Every rank runs each case twice: the single-process step (the reference: one process, the whole
sample) and the context-parallel step over its group; it writes what it saw to
``<out>/<case>.<rank>.json``, and the tests compare. Gradients are compared after summing them
over the group (``all_reduce_gradients``), or as a DDP / FSDP2 wrapper left them.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (draft_helpers)
import peagle_ext  # noqa: E402
from peagle_ext.draft.context_parallel import all_reduce_gradients  # noqa: E402
from peagle_ext.training import peagle_training_step  # noqa: E402

from draft_helpers import random_sequence, tiny_model  # noqa: E402

SEQ = 40
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def sample(model, seed: int, rows: int = 0, documents=(24, 10)):
    """(args, kwargs) of one step: tokens, aux states, loss mask, target and COD layout; a batch of
    ``rows`` rows (each its own documents) when rows > 0."""
    if rows:
        parts = [sample(model, seed + 100 * row, documents=(SEQ - 8 * row - 5, 3 + row)) for row in range(rows)]
        stacked = [torch.stack([part[0][i] for part in parts]) for i in range(3)]
        layout = peagle_ext.pad_rows([(part[1]["anchor_pos"], part[1]["depth"]) for part in parts], SEQ)
        return stacked, dict(target_logits=torch.stack([part[1]["target_logits"] for part in parts]),
                             anchor_pos=layout[0], depth=layout[1],
                             lengths=[part[1]["lengths"] for part in parts])
    ids, aux = random_sequence(model, SEQ, seed=seed)
    loss_mask = (torch.rand(SEQ, generator=torch.Generator().manual_seed(seed + 1)) < 0.8).float()
    anchor_pos, depth = peagle_ext.generate_cod_sample_indices(SEQ, loss_mask, 4, down_sample_ratio=0.9,
                                                               generator=torch.Generator().manual_seed(seed + 2))
    target = torch.randn(SEQ, model.config.vocab_size, generator=torch.Generator().manual_seed(seed + 3))
    return (ids, aux, loss_mask), dict(target_logits=target, anchor_pos=anchor_pos, depth=depth,
                                       lengths=torch.tensor(documents))


def perturbed_model(layers: int):
    model = tiny_model(num_hidden_layers=layers).train()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    return model


def twin(model):
    other = tiny_model(num_hidden_layers=len(model.model.layers)).train()
    other.load_state_dict(model.state_dict())
    return other


def record_masks(model, shapes: list):
    """Note the (Q_LEN, KV_LEN) of every mask the draft builds."""
    build = model.build_peagle_block_mask

    def recording(*args, **kwargs):
        mask = build(*args, **kwargs)
        shapes.append(list(mask.shape[-2:]))
        return mask

    model.build_peagle_block_mask = recording


def compare(reference_out, reference, out, model_grads) -> dict:
    """What a case reports: losses, metrics, and the worst gradient difference from the reference."""
    worst, mismatched = 0.0, []
    for name, parameter in reference.named_parameters():
        expected, got = parameter.grad, model_grads[name]
        worst = max(worst, (expected - got).abs().max().item())
        if not torch.allclose(got, expected, **TOLERANCE):
            mismatched.append(name)
    return dict(loss=out.loss.item(), reference_loss=reference_out.loss.item(), max_gradient_difference=worst,
                mismatched=mismatched, count=out.depth_count.tolist(),
                reference_count=reference_out.depth_count.tolist(),
                accuracy=out.depth_accuracy.nan_to_num(-1).tolist(),
                reference_accuracy=reference_out.depth_accuracy.nan_to_num(-1).tolist())


def reference_step(model, args, kwargs, **extra):
    reference = twin(model)
    out = peagle_training_step(reference, *args, **kwargs, **extra)
    out.loss.backward()
    return reference, out


def context_parallel_case(group, layers=2, rows=0, window=None, checkpointing=False, last_hidden=False):
    model = perturbed_model(layers)
    args, kwargs = sample(model, seed=5, rows=rows)
    extra = {"sliding_window": window}
    if last_hidden:
        head = torch.nn.Linear(model.config.target_hidden_size, model.config.vocab_size, bias=True)
        hidden = torch.randn(*args[0].shape, model.config.target_hidden_size,
                             generator=torch.Generator().manual_seed(9))
        kwargs.pop("target_logits")
        extra.update(target_last_hidden=hidden, target_lm_head=head)
    reference, reference_out = reference_step(model, args, kwargs, **extra)
    shapes = []
    record_masks(model, shapes)
    if checkpointing:
        model.gradient_checkpointing_enable()
    out = peagle_training_step(model, *args, **kwargs, **extra, context_parallel_group=group)
    out.loss.backward()
    all_reduce_gradients(model, group)
    result = compare(reference_out, reference, out, {n: p.grad for n, p in model.named_parameters()})
    result.update(mask_shapes=shapes, num_elements=kwargs["anchor_pos"].shape[-1])
    return result


def eager_flex_case(group):
    """Under no_grad the CPU attention is eager flex_attention (no dense fallback): each rank's
    queries against the gathered keys, the loss and metrics the single process's."""
    model = perturbed_model(2)
    args, kwargs = sample(model, seed=15)
    with torch.no_grad():
        reference = peagle_training_step(twin(model), *args, **kwargs, sliding_window=6)
        out = peagle_training_step(model, *args, **kwargs, sliding_window=6, context_parallel_group=group)
    return dict(loss=out.loss.item(), reference_loss=reference.loss.item(), count=out.depth_count.tolist(),
                reference_count=reference.depth_count.tolist(), accuracy=out.depth_accuracy.nan_to_num(-1).tolist(),
                reference_accuracy=reference.depth_accuracy.nan_to_num(-1).tolist())


def drawn_layout_case(group):
    """No layout given, each rank's generator seeded differently: the first rank's draw is used."""
    model = perturbed_model(2)
    args, kwargs = sample(model, seed=7)
    kwargs.pop("anchor_pos"), kwargs.pop("depth")
    rank = dist.get_rank(group)
    first = dict(generator=torch.Generator().manual_seed(50), num_depths=4, down_sample_ratio=0.9)
    reference, reference_out = reference_step(model, args, kwargs, **first)
    mine = dict(first, generator=torch.Generator().manual_seed(50 + 17 * rank))
    out = peagle_training_step(model, *args, **kwargs, **mine, context_parallel_group=group)
    out.loss.backward()
    all_reduce_gradients(model, group)
    return compare(reference_out, reference, out, {n: p.grad for n, p in model.named_parameters()})


def refused(group, **kwargs) -> dict:
    """The step's error (type and message) on this rank, or None."""
    model = perturbed_model(1)
    args, sample_kwargs = sample(model, seed=3)
    sample_kwargs.update(kwargs)
    try:
        peagle_training_step(model, *args, **sample_kwargs, context_parallel_group=group)
    except (TypeError, ValueError) as error:
        return dict(error=type(error).__name__, message=str(error))
    return dict(error=None)


def mismatched_layout_case(group):
    model = perturbed_model(1)
    args, kwargs = sample(model, seed=3)
    if dist.get_rank(group) == 1:
        kwargs["depth"] = kwargs["depth"].flip(0)
    return refused_with(model, args, kwargs, group)


def refused_with(model, args, kwargs, group):
    try:
        peagle_training_step(model, *args, **kwargs, context_parallel_group=group)
    except (TypeError, ValueError) as error:
        return dict(error=type(error).__name__, message=str(error))
    return dict(error=None)


def ddp_case(group):
    """DDP over the context group itself (a data x context mesh of 1 x 2): its averaging alone
    gives the single-process gradients."""
    from torch.nn.parallel import DistributedDataParallel

    model = perturbed_model(2)
    args, kwargs = sample(model, seed=11)
    reference, reference_out = reference_step(model, args, kwargs, sliding_window=9)
    ddp = DistributedDataParallel(model, process_group=dist.new_group(dist.get_process_group_ranks(group)))
    out = peagle_training_step(ddp, *args, **kwargs, sliding_window=9, context_parallel_group=group)
    out.loss.backward()
    result = compare(reference_out, reference, out, {n: p.grad for n, p in model.named_parameters()})
    del ddp
    gc.collect()
    return result


def fsdp_case(group):
    """FSDP2 (fully_shard) over the context ranks, each layer its own unit, gradients summed
    (divide factor 1)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    model = perturbed_model(2)
    args, kwargs = sample(model, seed=13)
    reference, reference_out = reference_step(model, args, kwargs)
    mesh = DeviceMesh.from_group(group, "cpu")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
        register_fsdp_forward_method(layer, "forward_peagle")  # the draft calls its layers so, not by __call__
    fully_shard(model, mesh=mesh)
    for unit in (*model.model.layers, model):  # each unit reduces its own gradients
        unit.set_gradient_divide_factor(1.0)  # the data-parallel size: 1 here
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM (nor AVG)
    out = peagle_training_step(model, *args, **kwargs, context_parallel_group=group)
    out.loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return compare(reference_out, reference, out, grads)


def ddp_outside_case(group):
    """DDP over this rank alone while the context group holds both: refused before any collective."""
    from torch.nn.parallel import DistributedDataParallel

    alone = [dist.new_group([rank]) for rank in range(dist.get_world_size())][dist.get_rank()]
    model = perturbed_model(1)
    ddp = DistributedDataParallel(model, process_group=alone)
    args, kwargs = sample(model, seed=3)
    result = refused_with(ddp, args, kwargs, group)
    del ddp
    gc.collect()
    return result


def non_member_case(group):
    """A group without this rank (torch hands non-members a placeholder, not a ProcessGroup)."""
    others = [dist.new_group([rank]) for rank in range(dist.get_world_size())]
    model = perturbed_model(1)
    args, kwargs = sample(model, seed=3)
    return refused_with(model, args, kwargs, others[1 - dist.get_rank()])


def too_few_elements_case(group):
    """One element for two ranks."""
    model = perturbed_model(1)
    ids, aux = random_sequence(model, 1, seed=2)
    args = (ids, aux, torch.ones(1))
    kwargs = dict(target_logits=torch.randn(1, model.config.vocab_size), anchor_pos=torch.tensor([0]),
                  depth=torch.tensor([0]))
    return refused_with(model, args, kwargs, group)


CASES = {
    "one_layer": lambda g: context_parallel_case(g, layers=1),
    "two_layers_documents_window": lambda g: context_parallel_case(g, layers=2, window=7),
    "one_layer_window": lambda g: context_parallel_case(g, layers=1, window=3),
    "batch_of_two_rows": lambda g: context_parallel_case(g, layers=2, rows=2, window=11),
    "gradient_checkpointing": lambda g: context_parallel_case(g, layers=2, checkpointing=True),
    "target_last_hidden": lambda g: context_parallel_case(g, layers=2, last_hidden=True),
    "drawn_layout": drawn_layout_case,
    "eager_flex_no_grad": eager_flex_case,
    "sequence_partitions": lambda g: refused(g, sequence_partitions=2),
    "mismatched_layout": mismatched_layout_case,
    "ddp": ddp_case,
    "fsdp2": fsdp_case,
    "ddp_outside": ddp_outside_case,
    "non_member": non_member_case,
    "too_few_elements": too_few_elements_case,
}


def worker(rank: int, world: int, store_path: str, out: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    try:
        for name in cases:
            try:
                result = CASES[name](group)
            except Exception:  # noqa: BLE001 - reported to the test, which fails on it
                result = dict(crash=traceback.format_exc())
            with open(os.path.join(out, f"{name}.{rank}.json"), "w") as handle:
                json.dump(result, handle)
            dist.barrier()
    finally:
        gc.collect()
        dist.barrier()  # nobody tears gloo down while a peer still talks to it
        dist.destroy_process_group()


def mesh_worker(rank: int, world: int, store_path: str, directory: str) -> None:
    """A 2 x 2 data x context mesh: ranks {0, 1} share sample A, ranks {2, 3} sample B; DDP over
    all four averages the gradients. Each rank compares with one process's gradient of the global
    batch's loss (both samples' KL over their total supervised count)."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    context_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = context_groups[rank // 2]
    try:
        model = perturbed_model(2)
        reference = twin(model)
        samples = [sample(model, seed=21), sample(model, seed=31, documents=(15, 25))]
        total_kl, total_count = 0.0, 0
        for args, kwargs in samples:
            single = peagle_training_step(reference, *args, **kwargs, sliding_window=13)
            total_kl = total_kl + single.loss * single.num_supervised
            total_count += single.num_supervised
        global_loss = total_kl / total_count
        global_loss.backward()
        ddp = DistributedDataParallel(model)
        args, kwargs = samples[rank // 2]
        out = peagle_training_step(ddp, *args, **kwargs, sliding_window=13, context_parallel_group=group)
        out.loss.backward()
        mean_loss = out.loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world  # each sample's loss counted once per context rank
        result = compare(out, reference, out, {n: p.grad for n, p in model.named_parameters()})
        result.update(mean_loss=mean_loss.item(), global_loss=global_loss.item())
        del ddp
    except Exception:  # noqa: BLE001
        result = dict(crash=traceback.format_exc())
    with open(os.path.join(directory, f"mesh.{rank}.json"), "w") as handle:
        json.dump(result, handle)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
