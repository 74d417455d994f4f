"""Bad input: every public call either completes or leaves the model exactly as it was, and says why.

One table (``CASES``) of bad inputs, run in both scopes (``models.SCOPES``): on the eager toy model
(module scope) and on a fresh ``surgery.trace`` of it (graph scope, used exactly as trace returns
it). Each row builds its model in the scope it runs in (and, where needed, a file saved from that
scope, or from the other one: files are scope-independent), takes a ``snapshot`` of the model, runs
the bad call, and asserts the error class, key words of the message (the rule, the offending value,
the fix) and that the model still equals its snapshot: same state_dict bits, same module objects at
every path, same requires_grad flags, same training modes, same attributes, no sites added or lost;
for a GraphModule also the same generated code and the same graph-scope flags.

A row runs in both scopes unless it says otherwise, with the reason, beside it. Rows that need a
variant another part of the project adds skip while it is absent from ``adapters.REGISTRY``.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from adapters import REGISTRY, LoRA
from models import SCOPES, in_scope
from surgery import errors as E
from surgery import offload


# ----- a tiny model with real-looking names: 7 linear sites (6 in blocks, then head), 3 LayerNorms -----


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.v_proj(torch.relu(self.k_proj(x))))


class Toy(nn.Module):
    def __init__(self, width: int = 8, layers: int = 3, out: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, out)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def toy(seed: int = 0, **kw) -> Toy:
    torch.manual_seed(seed)
    return Toy(**kw).eval()


FIFTH = "layers.2.k_proj"  # the fifth site of "*_proj" in model order
PROJ = [f"layers.{i}.{n}" for i in range(3) for n in ("k_proj", "v_proj")]  # what "*_proj" matches


def scoped(scope: str, model: nn.Module, width: int = 8, dtype: torch.dtype = torch.float32, device=None) -> nn.Module:
    """``model`` as the verbs see it in ``scope``: itself, or a fresh trace on a (3, width) example input."""
    return in_scope(scope, model, torch.randn(3, width, dtype=dtype, device=device))


def scoped_toy(scope: str, seed: int = 0, **kw) -> nn.Module:
    return scoped(scope, toy(seed, **kw), kw.get("width", 8))


class Router(nn.Module):
    """A MoE-style router: its own weight through F.linear, not an nn.Linear, so neither scope adapts it."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x):
        return F.linear(x, self.weight)


class Routed(Toy):
    def __init__(self):
        super().__init__()
        self.router = Router(8)

    def forward(self, x):
        return super().forward(x * torch.sigmoid(self.router(x)))


class Reused(Toy):
    """One nn.Linear (``mix``, last in model order) called twice per forward."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        return super().forward(self.mix(self.mix(x)))


class Unused(Toy):
    """An nn.Linear (``spare``) that forward never calls: an adapter there would be a silent no-op."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(8, 8)


class Attending(Toy):
    """An nn.MultiheadAttention, whose out_proj is never called: the attention reads its weight directly."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return super().forward(self.attn(x, x, x, need_weights=False)[0])


class Encoding(Toy):
    """An nn.TransformerEncoderLayer: its self-attention's out_proj is never called either."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)

    def forward(self, x):
        return super().forward(self.layer(x))


def other_toy(cls, scope):
    torch.manual_seed(0)
    return scoped(scope, cls().eval())


# ----- snapshot: everything a failed call must leave as it was -----


def _bits(t: torch.Tensor):
    if t.device.type == "meta":
        return ("meta", tuple(t.shape), t.dtype)
    return t.detach().clone()


@dataclass
class Snapshot:
    state: dict
    modules: dict
    params: dict
    modes: dict
    attrs: dict
    sites: list
    code: tuple | None  # graph scope: gm.code and its graph's code now (None for an eager model)
    flags: object  # graph scope: a copy of gm.meta["surgery"]["flags"] (requires_grad before the first rewrite)


_EAGER = object()  # flags of a model that is not a traced GraphModule (graph-scope flags may be None)


def _graph_flags(model: nn.Module):
    state = getattr(model, "meta", {}).get("surgery") if isinstance(model, fx.GraphModule) else None
    if state is None:
        return _EAGER
    flags = state.get("flags")
    return None if flags is None else dict(flags)


def _graph_code(model: nn.Module):
    """The code the GraphModule runs, and the code of its graph as it stands now (a graph changed in
    place without a recompile still runs the old code, until the next recompile picks the change up)."""
    if not isinstance(model, fx.GraphModule):
        return None
    return model.code, model.graph.python_code(root_module="self").src


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        state={k: _bits(v) for k, v in model.state_dict(keep_vars=True).items()},
        modules=dict(model.named_modules()),
        params={n: (p, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)},
        modes={n: m.training for n, m in model.named_modules()},
        attrs={n: set(vars(m)) for n, m in model.named_modules()},
        sites=list(surgery.sites(model)),
        code=_graph_code(model),
        flags=_graph_flags(model),
    )


