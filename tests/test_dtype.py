"""The adapted model follows the model's dtype: `.bfloat16()`, `.half()`, `.float()` after a rewrite give
outputs in the new dtype within its rounding, for every variant of the contract table, in both scopes."""

from __future__ import annotations

import pytest
import torch

import surgery
from adapters import LoRA
from cases import CASES
from models import SCOPES, rel_err
from surgery import errors as E
from test_control import X, adapted, toy

HALF = {torch.bfloat16: 3e-2, torch.float16: 3e-3}  # measured worst over the table: 1.7e-2 and 1.3e-3


def cast(model, dtype):
    return {torch.bfloat16: model.bfloat16, torch.float16: model.half, torch.float32: model.float}[dtype]()


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", list(HALF), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_float32_rewrite_cast_down_and_back(scope, dtype, case):
    model, _, out = adapted(scope, case)
    cast(model, dtype)
    got = model(X.to(dtype))
    assert got.dtype == dtype
    assert rel_err(got.float(), out) <= HALF[dtype]
    with surgery.disabled(model):  # the base in the new dtype, bit for bit
        assert torch.equal(model(X.to(dtype)), cast(toy(scope), dtype)(X.to(dtype)))
    cast(model, torch.float32)
    back = model(X)
    assert back.dtype == torch.float32 and rel_err(back, out) <= HALF[dtype]
    surgery.restore(model)
    assert torch.equal(model(X), cast(cast(toy(scope), dtype), torch.float32)(X))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_bfloat16_rewrite_cast_up(scope, case):
    torch.manual_seed(0)
    model = cast(toy(scope), torch.bfloat16)
    calibration = [torch.randn(64, 16, dtype=torch.bfloat16)] if case.calibration else None
    surgery.rewrite(model, case.variant, "*", calibration=calibration)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            assert all(t.dtype == torch.float32 for t in s.adapter_tensors().values())  # as PEFT: float32 adapters
            for t in s.adapter_tensors().values():
                if t.requires_grad:
                    t.add_(0.3 * torch.randn(t.shape))
    low = model(X.bfloat16())
    cast(model, torch.float32)
    high = model(X)
    assert high.dtype == torch.float32 and rel_err(high, low.float()) <= HALF[torch.bfloat16]
    loss = high.square().mean()
    loss.backward()
    assert all(t.grad is not None for s in surgery.sites(model).values() for t in s.adapter_tensors().values()
               if t.requires_grad)


@pytest.mark.parametrize("scope", SCOPES)
def test_an_adapter_dtype_narrower_than_the_base_is_refused(scope):
    model = toy(scope)
    before = model(X)
    with pytest.raises(E.ConfigError) as info:
        surgery.rewrite(model, LoRA(r=2, dtype=torch.bfloat16), "*")
    assert "narrower than the base weight's float32" in str(info.value) and "identity" in str(info.value)
    assert not surgery.sites(model) and torch.equal(model(X), before)
    surgery.rewrite(model, LoRA(r=2, dtype=torch.float64), "*")  # a wider one works
    assert torch.equal(model(X), before)
