"""DoRA equals PEFT's DoRA (peft 0.21, ``use_dora=True``): outputs, gradients, training with dropout, merge."""

import copy
import warnings

import pytest
import torch

import surgery
from adapters import DoRA
from models import GPT2, LLAMA, TINY, rel_err
from peft_twin import assert_same_outputs, copy_from_peft, peft_model, randomise_peft


def twins(family, dropout=0.0):
    """Our DoRA and PEFT's on the same base, PEFT's adapter randomised and copied into ours."""
    from peft import LoraConfig

    base = family.model()
    ours = surgery.rewrite(copy.deepcopy(base), DoRA(r=4, alpha=12, dropout=dropout), family.where)
    targets = list(surgery.sites(ours))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice on GPT-2's Conv1D
        pm = peft_model(base, LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, use_dora=True,
                                         target_modules=targets))
    randomise_peft(pm)
    assert copy_from_peft(pm, ours) == 3 * len(targets)
    return base, ours, pm


@pytest.mark.parametrize("family", TINY, ids=lambda f: f.name)
def test_dora_matches_peft(family):
    base, ours, pm = twins(family)
    assert_same_outputs(family, base, ours, pm)


def grads(model, family, x, proj, seed):
    torch.manual_seed(seed)  # same dropout masks: both models draw them in the same order and shapes
    model.zero_grad()
    (family.out(model, x) * proj).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=lambda f: f.name)
def test_dora_training_step_matches_peft(family, dropout):
    """Training mode: same outputs and same gradients (n detached, dropout inside the magnitude term)."""
    _, ours, pm = twins(family, dropout)
    pm.train()
    ours.train()
    x = family.inputs()
    proj = torch.randn(family.out(ours, x).shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    out = family.out(ours, x)
    torch.manual_seed(5)
    assert rel_err(out, family.out(pm, x)) <= 1e-5
    g_ours, g_peft = grads(ours, family, x, proj, 6), grads(pm, family, x, proj, 6)
    by_name = {k.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight"): v
               for k, v in g_peft.items()}
    assert set(g_ours) == set(by_name)
    for name, g in g_ours.items():
        assert g.abs().max() > 0, f"{name} got no gradient"
        assert rel_err(g, by_name[name]) <= 1e-4, f"gradient of {name} differs from PEFT's"


@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=lambda f: f.name)
def test_dora_merge_matches_peft_merge(family):
    base, ours, pm = twins(family)
    x = family.inputs()
    merged = pm.merge_and_unload()
    surgery.merge(ours)
    sd = merged.state_dict()
    for k, v in ours.state_dict().items():
        assert rel_err(v, sd[k]) <= 1e-5, f"merged {k} differs from PEFT's"
    assert rel_err(family.out(ours, x), family.out(merged, x)) <= 1e-5


def test_row_norm_identity_matches_the_explicit_norm():
    """n from the expanded square equals ||W + s B A||_row, also where B A is as large as W."""
    g = torch.Generator().manual_seed(0)
    v = DoRA(r=8, alpha=16)
    for scale in (1e-3, 0.1, 1.0):
        W = torch.randn(96, 64, generator=g)
        A, B = torch.randn(8, 64, generator=g), scale * torch.randn(96, 8, generator=g)
        want = (W.double() + v.scale * B.double() @ A.double()).norm(dim=1)
        assert rel_err(v.row_norm(W, A, B), want) <= 1e-6
        assert rel_err(v.row_norm(W.t().contiguous().t(), A, B), want) <= 1e-6  # Conv1D's transposed view


def test_norm_gets_no_gradient_and_magnitude_starts_at_row_norms():
    model = LLAMA.model()
    surgery.rewrite(model, DoRA(r=4), "*.k_proj")
    site = surgery.sites(model)["model.layers.0.self_attn.k_proj"]
    assert rel_err(site.lora_magnitude_vector, site.weight.detach().double().norm(dim=1)) <= 1e-6
    with torch.no_grad():
        site.lora_B.normal_()
    x = torch.randn(5, site.d_in)
    site.lora_magnitude_vector.grad = None
    site(x).sum().backward()
    # with n detached, dy/dm_i = (W x + s B A x)_i / n_i; a gradient through n would add to it
    W, A, B = (t.detach().double() for t in (site.weight, site.lora_A, site.lora_B))
    V = W + site.variant.scale * B @ A
    want = (x.double() @ V.t() / V.norm(dim=1)).sum(0)
    assert rel_err(site.lora_magnitude_vector.grad, want) <= 1e-5


def test_dora_refuses_a_layer_without_dense_weight():
    from surgery.errors import DenseWeightError

    model = LLAMA.model()
    layer = model.model.layers[0].self_attn.k_proj
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight, device="meta"))
    with pytest.raises(DenseWeightError, match="DoRA needs the dense base weight"):
        surgery.rewrite(model, DoRA(r=4), "*.layers.0.self_attn.k_proj")