def _same_bits(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def assert_unchanged(model: nn.Module, snap: Snapshot) -> None:
    now = snapshot(model)
    assert list(now.state) == list(snap.state), "state_dict keys changed"
    changed = [k for k in snap.state if not _same_bits(now.state[k], snap.state[k])]
    assert not changed, f"state_dict values changed: {changed}"
    assert list(now.modules) == list(snap.modules), "module paths changed"
    moved = [p for p in snap.modules if now.modules[p] is not snap.modules[p]]
    assert not moved, f"other module objects at {moved}"
    assert list(now.params) == list(snap.params), "parameter names changed"
    swapped = [n for n in snap.params if now.params[n][0] is not snap.params[n][0]]
    assert not swapped, f"other Parameter objects at {swapped}"
    flags = [n for n in snap.params if now.params[n][1] != snap.params[n][1]]
    assert not flags, f"requires_grad changed for {flags}"
    assert now.modes == snap.modes, "training modes changed"
    assert now.attrs == snap.attrs, "attributes added or removed"
    assert now.sites == snap.sites, "sites added or removed"
    assert now.code == snap.code, f"graph code changed:\n{snap.code[0]}\n->\n{now.code[0]}\ngraph now:\n{now.code[1]}"
    assert now.flags == snap.flags, f"graph-scope flags changed: {snap.flags} -> {now.flags}"


# ----- test-only variants that fail at the fifth site, each at another stage -----


@dataclass(frozen=True)
class FailsCheckAtFifth(LoRA):
    def check(self, site):
        if site.path == FIFTH:
            raise E.ConfigError(f"test variant refuses {site.path}")


@dataclass(frozen=True)
class BrokenIdentityAtFifth(LoRA):
    def init(self, site):
        t = super().init(site)
        if site.path == FIFTH:
            t["lora_B"] = torch.ones_like(t["lora_B"])
        return t


@dataclass(frozen=True)
class BadFoldAtFifth(LoRA):
    def fold(self, weight, bias, t):
        W, b = super().fold(weight, bias, t)
        return (W[:, :-1] if t.site.path == FIFTH else W), b


# ----- helpers for the rows -----


def need(*names: str) -> None:
    missing = [n for n in names if n not in REGISTRY]
    if missing:
        pytest.skip(f"variant {', '.join(missing)} is not in adapters.REGISTRY yet")


def variant(name: str, **kw):
    need(name)
    return REGISTRY[name](**kw)


def adapted(where="*_proj", v=None, scope: str = "module", **kw) -> nn.Module:
    m = scoped_toy(scope, **kw)
    surgery.rewrite(m, v or LoRA(r=2), where)
    return m


def saved(tmp, scope: str, model=None, name="a.safetensors"):
    """An adapter file saved in ``scope`` (by default from the toy adapted at "*_proj" there)."""
    model = adapted(scope=scope) if model is None else model
    path = tmp / name
    surgery.save(model, path)
    return path


OTHER = {"module": "graph", "graph": "module"}


def rewrite_file(path, *, meta=None, tensors=None, drop=()):
    """Re-save an adapter file with edited metadata or tensors (what a tampered or foreign file looks like)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    data = load_file(str(path))
    metadata.update(meta or {})
    data.update(tensors or {})
    for k in drop:
        data.pop(k)
    save_file(data, str(path), metadata=metadata)
    return path


def edit_sites(path, edit):
    with safe_open(str(path), framework="pt") as f:
        sites = json.loads(f.metadata()["sites"])
    return rewrite_file(path, meta={"sites": json.dumps(edit(sites))})


PEFT = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors


def peft_dir(tmp, paths=PROJ, *, r=2, name="peft", drop=(), tensors=None):
    """A PEFT LoRA adapter directory for the toy, written by hand as save_pretrained lays it out;
    ``drop`` / ``tensors`` (keys without the prefix) make it incomplete or wrong."""
    d = tmp / name
    d.mkdir()
    g = torch.Generator().manual_seed(3)
    data = {}
    for p in paths:
        d_out = 6 if p == "head" else 8
        data[f"{PEFT}{p}.lora_A.weight"] = 0.1 * torch.randn(r, 8, generator=g)
        data[f"{PEFT}{p}.lora_B.weight"] = 0.1 * torch.randn(d_out, r, generator=g)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths})}
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file(data, str(d / "adapter_model.safetensors"))
    return edit_peft(d, drop=drop, tensors=tensors)


def edit_peft(d, *, drop=(), tensors=None):
    path = str(d / "adapter_model.safetensors")
    data = load_file(path)
    data.update({PEFT + k: v for k, v in (tensors or {}).items()})
    for k in drop:
        data.pop(PEFT + k)
    save_file(data, path)
    return d


def exported(tmp, scope, **edits):
    """surgery.export_peft of the toy adapted at "*_proj" in ``scope``, then edited as in ``peft_dir``."""
    d = tmp / "exported"
    surgery.export_peft(adapted(scope=scope, seed=1), d)
    return edit_peft(d, **edits)


def poison(model, value):
    t = surgery.sites(model)[FIFTH].adapter_tensors()["lora_B"]
    with torch.no_grad():
        t[0, 0] = value
    return model


def huge_half(scope: str):
    """A float16 toy with finite weights of 6e4: its layers' outputs overflow float16."""
    m = scoped(scope, toy().to(torch.float16), 8, dtype=torch.float16)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(6e4)
    return m


def overflowing(model):
    """Finite adapter tensors whose product is not: the fold itself overflows (1e30 * 1e30)."""
    t = surgery.sites(model)[FIFTH].adapter_tensors()
    with torch.no_grad():
        t["lora_A"][0] = 1e30
        t["lora_B"][0, 0] = 1e30
    return model


def meta_toy(scope: str = "module"):
    with torch.device("meta"):
        m = Toy()
    return scoped(scope, m, device="meta")  # a meta example input: trace takes the torch.export route


def int8_toy(scope: str = "module"):
    m = toy()
    m.layers[0].k_proj.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    return scoped(scope, m)  # torch.fx cannot run the int8 layer; trace takes the torch.export route


def adapted_meta(scope: str = "module"):
    m = meta_toy(scope)
    surgery.rewrite(m, LoRA(r=2), "*_proj")  # LoRA needs only shapes, so meta works
    return m


def swap_norm(m):
    m.layers[0].k_proj = nn.LayerNorm(8)
    return m


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    return path


def write(tmp, data: bytes):
    path = tmp / "odd.safetensors"
    path.write_bytes(data)
    return path


def header(tmp, text: bytes):
    return write(tmp, len(text).to_bytes(8, "little") + text)


def plain(tmp):
    path = tmp / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    return path


# ----- the table -----


ARG = "<arg>"  # in `words`: how messages name the object in a call, `model` or `gm` by scope
MODULE_ONLY = ("module",)
GRAPH_ONLY = ("graph",)


@dataclass(frozen=True)
class Bad:
    id: str
    model: Callable  # (tmp_path, scope) -> the model to call, built in that scope
    call: Callable  # (model, tmp_path, scope) -> None; the bad call
    error: type
    words: tuple[str, ...]  # substrings the message must contain (ARG -> 'model' / 'gm')
    scopes: tuple[str, ...] = SCOPES  # the scopes the row runs in; fewer only with the reason beside it


def rw(v, where, **kw):
    return lambda m, tmp, scope: surgery.rewrite(m, v, where, **kw)


def disk_full_at(n: int):
    """A PiSSA rewrite whose n-th write to a temporary file (a staged residual or a kept original) finds the disk full."""

    def call(m, tmp, scope):
        real, count = offload._write, itertools.count(1)

        def write(f, t):
            if next(count) == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(f, t)

        with mock.patch.object(offload, "_write", write):
            surgery.rewrite(m, variant("PiSSA", r=2), "*_proj")

    return call


def fresh(tmp, scope):
    return scoped_toy(scope)


def with_sites(tmp, scope):
    return adapted(scope=scope)


def on_head(tmp, scope):
    return adapted("head", scope=scope)


CASES = [
    # --- where ---
    Bad("no-match", fresh, rw(LoRA(), "*.k_projj"), E.NoMatchError, ("'*.k_projj'", "matches no module", "'*.k_proj'")),
    Bad("no-match-bare-name", fresh, rw(LoRA(), "k_proj"), E.NoMatchError, ("'k_proj'", "write '*.k_proj'", "surgery.plan")),
    Bad("one-of-list-no-match", fresh, rw(LoRA(), ["*.k_proj", "*.q_proj"]), E.NoMatchError, ("'*.q_proj'", "Closest real paths")),
    Bad("half-base-overflows", lambda t, s: huge_half(s), rw(LoRA(), "*_proj"), E.NonFiniteError, ("overflows float16", "finite", "model.float()", "left unchanged")),
    Bad("layernorm-only-glob", fresh, rw(LoRA(), "*.norm"), E.UnsupportedModuleError, ("LayerNorm", "layers.0.norm", "nn.Linear")),
    Bad("layernorm-literal", fresh, rw(LoRA(), "layers.1.norm"), E.UnsupportedModuleError, ("layers.1.norm (LayerNorm)", "layers.0.k_proj")),
    # a module with a weight that is not a linear layer: refused by the same error in both scopes
    Bad("router-literal", lambda t, s: other_toy(Routed, s), rw(LoRA(), "router"), E.UnsupportedModuleError, ("router (Router)", "nn.Linear", "layers.0.k_proj")),
    Bad("router-in-a-list", lambda t, s: other_toy(Routed, s), rw(LoRA(), ["*_proj", "router"]), E.UnsupportedModuleError, ("'router'", "router (Router)")),
    # graph only: module scope adapts a layer called twice (one Site, run twice); a graph site is one call
    Bad("container-literal", fresh, rw(LoRA(), "layers.0"), E.UnsupportedModuleError, ("layers.0, a Block", "'layers.0.*'", "'layers.0.k_proj'")),
    # module scope cannot see that forward never calls it (issue 11 takes that on); the trace can
    Bad("linear-never-called", lambda t, s: other_toy(Unused, s), rw(LoRA(), "spare"), E.GraphScopeError, ("spare", "never runs", "silent no-op"), GRAPH_ONLY),
    # graph scope refuses it as a linear that never runs (the row above); module scope by its parent's class
    Bad("mha-out-proj", lambda t, s: other_toy(Attending, s), rw(LoRA(), "attn.out_proj"), E.UnsupportedModuleError, ("attn.out_proj", "nn.MultiheadAttention", "silent no-op"), MODULE_ONLY),
    Bad("encoder-out-proj", lambda t, s: other_toy(Encoding, s), rw(LoRA(), "layer.self_attn.out_proj"), E.UnsupportedModuleError, ("layer.self_attn.out_proj", "silent no-op"), MODULE_ONLY),
    Bad("layer-called-twice", lambda t, s: other_toy(Reused, s), rw(LoRA(), "*"), E.GraphScopeError, ("mix", "runs 2 times", "module scope"), GRAPH_ONLY),
    Bad("bad-regex", fresh, rw(LoRA(), "re:layers.(0|1"), E.PatternError, ("bad regex", "'re:layers.(0|1'", "whole path")),
    Bad("regex-overflow", fresh, rw(LoRA(), "re:a{99999999999}"), E.PatternError, ("bad regex", "repetition")),
    Bad("unbalanced-brace", fresh, rw(LoRA(), "*.{k_proj,v_proj"), E.PatternError, ("unbalanced '{'", "'*.{k_proj,v_proj'")),
    Bad("stray-close-brace", fresh, rw(LoRA(), "*.k_proj}"), E.PatternError, ("unbalanced '}'", "'*.k_proj}'")),
    Bad("unbalanced-bracket", fresh, rw(LoRA(), "layers.[0-1.*"), E.PatternError, ("unbalanced '['", "[0-3]")),
    Bad("stray-close-bracket", fresh, rw(LoRA(), "layers.0-1].*"), E.PatternError, ("unbalanced ']'",)),
    Bad("reversed-class", fresh, rw(LoRA(), "layers.[2-0].*"), E.PatternError, ("character class", "'layers.[2-0].*'", "[0-3]")),
    Bad("empty-negated-class", fresh, rw(LoRA(), "layers.[!].*"), E.PatternError, ("character class", "[!0]")),
    Bad("brace-bomb", fresh, rw(LoRA(), "{a,b}" * 13), E.PatternError, ("alternatives", "'re:'")),
    Bad("empty-string", fresh, rw(LoRA(), "  "), E.PatternError, ("empty", "'*.k_proj'")),
    Bad("where-int", fresh, rw(LoRA(), 3), E.WhereTypeError, ("got int", "where='*.{q_proj,v_proj}'")),
    Bad("where-none", fresh, rw(LoRA(), None), E.WhereTypeError, ("got NoneType", "glob string")),
    Bad("where-empty-list", fresh, rw(LoRA(), []), E.WhereTypeError, ("empty list", "['*.q_proj', '*.v_proj']")),
    Bad("where-list-with-int", fresh, rw(LoRA(), ["*.k_proj", 7]), E.WhereTypeError, ("int 7", "callables")),
    # --- variant ---
    Bad("variant-class", fresh, lambda m, t, s: surgery.rewrite(m, LoRA, "*_proj"), E.WhereTypeError, ("the class LoRA", "LoRA(r=8)")),
    Bad("variant-string", fresh, lambda m, t, s: surgery.rewrite(m, "LoRA", "*_proj"), E.WhereTypeError, ("str 'LoRA'", "adapters.LoRA(r=8)")),
    Bad("arguments-swapped", fresh, lambda m, t, s: surgery.rewrite(m, "*_proj", LoRA()), E.WhereTypeError, ("Argument order", "surgery.rewrite(model, variant, where)")),
    # module only: the call passes a dict in place of the row's model, so there is no scope to vary
    Bad("model-not-module", fresh, lambda m, t, s: surgery.rewrite({"w": 1}, LoRA(), "*"), E.WhereTypeError, ("torch.nn.Module", "dict"), MODULE_ONLY),
    Bad("pissa-r-above-svd", fresh, lambda m, t, s: surgery.rewrite(m, variant("PiSSA", r=9), "*_proj"), E.ConfigError, ("r=9", "min(d_in, d_out)=8", "r <= 8")),
    Bad("pissa-disk-full", fresh, disk_full_at(1), E.ConfigError, ("the new base weight of layers.0.k_proj (256 bytes)", tempfile.gettempdir(), os.strerror(errno.ENOSPC), "TMPDIR", "left unchanged")),
    Bad("pissa-disk-full-half-way", fresh, disk_full_at(5), E.ConfigError, ("base weight of layers.", os.strerror(errno.ENOSPC), "TMPDIR")),
    Bad("antipasto-r-above-svd", fresh, lambda m, t, s: surgery.rewrite(m, variant("AntiPaSTO", r=9), "*.k_proj"), E.ConfigError, ("r=9", "r <= 8")),
    # a rank above both sides of the weight is refused before anything is allocated (HRA once took 82 s and 16 GB)
    *[
        Bad(f"{n.lower()}-huge-rank", fresh, lambda m, t, s, n=n: surgery.rewrite(m, variant(n, r=10**9), "*.k_proj"), E.ConfigError, ("r=1000000000", "both sides of its 8x8 weight", "r <= 8"))
        for n in ("LoRA", "DoRA", "HRA", "DeLoRA")
    ],
    Bad("road-group-not-dividing", fresh, lambda m, t, s: surgery.rewrite(m, variant("ROAD", group_size=4), ["*_proj", "head"]), E.ConfigError, ("group_size=4", "d_out=6", "head", "group_size=2")),
    Bad("check-fails-at-fifth-site", fresh, rw(FailsCheckAtFifth(r=2), "*_proj"), E.ConfigError, (FIFTH,)),
    Bad("identity-broken-at-fifth-site", fresh, rw(BrokenIdentityAtFifth(r=2), "*_proj"), E.IdentityError, (FIFTH, "identity", "left unchanged")),
    Bad("already-rewritten", with_sites, rw(LoRA(r=4), "*.k_proj"), E.AlreadyRewrittenError, ("already has an adapter named 'default'", "LoRA(r=2)", f"surgery.delete({ARG}, 'default')", "name=")),
    Bad("second-rewrite-fails-half-way", on_head, rw(BrokenIdentityAtFifth(r=2), "*_proj"), E.IdentityError, (FIFTH,)),
    # --- calibration (EVA) ---
    Bad("eva-no-calibration", fresh, lambda m, t, s: surgery.rewrite(m, variant("EVA", r=2), "*_proj"), E.CalibrationError, ("needs calibration data", "calibration=batches")),
    Bad("eva-empty-calibration", fresh, lambda m, t, s: surgery.rewrite(m, variant("EVA", r=2), "*_proj", calibration=[]), E.CalibrationError, ("no batches",)),
    Bad("eva-too-few-tokens", fresh, lambda m, t, s: surgery.rewrite(m, variant("EVA", r=4), "*_proj", calibration=[torch.randn(2, 8)]), E.CalibrationError, ("2 calibration tokens", "at least 5")),
    Bad("eva-bad-batch-type", fresh, lambda m, t, s: surgery.rewrite(m, variant("EVA", r=2), "*_proj", calibration=[3.5]), E.CalibrationError, ("got float", "dicts of tensors")),
    # --- dense-weight variants on layers without a dense weight (graph scope: traced by torch.export) ---
    *[
        Bad(f"{n.lower()}-on-meta", lambda t, s: meta_toy(s), lambda m, t, s, n=n: surgery.rewrite(m, variant(n, r=2), "*.k_proj"), E.DenseWeightError, (n, "meta device", "LoRA"))
        for n in ("PiSSA", "DoRA", "AntiPaSTO")
    ],
    *[
        Bad(f"{n.lower()}-on-int8", lambda t, s: int8_toy(s), lambda m, t, s, n=n: surgery.rewrite(m, variant(n, r=2), "layers.0.k_proj"), E.DenseWeightError, (n, "layers.0.k_proj", "dense base weight"))
        for n in ("PiSSA", "DoRA", "AntiPaSTO")
    ],
    Bad("lora-on-int8", lambda t, s: int8_toy(s), rw(LoRA(r=2), "*.k_proj"), E.UnsupportedModuleError, ("layers.0.k_proj", "int8", "Dequantise")),
    # --- merge / restore / save ---
    Bad("merge-nan", lambda t, s: poison(adapted(scope=s), float("nan")), lambda m, t, s: surgery.merge(m), E.NonFiniteError, (FIFTH, "NaN or Inf", "lora_B", "left unchanged")),
    Bad("merge-inf", lambda t, s: poison(adapted(scope=s), float("inf")), lambda m, t, s: surgery.merge(m), E.NonFiniteError, (FIFTH, "lora_B")),
    Bad("merge-overflow", lambda t, s: overflowing(adapted(scope=s)), lambda m, t, s: surgery.merge(m), E.NonFiniteError, (FIFTH, "NaN or Inf in weight", "left unchanged")),
    Bad("merge-bad-fold-at-fifth-site", lambda t, s: adapted(v=BadFoldAtFifth(r=2), scope=s), lambda m, t, s: surgery.merge(m), E.VariantContractError, ("BadFoldAtFifth", FIFTH, "(8, 7)", "(8, 8)", "left unchanged")),
    Bad("merge-meta", lambda t, s: adapted_meta(s), lambda m, t, s: surgery.merge(m), E.MetaDeviceError, ("meta device", "layers.0.k_proj")),
    Bad("save-meta", lambda t, s: adapted_meta(s), lambda m, t, s: surgery.save(m, t / "m.safetensors"), E.MetaDeviceError, ("meta device", "lora_A")),
    Bad("merge-no-sites", fresh, lambda m, t, s: surgery.merge(m), E.NotRewrittenError, ("no sites", f"surgery.rewrite({ARG}")),
    Bad("restore-no-sites", fresh, lambda m, t, s: surgery.restore(m), E.NotRewrittenError, ("no sites",)),
    Bad("save-no-sites", fresh, lambda m, t, s: surgery.save(m, t / "x.safetensors"), E.NotRewrittenError, ("no sites",)),
    # --- load ---
    Bad("load-missing-file", fresh, lambda m, t, s: surgery.load(m, t / "nope.safetensors"), E.AdapterFileError, ("no adapter file", "nope.safetensors")),
    Bad("load-directory", fresh, lambda m, t, s: surgery.load(m, t), E.AdapterFileError, ("no adapter file",)),
    Bad("load-truncated", fresh, lambda m, t, s: surgery.load(m, truncate(saved(t, s))), E.AdapterFileError, ("truncated",)),
    Bad("load-eight-bytes", fresh, lambda m, t, s: surgery.load(m, write(t, b"\x10" + b"\0" * 7)), E.AdapterFileError, ("not a valid safetensors",)),
    Bad("load-empty-file", fresh, lambda m, t, s: surgery.load(m, write(t, b"")), E.AdapterFileError, ("0 bytes", "too short")),
    Bad("load-plain-safetensors", fresh, lambda m, t, s: surgery.load(m, plain(t)), E.AdapterFileError, ("not a model-surgery adapter", "import_peft")),
    Bad("load-text-file", fresh, lambda m, t, s: surgery.load(m, write(t, b"LoRA r=8 alpha=16\n" * 4)), E.AdapterFileError, ("not a valid safetensors",)),
    Bad("load-header-not-json", fresh, lambda m, t, s: surgery.load(m, header(t, b"{not json")), E.AdapterFileError, ("not valid JSON",)),
    Bad("load-header-a-list", fresh, lambda m, t, s: surgery.load(m, header(t, b"[1, 2, 3]")), E.AdapterFileError, ("not a map of tensor name",)),
    Bad("load-bad-offsets", fresh, lambda m, t, s: surgery.load(m, header(t, b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}}')), E.AdapterFileError, ("not a map of tensor name",)),
    Bad("load-sites-a-list", fresh, lambda m, t, s: surgery.load(m, rewrite_file(saved(t, s), meta={"sites": "[1]"})), E.AdapterFileError, ("lists no sites",)),
    Bad("load-site-without-variant", fresh, lambda m, t, s: surgery.load(m, edit_sites(saved(t, s), lambda x: {k: {"config": {}} for k in x})), E.AdapterFileError, ("'variant' must be a class name", "layers.0.k_proj")),
    Bad("load-dtype-not-a-dtype", fresh, lambda m, t, s: surgery.load(m, edit_sites(saved(t, s), lambda x: {k: {**v, "config": {**v["config"], "dtype": "load"}} for k, v in x.items()})), E.AdapterFileError, ("'load' is not a torch dtype",)),
    Bad("load-unknown-variant", fresh, lambda m, t, s: surgery.load(m, edit_sites(saved(t, s), lambda x: {k: {**v, "variant": "LoRAX"} for k, v in x.items()})), E.UnknownVariantError, ("'LoRAX'", "LoRA", "Upgrade")),
    Bad("load-other-shapes", lambda t, s: scoped_toy(s, width=12), lambda m, t, s: surgery.load(m, saved(t, s)), E.BaseMismatchError, ("another base", "8x8", "12x12")),
    Bad("load-fewer-layers", lambda t, s: scoped_toy(s, layers=2), lambda m, t, s: surgery.load(m, saved(t, s)), E.BaseMismatchError, ("layers.2.k_proj", "does not have", "closest")),
    Bad("load-other-paths", lambda t, s: scoped(s, nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))), lambda m, t, s: surgery.load(m, saved(t, s)), E.BaseMismatchError, ("another base", "layers.0.k_proj")),
    Bad("load-path-is-a-layernorm", lambda t, s: scoped(s, swap_norm(toy())), lambda m, t, s: surgery.load(m, saved(t, s)), E.BaseMismatchError, ("LayerNorm", "not a linear layer")),
    Bad("load-onto-rewritten", with_sites, lambda m, t, s: surgery.load(m, saved(t, s)), E.AlreadyRewrittenError, ("already has an adapter named 'default'", f"surgery.delete({ARG}, 'default')")),
    Bad("load-missing-tensor", fresh, lambda m, t, s: surgery.load(m, rewrite_file(saved(t, s), drop=[f"{FIFTH}.lora_B"])), E.AdapterFileError, (f"{FIFTH}.lora_B", "incomplete")),
    Bad("load-tensor-wrong-shape", fresh, lambda m, t, s: surgery.load(m, rewrite_file(saved(t, s), tensors={f"{FIFTH}.lora_A": torch.zeros(3, 8)})), E.BaseMismatchError, (f"{FIFTH}.lora_A", "(3, 8)", "(2, 8)")),
    Bad("load-second-adapter-fails-half-way", on_head, lambda m, t, s: surgery.load(m, rewrite_file(saved(t, s, adapted(scope=s), "b.safetensors"), drop=[f"{FIFTH}.lora_B"])), E.AdapterFileError, (f"{FIFTH}.lora_B",)),
    # files are scope-independent: a file saved in the other scope (module -> graph, graph -> module) fails the same way
    Bad("load-other-scopes-file-missing-tensor", fresh, lambda m, t, s: surgery.load(m, rewrite_file(saved(t, OTHER[s]), drop=[f"{FIFTH}.lora_B"])), E.AdapterFileError, (f"{FIFTH}.lora_B", "incomplete")),
    Bad("load-other-scopes-file-fails-half-way", on_head, lambda m, t, s: surgery.load(m, rewrite_file(saved(t, OTHER[s]), tensors={f"{FIFTH}.lora_A": torch.zeros(3, 8)})), E.BaseMismatchError, (f"{FIFTH}.lora_A", "(3, 8)", "(2, 8)")),
    # --- import_peft (a hand-written PEFT LoRA directory, or our own export, made wrong) ---
    Bad("peft-missing-tensor", fresh, lambda m, t, s: surgery.import_peft(m, peft_dir(t, drop=[f"{FIFTH}.lora_B.weight"])), E.AdapterFileError, (f"{FIFTH}.lora_B.weight", "lacks")),
    Bad("peft-tensor-wrong-size", fresh, lambda m, t, s: surgery.import_peft(m, peft_dir(t, tensors={f"{FIFTH}.lora_B.weight": torch.zeros(8, 3)})), E.BaseMismatchError, (f"{PEFT}{FIFTH}.lora_B.weight", "(8, 3)", "(8, 2)")),
    Bad("peft-nan-at-fifth-site", fresh, lambda m, t, s: surgery.import_peft(m, peft_dir(t, tensors={f"{FIFTH}.lora_B.weight": torch.full((8, 2), float("nan"))})), E.NonFiniteError, (f"{FIFTH}.lora_B.weight", "NaN or Inf")),
    Bad("peft-second-install-fails-half-way", on_head, lambda m, t, s: surgery.import_peft(m, peft_dir(t, tensors={f"{FIFTH}.lora_B.weight": torch.zeros(8, 3)})), E.BaseMismatchError, (f"{FIFTH}.lora_B.weight", "(8, 3)")),
    Bad("peft-second-install-missing-tensor", on_head, lambda m, t, s: surgery.import_peft(m, peft_dir(t, drop=[f"{FIFTH}.lora_B.weight"])), E.AdapterFileError, (f"{FIFTH}.lora_B.weight", "lacks")),
    Bad("peft-export-tampered-fails-half-way", on_head, lambda m, t, s: surgery.import_peft(m, exported(t, s, tensors={f"{FIFTH}.lora_B.weight": torch.zeros(8, 3)})), E.BaseMismatchError, (f"{FIFTH}.lora_B.weight", "(8, 3)", "(8, 2)")),
    Bad("peft-onto-rewritten", with_sites, lambda m, t, s: surgery.import_peft(m, peft_dir(t)), E.AlreadyRewrittenError, ("layers.0.k_proj", "already has an adapter named 'default'")),
]


