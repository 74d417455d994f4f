"""DeLoRA equals PEFT's DeLoRA (peft 0.21) on the Linear families; its gradients wake up as documented."""

import copy

import pytest
import torch

import surgery
from adapters import DeLoRA
from models import BERT, GPT2, LLAMA, QWEN3, rel_err
from peft_twin import assert_same_outputs, copy_from_peft, peft_model, randomise_peft
from surgery.errors import BaseMismatchError, ConfigError

LINEAR = [LLAMA, QWEN3, BERT]  # PEFT refuses GPT-2's Conv1D for DeLoRA


def twins(family, dropout=0.0):
    from peft import DeloraConfig

    base = family.model()
    ours = surgery.rewrite(copy.deepcopy(base), DeLoRA(r=4, lambda0=6.0, dropout=dropout), family.where)
    targets = list(surgery.sites(ours))
    pm = peft_model(base, DeloraConfig(r=4, delora_lambda=6.0, module_dropout=dropout, target_modules=targets))
    return base, ours, pm


@pytest.mark.parametrize("family", LINEAR, ids=lambda f: f.name)
def test_delora_matches_peft(family):
    base, ours, pm = twins(family)
    theirs_sd = pm.state_dict()
    for path, s in surgery.sites(ours).items():  # w is computed at init, independently on each side
        key = f"base_model.model.{path}.delora_w_norm.default"
        assert rel_err(s.delora_w_norm, theirs_sd[key]) <= 1e-6
        assert s.delora_lambda.item() == theirs_sd[f"base_model.model.{path}.delora_lambda.default"].item()
    randomise_peft(pm)
    assert copy_from_peft(pm, ours) == 4 * len(surgery.sites(ours))
    assert_same_outputs(family, base, ours, pm)

    merged = pm.merge_and_unload()
    surgery.merge(ours)
    sd = merged.state_dict()
    for k, v in ours.state_dict().items():
        assert rel_err(v, sd[k]) <= 1e-5, f"merged {k} differs from PEFT's"


def test_delora_training_step_with_dropout_matches_peft():
    """Same masks (same seed, same draw order), same outputs and gradients; the norms are not detached."""
    _, ours, pm = twins(LLAMA, dropout=0.2)
    randomise_peft(pm)
    copy_from_peft(pm, ours)
    x = LLAMA.inputs()
    proj = torch.randn(LLAMA.out(ours, x).shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for m in (ours, pm):
        m.train()
        torch.manual_seed(5)
        (LLAMA.out(m, x) * proj).sum().backward()
        grads.append({n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                      for n, p in m.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1])
    for n, g in grads[0].items():
        assert g.abs().max() > 0, f"{n} got no gradient"
        assert rel_err(g, grads[1][n]) <= 1e-4, f"gradient of {n} differs from PEFT's"


def test_gradients_reach_b_first_then_a_and_lambda():
    model = surgery.rewrite(LLAMA.model(), DeLoRA(r=4), "*.layers.0.self_attn.v_proj")
    site = surgery.sites(model)["model.layers.0.self_attn.v_proj"]
    opt = torch.optim.SGD([site.delora_A, site.delora_B, site.delora_lambda], lr=0.1)
    x = torch.randn(7, site.d_in)
    seen = []
    for _ in range(2):
        opt.zero_grad()
        site(x).pow(2).sum().backward()
        seen.append({n: bool(getattr(site, n).grad.abs().max() > 0) for n in ("delora_A", "delora_B", "delora_lambda")})
        opt.step()
    assert seen[0] == {"delora_A": False, "delora_B": True, "delora_lambda": False}
    assert all(seen[1].values()), seen[1]
    assert torch.isfinite(site.delora_A).all() and not site.delora_w_norm.requires_grad


def test_config_is_checked():
    for bad in (0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="lambda0 must be a finite nonzero number"):
            DeLoRA(r=4, lambda0=bad)
    with pytest.raises(ConfigError, match="dropout"):
        DeLoRA(r=4, dropout=1.0)
    with pytest.raises(ConfigError, match="positive integer"):
        DeLoRA(r=0)


def test_loaded_adapter_keeps_its_saved_column_norms(tmp_path):
    """As in PEFT, w belongs to the adapter: loading onto another base does not recompute it."""
    model = surgery.rewrite(GPT2.model(), DeLoRA(r=4), GPT2.where)  # Conv1D too, unlike PEFT
    saved = {p: s.delora_w_norm.clone() for p, s in surgery.sites(model).items()}
    for p, s in surgery.sites(model).items():  # Conv1D stores W^T (d_in, d_out): W's columns are its rows
        assert rel_err(saved[p], s.weight.detach().double().norm(dim=1)) <= 1e-6
    surgery.save(model, tmp_path / "a.safetensors")
    with pytest.raises(BaseMismatchError, match="saved on another base"):  # w was computed from W
        surgery.load(GPT2.model(seed=5), tmp_path / "a.safetensors")
    other = surgery.load(GPT2.model(seed=5), tmp_path / "a.safetensors", check_base=False)
    for p, s in surgery.sites(other).items():
        assert torch.equal(s.delora_w_norm, saved[p])
        assert not torch.allclose(s.delora_w_norm, s.weight.detach().norm(dim=1))  # Conv1D: W^T's columns
