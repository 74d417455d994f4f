"""merge -> save_pretrained -> from_pretrained: a plain transformers checkpoint with the adapted outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import surgery
from adapters import REGISTRY
from cases import CASES
from models import LLAMA, calibration_batches, randomise_adapters, rel_err
from surgery.site import linear_weight


def adapted(case, base, seed=3):
    model = copy.deepcopy(base)
    surgery.rewrite(model, case.variant, LLAMA.where, calibration=calibration_batches(LLAMA, case))
    randomise_adapters(model, scale=0.1, seed=seed)
    return model.eval()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_merged_checkpoint_reloads_with_adapted_outputs(case, tmp_path):
    base = LLAMA.model()
    model = adapted(case, base)
    x = LLAMA.inputs()
    want = LLAMA.out(model, x)
    assert rel_err(want, LLAMA.out(base, x)) > 1e-4, "the randomised adapter changed nothing"
    surgery.merge(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == set(base.state_dict()), "adapter keys leaked into the checkpoint"
    assert type(reloaded) is type(base)
    err = rel_err(LLAMA.out(reloaded, x), want)
    assert err <= 1e-5, f"{case.id}: reloaded merged checkpoint differs from the adapted model by {err:.3g}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bf16_fold_is_float32_cast_once(case):
    model = adapted(case, LLAMA.model(dtype=torch.bfloat16))
    expected = {}
    for path, site in surgery.sites(model).items():
        W, _ = site.fold()  # float32, from the bf16 weight and float32 adapter tensors
        assert W.dtype == torch.float32
        expected[path] = linear_weight(W, site.layout).to(torch.bfloat16)
    surgery.merge(model)
    modules = dict(model.named_modules())
    for path, w in expected.items():
        assert modules[path].weight.dtype == torch.bfloat16
        assert torch.equal(modules[path].weight, w), f"{case.id}: {path} was not folded in float32 and cast once"


def test_bf16_lora_merge_equals_the_float32_formula():
    model = LLAMA.model(dtype=torch.bfloat16)
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    surgery.rewrite(model, REGISTRY["LoRA"](r=4, alpha=8), LLAMA.where)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_(0, 0.02)
    deltas = {p: 2.0 * (s.lora_B.detach().float() @ s.lora_A.detach().float()) for p, s in surgery.sites(model).items()}
    surgery.merge(model)
    for p, delta in deltas.items():
        W = orig[f"{p}.weight"]
        assert torch.equal(model.get_submodule(p).weight, (W.float() + delta.float()).to(torch.bfloat16))


def _tied_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)).eval()


def test_tied_lm_head_is_untied_by_merge_and_reloads_untied(tmp_path):
    model = _tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.detach().clone()
    surgery.rewrite(model, REGISTRY["LoRA"](r=4, alpha=8), "lm_head")
    with torch.no_grad():
        surgery.sites(model)["lm_head"].lora_B.normal_(0, 0.1)
    x = LLAMA.inputs()
    want = LLAMA.out(model, x)
    with pytest.warns(UserWarning, match="untied"):
        surgery.merge(model)
    assert torch.equal(model.model.embed_tokens.weight, embed), "merging the head changed the input embedding"
    assert not torch.equal(model.lm_head.weight, embed)
    assert model.config.tie_word_embeddings is False
    assert rel_err(LLAMA.out(model, x), want) <= 1e-5
    head = model.lm_head.weight.detach().clone()

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr(), "re-tied on reload"
    assert torch.equal(reloaded.model.embed_tokens.weight, embed)
    assert torch.equal(reloaded.lm_head.weight, head)
    assert rel_err(LLAMA.out(reloaded, x), want) <= 1e-5