@pytest.mark.parametrize("case, scope", [pytest.param(c, s, id=f"{s}-{c.id}") for c in CASES for s in c.scopes])
def test_bad_input(case, scope, tmp_path):
    model = case.model(tmp_path, scope)
    snap = snapshot(model)
    with pytest.raises(case.error) as info:
        case.call(model, tmp_path, scope)
    msg = str(info.value)
    arg = "model" if scope == "module" else "gm"
    missing = [w for w in (w.replace(ARG, arg) for w in case.words) if w not in msg]
    assert not missing, f"message lacks {missing}: {msg}"
    assert isinstance(info.value, E.SurgeryError)
    assert_unchanged(model, snap)


def test_rows_are_built_in_their_scope(tmp_path):
    """Graph-scope rows really get a traced GraphModule (and module-scope rows the eager model)."""
    for scope in SCOPES:
        for build in (fresh, with_sites, on_head, lambda t, s: meta_toy(s), lambda t, s: int8_toy(s)):
            m = build(tmp_path, scope)
            assert isinstance(m, fx.GraphModule) == (scope == "graph")
            assert (getattr(m, "meta", {}).get("surgery") is not None) == (scope == "graph")


def test_snapshot_ignores_a_rewrite_of_the_same_bits():
    for scope in SCOPES:
        m = adapted("head", scope=scope)
        snap = snapshot(m)
        with torch.no_grad():
            m.get_submodule("layers.0.k_proj").weight.copy_(m.get_submodule("layers.0.k_proj").weight.clone())
        if scope == "graph":
            m.recompile()
        surgery.sites(m)
        assert_unchanged(m, snap)


