"""Property tests (hypothesis): random shapes, ranks, dtypes and every registered variant; random `where`.

For each variant in ``adapters.REGISTRY``, on a small ``nn.Sequential`` of two Linear layers with
random sizes, bias or not, dtype float32 / bfloat16 / float16 and random batch shapes:
identity at init, fold == unfolded, save/load round trip, restore bitwise exact. A combination the
variant itself refuses (its ConfigError: odd HRA rank, r too large for an SVD, ...) is rejected,
not failed. For the `where` parser: random strings give a match or one of our errors, never a crash.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn

import surgery
from adapters import REGISTRY
from models import rel_err
from surgery.errors import ConfigError, SurgeryError
from surgery.scope import ModuleScope
from surgery.site import adaptable
from surgery.where import match

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative tolerances of fold == unfolded and of the load round trip, per base dtype
FOLD_TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def build_variant(name: str, r: int, choice: int):
    cls = REGISTRY[name]
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    if "r" in names:
        kw["r"] = r
    if "group_size" in names:
        kw["group_size"] = 2
    if name == "ROAD":
        kw["variant"] = ("road_1", "road_2", "road_4")[choice % 3]
    try:
        return cls(**kw)
    except ConfigError:
        reject()


def randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            for t in s.adapter_tensors().values():
                if isinstance(t, nn.Parameter):
                    t.add_(0.1 * torch.randn(t.shape, generator=g).to(t))


@pytest.mark.parametrize("name", sorted(REGISTRY))
@SETTINGS
@given(
    d_in=st.integers(2, 12),
    d_mid=st.integers(2, 12).map(lambda n: 2 * n),
    d_out=st.integers(1, 6).map(lambda n: 2 * n),
    r=st.integers(1, 6),
    choice=st.integers(0, 2),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
)
def test_variant_properties(name, d_in, d_mid, d_out, r, choice, bias, dtype, batch, tmp_path_factory):
    torch.manual_seed(d_in * 1000 + d_out * 10 + r)
    v = build_variant(name, r, choice)
    base = nn.Sequential(nn.Linear(d_in, d_mid, bias=bias), nn.Linear(d_mid, d_out, bias=bias)).to(dtype).eval()
    original = copy.deepcopy(base)
    x = torch.randn(*batch, d_in).to(dtype)
    ref = base(x)
    calibration = [torch.randn(32, d_in).to(dtype)] if v.needs_calibration else None
    model = copy.deepcopy(base)
    try:
        surgery.rewrite(model, v, "*", calibration=calibration)
    except ConfigError:
        reject()
    sites = surgery.sites(model)
    assert sites and all(t.dtype == v.adapter_dtype(dtype) for s in sites.values() for t in s.adapter_tensors().values())

    # identity at init (the engine's own bound: the variant's promise, or a few ulps of a half dtype)
    if v.identity_tol is not None:
        tol = max(v.identity_tol, 32 * torch.finfo(dtype).eps)
        assert rel_err(model(x), ref) <= tol

    randomise(model, seed=r)
    unmerged = model(x)
    assert unmerged.dtype == dtype and unmerged.shape == ref.shape

    # save / load round trip onto a fresh copy of the base
    path = tmp_path_factory.mktemp("prop") / "a.safetensors"
    surgery.save(model, path)
    fresh = surgery.load(copy.deepcopy(original), path).eval()
    assert rel_err(fresh(x), unmerged) <= (1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps)

    # restore gives back the exact base, bit for bit (PiSSA and AntiPaSTO rewrote W)
    surgery.restore(fresh)
    want = original.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in fresh.state_dict().items()) and set(fresh.state_dict()) == set(want)

    # fold == unfolded
    surgery.merge(model)
    assert not surgery.sites(model) and all(type(m) is nn.Linear for m in model)
    assert rel_err(model(x), unmerged) <= FOLD_TOL[dtype]


# ----- the `where` parser: our errors or a match, never a crash -----

MODEL = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Sequential(nn.Linear(2, 2)))
CANDS = ModuleScope(MODEL).candidates()
GLOB = st.text(alphabet=st.sampled_from(list("01ab.*?[]{}!,-^\\()|+$:_ ")), max_size=24)
PATTERN = st.one_of(GLOB, GLOB.map(lambda s: "re:" + s), st.text(max_size=16))


@settings(max_examples=400, deadline=None)
@given(where=st.one_of(PATTERN, st.lists(PATTERN, max_size=3)))
def test_where_strings_never_crash(where):
    for call in (lambda: match(CANDS, adaptable, where), lambda: surgery.plan(MODEL, where)):
        try:
            call()
        except SurgeryError as e:
            assert str(e) and not isinstance(e, (IndexError, KeyError, RecursionError))


@settings(max_examples=60, deadline=None)
@given(where=st.one_of(st.integers(), st.none(), st.floats(), st.binary(), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_where_of_the_wrong_type_is_our_error(where):
    with pytest.raises(SurgeryError):
        match(CANDS, adaptable, where)
