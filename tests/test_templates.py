"""A rewrite traces each kind of site once: sites that agree on layout, bias, tensors and variant share one
traced variant graph (and, in module scope, one compiled forward), whatever their shapes unless a forward reads
them, and nothing a forward branches on is lost by the sharing."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import surgery
from adapters import IA3, LoRA
from models import GPT2, LLAMA, SCOPES, in_scope, rel_err
from surgery import splice

ALL7 = "*.{q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}"


@pytest.fixture
def traces(monkeypatch):
    """The paths at which a variant's forward was traced, in order."""
    seen: list[str] = []
    real = splice.trace_variant

    def counted(variant, tensors, modules, has_bias, site, cast):
        seen.append(site.info.path if hasattr(site, "info") else site.path)
        return real(variant, tensors, modules, has_bias, site, cast)

    monkeypatch.setattr(splice, "trace_variant", counted)
    return seen


def llama(scope: str) -> nn.Module:
    model = LLAMA.model()
    return in_scope(scope, model, **LLAMA.inputs())


def code_of(site) -> str:
    """A site's code without what names its place (graph scope names nodes and attributes by path)."""
    code = re.sub(r"(self_attn|mlp)\.(gate|up|down|[qkvo])_proj", "P", site.code)
    return re.sub(r"\d+", "#", re.sub(r"(_\d+)+\b", "", code))


@pytest.mark.parametrize("scope", SCOPES)
def test_one_trace_per_kind_of_site(scope, traces):
    model = llama(scope)
    surgery.rewrite(model, LoRA(r=4), ALL7)
    sites = surgery.sites(model)
    shapes = {(s.d_in, s.d_out) for s in sites.values()}
    assert len(sites) == 14 and len(shapes) == 4  # q/o, k/v, gate/up, down
    assert len(traces) == 1, traces  # LoRA's forward never reads the shape: one graph for all four
    assert len({code_of(s) for s in sites.values()}) == 1
    # every site holds its own tensors (nothing shared but the code)
    ids = [id(t) for s in sites.values() for t in s.adapter_tensors().values()]
    assert len(ids) == len(set(ids)) == 28