def _relu_to_sigmoid(gm, recompile=True):
    node = next(n for n in gm.graph.nodes if n.target is torch.relu)
    node.target = torch.sigmoid
    if recompile:
        gm.recompile()


def _flip_a_flag(gm):
    flags = gm.meta["surgery"]["flags"]
    flags["head.weight"] = not flags["head.weight"]  # in place: the snapshot must hold a copy


def _toggle_requires_grad(m):
    w = m.get_submodule("layers.0.k_proj").weight
    w.requires_grad_(not w.requires_grad)


def _same_module_anew(m):
    block = m.get_submodule("layers.0")
    block.k_proj = copy.deepcopy(block.k_proj)  # same bits, another object


CHANGES = {  # id -> (change, the assertion that must catch it, scopes)
    "one-ulp": (lambda m: m.get_submodule("head").bias.data.__setitem__(0, m.get_submodule("head").bias[0] * (1 + 2**-20)), "state_dict values", SCOPES),
    "requires-grad": (_toggle_requires_grad, "requires_grad changed", SCOPES),
    "module-object": (_same_module_anew, "other module objects", SCOPES),
    "parameter-object": (lambda m: setattr(m.get_submodule("layers.1.norm"), "weight", nn.Parameter(m.get_submodule("layers.1.norm").weight.detach().clone())), "other Parameter objects", SCOPES),
    "mode": (lambda m: m.get_submodule("layers.2").train(), "training modes", SCOPES),
    "attribute": (lambda m: m.get_submodule("layers.2").__dict__.__setitem__("stray", 1), "attributes", SCOPES),
    "buffer": (lambda m: m.get_submodule("head").register_buffer("extra", torch.zeros(1)), "state_dict keys", SCOPES),
    # graph scope's own bookkeeping: each change below leaves every module, tensor and flag as it was
    "graph-code": (_relu_to_sigmoid, "graph code changed", GRAPH_ONLY),
    "graph-changed-not-recompiled": (lambda gm: _relu_to_sigmoid(gm, recompile=False), "graph code changed", GRAPH_ONLY),
    "graph-flag-flipped": (_flip_a_flag, "graph-scope flags changed", GRAPH_ONLY),
    "graph-flags-dropped": (lambda gm: gm.meta["surgery"].__setitem__("flags", None), "graph-scope flags changed", GRAPH_ONLY),
    "graph-site-record-dropped": (lambda gm: gm.meta["surgery"]["sites"].pop("head"), "sites added or removed", GRAPH_ONLY),
}


