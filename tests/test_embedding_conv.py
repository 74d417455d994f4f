"""LoRA and DoRA on nn.Embedding and nn.Conv1d/2d/3d, IA3 on the convs, in both scopes: equal to PEFT 0.21
(outputs and gradients, same tensors copied across), identity at init, every tensor trains, fold, save/load,
restore, export_peft and import_peft with real PEFT; every other variant refused there; `where` wildcards
still mean linear layers."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from typing import Any, Callable

import pytest
import torch
from torch import nn

import surgery
from adapters import DoRA, IA3, LoRA
from cases import CASES
from models import LLAMA, SCOPES, in_scope, randomise_adapters, rel_err
from peft_twin import randomise_peft
from test_errors import assert_unchanged, snapshot
from surgery.errors import ConfigError, GraphScopeError, PeftFormatError, UnsupportedModuleError
from surgery.variant import Variant


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv3d(3, 4, (2, 3, 3), padding=(0, 1, 1))
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, (3, 2), stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv1d(8, 6, 3)
        self.head = nn.Linear(6, 5)

    def forward(self, x):  # x: (N, 3, 2, H, W), two frames that conv0 folds into one
        h = torch.relu(self.conv0(x)).flatten(1, 2)
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h)).flatten(2)
        return self.head(torch.relu(self.conv3(h)).mean(-1))


@dataclass(frozen=True)
class Net:
    name: str
    build: Callable[[], nn.Module]
    where: str
    inputs: Callable[[], dict[str, torch.Tensor]]
    out: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    kinds: tuple[str, ...]  # the layer classes `where` must reach beyond nn.Linear

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()


def _cnn_inputs():
    return {"x": torch.randn(2, 3, 2, 10, 10, generator=torch.Generator().manual_seed(1))}


LLAMA_NET = Net("llama", LLAMA.build, "*.{embed_tokens,k_proj,v_proj,down_proj}", LLAMA.inputs, LLAMA.out,
                ("Embedding",))
CNN_NET = Net("cnn", CNN, "*conv*", _cnn_inputs, lambda m, x: m(**x), ("Conv3d", "Conv2d", "Conv1d"))
CNN_2D3D = replace(CNN_NET, name="cnn-2d3d", where="conv{0,1,2}", kinds=("Conv3d", "Conv2d"))  # PEFT's IA3 convs
NETS = [LLAMA_NET, CNN_NET]


def lora_config(targets: list[str], **extra):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=12, target_modules=targets, **extra)


def ia3_config(targets: list[str], **extra):
    from peft import IA3Config

    return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t.endswith(IA3_FF)], **extra)


IA3_FF = ("conv0", "conv2")  # input side on the Conv3d and one Conv2d, output side elsewhere


@dataclass(frozen=True)
class Method:
    """A variant on embeddings and convs, with its PEFT 0.21 twin (the same hyperparameters)."""

    variant: Variant
    peft_config: Callable[..., Any]  # (targets, **extra) -> PEFT's config
    nets: tuple[Net, ...]  # where it adapts embeddings or convs, in our formats
    peft_nets: tuple[Net, ...]  # the part of that PEFT 0.21 has a peer for
    identity: float = 0.0  # relative output error at init

    def __str__(self) -> str:
        return self.variant.name


METHODS = [
    Method(LoRA(r=4, alpha=12), lora_config, (LLAMA_NET, CNN_NET), (LLAMA_NET, CNN_NET)),
    # b + (m / n) (y - b + s B A x) rounds y - b + b on a layer with a bias (the convs), as on linear layers
    Method(DoRA(r=4, alpha=12), lambda t, **kw: lora_config(t, use_dora=True, **kw), (LLAMA_NET, CNN_NET),
           (LLAMA_NET, CNN_NET), identity=1e-7),
    # PEFT 0.21's IA3 has neither nn.Conv1d nor nn.Embedding
    Method(IA3(feedforward=IA3_FF), ia3_config, (CNN_NET,), (CNN_2D3D,)),
]
OURS = [pytest.param(m, n, id=f"{m}-{n.name}") for m in METHODS for n in m.nets]
WITH_PEFT = [pytest.param(m, n, id=f"{m}-{n.name}") for m in METHODS for n in m.peft_nets]


def fresh(scope: str, net: Net, base: nn.Module | None = None) -> nn.Module:
    model = copy.deepcopy(base) if base is not None else net.model()
    return in_scope(scope, model, **net.inputs())


def eval_mode(scope: str, model: nn.Module) -> nn.Module:
    if scope == "module":  # a GraphModule from torch.export refuses .eval(); it was traced in eval mode
        model.eval()
    return model


def classes(model: nn.Module) -> set[str]:
    """The classes of the layers the sites stand in for."""
    return {s.base_class for s in surgery.sites(model).values()}


def peft_twin(base: nn.Module, targets: list[str], method: Method = METHODS[0], **config):
    from peft import get_peft_model

    pm = get_peft_model(copy.deepcopy(base), method.peft_config(targets, **config))
    randomise_peft(pm)
    return pm.eval()


def peft_name(key: str) -> str:
    """PEFT's live key of an adapter tensor -> ours: the adapter-name level and the embedding's own names go."""
    k = key.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
    return k.replace(".lora_embedding_A", ".lora_A").replace(".lora_embedding_B", ".lora_B")


def peft_tensors(pm) -> dict[str, torch.Tensor]:
    return {peft_name(n): p for n, p in pm.named_parameters() if p.requires_grad}


def assert_same_grads(pm, ours: nn.Module) -> None:
    grads = peft_tensors(pm)
    for p, s in surgery.sites(ours).items():
        for n, t in s.adapter_tensors().items():
            g = grads[f"{p}.{n}"].grad.reshape(t.shape)
            assert rel_err(t.grad, g) <= 1e-5, f"gradient of {p}.{n} vs PEFT: {rel_err(t.grad, g):.3g}"


def copy_across(pm, ours: nn.Module) -> int:
    mine = {f"{p}.{n}": t for p, s in surgery.sites(ours).items() for n, t in s.adapter_tensors().items()}
    theirs = peft_tensors(pm)
    assert set(theirs) == set(mine), sorted(set(theirs) ^ set(mine))[:4]
    with torch.no_grad():
        for k, t in mine.items():
            t.copy_(theirs[k].reshape(t.shape))  # PEFT's conv kernels (r, in, *k) are our rows (r, in * prod(k))
    return len(mine)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method,net", WITH_PEFT)
def test_matches_peft_outputs_and_gradients(method, net, scope):
    base = net.model()
    ours = fresh(scope, net, base)
    surgery.rewrite(ours, method.variant, net.where)
    assert set(net.kinds) <= classes(ours)
    pm = peft_twin(base, list(surgery.sites(ours)), method)
    copy_across(pm, ours)
    x = net.inputs()
    theirs = net.out(pm, x)
    assert rel_err(theirs, net.out(base, x)) > 1e-3, "PEFT's adapter is still the identity"
    mine = net.out(eval_mode(scope, ours), x)
    err = rel_err(mine, theirs)
    assert err <= 1e-5, f"outputs vs PEFT: {err:.3g}"
    theirs.pow(2).mean().backward()
    mine.pow(2).mean().backward()
    assert_same_grads(pm, ours)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method,net", OURS)
def test_identity_fold_save_load_restore(method, net, scope, tmp_path):
    model = fresh(scope, net)
    x = net.inputs()
    ref = net.out(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.rewrite(model, method.variant, net.where)
    assert set(net.kinds) <= classes(model)
    # B = 0 (on embeddings A = 0), DoRA's m / n = 1 from the same sum of squares, IA3's l = 1
    err = rel_err(net.out(model, x), ref)
    assert err <= method.identity, f"identity at init: {err:.3g}"
    randomise_adapters(model, scale=0.1, seed=3)
    adapted = net.out(model, x)
    assert rel_err(adapted, ref) > 1e-3

    surgery.save(model, tmp_path / "a.safetensors")
    other = fresh(scope, net)
    surgery.load(other, tmp_path / "a.safetensors")
    assert rel_err(net.out(other, x), adapted) == 0.0
    surgery.restore(other)
    after = other.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before), "restore is bitwise"
    assert torch.equal(net.out(other, x), ref)

    surgery.merge(model)
    assert not surgery.sites(model)
    err = rel_err(net.out(model, x), adapted)
    assert err <= 1e-5, f"merged vs unmerged: {err:.3g}"
    if scope == "module":
        assert {type(m).__name__ for m in model.modules()} >= set(net.kinds)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("net", NETS, ids=lambda n: n.name)
def test_named_adapters_on_embeddings_and_convs(net, scope, tmp_path):
    """A second named LoRA on the same embedding and conv sites: identity beside a trained first, each adapter
    on its own through activate, strength 0 drops one exactly, and both round-trip through a file."""
    model = fresh(scope, net)
    x = net.inputs()
    ref = net.out(model, x)
    surgery.rewrite(model, LoRA(r=4, alpha=8), net.where, name="a")
    randomise_adapters(model, scale=0.1, seed=3)
    only_a = net.out(model, x)
    surgery.rewrite(model, LoRA(r=2, alpha=4), net.where, name="b")
    assert rel_err(net.out(model, x), only_a) == 0.0
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # move b only
        for site in surgery.sites(model).values():
            for t in site.adapter("b").adapter_tensors().values():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    both = net.out(model, x)
    with surgery.scaled(model, 0.0, name="b"):
        a_again = net.out(model, x)
    assert rel_err(a_again, only_a) <= 1e-6 < rel_err(both, only_a)
    surgery.activate(model, "b")
    only_b = net.out(model, x)
    surgery.activate(model, "a", "b")
    surgery.save(model, tmp_path / "ab.safetensors")
    other = fresh(scope, net)
    surgery.load(other, tmp_path / "ab.safetensors")
    assert rel_err(net.out(other, x), both) == 0.0
    surgery.activate(other, "b")
    assert rel_err(net.out(other, x), only_b) == 0.0
    surgery.merge(model)
    assert rel_err(net.out(model, x), both) <= 1e-5
    assert rel_err(only_b, ref) > 1e-3


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method,net", WITH_PEFT)
def test_export_peft_loads_in_peft_model(method, net, scope, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    base = net.model()
    ours = fresh(scope, net, base)
    surgery.rewrite(ours, method.variant, net.where)
    randomise_adapters(ours, scale=0.1, seed=3)
    x = net.inputs()
    want = net.out(eval_mode(scope, ours), x)
    surgery.export_peft(ours, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    twin = peft_twin(base, list(surgery.sites(ours)), method)  # PEFT's own names and shapes for these layers
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in get_peft_model_state_dict(twin).items()}
    if net is LLAMA_NET:
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in saved
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    err = rel_err(net.out(pm, x), want)
    assert err <= 1e-5, f"PEFT loading our export vs ours: {err:.3g}"


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method,net", WITH_PEFT)
def test_import_peft_of_embeddings_and_convs(method, net, scope, tmp_path):
    base = net.model()
    probe = net.model()
    surgery.rewrite(probe, method.variant, net.where)  # the same targets as PEFT gets
    extra = {"use_rslora": True} if method.variant.name != "IA3" else {}
    pm = peft_twin(base, list(surgery.sites(probe)), method, **extra)
    pm.save_pretrained(str(tmp_path))
    ours = fresh(scope, net, base)
    surgery.import_peft(ours, tmp_path)
    assert {p: s.variant.name for p, s in surgery.sites(ours).items()} == dict.fromkeys(surgery.sites(probe),
                                                                                       method.variant.name)
    x = net.inputs()
    err = rel_err(net.out(eval_mode(scope, ours), x), net.out(pm, x))
    assert err <= 1e-5, f"imported vs PEFT: {err:.3g}"


@pytest.mark.parametrize("scope", SCOPES)
def test_import_peft_reads_the_ia3_conv_side_from_a_regex(scope, tmp_path):
    """A conv's IA3 vector (1, C, 1, ...) has one shape on both sides: PEFT's feedforward_modules decides, here in
    its regex form (a full match); an unreadable one is refused before the model changes."""
    from peft import IA3Config, get_peft_model

    base = CNN_NET.model()
    pm = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=r"conv[0-2]", feedforward_modules=r"conv[02]"))
    randomise_peft(pm)
    pm.eval().save_pretrained(str(tmp_path))
    ours = fresh(scope, CNN_NET, base)
    surgery.import_peft(ours, tmp_path)
    assert {p: s.variant.input_side(p) for p, s in surgery.sites(ours).items()} == {
        "conv0": True, "conv1": False, "conv2": True}
    x = CNN_NET.inputs()
    err = rel_err(CNN_NET.out(eval_mode(scope, ours), x), CNN_NET.out(pm, x))
    assert err <= 1e-5, f"imported vs PEFT: {err:.3g}"

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, feedforward_modules="conv[")))
    other = fresh(scope, CNN_NET, base)
    snap = snapshot(other)
    with pytest.raises(PeftFormatError, match=r"feedforward_modules 'conv\[' is not a regex"):
        surgery.import_peft(other, tmp_path)
    assert_unchanged(other, snap)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method,net", OURS)
def test_every_adapter_tensor_trains(method, net, scope):
    """Within two SGD steps from init every adapter tensor moves (one step leaves A at 0 gradient while B = 0, and
    on an embedding B while A = 0, as in PEFT), and no base tensor does."""
    model = fresh(scope, net)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.rewrite(model, method.variant, net.where)
    tensors = {f"{p}.{n}": t for p, s in surgery.sites(model).items() for n, t in s.adapter_tensors().items()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(tensors)
    start = {n: t.detach().clone() for n, t in tensors.items()}
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    x = net.inputs()
    proj = torch.randn(net.out(model, x).shape, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        opt.zero_grad()
        (net.out(model, x) * proj).sum().backward()
        opt.step()
    still = [n for n, t in tensors.items() if torch.equal(t, start[n])]
    assert not still, f"{method} on {net.name} ({scope}): not moved by two steps: {still}"
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items()), "a base tensor changed"


@pytest.mark.parametrize("method", [m for m in METHODS if hasattr(m.variant, "dropout")], ids=str)
def test_conv_training_with_dropout_matches_peft(method):
    """Training mode with dropout on the convs: same outputs and gradients as PEFT (same masks, drawn in the same
    order; DoRA's base term is recomputed on the dropped input, as in PEFT)."""
    net = CNN_NET
    base = net.model()
    variant = replace(method.variant, dropout=0.3)
    ours = surgery.rewrite(copy.deepcopy(base), variant, net.where)
    pm = peft_twin(base, list(surgery.sites(ours)), method, lora_dropout=0.3)
    copy_across(pm, ours)
    ours.train()
    pm.train()
    x = net.inputs()
    proj = torch.randn(net.out(ours, x).shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    mine = net.out(ours, x)
    torch.manual_seed(5)
    theirs = net.out(pm, x)
    torch.manual_seed(6)
    assert rel_err(net.out(ours, x), mine) > 1e-3, "dropout did not act (other masks, same output)"
    assert rel_err(mine, theirs) <= 1e-5, f"training outputs vs PEFT: {rel_err(mine, theirs):.3g}"
    (mine * proj).sum().backward()
    (theirs * proj).sum().backward()
    assert_same_grads(pm, ours)


@pytest.mark.parametrize("method,net", WITH_PEFT)
def test_merge_matches_peft_merge(method, net):
    base = net.model()
    ours = surgery.rewrite(copy.deepcopy(base), method.variant, net.where)
    pm = peft_twin(base, list(surgery.sites(ours)), method)
    copy_across(pm, ours)
    surgery.merge(ours)
    merged = pm.merge_and_unload().state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(merged)
    for k, v in mine.items():
        assert rel_err(v, merged[k]) <= 1e-5, f"merged {k} vs PEFT's merge: {rel_err(v, merged[k]):.3g}"


@pytest.mark.parametrize("scope", SCOPES)
def test_ia3_on_a_conv1d_is_not_exported_to_peft(scope, tmp_path):
    """PEFT 0.21's IA3 has no nn.Conv1d layer, so a file it could not load is never written."""
    model = fresh(scope, CNN_NET)
    surgery.rewrite(model, IA3(), "conv3")
    with pytest.raises(PeftFormatError, match=r"IA3\(\) at conv3 sits on an nn.Conv1d, which PEFT 0.21's IA3 refuses"):
        surgery.export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())


ADAPTED_BY = {"embedding": "DoRA, LoRA", "conv": "DoRA, IA3, LoRA"}  # the variants tested above, per kind of layer
LAYERS = [("embedding", "model.embed_tokens", LLAMA_NET, "embedding"), ("conv3d", "conv0", CNN_NET, "conv"),
          ("conv2d", "conv1", CNN_NET, "conv"), ("conv1d", "conv3", CNN_NET, "conv")]
REFUSED = [pytest.param(case, where, net, kind, id=f"{case}-{layer}") for case in CASES
           for layer, where, net, kind in LAYERS if case.variant.name not in ADAPTED_BY[kind].split(", ")]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("case,where,net,kind", REFUSED)
def test_other_variants_are_refused_on_embeddings_and_convs(case, where, net, kind, scope):
    model = fresh(scope, net)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"{case.variant.name} cannot adapt {where}.*Variants that adapt it: "
                                          rf"{ADAPTED_BY[kind]}\."):
        surgery.rewrite(model, case.variant, where)
    assert not surgery.sites(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("scope", SCOPES)
def test_wildcards_still_mean_linear_layers(scope):
    model = fresh(scope, LLAMA_NET)
    surgery.rewrite(model, IA3(), "*")  # would be refused if "*" reached the embedding
    assert "model.embed_tokens" not in surgery.sites(model) and "lm_head" in surgery.sites(model)
    cnn = fresh(scope, CNN_NET)
    surgery.rewrite(cnn, LoRA(r=2), "*")
    assert list(surgery.sites(cnn)) == ["head"]
    cnn = fresh(scope, CNN_NET)
    surgery.rewrite(cnn, LoRA(r=2), "{conv*,head}")  # each alternative reaches what it names
    assert list(surgery.sites(cnn)) == ["conv0", "conv1", "conv2", "conv3", "head"]


def test_convs_and_embeddings_lora_cannot_match_are_refused():
    cases = {
        "grouped": nn.Conv2d(4, 4, 3, groups=2),
        "dilated": nn.Conv2d(4, 4, 3, dilation=2),
        "reflect": nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        "max_norm": nn.Embedding(10, 4, max_norm=1.0),
    }
    for name, layer in cases.items():
        model = nn.Sequential(layer)
        with pytest.raises(UnsupportedModuleError, match="cannot adapt 0: this"):
            surgery.rewrite(model, LoRA(r=2), "0")
        assert model[0] is layer, name

    class Scaled(nn.Embedding):  # like Gemma's scaled embedding: the weight alone does not say what it computes
        def forward(self, ids):
            return super().forward(ids) * 2.0

    with pytest.raises(UnsupportedModuleError):
        surgery.rewrite(nn.Sequential(Scaled(10, 4)), LoRA(r=2), "0")


def tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True)).eval()


