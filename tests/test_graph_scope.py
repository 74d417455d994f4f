"""Graph scope: the same variant splice on a whole-model GraphModule from surgery.trace.

Every case of tests/cases.py runs here too, calibration cases (EVA) with the same batches as in
module scope.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import surgery
from adapters import LoRA
from cases import CASES
from models import GPT2, LLAMA, calibration_batches, rel_err
from models import randomise_adapters as randomise
from surgery.errors import AlreadyRewrittenError, CalibrationError, IdentityError, NoMatchError

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
FAMILIES = [LLAMA, GPT2]  # aten.linear regions and Conv1D's view/addmm/view regions


@pytest.fixture(scope="module")
def traced(traced_bases):
    """family name -> (eager base, traced base); tests deepcopy them."""
    return {fam.name: traced_bases(fam) for fam in FAMILIES}


def fresh(traced, family):
    model, gm = traced[family.name]
    return copy.deepcopy(model), copy.deepcopy(gm)


X = dict(batch=3, seq=7, seed=4)  # another shape than the one traced (2 x 6)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_case_in_graph_scope(case, family, traced):
    """Identity at init and provenance; with the same adapter values, graph scope == module scope;
    then merged == unmerged."""
    model, gm = fresh(traced, family)
    x = family.inputs(**X)
    base = family.out(model, x)
    calibration = calibration_batches(family, case)
    surgery.rewrite(gm, case.variant, family.where, calibration=calibration)
    sites = surgery.sites(gm)
    surgery.rewrite(model, case.variant, family.where, calibration=calibration)
    eager_sites = surgery.sites(model)
    # EVA's rank redistribution may drop sites; it must drop the same ones in both scopes
    assert list(sites) == list(eager_sites)
    assert set(sites) <= set(surgery.plan(traced[family.name][0], family.where).paths)
    for p, s in sites.items():  # same data-driven init in both scopes (LoRA-likes: same A up to sign)
        if case.calibration:
            a, b = s.adapter_tensors()["lora_A"], eager_sites[p].adapter_tensors()["lora_A"]
            cos = (a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1))
            assert cos.min() >= 1 - 1e-4, f"{p}: graph-scope calibration saw other inputs"
    err = rel_err(family.out(gm, x), base)
    assert err <= case.identity, f"{case.id} on {family.name}: graph-scope identity error {err:.3g}"
    stamped = {n.meta["surgery"]["site"] for n in gm.graph.nodes if "surgery" in n.meta}
    assert stamped == set(sites)
    assert all(n.meta["surgery"]["variant"] == sites[n.meta["surgery"]["site"]].variant.short()
               for n in gm.graph.nodes if "surgery" in n.meta)
    keys = set(gm.state_dict())
    for p, s in sites.items():
        assert {f"{p}.{n}" for n in s.adapter_tensors()} <= keys
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.{n}" for p, s in sites.items() for n, t in s.adapter_tensors().items()
                         if isinstance(t, nn.Parameter)}
    assert "trainable" in surgery.summary(gm)

    randomise(model)
    with torch.no_grad():
        for p, s in sites.items():
            theirs = eager_sites[p].adapter_tensors()
            for n, t in s.adapter_tensors().items():
                t.copy_(theirs[n])
            s.weight.copy_(eager_sites[p].weight)  # PiSSA's residual: same SVD, but copy to be exact
    unmerged = family.out(gm, x)
    assert rel_err(unmerged, base) > 1e-4, "randomised adapter changed nothing"
    err = rel_err(unmerged, family.out(model, x))
    assert err <= case.fold, f"{case.id} on {family.name}: graph vs module scope {err:.3g}"
    surgery.merge(gm)
    assert not surgery.sites(gm) and not any("surgery" in n.meta for n in gm.graph.nodes)
    err = rel_err(family.out(gm, x), unmerged)
    assert err <= case.fold, f"{case.id} on {family.name}: graph-scope fold error {err:.3g}"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("lora", "pissa")], ids=str)
def test_restore_is_bitwise_and_leaves_eager_model_alone(case, family, traced):
    model, gm = fresh(traced, family)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    x = family.inputs(**X)
    ref = family.out(gm, x)
    surgery.rewrite(gm, case.variant, family.where)
    randomise(gm)
    for k, v in model.state_dict().items():  # PiSSA's residual goes to a new Parameter, not the shared one
        assert torch.equal(v, before[k]), f"rewrite wrote into the eager model's {k}"
    surgery.restore(gm)
    after = gm.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert gm.code == code
    assert torch.equal(family.out(gm, x), ref)
    assert all(p.requires_grad for p in gm.parameters())


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_save_load_on_a_fresh_trace(family, traced, tmp_path):
    _, gm = fresh(traced, family)
    surgery.rewrite(gm, LoRA(r=4, alpha=8), family.where)
    randomise(gm)
    x = family.inputs(**X)
    want = family.out(gm, x)
    surgery.save(gm, tmp_path / "a.safetensors")
    _, gm2 = fresh(traced, family)
    surgery.load(gm2, tmp_path / "a.safetensors")
    assert torch.equal(family.out(gm2, x), want)
    with pytest.raises(AlreadyRewrittenError):
        surgery.load(gm2, tmp_path / "a.safetensors")


def test_graph_scope_trains(traced):
    fam = LLAMA
    _, gm = fresh(traced, fam)
    surgery.rewrite(gm, LoRA(r=4), "*.v_proj")
    x = fam.inputs(**X)
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        fam.out(gm, x).square().mean().backward()
        opt.step()
    for s in surgery.sites(gm).values():
        for n, t in s.adapter_tensors().items():
            assert t.grad is not None and t.grad.abs().max() > 0, f"{s.path}.{n} got no gradient"


# ----- a hand-written expected graph (the style of torch's test_subgraph_rewriter) -----


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_splice_produces_the_hand_written_graph():
    torch.manual_seed(0)
    model = One()
    gm = surgery.trace(model, torch.randn(2, 4))
    surgery.rewrite(gm, LoRA(r=2, alpha=4), "fc")

    expected = fx.Graph()
    x = expected.placeholder("x")
    y = expected.call_module("fc", (x,))
    a = expected.get_attr("fc.lora_A")
    h = expected.call_function(torch._C._nn.linear, (x, a))
    bb = expected.get_attr("fc.lora_B")
    d = expected.call_function(torch._C._nn.linear, (h, bb))
    out = expected.call_function(torch.add, (y, d), {"alpha": 2.0})
    expected.output(expected.call_function(torch.relu, (out,)))  # no get_attr of W or b: LoRA reads neither

    def shape(graph):
        nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        return [(n.op, n.target, fx.graph.map_arg(n.args, lambda a: index[a]), n.kwargs) for n in nodes]

    gm.graph.lint()
    assert shape(gm.graph) == shape(expected)
    site = surgery.sites(gm)["fc"]
    xin = torch.randn(5, 4)
    with torch.no_grad():
        site.adapter_tensors()["lora_B"].normal_()
        A, B = site.adapter_tensors()["lora_A"], site.adapter_tensors()["lora_B"]
        torch.testing.assert_close(gm(xin), torch.relu(F.linear(xin, model.fc.weight, model.fc.bias) + 2.0 * xin @ A.T @ B.T))
    assert "lora_A" not in dict(model.fc.named_parameters()), "the eager leaf got the adapter tensors"


# ----- errors and atomicity -----


@dataclass(frozen=True)
class BrokenLoRA(LoRA):  # not registered: a variant whose init breaks its identity promise
    def init(self, site):
        t = super().init(site)
        t["lora_B"] = t["lora_B"] + 1.0
        return t


def test_failed_rewrite_leaves_graph_unchanged(traced):
    _, gm = fresh(traced, LLAMA)
    code, keys = gm.code, set(gm.state_dict())
    with pytest.raises(IdentityError):
        surgery.rewrite(gm, BrokenLoRA(r=2), LLAMA.where)
    assert gm.code == code and set(gm.state_dict()) == keys and not surgery.sites(gm)
    assert all(p.requires_grad for p in gm.parameters())


def test_graph_scope_errors(traced):
    _, gm = fresh(traced, GPT2)
    with pytest.raises(NoMatchError, match="c_attn"):
        surgery.rewrite(gm, LoRA(r=2), "*.c_atn")
    surgery.rewrite(gm, LoRA(r=2), "*.attn.c_attn")
    with pytest.raises(AlreadyRewrittenError):
        surgery.rewrite(gm, LoRA(r=2), "*.c_attn")
    eva = next((c.variant for c in CASES if c.calibration), None)
    if eva is not None:
        with pytest.raises(CalibrationError, match="needs calibration data"):
            surgery.rewrite(gm, eva, "*.mlp.c_proj")