@pytest.mark.parametrize("kind, scope", [pytest.param(k, s, id=f"{s}-{k}") for k, (_, _, scopes) in CHANGES.items() for s in scopes])
def test_snapshot_notices_every_kind_of_change(kind, scope):
    change, caught_by, _ = CHANGES[kind]
    m = adapted("head", scope=scope)  # with a site, so graph scope has flags and a site record to lose
    snap = snapshot(m)
    change(m)
    with pytest.raises(AssertionError, match=caught_by):
        assert_unchanged(m, snap)


def test_the_table_is_big_enough():
    assert len({c.id for c in CASES}) == len(CASES)
    for scope in SCOPES:
        assert sum(scope in c.scopes for c in CASES) >= 70, scope
    assert all(set(c.scopes) <= set(SCOPES) and c.scopes for c in CASES)


def test_the_hand_written_peft_directory_is_valid(tmp_path):
    """The PEFT rows fail because of what they tamper with: untouched, the directory imports in both scopes."""
    d = peft_dir(tmp_path)
    want = load_file(str(d / "adapter_model.safetensors"))
    for scope in SCOPES:
        m = surgery.import_peft(adapted("head", scope=scope), d)
        sites = surgery.sites(m)
        assert set(sites) == set(PROJ + ["head"])
        for p in PROJ:
            for n in ("lora_A", "lora_B"):
                assert torch.equal(sites[p].adapter_tensors()[n].detach(), want[f"{PEFT}{p}.{n}.weight"])
        assert {n for n, p in m.named_parameters() if p.requires_grad} == {f"{p}.lora_{t}" for p in PROJ + ["head"] for t in "AB"}


