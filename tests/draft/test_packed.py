"""The oneDNN-packed linear layers of the decoding loop: the same products as F.linear, rebuilt
when a weight changes, left alone where they cannot apply, and gone after the block."""

from __future__ import annotations

import pytest
import torch

from peagle_ext.draft.speculative.packed import packed_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed inner product")


def layers(bias: bool, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias), torch.nn.ReLU(),
                               torch.nn.Linear(40, 8, bias=bias)).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (6, 24), (2, 5, 24), (0, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_product_equals_f_linear(bias, shape, dtype):
    module = layers(bias, dtype)
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        expected = module(x)
        with packed_linears(module):
            assert "forward" in module[0].__dict__  # the packed product is in place
            got = module(x)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(got, expected, **tolerance)
    assert "forward" not in module[0].__dict__ and "forward" not in module[2].__dict__


def test_a_weight_changed_in_place_or_replaced_is_packed_again():
    module = layers(True)
    x = torch.randn(3, 24)
    with torch.no_grad(), packed_linears(module):
        module(x)
    with torch.no_grad():
        module[0].weight.mul_(2)  # in place: the version counter moves
        module[2].weight = torch.nn.Parameter(torch.randn(8, 40))  # replaced
        expected = module(x)
        with packed_linears(module):
            got = module(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gradients_other_dtypes_and_disabled_packing_use_the_plain_product():
    module = layers(True)
    x = torch.randn(3, 24, requires_grad=True)
    with packed_linears(module):
        out = module(x)  # a gradient is wanted: F.linear, differentiable
        out.sum().backward()
        assert x.grad is not None and module[0].weight.grad is not None
        with torch.no_grad():  # another dtype than the weights: F.linear's own error, not oneDNN's
            with pytest.raises(RuntimeError, match="dtype|type"):
                module(torch.randn(3, 24, dtype=torch.float64))
    with packed_linears(module, enabled=False):
        assert "forward" not in module[0].__dict__


def test_a_layer_whose_forward_is_already_replaced_is_left_alone():
    module = layers(False)
    own = module[0].forward
    module[0].forward = lambda x: own(x) + 1  # as accelerate's hooks replace a forward
    x = torch.randn(2, 24)
    with torch.no_grad():
        expected = module(x)
        with packed_linears(module):
            got = module(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert "forward" in module[0].__dict__  # still the user's
