"""LoRA on nn.Embedding and nn.Conv1d/2d, in both scopes: equal to PEFT 0.21's LoRA (outputs and
gradients, same tensors copied across), identity at init, fold, save/load, restore, export_peft and
import_peft with real PEFT; every other variant refused there; `where` wildcards still mean linear layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import surgery
from adapters import IA3, LoRA
from cases import CASES
from models import LLAMA, SCOPES, in_scope, randomise_adapters, rel_err
from peft_twin import randomise_peft
from surgery.errors import ConfigError, GraphScopeError, UnsupportedModuleError


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, (3, 2), stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv1d(8, 6, 3)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
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
    return {"x": torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))}


LLAMA_NET = Net("llama", LLAMA.build, "*.{embed_tokens,k_proj,v_proj,down_proj}", LLAMA.inputs, LLAMA.out,
                ("Embedding",))
CNN_NET = Net("cnn", CNN, "*conv*", _cnn_inputs, lambda m, x: m(**x), ("Conv2d", "Conv1d"))
NETS = [LLAMA_NET, CNN_NET]


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


def peft_twin(base: nn.Module, targets: list[str], **config):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=targets, **config))
    randomise_peft(pm)
    return pm.eval()


def peft_name(key: str) -> str:
    """PEFT's live key of an adapter tensor -> ours: the adapter-name level and the embedding's own names go."""
    k = key.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
    return k.replace(".lora_embedding_A", ".lora_A").replace(".lora_embedding_B", ".lora_B")


def peft_tensors(pm) -> dict[str, torch.Tensor]:
    return {peft_name(n): p for n, p in pm.named_parameters() if p.requires_grad}


def copy_across(pm, ours: nn.Module) -> int:
    mine = {f"{p}.{n}": t for p, s in surgery.sites(ours).items() for n, t in s.adapter_tensors().items()}
    theirs = peft_tensors(pm)
    assert set(theirs) == set(mine), sorted(set(theirs) ^ set(mine))[:4]
    with torch.no_grad():
        for k, t in mine.items():
            t.copy_(theirs[k].reshape(t.shape))  # PEFT's conv kernels (r, in, *k) are our rows (r, in * prod(k))
    return len(mine)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("net", NETS, ids=lambda n: n.name)
def test_lora_matches_peft_outputs_and_gradients(net, scope):
    base = net.model()
    ours = fresh(scope, net, base)
    surgery.rewrite(ours, LoRA(r=4, alpha=12), net.where)
    assert set(net.kinds) <= classes(ours)
    pm = peft_twin(base, list(surgery.sites(ours)))
    assert copy_across(pm, ours) == 2 * len(surgery.sites(ours))
    x = net.inputs()
    theirs = net.out(pm, x)
    assert rel_err(theirs, net.out(base, x)) > 1e-3, "PEFT's adapter is still the identity"
    mine = net.out(eval_mode(scope, ours), x)
    err = rel_err(mine, theirs)
    assert err <= 1e-5, f"outputs vs PEFT: {err:.3g}"
    theirs.pow(2).mean().backward()
    mine.pow(2).mean().backward()
    grads = peft_tensors(pm)
    for p, s in surgery.sites(ours).items():
        for n, t in s.adapter_tensors().items():
            g = grads[f"{p}.{n}"].grad.reshape(t.shape)
            assert rel_err(t.grad, g) <= 1e-5, f"gradient of {p}.{n} vs PEFT: {rel_err(t.grad, g):.3g}"


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("net", NETS, ids=lambda n: n.name)
def test_identity_fold_save_load_restore(net, scope, tmp_path):
    model = fresh(scope, net)
    x = net.inputs()
    ref = net.out(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    surgery.rewrite(model, LoRA(r=4, alpha=8), net.where)
    assert rel_err(net.out(model, x), ref) == 0.0, "LoRA adds exactly 0 at init (B = 0; on embeddings A = 0)"
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
@pytest.mark.parametrize("net", NETS, ids=lambda n: n.name)
def test_export_peft_loads_in_peft_model(net, scope, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    base = net.model()
    ours = fresh(scope, net, base)
    surgery.rewrite(ours, LoRA(r=4, alpha=12), net.where)
    randomise_adapters(ours, scale=0.1, seed=3)
    x = net.inputs()
    want = net.out(eval_mode(scope, ours), x)
    surgery.export_peft(ours, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    if net is LLAMA_NET:
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    err = rel_err(net.out(pm, x), want)
    assert err <= 1e-5, f"PEFT loading our export vs ours: {err:.3g}"


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("net", NETS, ids=lambda n: n.name)
def test_import_peft_of_embedding_and_conv_lora(net, scope, tmp_path):
    base = net.model()
    probe = net.model()
    surgery.rewrite(probe, LoRA(r=4), net.where)  # the same targets as PEFT gets
    pm = peft_twin(base, list(surgery.sites(probe)), use_rslora=True)
    pm.save_pretrained(str(tmp_path))
    ours = fresh(scope, net, base)
    surgery.import_peft(ours, tmp_path)
    x = net.inputs()
    err = rel_err(net.out(eval_mode(scope, ours), x), net.out(pm, x))
    assert err <= 1e-5, f"imported vs PEFT: {err:.3g}"


OTHERS = [c for c in CASES if c.variant.name != "LoRA"]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("where,net", [("model.embed_tokens", LLAMA_NET), ("conv1", CNN_NET), ("conv3", CNN_NET)],
                         ids=["embedding", "conv2d", "conv1d"])
@pytest.mark.parametrize("case", OTHERS, ids=str)
def test_other_variants_are_refused_on_embeddings_and_convs(case, where, net, scope):
    model = fresh(scope, net)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"{case.variant.name} cannot adapt {where}.*Variants that adapt it: LoRA"):
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
    assert list(surgery.sites(cnn)) == ["conv1", "conv2", "conv3", "head"]


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
def test_bf16_embedding_keeps_ids_integer(scope):
    base = LLAMA.model(dtype=torch.bfloat16)
    model = in_scope(scope, base, **LLAMA.inputs())
    x = LLAMA.inputs()
    ref = LLAMA.out(model, x)
    surgery.rewrite(model, LoRA(r=4), LLAMA_NET.where)
    site = surgery.sites(model)["model.embed_tokens"]
    assert site.lora_A.dtype == torch.float32, "float32 adapters on a bf16 base, as PEFT"
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