# ----- config errors raised when a variant is built, over every registered variant -----


def _fields(name):
    return {f.name for f in dataclasses.fields(REGISTRY[name])}


RANKED = ["LoRA", "PiSSA", "DoRA", "EVA", "HRA", "DeLoRA", "AntiPaSTO"]
WITH_DROPOUT = ["LoRA", "PiSSA", "DoRA", "EVA", "DeLoRA"]


@pytest.mark.parametrize("r", [0, -2, 2.5, "8", True], ids=repr)
@pytest.mark.parametrize("name", RANKED)
def test_bad_rank_is_refused(name, r):
    need(name)
    with pytest.raises(E.ConfigError) as info:
        REGISTRY[name](r=r)
    assert f"r={r!r}" in str(info.value) and "positive integer" in str(info.value)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("name", WITH_DROPOUT)
def test_dropout_out_of_range_is_refused(name, dropout):
    need(name)
    assert "dropout" in _fields(name)
    with pytest.raises(E.ConfigError, match=rf"dropout must be in \[0, 1\), got dropout={dropout!r}"):
        REGISTRY[name](r=2, dropout=dropout)


@pytest.mark.parametrize("r", [1, 3, 7])
def test_hra_odd_rank_is_refused(r):
    need("HRA")
    with pytest.raises(E.ConfigError, match=rf"r must be even, got r={r}"):
        REGISTRY["HRA"](r=r)


