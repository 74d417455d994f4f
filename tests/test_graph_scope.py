"""Graph scope's own properties, on a whole-model GraphModule from surgery.trace.

The contract (identity at init, fold, what trains, files and restore, bf16) runs in both scopes in
tests/test_contract.py. Here: with the same adapter values graph scope computes what module scope
computes (the same splice; calibration sees the same inputs), nodes carry provenance, the eager
model that shares its parameters with the trace is never written, the splice builds the graph one
would write by hand, a trace trains, and errors on the export route leave the graph as it was.
Every test uses a fresh ``surgery.trace`` of a fresh base, exactly as trace returns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import surgery
from adapters import LoRA
from cases import CASES
from models import GPT2, LLAMA, calibration_batches, in_scope, rel_err
from models import randomise_adapters as randomise
from surgery.errors import AlreadyRewrittenError, CalibrationError, IdentityError, NoMatchError

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
FAMILIES = [LLAMA, GPT2]  # aten.linear regions and Conv1D's view/addmm/view regions


def traced(family):
    """A fresh eager base and a fresh trace of it (they share parameters)."""
    model = family.model()
    return model, in_scope("graph", model, **family.inputs())


X = dict(batch=3, seq=7, seed=4)  # another shape than the one traced (2 x 6)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_graph_scope_equals_module_scope(case, family):
    """Same sites, same data-driven init, provenance on every spliced node; with the same adapter
    values, the same output as module scope, at a shape other than the traced one."""
    _, gm = traced(family)
    model = family.model()  # module scope's own base: its rewrite replaces leaves (and PiSSA's weight)
    x = family.inputs(**X)
    base = family.out(gm, x)
    calibration = calibration_batches(family, case)
    surgery.rewrite(gm, case.variant, family.where, calibration=calibration)
    sites = surgery.sites(gm)
    surgery.rewrite(model, case.variant, family.where, calibration=calibration)
    eager_sites = surgery.sites(model)
    # EVA's rank redistribution may drop sites; it must drop the same ones in both scopes
    assert sites and list(sites) == list(eager_sites)
    if case.calibration:  # calibration saw the same inputs: the same A, row by row, up to sign
        for p, s in sites.items():
            a, b = s.adapter_tensors()["lora_A"], eager_sites[p].adapter_tensors()["lora_A"]
            assert a.shape == b.shape, f"{p}: rank {a.shape[0]} in graph scope, {b.shape[0]} in module scope"
            cos = (a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1))
            assert cos.min() >= 1 - 1e-4, f"{p}: graph-scope calibration saw other inputs"

    stamped = [n for n in gm.graph.nodes if "surgery" in n.meta]
    assert {n.meta["surgery"]["site"] for n in stamped} == set(sites)
    assert all(n.meta["surgery"]["variant"] == sites[n.meta["surgery"]["site"]].variant.short() for n in stamped)

    randomise(model)
    with torch.no_grad():
        for p, s in sites.items():
            theirs = eager_sites[p].adapter_tensors()
            assert set(s.adapter_tensors()) == set(theirs)
            for n, t in s.adapter_tensors().items():
                t.copy_(theirs[n])
            s.weight.copy_(eager_sites[p].weight)  # PiSSA's residual: same SVD, but copy to be exact
    unmerged = family.out(gm, x)
    assert rel_err(unmerged, base) > 1e-4, "randomised adapter changed nothing"
    err = rel_err(unmerged, family.out(model, x))
    assert err <= case.fold, f"{case.id} on {family.name}: graph vs module scope {err:.3g}"
    surgery.merge(gm)
    assert not any("surgery" in n.meta for n in gm.graph.nodes), "merge left provenance on nodes"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("lora", "pissa")], ids=str)
def test_graph_scope_never_writes_the_eager_model(case, family):
    """rewrite (PiSSA replaces the base weight), restore and merge leave the shared eager parameters alone."""
    model, gm = traced(family)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    eager_objects = dict(model.named_parameters()) | dict(model.named_modules())
    code = gm.code
    x = family.inputs(**X)
    ref = family.out(gm, x)

    def eager_untouched(verb):
        now = model.state_dict()
        assert set(now) == set(before)
        for k, v in now.items():
            assert torch.equal(v, before[k]), f"graph-scope {verb} wrote into the eager model's {k}"
        now_objects = dict(model.named_parameters()) | dict(model.named_modules())
        swapped = [k for k in eager_objects.keys() | now_objects.keys() if now_objects.get(k) is not eager_objects.get(k)]
        assert not swapped, f"graph-scope {verb} put other objects into the eager model at {swapped[:3]}"

    surgery.rewrite(gm, case.variant, family.where)
    randomise(gm)
    eager_untouched("rewrite")
    surgery.restore(gm)
    eager_untouched("restore")
    after = gm.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert gm.code == code
    assert torch.equal(family.out(gm, x), ref)
    assert all(p.requires_grad for p in gm.parameters())

    surgery.rewrite(gm, case.variant, family.where)
    randomise(gm)
    surgery.merge(gm)
    eager_untouched("merge")


def test_graph_scope_trains():
    fam = LLAMA
    _, gm = traced(fam)
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


# ----- errors and atomicity on the export route (tests/test_errors.py has the table, on an fx-route toy) -----


@dataclass(frozen=True)
class BrokenLoRA(LoRA):  # not registered: a variant whose init breaks its identity promise
    def init(self, site):
        t = super().init(site)
        t["lora_B"] = t["lora_B"] + 1.0
        return t


def test_failed_rewrite_leaves_graph_unchanged():
    _, gm = traced(LLAMA)
    code, keys = gm.code, set(gm.state_dict())
    with pytest.raises(IdentityError):
        surgery.rewrite(gm, BrokenLoRA(r=2), LLAMA.where)
    assert gm.code == code and set(gm.state_dict()) == keys and not surgery.sites(gm)
    assert all(p.requires_grad for p in gm.parameters())


def test_graph_scope_errors():
    _, gm = traced(GPT2)
    with pytest.raises(NoMatchError, match="c_attn"):
        surgery.rewrite(gm, LoRA(r=2), "*.c_atn")
    surgery.rewrite(gm, LoRA(r=2), "*.attn.c_attn")
    with pytest.raises(AlreadyRewrittenError):
        surgery.rewrite(gm, LoRA(r=2), "*.c_attn")
    eva = next((c.variant for c in CASES if c.calibration), None)
    if eva is not None:
        with pytest.raises(CalibrationError, match="needs calibration data"):
            surgery.rewrite(gm, eva, "*.mlp.c_proj")
