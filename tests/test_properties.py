"""Property tests (hypothesis): random shapes, ranks, dtypes and every registered variant; random `where`.

For each variant in ``adapters.REGISTRY``, on a small ``nn.Sequential`` of two Linear layers with
random sizes, bias or not, dtype float32 / bfloat16 / float16 and random batch shapes:
identity at init, fold == unfolded, save/load round trip, restore bitwise exact. A combination the
variant itself refuses (its ConfigError: odd HRA rank, r too large for an SVD, ...) is rejected,
not failed. Both scopes: the model itself, or a fresh ``surgery.trace`` of it (where the same file
loaded in module scope must give the same outputs). For the `where` parser: random strings give a
match or one of our errors, never a crash, and ``plan`` on the traced model agrees with the eager one.
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
from models import SCOPES, in_scope, rel_err
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


@pytest.mark.parametrize("scope", SCOPES)
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
def test_variant_properties(scope, name, d_in, d_mid, d_out, r, choice, bias, dtype, batch, tmp_path_factory):
    torch.manual_seed(d_in * 1000 + d_out * 10 + r)
    v = build_variant(name, r, choice)
    base = nn.Sequential(nn.Linear(d_in, d_mid, bias=bias), nn.Linear(d_mid, d_out, bias=bias)).to(dtype).eval()
    original = copy.deepcopy(base)
    want = original.state_dict()
    x = torch.randn(*batch, d_in).to(dtype)
    ref = base(x)
    calibration = [torch.randn(32, d_in).to(dtype)] if v.needs_calibration else None
    eager = copy.deepcopy(base)
    model = in_scope(scope, eager, x)
    try:
        surgery.rewrite(model, v, "*", calibration=calibration)
    except ConfigError:
        reject()
    sites = surgery.sites(model)
    assert sites and set(sites) <= {"0", "1"}  # EVA's rank redistribution may drop a site
    assert all(t.dtype == v.adapter_dtype(dtype) for s in sites.values() for t in s.adapter_tensors().values())

    # identity at init (the engine's own bound: the variant's promise, or a few ulps of a half dtype)
    if v.identity_tol is not None:
        tol = max(v.identity_tol, 32 * torch.finfo(dtype).eps)
        assert rel_err(model(x), ref) <= tol

    randomise(model, seed=r)
    unmerged = model(x)
    assert unmerged.dtype == dtype and unmerged.shape == ref.shape

    # save / load round trip onto a fresh copy of the base (in graph scope: a fresh trace of it)
    path = tmp_path_factory.mktemp("prop") / "a.safetensors"
    surgery.save(model, path)
    fresh = surgery.load(in_scope(scope, copy.deepcopy(original), x), path).eval()
    round_trip = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert rel_err(fresh(x), unmerged) <= round_trip
    if scope == "graph":  # files are scope-independent: the same tensors in module scope, the same outputs
        twin = surgery.load(copy.deepcopy(original), path).eval()
        assert rel_err(twin(x), unmerged) <= round_trip, "graph scope computes another function than module scope"

    # restore gives back the exact base, bit for bit (PiSSA and AntiPaSTO rewrote W), and its flags
    surgery.restore(fresh)
    assert not surgery.sites(fresh)
    assert all(torch.equal(t, want[k]) for k, t in fresh.state_dict().items()) and set(fresh.state_dict()) == set(want)
    assert all(p.requires_grad for p in fresh.parameters())
    assert torch.equal(fresh(x), ref)

    # fold == unfolded; plain nn.Linear layers come back, with nothing of the sites left
    surgery.merge(model)
    assert not surgery.sites(model) and all(type(model.get_submodule(p)) is nn.Linear for p in ("0", "1"))
    assert set(model.state_dict()) == set(want)
    assert all(p.requires_grad for p in model.parameters())
    if scope == "graph":
        assert not [n for n in model.graph.nodes if "surgery" in n.meta], "spliced nodes left after merge"
        # graph-scope calls never write into the eager model's parameters, which the GraphModule shares
        assert all(torch.equal(t, want[k]) for k, t in eager.state_dict().items())
        assert rel_err(eager(x), ref) == 0
    assert rel_err(model(x), unmerged) <= FOLD_TOL[dtype]


# ----- the `where` parser: our errors or a match, never a crash; both scopes select the same paths -----

MODEL = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Sequential(nn.Linear(2, 2)))
CANDS = ModuleScope(MODEL).candidates()
TRACED = surgery.trace(MODEL, torch.randn(3, 2))  # graph scope: plan on the traced model
IN_SCOPE = {"module": MODEL, "graph": TRACED}
GLOB = st.text(alphabet=st.sampled_from(list("01ab.*?[]{}!,-^\\()|+$:_ ")), max_size=24)
PATTERN = st.one_of(GLOB, GLOB.map(lambda s: "re:" + s), st.text(max_size=16))


def outcome(call):
    """What a call gives: ("paths", [...]) or ("error", its class); anything but our errors propagates."""
    try:
        return "paths", call().paths
    except SurgeryError as e:
        assert str(e) and not isinstance(e, (IndexError, KeyError, RecursionError))
        return "error", type(e)


@pytest.mark.parametrize("scope", SCOPES)
@settings(max_examples=400, deadline=None)
@given(where=st.one_of(PATTERN, st.lists(PATTERN, max_size=3)))
def test_where_strings_never_crash(scope, where):
    outcome(lambda: match(CANDS, adaptable, where))
    got = outcome(lambda: surgery.plan(IN_SCOPE[scope], where))
    assert got == outcome(lambda: surgery.plan(MODEL, where)), "the scopes disagree on what `where` selects"


@pytest.mark.parametrize("scope", SCOPES)
@settings(max_examples=60, deadline=None)
@given(where=st.one_of(st.integers(), st.none(), st.floats(), st.binary(), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_where_of_the_wrong_type_is_our_error(scope, where):
    with pytest.raises(SurgeryError):
        match(CANDS, adaptable, where)
    with pytest.raises(SurgeryError):
        surgery.plan(IN_SCOPE[scope], where)