@dataclass(frozen=True)
class HalvesRows(LoRA):
    """Reads t.site.d_out in forward: a graph traced at one shape bakes its number in, so each shape gets its own."""

    def forward(self, x, y, weight, bias, t):
        out = super().forward(x, y, weight, bias, t)
        keep = torch.arange(t.site.d_out, device=y.device) < t.site.d_out // 2  # a constant of the trace
        return torch.where(keep, out, y)

    def fold(self, weight, bias, t):
        W, b = super().fold(weight, bias, t)
        keep = (torch.arange(t.site.d_out, device=W.device) < t.site.d_out // 2)[:, None]
        return torch.where(keep, W, weight), b


@pytest.mark.parametrize("scope", SCOPES)
def test_a_forward_that_reads_the_shape_is_traced_per_shape(scope, traces):
    model = llama(scope)
    x = LLAMA.inputs()
    surgery.rewrite(model, HalvesRows(r=4), ALL7)
    assert len(traces) == 4, traces  # q/o, k/v, gate/up, down
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_()
    out = model(**x).logits
    assert rel_err(surgery.merge(model)(**x).logits, out) < 1e-5, "each shape has its own constant"


@pytest.mark.parametrize("scope", SCOPES)
def test_conv1d_sites_of_other_widths_get_their_own_forward(scope, traces):
    """GPT-2's Conv1D bakes its output width into its trace (x.view(..., nf)): c_attn (3d), c_fc (4d) and
    c_proj (d) share the variant graph but not (module scope) the site's forward."""
    x = GPT2.inputs()
    model = in_scope(scope, GPT2.model(), **x)
    base = model(**x).logits
    surgery.rewrite(model, LoRA(r=4), "*.{attn.c_attn,mlp.c_fc,mlp.c_proj}")
    assert len(traces) == 1, traces
    assert rel_err(model(**x).logits, base) < 1e-6
    sites = surgery.sites(model)
    assert {s.d_out for s in sites.values()} == {32, 96, 128}
    with torch.no_grad():
        for s in sites.values():
            s.lora_B.normal_()
    out = model(**x).logits
    assert rel_err(out, base) > 1e-2
    assert rel_err(surgery.merge(model)(**x).logits, out) < 1e-5


@pytest.mark.parametrize("scope", SCOPES)
def test_a_second_rewrite_and_a_load_trace_again(scope, traces, tmp_path):
    model = llama(scope)
    surgery.rewrite(model, LoRA(r=4), "*.{k_proj,v_proj}")
    surgery.save(model, tmp_path / "a.safetensors")
    fresh = llama(scope)
    surgery.load(fresh, tmp_path / "a.safetensors")
    assert len(traces) == 2, "one kind per call: the rewrite, then the load"


@pytest.mark.parametrize("scope", SCOPES)
def test_ia3_shares_a_trace_per_side(scope, traces):
    """IA3's forward branches on the path (input side for feed-forward outputs): its trace_key keeps the
    sides apart, so a layer whose shape matches the other side still gets its own branch."""
    model = llama(scope)
    x = LLAMA.inputs()
    base = model(**x).logits
    variant = IA3(feedforward=("down_proj", "o_proj"))  # o_proj has q_proj's shape: same kind, other side
    surgery.rewrite(model, variant, "*.{q_proj,o_proj,down_proj}")
    sites = surgery.sites(model)
    assert len(traces) == 2, traces  # q (output side); o and down (input side, two shapes, one graph)
    q, o = sites["model.layers.0.self_attn.q_proj"], sites["model.layers.0.self_attn.o_proj"]
    assert (q.d_in, q.d_out) == (o.d_in, o.d_out) and code_of(q) != code_of(o)
    with torch.no_grad():
        for s in sites.values():
            s.ia3_l.mul_(1.5)
    out = model(**x).logits
    assert rel_err(out, base) > 1e-2
    merged = surgery.merge(model)
    assert rel_err(merged(**x).logits, out) < 1e-5, "each side traced its own branch: merge agrees with forward"


@dataclass(frozen=True)
class DoublesKeys(LoRA):
    """Reads the path in forward without a trace_key: every such site must be traced on its own."""

    def forward(self, x, y, weight, bias, t):
        out = super().forward(x, y, weight, bias, t)
        return y + 2 * (out - y) if t.site.path.endswith("k_proj") else out

    def fold(self, weight, bias, t):
        W, b = super().fold(weight, bias, t)
        return (weight + 2 * (W - weight) if t.site.path.endswith("k_proj") else W), b


@pytest.mark.parametrize("scope", SCOPES)
def test_a_forward_that_reads_the_path_is_traced_per_site(scope, traces):
    model = llama(scope)
    x = LLAMA.inputs()
    surgery.rewrite(model, DoublesKeys(r=4), "*.{k_proj,v_proj}")  # k and v have one shape
    assert len(traces) == 4, traces
    sites = surgery.sites(model)
    k, v = sites["model.layers.0.self_attn.k_proj"], sites["model.layers.0.self_attn.v_proj"]
    assert code_of(k) != code_of(v)
    with torch.no_grad():
        for s in sites.values():
            s.lora_B.normal_()
    out = model(**x).logits
    assert rel_err(surgery.merge(model)(**x).logits, out) < 1e-5


@dataclass(frozen=True)
class Tagged(LoRA):
    tags: list = None  # unhashable: the kind of a site cannot be told, so nothing is shared


@pytest.mark.parametrize("scope", SCOPES)
def test_an_unhashable_variant_is_traced_per_site(scope, traces):
    model = llama(scope)
    surgery.rewrite(model, Tagged(r=4, tags=["a"]), "*.{k_proj,v_proj}")
    assert len(traces) == 4


@dataclass(frozen=True)
class FormatsSite(LoRA):
    """Sees the path through t.site as a whole (its text), not through t.site.path."""

    def forward(self, x, y, weight, bias, t):
        out = super().forward(x, y, weight, bias, t)
        return y + 2 * (out - y) if "k_proj" in f"{t.site}" else out

    def fold(self, weight, bias, t):
        W, b = super().fold(weight, bias, t)
        return (weight + 2 * (W - weight) if "k_proj" in f"{t.site}" else W), b


@pytest.mark.parametrize("scope", SCOPES)
def test_a_forward_that_reads_the_whole_site_is_traced_per_site(scope, traces):
    model = llama(scope)
    x = LLAMA.inputs()
    surgery.rewrite(model, FormatsSite(r=4), "*.{k_proj,v_proj}")
    assert len(traces) == 4, traces
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_()
    out = model(**x).logits
    assert rel_err(surgery.merge(model)(**x).logits, out) < 1e-5


class Times(nn.Linear):
    """A Linear subclass whose forward bakes a Python number into its trace."""

    def __init__(self, k: float):
        super().__init__(8, 8)
        self.k = k

    def forward(self, x):
        return super().forward(x) * self.k


def test_a_linear_subclass_is_traced_per_module():
    """Times(1.0) computes a plain linear map, Times(3.0) does not: reusing the first one's trace for the
    second would make its site a plain linear map that passes the identity probe, a silent wrong result."""
    torch.manual_seed(0)
    model = nn.Sequential(Times(1.0), Times(3.0))
    with pytest.raises(surgery.errors.IdentityError, match=" at 1 "):
        surgery.rewrite(model, LoRA(r=2), "*")
    assert type(model[0]) is Times and type(model[1]) is Times


@dataclass(frozen=True)
class WritesY(LoRA):
    """A broken init behind a forward that adds in place to y: the identity probe takes its reference from the
    base output the site computes on the way, and must not take it once the forward has written to it."""

    def init(self, site):
        t = super().init(site)
        t["lora_B"] = torch.ones_like(t["lora_B"])
        return t

    def forward(self, x, y, weight, bias, t):
        return y.add_(torch.nn.functional.linear(torch.nn.functional.linear(x, t.lora_A), t.lora_B))


@pytest.mark.parametrize("scope", SCOPES)
def test_the_identity_probe_is_not_fooled_by_an_in_place_forward(scope):
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    model = in_scope(scope, nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), x)
    with pytest.raises(surgery.errors.IdentityError, match="WritesY"):
        surgery.rewrite(model, WritesY(r=2), "*")
    assert not surgery.sites(model)


