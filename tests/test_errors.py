"""Bad input: every public call either completes or leaves the model exactly as it was, and says why.

One table (``CASES``) of bad inputs. Each row builds a model (and, where needed, a file), takes a
``snapshot`` of the model, runs the bad call, and asserts the error class, key words of the
message (the rule, the offending value, the fix) and that the model still equals its snapshot:
same state_dict bits, same module objects at every path, same requires_grad flags, same training
modes, same attributes, no sites added or lost.

Rows that need a variant another part of the project adds skip while it is absent from
``adapters.REGISTRY``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from adapters import REGISTRY, LoRA
from surgery import errors as E


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


def snapshot(model: nn.Module) -> Snapshot:
    return Snapshot(
        state={k: _bits(v) for k, v in model.state_dict(keep_vars=True).items()},
        modules=dict(model.named_modules()),
        params={n: (p, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)},
        modes={n: m.training for n, m in model.named_modules()},
        attrs={n: set(vars(m)) for n, m in model.named_modules()},
        sites=list(surgery.sites(model)),
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


def adapted(where="*_proj", v=None, **kw) -> Toy:
    m = toy(**kw)
    surgery.rewrite(m, v or LoRA(r=2), where)
    return m


def saved(tmp, model=None, name="a.safetensors"):
    model = model or adapted()
    path = tmp / name
    surgery.save(model, path)
    return path


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


def poison(model, value):
    site = surgery.sites(model)[FIFTH]
    with torch.no_grad():
        site.lora_B[0, 0] = value
    return model


def meta_toy():
    with torch.device("meta"):
        return Toy()


def int8_toy():
    m = toy()
    m.layers[0].k_proj.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    return m


# ----- the table -----


@dataclass(frozen=True)
class Bad:
    id: str
    model: Callable  # tmp_path -> model
    call: Callable  # (model, tmp_path) -> None; the bad call
    error: type
    words: tuple[str, ...]  # substrings the message must contain


def rw(v, where, **kw):
    return lambda m, tmp: surgery.rewrite(m, v, where, **kw)


def fresh(tmp):
    return toy()


def with_sites(tmp):
    return adapted()


CASES = [
    # --- where ---
    Bad("no-match", fresh, rw(LoRA(), "*.k_projj"), E.NoMatchError, ("'*.k_projj'", "matches no module", "'*.k_proj'")),
    Bad("no-match-bare-name", fresh, rw(LoRA(), "k_proj"), E.NoMatchError, ("'k_proj'", "write '*.k_proj'", "surgery.plan")),
    Bad("one-of-list-no-match", fresh, rw(LoRA(), ["*.k_proj", "*.q_proj"]), E.NoMatchError, ("'*.q_proj'", "Closest real paths")),
    Bad("layernorm-only-glob", fresh, rw(LoRA(), "*.norm"), E.UnsupportedModuleError, ("LayerNorm", "layers.0.norm", "nn.Linear")),
    Bad("layernorm-literal", fresh, rw(LoRA(), "layers.1.norm"), E.UnsupportedModuleError, ("layers.1.norm (LayerNorm)", "layers.0.k_proj")),
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
    Bad("variant-class", fresh, lambda m, t: surgery.rewrite(m, LoRA, "*_proj"), E.WhereTypeError, ("the class LoRA", "LoRA(r=8)")),
    Bad("variant-string", fresh, lambda m, t: surgery.rewrite(m, "LoRA", "*_proj"), E.WhereTypeError, ("str 'LoRA'", "adapters.LoRA(r=8)")),
    Bad("arguments-swapped", fresh, lambda m, t: surgery.rewrite(m, "*_proj", LoRA()), E.WhereTypeError, ("Argument order", "surgery.rewrite(model, variant, where)")),
    Bad("model-not-module", fresh, lambda m, t: surgery.rewrite({"w": 1}, LoRA(), "*"), E.WhereTypeError, ("torch.nn.Module", "dict")),
    Bad("pissa-r-above-svd", fresh, lambda m, t: surgery.rewrite(m, variant("PiSSA", r=9), "*_proj"), E.ConfigError, ("r=9", "min(d_in, d_out)=8", "r <= 8")),
    Bad("antipasto-r-above-svd", fresh, lambda m, t: surgery.rewrite(m, variant("AntiPaSTO", r=9), "*.k_proj"), E.ConfigError, ("r=9", "r <= 8")),
    Bad("road-group-not-dividing", fresh, lambda m, t: surgery.rewrite(m, variant("ROAD", group_size=4), ["*_proj", "head"]), E.ConfigError, ("group_size=4", "d_out=6", "head", "group_size=2")),
    Bad("check-fails-at-fifth-site", fresh, rw(FailsCheckAtFifth(r=2), "*_proj"), E.ConfigError, (FIFTH,)),
    Bad("identity-broken-at-fifth-site", fresh, rw(BrokenIdentityAtFifth(r=2), "*_proj"), E.IdentityError, (FIFTH, "identity", "left unchanged")),
    Bad("already-rewritten", with_sites, rw(LoRA(r=4), "*.k_proj"), E.AlreadyRewrittenError, ("already rewritten", "LoRA(r=2)", "surgery.restore(model)")),
    Bad("second-rewrite-fails-half-way", lambda t: adapted("head"), rw(BrokenIdentityAtFifth(r=2), "*_proj"), E.IdentityError, (FIFTH,)),
    # --- calibration (EVA) ---
    Bad("eva-no-calibration", fresh, lambda m, t: surgery.rewrite(m, variant("EVA", r=2), "*_proj"), E.CalibrationError, ("needs calibration data", "calibration=batches")),
    Bad("eva-empty-calibration", fresh, lambda m, t: surgery.rewrite(m, variant("EVA", r=2), "*_proj", calibration=[]), E.CalibrationError, ("no batches",)),
    Bad("eva-too-few-tokens", fresh, lambda m, t: surgery.rewrite(m, variant("EVA", r=4), "*_proj", calibration=[torch.randn(2, 8)]), E.CalibrationError, ("2 calibration tokens", "at least 5")),
    Bad("eva-bad-batch-type", fresh, lambda m, t: surgery.rewrite(m, variant("EVA", r=2), "*_proj", calibration=[3.5]), E.CalibrationError, ("got float", "dicts of tensors")),
    # --- dense-weight variants on layers without a dense weight ---
    *[
        Bad(f"{n.lower()}-on-meta", lambda t: meta_toy(), lambda m, t, n=n: surgery.rewrite(m, variant(n, r=2), "*.k_proj"), E.DenseWeightError, (n, "meta device", "LoRA"))
        for n in ("PiSSA", "DoRA", "AntiPaSTO")
    ],
    *[
        Bad(f"{n.lower()}-on-int8", lambda t: int8_toy(), lambda m, t, n=n: surgery.rewrite(m, variant(n, r=2), "layers.0.k_proj"), E.DenseWeightError, (n, "layers.0.k_proj", "dense base weight"))
        for n in ("PiSSA", "DoRA", "AntiPaSTO")
    ],
    Bad("lora-on-int8", lambda t: int8_toy(), rw(LoRA(r=2), "*.k_proj"), E.UnsupportedModuleError, ("layers.0.k_proj", "int8", "Dequantise")),
    # --- merge / restore / save ---
    Bad("merge-nan", lambda t: poison(adapted(), float("nan")), lambda m, t: surgery.merge(m), E.NonFiniteError, (FIFTH, "NaN or Inf", "lora_B", "left unchanged")),
    Bad("merge-inf", lambda t: poison(adapted(), float("inf")), lambda m, t: surgery.merge(m), E.NonFiniteError, (FIFTH, "lora_B")),
    Bad("merge-bad-fold-at-fifth-site", lambda t: adapted(v=BadFoldAtFifth(r=2)), lambda m, t: surgery.merge(m), E.VariantContractError, (FIFTH, "(8, 7)", "(8, 8)", "left unchanged")),
    Bad("merge-meta", lambda t: adapted_meta(), lambda m, t: surgery.merge(m), E.MetaDeviceError, ("meta device", "layers.0.k_proj")),
    Bad("save-meta", lambda t: adapted_meta(), lambda m, t: surgery.save(m, t / "m.safetensors"), E.MetaDeviceError, ("meta device", "lora_A")),
    Bad("merge-no-sites", fresh, lambda m, t: surgery.merge(m), E.NotRewrittenError, ("no sites", "surgery.rewrite")),
    Bad("restore-no-sites", fresh, lambda m, t: surgery.restore(m), E.NotRewrittenError, ("no sites",)),
    Bad("save-no-sites", fresh, lambda m, t: surgery.save(m, t / "x.safetensors"), E.NotRewrittenError, ("no sites",)),
    # --- load ---
    Bad("load-missing-file", fresh, lambda m, t: surgery.load(m, t / "nope.safetensors"), E.AdapterFileError, ("no adapter file", "nope.safetensors")),
    Bad("load-directory", fresh, lambda m, t: surgery.load(m, t), E.AdapterFileError, ("no adapter file",)),
    Bad("load-truncated", fresh, lambda m, t: surgery.load(m, truncate(saved(t))), E.AdapterFileError, ("truncated",)),
    Bad("load-eight-bytes", fresh, lambda m, t: surgery.load(m, write(t, b"\x10" + b"\0" * 7)), E.AdapterFileError, ("not a valid safetensors",)),
    Bad("load-empty-file", fresh, lambda m, t: surgery.load(m, write(t, b"")), E.AdapterFileError, ("0 bytes", "too short")),
    Bad("load-plain-safetensors", fresh, lambda m, t: surgery.load(m, plain(t)), E.AdapterFileError, ("not a model-surgery adapter", "import_peft")),
    Bad("load-text-file", fresh, lambda m, t: surgery.load(m, write(t, b"LoRA r=8 alpha=16\n" * 4)), E.AdapterFileError, ("not a valid safetensors",)),
    Bad("load-header-not-json", fresh, lambda m, t: surgery.load(m, header(t, b"{not json")), E.AdapterFileError, ("not valid JSON",)),
    Bad("load-header-a-list", fresh, lambda m, t: surgery.load(m, header(t, b"[1, 2, 3]")), E.AdapterFileError, ("not a map of tensor name",)),
    Bad("load-bad-offsets", fresh, lambda m, t: surgery.load(m, header(t, b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}}')), E.AdapterFileError, ("not a map of tensor name",)),
    Bad("load-sites-a-list", fresh, lambda m, t: surgery.load(m, rewrite_file(saved(t), meta={"sites": "[1]"})), E.AdapterFileError, ("lists no sites",)),
    Bad("load-site-without-variant", fresh, lambda m, t: surgery.load(m, edit_sites(saved(t), lambda s: {k: {"config": {}} for k in s})), E.AdapterFileError, ("'variant' must be a class name", "layers.0.k_proj")),
    Bad("load-dtype-not-a-dtype", fresh, lambda m, t: surgery.load(m, edit_sites(saved(t), lambda s: {k: {**v, "config": {**v["config"], "dtype": "load"}} for k, v in s.items()})), E.AdapterFileError, ("'load' is not a torch dtype",)),
    Bad("load-unknown-variant", fresh, lambda m, t: surgery.load(m, edit_sites(saved(t), lambda s: {k: {**v, "variant": "LoRAX"} for k, v in s.items()})), E.UnknownVariantError, ("'LoRAX'", "LoRA", "Upgrade")),
    Bad("load-other-shapes", lambda t: toy(width=12), lambda m, t: surgery.load(m, saved(t)), E.BaseMismatchError, ("another base", "8x8", "12x12")),
    Bad("load-fewer-layers", lambda t: toy(layers=2), lambda m, t: surgery.load(m, saved(t)), E.BaseMismatchError, ("layers.2.k_proj", "does not have", "closest")),
    Bad("load-other-paths", lambda t: nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6)), lambda m, t: surgery.load(m, saved(t)), E.BaseMismatchError, ("another base", "layers.0.k_proj")),
    Bad("load-path-is-a-layernorm", lambda t: swap_norm(toy()), lambda m, t: surgery.load(m, saved(t)), E.BaseMismatchError, ("LayerNorm", "not a linear layer")),
    Bad("load-onto-rewritten", with_sites, lambda m, t: surgery.load(m, saved(t)), E.AlreadyRewrittenError, ("already rewritten", "fresh base")),
    Bad("load-missing-tensor", fresh, lambda m, t: surgery.load(m, rewrite_file(saved(t), drop=[f"{FIFTH}.lora_B"])), E.AdapterFileError, (f"{FIFTH}.lora_B", "incomplete")),
    Bad("load-tensor-wrong-shape", fresh, lambda m, t: surgery.load(m, rewrite_file(saved(t), tensors={f"{FIFTH}.lora_A": torch.zeros(3, 8)})), E.BaseMismatchError, (f"{FIFTH}.lora_A", "(3, 8)", "(2, 8)")),
    Bad("load-second-adapter-fails-half-way", lambda t: adapted("head"), lambda m, t: surgery.load(m, rewrite_file(saved(t, adapted("*_proj"), "b.safetensors"), drop=[f"{FIFTH}.lora_B"])), E.AdapterFileError, (f"{FIFTH}.lora_B",)),
]


def adapted_meta():
    m = meta_toy()
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


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path):
    model = case.model(tmp_path)
    snap = snapshot(model)
    with pytest.raises(case.error) as info:
        case.call(model, tmp_path)
    msg = str(info.value)
    missing = [w for w in case.words if w not in msg]
    assert not missing, f"message lacks {missing}: {msg}"
    assert isinstance(info.value, E.SurgeryError)
    assert_unchanged(model, snap)


def test_snapshot_ignores_a_rewrite_of_the_same_bits():
    m = toy()
    snap = snapshot(m)
    with torch.no_grad():
        m.head.weight.copy_(m.head.weight.clone())
    assert_unchanged(m, snap)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.head.bias.data.__setitem__(0, m.head.bias[0] * (1 + 2**-20)),
        lambda m: m.layers[0].k_proj.weight.requires_grad_(False),
        lambda m: setattr(m.layers[0], "k_proj", nn.Linear(8, 8)),
        lambda m: setattr(m.layers[1].norm, "weight", nn.Parameter(m.layers[1].norm.weight.detach().clone())),
        lambda m: m.layers[2].train(),
        lambda m: m.layers[2].__dict__.__setitem__("stray", 1),
        lambda m: m.head.register_buffer("extra", torch.zeros(1)),
    ],
    ids=["one-ulp", "requires-grad", "module-object", "parameter-object", "mode", "attribute", "buffer"],
)
def test_snapshot_notices_every_kind_of_change(change):
    m = toy()
    snap = snapshot(m)
    change(m)
    with pytest.raises(AssertionError):
        assert_unchanged(m, snap)


def test_the_table_is_big_enough():
    assert len({c.id for c in CASES}) == len(CASES) >= 25


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_bases_get_float32_adapters(dtype):
    m = toy().to(dtype)
    surgery.rewrite(m, LoRA(r=2), "*_proj")
    for s in surgery.sites(m).values():
        assert s.weight.dtype == dtype
        assert {t.dtype for t in s.adapter_tensors().values()} == {torch.float32}
    assert m(torch.randn(3, 8, dtype=dtype)).dtype == dtype


def test_meta_device_behaviour():
    """On the meta device (shapes, no values): LoRA needs only shapes, so rewrite works and the adapter
    tensors are meta too; restore gives the meta base back; merge and save refuse (MetaDeviceError),
    and variants that need the dense weight refuse at rewrite (DenseWeightError, rows above)."""
    m = adapted_meta()
    sites = surgery.sites(m)
    assert len(sites) == 6
    assert all(t.device.type == "meta" for s in sites.values() for t in s.adapter_tensors().values())
    assert m(torch.empty(3, 8, device="meta")).shape == (3, 6)
    surgery.restore(m)
    assert not surgery.sites(m) and all(p.device.type == "meta" for p in m.parameters())


def test_failed_calibration_keeps_mixed_training_modes():
    need("EVA")
    m = toy().train()
    m.layers[1].eval()  # a mixed model: model.train(was) afterwards would flatten this
    snap = snapshot(m)
    with pytest.raises(E.CalibrationError):
        surgery.rewrite(m, REGISTRY["EVA"](r=4), "*_proj", calibration=[torch.randn(2, 8)])
    assert_unchanged(m, snap)


def test_second_rewrite_keeps_the_first_sites_trainable():
    m = adapted("head")
    surgery.rewrite(m, LoRA(r=2), "*.k_proj")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{t}" for p in ["head", "layers.0.k_proj", "layers.1.k_proj", "layers.2.k_proj"] for t in "AB"}
