"""surgery.import_peft: adapters written by the real PEFT's save_pretrained reproduce PeftModel's outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import surgery
from adapters import LoRA
from models import GPT2, LLAMA, SCOPES, in_scope, rel_err
from peft_twin import peft_model, randomise_peft
from surgery.errors import AdapterFileError, BaseMismatchError, PeftFormatError


TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}


def _config(name, family):
    from peft import DeloraConfig, HRAConfig, IA3Config, LoraConfig, RoadConfig

    t, ff = TARGETS[family.name]
    return {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=t),
        "lora-rslora-patterns": lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.1, target_modules=t,
                                                   rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\..*v_proj": 3}),
        "lora-gaussian-init": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights="gaussian"),
        "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=t),
        "ia3": lambda: IA3Config(target_modules=t, feedforward_modules=ff),
        "hra": lambda: HRAConfig(r=4, target_modules=t),
        "delora": lambda: DeloraConfig(r=4, delora_lambda=10, target_modules=t, rank_pattern={"v_proj": 2}),
        "road": lambda: RoadConfig(variant="road_2", group_size=8, target_modules=t),
        "road-4": lambda: RoadConfig(variant="road_4", group_size=8, target_modules=t),
    }[name]()


# PEFT's HRA, DeLoRA and RoAd refuse GPT-2's Conv1D, so those rows run on Llama only
ROWS = [(n, LLAMA) for n in ("lora", "lora-rslora-patterns", "lora-gaussian-init", "dora", "ia3", "hra", "delora",
                             "road", "road-4")] + [(n, GPT2) for n in ("lora", "dora", "ia3")]


def saved_peft(family, config, directory):
    base = family.model()
    pm = peft_model(base, config)
    randomise_peft(pm)
    pm.eval()
    pm.save_pretrained(str(directory))
    return base, pm


def fresh(scope, family, base=None):
    """A fresh base as the verbs see it in ``scope``: an eager copy, or a fresh trace of one."""
    model = copy.deepcopy(base) if base is not None else family.model()
    return in_scope(scope, model, **family.inputs())


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("name,family", ROWS, ids=[f"{n}-{f.name}" for n, f in ROWS])
def test_import_reproduces_peft(name, family, scope, tmp_path):
    base, pm = saved_peft(family, _config(name, family), tmp_path)
    x = family.inputs()
    want = family.out(pm, x)
    assert rel_err(want, family.out(base, x)) > 1e-4, "PEFT's randomised adapter changed nothing"
    ours = surgery.import_peft(fresh(scope, family, base), tmp_path)
    if scope == "module":  # a GraphModule from torch.export refuses .eval(); it was traced in eval mode
        ours.eval()
    n_peft = sum(1 for n, _ in pm.named_modules() if n.endswith("base_layer"))
    assert len(surgery.sites(ours)) == n_peft
    err = rel_err(family.out(ours, x), want)
    assert err <= 1e-5, f"{name} on {family.name} ({scope} scope): ours differs from PeftModel by {err:.3g}"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from peft import LoraConfig

    d = tmp_path_factory.mktemp("lora")
    saved_peft(LLAMA, LoraConfig(r=4, target_modules=["k_proj", "v_proj"]), d)
    return d


def _with(lora_dir, tmp_path, **fields):
    d = tmp_path / "edited"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((lora_dir / "adapter_model.safetensors").read_bytes())
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    config.update(fields)
    (d / "adapter_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("field,value", [
    ("layers_to_transform", [0]),
    ("lora_bias", True),
    ("init_lora_weights", "olora"),
    ("init_lora_weights", "pissa"),
    ("bias", "all"),
    ("modules_to_save", ["lm_head"]),
    ("layer_replication", [[0, 1]]),
    ("a_field_from_a_newer_peft", 3),
])
def test_unsupported_fields_are_named(lora_dir, tmp_path, field, value):
    model = LLAMA.model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PeftFormatError, match=field):
        surgery.import_peft(model, _with(lora_dir, tmp_path, **{field: value}))
    assert not surgery.sites(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_defaults_and_bookkeeping_fields_are_accepted(lora_dir, tmp_path):
    d = _with(lora_dir, tmp_path, layers_to_transform=None, modules_to_save=None, base_model_name_or_path="x",
              fan_in_fan_out=True, init_lora_weights=False, new_flag_from_newer_peft=None)
    assert len(surgery.sites(surgery.import_peft(LLAMA.model(), d))) == 4


def test_pickled_weights_are_refused(lora_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be opened as one
    with pytest.raises(AdapterFileError, match="adapter_model.bin"):
        surgery.import_peft(LLAMA.model(), d)
    (d / "adapter_model.safetensors").write_bytes(b"\x80\x04K\x01.......")  # a pickle under the safetensors name
    with pytest.raises(AdapterFileError, match="pickle"):
        surgery.import_peft(LLAMA.model(), d)


def test_wrong_base_and_missing_directory(lora_dir, tmp_path):
    with pytest.raises(BaseMismatchError, match="k_proj"):
        surgery.import_peft(GPT2.model(), lora_dir)
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        surgery.import_peft(LLAMA.model(), tmp_path / "nowhere")


def test_export_then_import_round_trip(lora_dir, tmp_path):
    model = surgery.import_peft(LLAMA.model(), lora_dir)
    surgery.export_peft(model, tmp_path / "again")
    again = surgery.import_peft(LLAMA.model(), tmp_path / "again")
    x = LLAMA.inputs()
    assert torch.equal(LLAMA.out(again, x), LLAMA.out(model, x))


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh-base", "after-a-rewrite"])
@pytest.mark.parametrize("scope", SCOPES)
def test_a_failed_import_leaves_requires_grad_as_it_was(lora_dir, tmp_path, scope, earlier):
    """One module's lora_B is missing from an otherwise valid PEFT directory: the import fails and
    every parameter keeps its flag (a mixed pattern of the user's own, or that of an earlier rewrite)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(lora_dir / "adapter_model.safetensors")
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert gone in tensors and len(tensors) == 8
    del tensors[gone]
    d = tmp_path / "incomplete"
    d.mkdir()
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())

    model = fresh(scope, LLAMA)
    for n, p in model.named_parameters():  # the user's own mix: embeddings and layer 0 frozen
        p.requires_grad_(not (n.startswith("model.embed_tokens") or n.startswith("model.layers.0.")))
    users = {n: p.requires_grad for n, p in model.named_parameters()}
    assert len(set(users.values())) == 2
    if earlier:
        surgery.rewrite(model, LoRA(r=2), "*.down_proj")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    sites = list(surgery.sites(model))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    code = model.code if scope == "graph" else None

    with pytest.raises(AdapterFileError, match="layers.1.self_attn.v_proj.lora_B"):
        surgery.import_peft(model, d)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(surgery.sites(model)) == sites
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
    if scope == "graph":
        assert model.code == code
    if earlier:  # the flags from before the first rewrite are still what restore gives back
        surgery.restore(model)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == users
