"""Contract tests: every variant in tests/cases.py on every tiny model family (and the real MiniLM)."""

from __future__ import annotations

import copy

import pytest
import torch

import surgery
from cases import CASES
from models import MINILM, TINY, calibration_batches, rel_err
from models import randomise_adapters as randomise

FAMILIES = TINY + [MINILM]


def adapt(family, case, model=None, **kw):
    model = family.model(**kw) if model is None else model
    surgery.rewrite(model, case.variant, family.where, calibration=calibration_batches(family, case))
    return model


@pytest.fixture(scope="module")
def minilm_base():
    return MINILM.model()


def base_of(family, minilm_base, dtype=torch.float32):
    if family is MINILM:
        return copy.deepcopy(minilm_base).to(dtype)
    return family.model(dtype=dtype)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_identity_at_init(case, family, minilm_base):
    base = base_of(family, minilm_base)
    x = family.inputs()
    ref = family.out(base, x)
    model = adapt(family, case, copy.deepcopy(base))
    assert len(surgery.sites(model)) > 0
    err = rel_err(family.out(model, x), ref)
    assert err <= case.identity, f"{case.id} on {family.name}: identity error {err:.3g} > {case.identity:g}"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fold_equals_unfolded(case, family, minilm_base):
    model = adapt(family, case, base_of(family, minilm_base))
    randomise(model)
    x = family.inputs()
    unmerged = family.out(model, x)
    assert rel_err(unmerged, family.out(base_of(family, minilm_base), x)) > 1e-4, "randomised adapter changed nothing"
    surgery.merge(model)
    assert not surgery.sites(model)
    err = rel_err(family.out(model, x), unmerged)
    assert err <= case.fold, f"{case.id} on {family.name}: fold error {err:.3g} > {case.fold:g}"


@pytest.mark.parametrize("family", TINY, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_only_adapter_tensors_train_and_none_is_dead(case, family):
    model = adapt(family, case)
    base_keys = set(family.model().state_dict())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "no trainable tensors"
    for n in trainable:
        path, _, leaf = n.rpartition(".")
        assert n not in base_keys and path in surgery.sites(model), f"{n} trains but is not an adapter tensor"
    assert set(model.state_dict()) >= base_keys, "base state_dict keys changed"

    model.train()
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
    assert not dead, f"{case.id} on {family.name}: no gradient within two steps for {dead}"
    after = model.state_dict()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"base tensors changed by training: {changed[:3]}"


@pytest.mark.parametrize("family", TINY, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_save_load_round_trip_and_restore(case, family, tmp_path):
    model = adapt(family, case)
    randomise(model)
    x = family.inputs()
    want = family.out(model, x)
    surgery.save(model, tmp_path / "a.safetensors")
    fresh = family.model()
    original = {k: v.clone() for k, v in fresh.state_dict().items()}
    surgery.load(fresh, tmp_path / "a.safetensors")
    fresh.eval()
    assert rel_err(family.out(fresh, x), want) <= 1e-6
    surgery.restore(fresh)
    assert not surgery.sites(fresh)
    now = fresh.state_dict()
    assert set(now) == set(original)
    assert all(torch.equal(now[k], original[k]) for k in original), "restore is not bitwise exact"
    assert all(p.requires_grad for p in fresh.parameters()), "restore did not give back requires_grad"


@pytest.mark.parametrize("family", TINY, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bf16_base(case, family):
    model = adapt(family, case, family.model(dtype=torch.bfloat16))
    for s in surgery.sites(model).values():
        assert all(t.dtype == torch.float32 for t in s.adapter_tensors().values()), "adapters should be float32"
    randomise(model)
    x = family.inputs()
    unmerged = family.out(model, x)
    assert unmerged.dtype == torch.bfloat16
    surgery.merge(model)
    err = rel_err(family.out(model, x), unmerged)
    assert err <= case.bf16_fold, f"{case.id} on {family.name}: bf16 fold error {err:.3g} > {case.bf16_fold:g}"