@dataclass(frozen=True)
class WritesYAtLast(WritesY):
    """WritesY's broken init at the last of four sites of one kind only: a later site's probe takes its reference
    from the base output its own graph computes, and must not take it after the forward wrote to it."""

    def init(self, site):
        t = LoRA.init(self, site)
        if site.path == "3":
            t["lora_B"] = torch.ones_like(t["lora_B"])
        return t


class _Reads(torch.overrides.TorchFunctionMode):
    """How many times each weight goes into a linear map."""

    def __init__(self):
        super().__init__()
        self.count: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.linear, torch._C._nn.linear):
            self.count[id(args[1])] = self.count.get(id(args[1]), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scope", SCOPES)
def test_the_identity_probe_reads_a_later_sites_weight_once(scope):
    """The probe of a site built from its kind's template compares the adapted output with the base output its
    own graph computed on the way (one read of the weight, not two), and still finds a broken init there."""
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    model = in_scope(scope, nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]), x)
    weights = [model.get_submodule(str(i)).weight for i in range(4)]
    with _Reads() as reads:
        surgery.rewrite(model, LoRA(r=2), "*")
    assert [reads.count.get(id(w)) for w in weights[1:]] == [1, 1, 1]
    assert reads.count.get(id(weights[0])) in (1, 2)  # module scope checks the first site against the layer too
    fresh = in_scope(scope, nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]), x)
    with pytest.raises(surgery.errors.IdentityError, match=r"WritesYAtLast\(r=2\) at 3 "):
        surgery.rewrite(fresh, WritesYAtLast(r=2), "*")
    assert not surgery.sites(fresh)


@dataclass(frozen=True)
class Flattens(LoRA):
    """Returns y flattened: on the probe's one row, (d_out,) against (1, d_out) would broadcast to no difference."""

    def forward(self, x, y, weight, bias, t):
        return super().forward(x, y, weight, bias, t).flatten()


@pytest.mark.parametrize("scope", SCOPES)
def test_the_identity_probe_checks_the_shape(scope):
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    model = in_scope(scope, nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), x)
    with pytest.raises(surgery.errors.VariantContractError, match=r"returned shape \(8,\) where the base output"):
        surgery.rewrite(model, Flattens(r=2), "*")
    assert not surgery.sites(model)


def _provenance(site) -> set[str]:
    return {n.meta["surgery"]["site"] for n in site.graph.nodes if "surgery" in n.meta}


def test_sites_of_a_kind_share_a_graph_until_it_is_read(tmp_path):
    """Module scope: a site built from its kind's template runs the template's code and shares its graph; reading
    the graph gives the site its own copy, whose nodes name this site, and a change to it (a gate) is its own."""
    model = llama("module")
    x = LLAMA.inputs()
    surgery.rewrite(model, LoRA(r=4), "*.{k_proj,v_proj}")
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_()
    out = model(**x).logits
    twin = copy.deepcopy(model)  # copied while the graphs are still shared
    sites = surgery.sites(model)
    assert all(_provenance(s) == {p} for p, s in sites.items())
    assert len({id(s.graph) for s in sites.values()}) == len(sites) == 4
    surgery.set_scale(model, 0.5)  # a blend spliced into every site's graph
    assert all(s.code.count("blend(") == 1 for s in sites.values()), "each gate went into its own graph"
    assert rel_err(model(**x).logits, out) > 1e-3
    surgery.set_scale(model, 1.0)
    assert rel_err(model(**x).logits, out) < 1e-6
    assert all(_provenance(s) == {p} for p, s in surgery.sites(twin).items())
    assert rel_err(twin(**x).logits, out) < 1e-6
    torch.save(twin, tmp_path / "m.pt")  # pickling a site writes its code, not a shared graph
    assert rel_err(torch.load(tmp_path / "m.pt", weights_only=False)(**x).logits, out) < 1e-6