def test_tied_embedding_is_refused_in_graph_scope_naming_the_tie():
    gm = surgery.trace(tied_llama(), **LLAMA.inputs())
    with pytest.raises(GraphScopeError, match=r"model.embed_tokens.*tied to lm_head.weight.*Module scope handles it"):
        surgery.rewrite(gm, LoRA(r=4), "model.embed_tokens")
    assert not surgery.sites(gm)


def test_tied_embedding_leaves_lm_head_alone():
    model = tied_llama()
    W = model.lm_head.weight.detach().clone()
    h = torch.randn(3, 32)
    head_before = model.lm_head(h)
    surgery.rewrite(model, LoRA(r=4), "model.embed_tokens")
    randomise_adapters(model, scale=0.1, seed=3)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "the site shares the Parameter, untouched"
    assert torch.equal(model.lm_head(h), head_before), "LoRA on the embedding must not change lm_head"
    x = LLAMA.inputs()
    adapted = LLAMA.out(model, x)
    with pytest.warns(UserWarning, match="tied to"):
        surgery.merge(model)
    assert torch.equal(model.lm_head.weight, W) and torch.equal(model.lm_head(h), head_before)
    assert not torch.equal(model.model.embed_tokens.weight, W), "the fold went into the embedding only"
    assert model.config.tie_word_embeddings is False
    assert rel_err(LLAMA.out(model, x), adapted) <= 1e-5


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("variant", [LoRA(r=4), DoRA(r=4)], ids=lambda v: v.name)
def test_bf16_embedding_keeps_ids_integer(variant, scope):
    base = LLAMA.model(dtype=torch.bfloat16)
    model = in_scope(scope, base, **LLAMA.inputs())
    x = LLAMA.inputs()
    ref = LLAMA.out(model, x)
    surgery.rewrite(model, variant, LLAMA_NET.where)
    site = surgery.sites(model)["model.embed_tokens"]
    assert {t.dtype for t in site.adapter_tensors().values()} == {torch.float32}, "float32 adapters, as PEFT"
    assert rel_err(LLAMA.out(model, x), ref) == 0.0
    randomise_adapters(model, scale=0.1, seed=3)
    adapted = LLAMA.out(model, x)
    assert adapted.dtype == torch.bfloat16 and rel_err(adapted, ref) > 1e-2
    surgery.merge(model)
    assert rel_err(LLAMA.out(model, x), adapted) <= 3e-2  # the bf16 rounding of the merged weight, as in cases.py


def test_conv3d_matches_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv3d(2, 4, (3, 2, 2), stride=(1, 2, 1), padding=1)).eval()
    ours = copy.deepcopy(base)
    surgery.rewrite(ours, LoRA(r=4, alpha=12), "0")
    pm = peft_twin(base, ["0"])
    copy_across(pm, ours)
    x = torch.randn(2, 2, 5, 6, 4)
    assert rel_err(pm(x), base(x)) > 1e-3
    assert rel_err(ours(x), pm(x)) <= 1e-5
    out = ours(x)
    surgery.merge(ours)
    assert type(ours[0]) is nn.Conv3d and rel_err(ours(x), out) <= 1e-5
