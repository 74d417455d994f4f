"""surgery.export_peft: every variant, randomised, loads into the real peft.PeftModel with equal outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import surgery
from adapters import REGISTRY
from cases import CASES
from models import GPT2, LLAMA, SCOPES, calibration_batches, in_scope, randomise_adapters, rel_err
from surgery.errors import NotRewrittenError, PeftFormatError

PEFT_REFUSES_CONV1D = {"HRA", "DeLoRA", "ROAD"}  # PEFT 0.21 raises TypeError on GPT-2's Conv1D for these


def fresh(scope, family, base=None):
    """A copy of ``base`` (default: the family's model) as the verbs see it in ``scope``: the eager copy,
    or a fresh trace of it (its parameters are shared with the copy, never with ``base``)."""
    model = copy.deepcopy(base) if base is not None else family.model()
    return in_scope(scope, model, **family.inputs())


def adapted(scope, family, case, base):
    model = fresh(scope, family, base)
    surgery.rewrite(model, case.variant, family.where, calibration=calibration_batches(family, case))
    randomise_adapters(model, scale=0.1, seed=3)
    if scope == "module":  # a GraphModule from torch.export refuses .eval(); it was traced in eval mode
        model.eval()
    return model


def peft_load(base, directory):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=lambda f: f.name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_export_loads_in_peft_with_equal_outputs(case, family, scope, tmp_path):
    base = family.model()  # PEFT always loads onto a copy of this eager base, whatever the scope
    ours = adapted(scope, family, case, base)
    x = family.inputs()
    want = family.out(ours, x)
    assert rel_err(want, family.out(base, x)) > 1e-4, "the randomised adapter changed nothing"
    if family is GPT2 and case.variant.name in PEFT_REFUSES_CONV1D:
        with pytest.raises(PeftFormatError, match="Conv1D"):
            surgery.export_peft(ours, tmp_path)
        assert not (tmp_path / "adapter_config.json").exists()
        return
    surgery.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in keys)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    pm = peft_load(base, tmp_path)
    got = family.out(pm, x)
    err = rel_err(got, want)
    assert err <= 1e-5, f"{case.id} on {family.name} ({scope} scope): PEFT's outputs differ from ours by {err:.3g}"
    assert sorted(config["target_modules"]) == sorted(surgery.sites(ours))


@pytest.mark.parametrize("scope", SCOPES)
def test_lora_config_fields_map_from_ours(scope, tmp_path):
    model = fresh(scope, LLAMA)
    surgery.rewrite(model, REGISTRY["LoRA"](r=4, alpha=12, dropout=0.1, rslora=True), LLAMA.where)
    surgery.export_peft(model, tmp_path)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (c["peft_type"], c["r"], c["lora_alpha"], c["lora_dropout"], c["use_rslora"]) == ("LORA", 4, 12, 0.1, True)
    assert c["rank_pattern"] == {} and c["alpha_pattern"] == {} and c["use_dora"] is False and c["bias"] == "none"
    path = "model.layers.0.self_attn.k_proj"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {f"base_model.model.{path}.lora_A.weight", f"base_model.model.{path}.lora_B.weight"} <= keys


@pytest.mark.parametrize("scope", SCOPES)
def test_pissa_exports_as_rank_2r_lora_on_the_original_base(scope, tmp_path):
    model = fresh(scope, LLAMA)
    surgery.rewrite(model, REGISTRY["PiSSA"](r=4, alpha=8), LLAMA.where)
    surgery.export_peft(model, tmp_path)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (c["r"], c["lora_alpha"], c["init_lora_weights"]) == (8, 16, True)


@pytest.mark.skipif("EVA" not in REGISTRY, reason="no EVA variant")
@pytest.mark.parametrize("scope", SCOPES)
def test_eva_per_site_ranks_go_to_rank_and_alpha_patterns(scope, tmp_path):
    model = fresh(scope, LLAMA)
    calibration = [LLAMA.inputs(batch=4, seq=8, seed=s) for s in range(3)]
    surgery.rewrite(model, REGISTRY["EVA"](r=4, alpha=8), LLAMA.where, calibration=calibration)
    ranks = {p: s.variant.r for p, s in surgery.sites(model).items()}
    surgery.export_peft(model, tmp_path)
    c = json.loads((tmp_path / "adapter_config.json").read_text())
    from peft.utils.other import get_pattern_key

    for p, r in ranks.items():
        key = get_pattern_key(c["rank_pattern"].keys(), p)
        assert c["rank_pattern"].get(key, c["r"]) == r
        akey = get_pattern_key(c["alpha_pattern"].keys(), p)
        assert c["alpha_pattern"].get(akey, c["lora_alpha"]) == pytest.approx(8 * r / 4)


@pytest.mark.parametrize("scope", SCOPES)
def test_mixed_methods_are_one_adapter_or_a_clear_error(scope, tmp_path):
    base = LLAMA.model()
    model = fresh(scope, LLAMA, base)  # LoRA + PiSSA: both plain LoRA in PEFT, different r -> rank_pattern
    surgery.rewrite(model, REGISTRY["LoRA"](r=2, alpha=4), "*.k_proj")
    surgery.rewrite(model, REGISTRY["PiSSA"](r=4, alpha=8), "*.v_proj")
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.adapter_tensors()["lora_B"].add_(0.1)
    surgery.export_peft(model, tmp_path)
    x = LLAMA.inputs()
    assert rel_err(LLAMA.out(peft_load(base, tmp_path), x), LLAMA.out(model, x)) <= 1e-5

    mixed = fresh(scope, LLAMA, base)
    surgery.rewrite(mixed, REGISTRY["LoRA"](r=2), "*.k_proj")
    surgery.rewrite(mixed, REGISTRY["DoRA"](r=2), "*.v_proj")
    with pytest.raises(PeftFormatError, match="use_dora"):
        surgery.export_peft(mixed, tmp_path / "mixed")
    ia3 = fresh(scope, LLAMA, base)
    surgery.rewrite(ia3, REGISTRY["LoRA"](r=2), "*.k_proj")
    surgery.rewrite(ia3, REGISTRY["IA3"](), "*.v_proj")
    with pytest.raises(PeftFormatError, match="peft_type"):
        surgery.export_peft(ia3, tmp_path / "ia3")
    drop = fresh(scope, LLAMA, base)
    surgery.rewrite(drop, REGISTRY["LoRA"](r=2, dropout=0.1), "*.k_proj")
    surgery.rewrite(drop, REGISTRY["LoRA"](r=2), "*.v_proj")
    with pytest.raises(PeftFormatError, match="lora_dropout"):
        surgery.export_peft(drop, tmp_path / "drop")


@pytest.mark.skipif("AntiPaSTO" not in REGISTRY, reason="no AntiPaSTO variant")
@pytest.mark.parametrize("scope", SCOPES)
def test_a_full_rank_delta_without_peft_peer_is_refused(scope, tmp_path):
    model = fresh(scope, LLAMA)
    surgery.rewrite(model, REGISTRY["AntiPaSTO"](r=16, rotate_basis="V"), "*.k_proj")  # k_proj is 16x32: full rank
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.adapter_tensors()["antipasto_delta"].add_(0.3)
            s.adapter_tensors()["antipasto_rot"].add_(0.3)
    with pytest.raises(PeftFormatError, match="rank 16"):
        surgery.export_peft(model, tmp_path)


@pytest.mark.parametrize("scope", SCOPES)
def test_export_needs_sites(scope, tmp_path):
    with pytest.raises(NotRewrittenError):
        surgery.export_peft(fresh(scope, LLAMA), tmp_path)
    assert not list(tmp_path.iterdir())


class _Nested(torch.nn.Module):
    """'fc' and 'sub.fc': PEFT's list entry 'fc' would also catch 'sub.fc' (suffix match)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.sub = torch.nn.Module()
        self.sub.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.sub.fc(self.fc(x))


@pytest.mark.parametrize("scope", SCOPES)
def test_targets_are_exact_even_where_a_list_would_over_match(scope, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    base = _Nested()
    model = in_scope(scope, copy.deepcopy(base), torch.randn(3, 8))
    surgery.rewrite(model, REGISTRY["IA3"](feedforward=("fc",)), "fc")
    with torch.no_grad():
        surgery.sites(model)["fc"].adapter_tensors()["ia3_l"].uniform_(0.5, 1.5)
    surgery.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert [n for n, _ in pm.named_modules() if n.endswith("base_layer")] == ["base_model.model.fc.base_layer"]
    x = torch.randn(3, 8)
    assert rel_err(pm(x), model(x)) <= 1e-6
