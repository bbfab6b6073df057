"""Careless and hostile values of peagle_training_step's ``context_parallel_group``: each is refused
by name before any collective, or (a group of one process) gives exactly the step without it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from peagle_ext.training import peagle_training_step

from draft_helpers import random_sequence, single_thread, tiny_model  # noqa: F401 - single_thread is a fixture

SEQ = 20


@pytest.fixture(scope="module")
def lone_group():
    """A gloo process group of this process alone (world size 1)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def step_inputs(model):
    ids, aux = random_sequence(model, SEQ, seed=4)
    target = torch.randn(SEQ, model.config.vocab_size, generator=torch.Generator().manual_seed(6))
    return (ids, aux, torch.ones(SEQ)), dict(target_logits=target, generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("group", [0, 2, "gloo", "cp", [0, 1], (0,), True, 1.5, object(), torch.tensor([0, 1])])
def test_a_group_that_is_no_process_group_is_a_type_error_naming_it(group):
    model = tiny_model(num_hidden_layers=1)
    args, kwargs = step_inputs(model)
    with pytest.raises(TypeError, match="context_parallel_group must be a torch.distributed ProcessGroup"):
        peagle_training_step(model, *args, **kwargs, context_parallel_group=group)


@pytest.mark.parametrize("partitions", [2, 3, 64])
def test_sequence_partitions_with_a_group_are_refused_by_name(lone_group, partitions):
    model = tiny_model(num_hidden_layers=1)
    args, kwargs = step_inputs(model)
    with pytest.raises(ValueError, match="sequence_partitions must be 1 with context_parallel_group"):
        peagle_training_step(model, *args, **kwargs, sequence_partitions=partitions, context_parallel_group=lone_group)


@pytest.mark.parametrize("partitions", [0, -1, 1.0, "2", None, True])
def test_bad_sequence_partitions_are_still_named_with_a_group(lone_group, partitions):
    model = tiny_model(num_hidden_layers=1)
    args, kwargs = step_inputs(model)
    with pytest.raises(ValueError, match="sequence_partitions must be an int >= 1"):
        peagle_training_step(model, *args, **kwargs, sequence_partitions=partitions, context_parallel_group=lone_group)


def test_a_mesh_of_two_dimensions_is_refused_by_name(lone_group):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "cp"))
    model = tiny_model(num_hidden_layers=1)
    args, kwargs = step_inputs(model)
    with pytest.raises(ValueError, match="context_parallel_group must be a one-dimensional DeviceMesh"):
        peagle_training_step(model, *args, **kwargs, context_parallel_group=mesh)
    out = peagle_training_step(model, *args, **kwargs, context_parallel_group=mesh["cp"])  # one dimension: taken
    assert out.loss.isfinite()


@pytest.mark.parametrize("layers", [1, 2])
def test_a_group_of_one_process_is_exactly_the_plain_step(lone_group, layers):
    model = tiny_model(num_hidden_layers=layers).train()
    twin = tiny_model(num_hidden_layers=layers).train()
    args, kwargs = step_inputs(model)
    plain = peagle_training_step(twin, *args, **kwargs, sliding_window=5)
    plain.loss.backward()
    kwargs["generator"] = torch.Generator().manual_seed(8)
    shared = peagle_training_step(model, *args, **kwargs, sliding_window=5, context_parallel_group=lone_group)
    shared.loss.backward()
    assert torch.allclose(shared.loss, plain.loss, atol=1e-6, rtol=1e-6)
    assert torch.equal(shared.depth_count, plain.depth_count)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-6), name


@pytest.mark.parametrize("window", [0, -3, 2.5, "5", True, 2**70])
def test_a_window_is_checked_as_without_a_group(lone_group, window):
    """The same error as the plain step (the mask builder's), before the shares are cut; a window past
    every sequence is no window."""
    model = tiny_model(num_hidden_layers=1)
    args, kwargs = step_inputs(model)
    try:
        plain = peagle_training_step(model, *args, **kwargs, sliding_window=window)
    except (TypeError, ValueError) as error:
        with pytest.raises(type(error), match="sliding_window"):
            kwargs["generator"] = torch.Generator().manual_seed(8)
            peagle_training_step(model, *args, **kwargs, sliding_window=window, context_parallel_group=lone_group)
        assert "sliding_window" in str(error)
        return
    kwargs["generator"] = torch.Generator().manual_seed(8)
    shared = peagle_training_step(model, *args, **kwargs, sliding_window=window, context_parallel_group=lone_group)
    assert torch.allclose(shared.loss, plain.loss, atol=1e-6)
