"""The variant contract owns its rules (surgery/variant.py), in both scopes: what a forward may do under
torch.fx, what init, replace_weight and fold must return, and registration. A variant that breaks a
rule gets a VariantContractError naming it and the rule, and the model is left as it was."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import surgery
from adapters import LoRA
from models import LLAMA, SCOPES, in_scope, rel_err
from surgery import errors as E
from surgery.variant import REGISTRY, Variant, register

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def toy(scope: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).eval()
    return in_scope(scope, model, X)


def state(model: nn.Module):
    """Everything a refused rewrite must leave as it was."""
    code = model.code if isinstance(model, torch.fx.GraphModule) else None
    return ({k: v.clone() for k, v in model.state_dict().items()}, code,
            {n: p.requires_grad for n, p in model.named_parameters()}, list(surgery.sites(model)))


def assert_same(model: nn.Module, before) -> None:
    now = state(model)
    assert now[0].keys() == before[0].keys() and all(torch.equal(now[0][k], before[0][k]) for k in now[0])
    assert now[1:] == before[1:]


# ----- test-only variants, each breaking (or using) one rule -----


@dataclass(frozen=True)
class ConstantLoRA(LoRA):
    """Builds a constant tensor inside forward: allowed; the engine copies it onto the site."""

    def forward(self, x, y, weight, bias, t):
        ones = torch.ones(t.site.d_out)  # (d_out,), a constant of the traced graph
        return super().forward(x, y, weight, bias, t) * ones


@dataclass(frozen=True)
class BranchyLoRA(LoRA):
    """Branches on a tensor value: cannot be traced."""

    def forward(self, x, y, weight, bias, t):
        if t.lora_B.abs().sum() > 0:
            return super().forward(x, y, weight, bias, t)
        return y


@dataclass(frozen=True)
class LoopLoRA(LoRA):
    """Iterates over a tensor in Python: cannot be traced."""

    def forward(self, x, y, weight, bias, t):
        for row in t.lora_B:
            y = y + 0 * row.sum()
        return y


@dataclass(frozen=True)
class TupleLoRA(LoRA):
    def forward(self, x, y, weight, bias, t):
        return y, x


@dataclass(frozen=True)
class BadReplaceWeight(LoRA):
    needs_weight = True

    def init(self, site):
        site.replace_weight(site.weight[:, :-1])
        return super().init(site)


@dataclass(frozen=True)
class InitRaises(LoRA):
    def init(self, site):
        return {"lora_A": {}["missing"]}


@dataclass(frozen=True)
class InitReturnsList(LoRA):
    def init(self, site):
        return [torch.zeros(2)]


@dataclass(frozen=True)
class FoldRaises(LoRA):
    def fold(self, weight, bias, t):
        raise ZeroDivisionError("oops")


@pytest.mark.parametrize("scope", SCOPES)
def test_a_constant_built_in_forward_is_carried_onto_the_site(scope):
    model = toy(scope)
    ref = model(X)
    surgery.rewrite(model, ConstantLoRA(r=2), "*")
    assert rel_err(model(X), ref) == 0
    for s in surgery.sites(model).values():
        assert set(s.adapter_tensors()) == {"lora_A", "lora_B"}, "a traced constant is not an adapter tensor"
    keys = set(model.state_dict())
    assert not any("constant" in k for k in keys), "constants stay out of the state_dict (and out of saved files)"
    surgery.merge(model)
    assert rel_err(model(X), ref) <= 1e-6


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(
    "variant, words",
    [
        (BranchyLoRA(r=2), ("BranchyLoRA(r=2).forward", "cannot be traced", "no `if`")),
        (LoopLoRA(r=2), ("LoopLoRA(r=2).forward", "cannot be traced", "Python iteration")),
        (TupleLoRA(r=2), ("TupleLoRA(r=2).forward", "returned tuple", "one tensor")),
        (BadReplaceWeight(r=2), ("replace_weight", "(8, 8)", "bug in the variant")),
        (InitRaises(r=2), ("InitRaises(r=2).init failed", "KeyError", "bug in the variant")),
        (InitReturnsList(r=2), ("InitReturnsList(r=2).init", "returned list", "dict of tensor name")),
    ],
    ids=["tensor-branch", "loop", "returns-tuple", "replace-weight-shape", "init-raises", "init-returns-list"],
)
def test_a_broken_variant_is_named_with_its_rule(scope, variant, words):
    model = toy(scope)
    before = state(model)
    with pytest.raises(E.VariantContractError) as info:
        surgery.rewrite(model, variant, "*")
    missing = [w for w in words if w not in str(info.value)]
    assert not missing, f"message lacks {missing}: {info.value}"
    assert_same(model, before)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_fold_that_raises_is_a_contract_error_and_merges_nothing(scope):
    model = toy(scope)
    surgery.rewrite(model, FoldRaises(r=2), "*")
    before = state(model)
    with pytest.raises(E.VariantContractError, match=r"FoldRaises\(r=2\)\.fold failed .*ZeroDivisionError"):
        surgery.merge(model)
    assert_same(model, before)


def test_registering_a_second_variant_under_a_taken_name_is_refused():
    @dataclass(frozen=True)
    class LoRA(Variant):  # noqa: F811 - the point: the same name as adapters.LoRA
        pass

    with pytest.raises(E.RegistrationError, match="'LoRA' is already registered"):
        register(LoRA)
    assert REGISTRY["LoRA"].__module__ == "adapters.lora"
    with pytest.raises(E.RegistrationError, match="Variant subclasses"):
        register(dict)


def test_modifies_base_is_gone_and_replacing_the_base_is_declared_by_calling_replace_weight():
    assert not hasattr(Variant, "modifies_base")


# ----- both scopes agree on what can be adapted -----


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("where", ["*.mlp.*", "*.mlp.gate"])
def test_a_moe_router_is_refused_in_both_scopes_with_the_same_message(where):
    """A router computes F.linear with its own weight but is no nn.Linear; graph scope used to take it."""
    model = _mixtral()
    ids = {"input_ids": torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))}
    messages = []
    for scope in SCOPES:
        target = in_scope(scope, copy.deepcopy(model), **ids)
        with pytest.raises(E.UnsupportedModuleError) as info:
            surgery.rewrite(target, LoRA(r=2), where)
        assert "MixtralTopKRouter" in str(info.value)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_a_callable_where_sees_the_users_module_classes_in_graph_scope():
    model = LLAMA.model()
    gm = surgery.trace(model, **LLAMA.inputs())
    seen = set()
    surgery.rewrite(gm, LoRA(r=2), lambda p, m: seen.add(type(m).__name__) or (isinstance(m, nn.Linear) and p.endswith("v_proj")))
    assert {"LlamaDecoderLayer", "Linear", "LlamaRMSNorm"} <= seen
    assert list(surgery.sites(gm)) == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]


# ----- a graph-scope splice leaves no bookkeeping nodes -----


def test_graph_scope_splice_leaves_no_unused_get_attr_or_bias_guard():
    gm = surgery.trace(LLAMA.model(), **LLAMA.inputs())  # Llama's projections have no bias
    surgery.rewrite(gm, LoRA(r=2), "*.v_proj")
    spliced = [n for n in gm.graph.nodes if "surgery" in n.meta]
    assert spliced
    assert all(n.users for n in spliced if n.op == "get_attr"), "an unused get_attr was left in the graph"
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "assert_is_none" in str(n.target)]
    added = surgery.diff(surgery.trace(LLAMA.model(), **LLAMA.inputs()), gm).added
    assert not [c for c in added if c.op == "get_attr" and c.name.endswith(("weight", "bias"))], added