@pytest.mark.parametrize("g", [3, 0, -4, 2.0])
def test_road_bad_group_size_is_refused(g):
    need("ROAD")
    with pytest.raises(E.ConfigError, match=rf"positive even integer.*group_size={g!r}"):
        REGISTRY["ROAD"](group_size=g)


# ----- dtypes and devices -----


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_bases_get_float32_adapters(dtype, scope):
    m = scoped(scope, toy().to(dtype), dtype=dtype)
    surgery.rewrite(m, LoRA(r=2), "*_proj")
    sites = surgery.sites(m)
    assert list(sites) == PROJ
    for s in sites.values():
        assert s.weight.dtype == dtype
        assert {t.dtype for t in s.adapter_tensors().values()} == {torch.float32}
    assert m(torch.randn(3, 8, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("scope", SCOPES)
def test_merge_takes_large_finite_weights(scope):
    """Entries of 1e37 are finite but their sum is not: merge's check of W' looks at values, not at a sum."""
    m = scoped_toy(scope)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1e37)
    surgery.rewrite(m, LoRA(r=2), "*_proj")
    surgery.merge(m)
    assert not surgery.sites(m)
    assert all((p == 1e37).all() for p in m.parameters())  # B = 0: W' is W


@pytest.mark.parametrize("scope", SCOPES)
def test_meta_device_behaviour(scope):
    """On the meta device (shapes, no values): LoRA needs only shapes, so rewrite works and the adapter
    tensors are meta too; restore gives the meta base back; merge and save refuse (MetaDeviceError),
    and variants that need the dense weight refuse at rewrite (DenseWeightError, rows above).
    Graph scope traces the meta model through torch.export, on a meta example input."""
    m = adapted_meta(scope)
    sites = surgery.sites(m)
    assert len(sites) == 6
    assert all(t.device.type == "meta" for s in sites.values() for t in s.adapter_tensors().values())
    assert m(torch.empty(3, 8, device="meta")).shape == (3, 6)
    surgery.restore(m)
    assert not surgery.sites(m) and all(p.device.type == "meta" for p in m.parameters())


@pytest.mark.parametrize("scope", SCOPES)
def test_failed_calibration_keeps_mixed_training_modes(scope):
    need("EVA")
    m = scoped_toy(scope).train()
    m.get_submodule("layers.1").eval()  # a mixed model: model.train(was) afterwards would flatten this
    snap = snapshot(m)
    assert len(set(snap.modes.values())) == 2
    with pytest.raises(E.CalibrationError):
        surgery.rewrite(m, REGISTRY["EVA"](r=4), "*_proj", calibration=[torch.randn(2, 8)])
    assert_unchanged(m, snap)


@pytest.mark.parametrize("scope", SCOPES)
def test_second_rewrite_keeps_the_first_sites_trainable(scope):
    m = adapted("head", scope=scope)
    surgery.rewrite(m, LoRA(r=2), "*.k_proj")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{t}" for p in ["head", "layers.0.k_proj", "layers.1.k_proj", "layers.2.k_proj"] for t in "AB"}


@pytest.mark.parametrize("scope", SCOPES)
def test_sites_stay_in_model_order_after_a_second_rewrite(scope):
    """surgery.sites lists sites "in model order" (its docstring), whatever order they were added in."""
    m = adapted("head", scope=scope)
    surgery.rewrite(m, LoRA(r=2), "*.k_proj")
    assert list(surgery.sites(m)) == ["layers.0.k_proj", "layers.1.k_proj", "layers.2.k_proj", "head"]
