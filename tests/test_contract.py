"""Contract tests: every variant in tests/cases.py on every tiny model family (and the real MiniLM),
in both scopes: on the eager model (module scope) and on a fresh ``surgery.trace`` of it (graph scope),
used exactly as trace returns it. One test body per property; ``scope`` is a parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import surgery
from cases import CASES
from models import MINILM, SCOPES, TINY, calibration_batches, in_scope, rel_err
from models import randomise_adapters as randomise
from surgery.capture import is_traced

FAMILIES = TINY + [MINILM]


@pytest.fixture(scope="module")
def minilm_base():
    """The pretrained eager MiniLM, loaded once; tests adapt deep copies of it (never of a trace)."""
    return MINILM.model()


def base_of(family, minilm_base, dtype=torch.float32):
    """A fresh eager base."""
    if family is MINILM:
        return copy.deepcopy(minilm_base).to(dtype)
    return family.model(dtype=dtype)


def adapted(scope, family, case, base):
    """``base`` in ``scope`` (a fresh trace in graph scope), rewritten with ``case``."""
    model = in_scope(scope, base, **family.inputs())
    assert is_traced(model) == (scope == "graph")
    surgery.rewrite(model, case.variant, family.where, calibration=calibration_batches(family, case))
    return model


def set_training(model, mode):
    # The flags themselves, not .train()/.eval(): a GraphModule from torch.export refuses both.
    for m in model.modules():
        m.training = mode


def adapter_names(model, parameters_only=False):
    """``<site path>.<tensor name>`` for every adapter tensor (or only its Parameters) of ``model``."""
    return {f"{p}.{n}" for p, s in surgery.sites(model).items() for n, t in s.adapter_tensors().items()
            if isinstance(t, nn.Parameter) or not parameters_only}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("scope", SCOPES)
def test_identity_at_init(scope, case, family, minilm_base):
    base = base_of(family, minilm_base)
    x = family.inputs()
    ref = family.out(base, x)
    model = adapted(scope, family, case, base)
    assert len(surgery.sites(model)) > 0
    err = rel_err(family.out(model, x), ref)
    assert err <= case.identity, f"{case.id} on {family.name} ({scope}): identity error {err:.3g} > {case.identity:g}"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("scope", SCOPES)
def test_fold_equals_unfolded(scope, case, family, minilm_base):
    base = base_of(family, minilm_base)
    x = family.inputs()
    ref = family.out(base, x)  # before the rewrite: module scope writes into base (PiSSA's residual)
    model = adapted(scope, family, case, base)
    randomise(model)
    unmerged = family.out(model, x)
    assert rel_err(unmerged, ref) > 1e-4, "randomised adapter changed nothing"
    surgery.merge(model)
    assert not surgery.sites(model)
    err = rel_err(family.out(model, x), unmerged)
    assert err <= case.fold, f"{case.id} on {family.name} ({scope}): fold error {err:.3g} > {case.fold:g}"


@pytest.mark.parametrize("family", TINY, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("scope", SCOPES)
def test_only_adapter_tensors_train_and_none_is_dead(scope, case, family):
    model = adapted(scope, family, case, family.model())
    base_keys = set(family.model().state_dict())  # a GraphModule keeps the eager paths as its keys
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "no trainable tensors"
    assert set(trainable) == adapter_names(model, parameters_only=True), "trainable tensors are not the adapter's"
    assert not set(trainable) & base_keys, "an adapter tensor took a base tensor's name"
    assert set(model.state_dict()) >= base_keys | adapter_names(model), "state_dict lost base or adapter keys"
    counted = sum(s.trainable_count() for s in surgery.sites(model).values())
    assert counted == sum(p.numel() for p in trainable.values())

    set_training(model, True)  # dropout variants train with their dropout on
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    x = family.inputs()
    proj = torch.randn(family.out(model, x).shape, generator=torch.Generator().manual_seed(3))
    moved = {n: False for n in trainable}
    before = {n: p.detach().clone() for n, p in model.state_dict().items() if n in base_keys}
    for _ in range(2):
        opt.zero_grad()
        (family.out(model, x) * proj).sum().backward()
        for n, p in trainable.items():
            if p.grad is not None and p.grad.abs().sum() > 0:
                moved[n] = True
        opt.step()
    dead = [n for n, ok in moved.items() if not ok]
    assert not dead, f"{case.id} on {family.name} ({scope}): no gradient within two steps for {dead}"
    after = model.state_dict()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"base tensors changed by training: {changed[:3]}"


@pytest.mark.parametrize("family", TINY, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("scope", SCOPES)
def test_save_load_round_trip_and_restore(scope, case, family, tmp_path):
    model = adapted(scope, family, case, family.model())
    randomise(model)
    x = family.inputs()
    want = family.out(model, x)
    surgery.save(model, tmp_path / "a.safetensors")
    fresh = in_scope(scope, family.model(), **x)
    original = {k: v.clone() for k, v in fresh.state_dict().items()}
    surgery.load(fresh, tmp_path / "a.safetensors")
    set_training(fresh, False)
    assert rel_err(family.out(fresh, x), want) <= 1e-6
    surgery.restore(fresh)
    assert not surgery.sites(fresh)
    now = fresh.state_dict()
    assert set(now) == set(original)
    assert all(torch.equal(now[k], original[k]) for k in original), "restore is not bitwise exact"
    assert all(p.requires_grad for p in fresh.parameters()), "restore did not give back requires_grad"


@pytest.mark.parametrize("family", TINY, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("scope", SCOPES)
def test_bf16_base(scope, case, family):
    model = adapted(scope, family, case, family.model(dtype=torch.bfloat16))
    for s in surgery.sites(model).values():
        assert all(t.dtype == torch.float32 for t in s.adapter_tensors().values()), "adapters should be float32"
    randomise(model)
    x = family.inputs()
    unmerged = family.out(model, x)
    assert unmerged.dtype == torch.bfloat16
    surgery.merge(model)
    err = rel_err(family.out(model, x), unmerged)
    assert err <= case.bf16_fold, f"{case.id} on {family.name} ({scope}): bf16 fold error {err:.3g} > {case.bf16_fold:g}"
