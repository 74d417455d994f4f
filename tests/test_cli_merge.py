"""`surgery merge` and `surgery export-peft` end to end on saved models (a tiny Llama and the real MiniLM)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import surgery
from adapters import REGISTRY
from models import LLAMA, MINILM, minilm_path, randomise_adapters, rel_err
from surgery.cli import load_model, main


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    LLAMA.model().save_pretrained(d)
    return d


def adapter_file(base_dir, variant, where, path):
    model = load_model(str(base_dir))
    surgery.rewrite(model, variant, where)
    randomise_adapters(model, scale=0.1, seed=5)
    surgery.save(model, path)
    return model.eval()


def test_merge_our_adapter_file(llama_dir, tmp_path, capsys):
    ours = adapter_file(llama_dir, REGISTRY["DoRA"](r=4, alpha=8), LLAMA.where, tmp_path / "dora.safetensors")
    assert main(["merge", str(llama_dir), str(tmp_path / "dora.safetensors"), "-o", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "wrote a merged checkpoint" in captured.out and "folding" in captured.err  # the tqdm bar
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert set(merged.state_dict()) == set(LLAMA.model().state_dict())
    x = LLAMA.inputs()
    assert rel_err(LLAMA.out(merged, x), LLAMA.out(ours, x)) <= 1e-5


def test_merge_a_peft_adapter_directory(llama_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    pm = get_peft_model(load_model(str(llama_dir)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    randomise_peft = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in randomise_peft.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "peft")
    want = LLAMA.out(PeftModel.from_pretrained(load_model(str(llama_dir)), tmp_path / "peft").eval(), LLAMA.inputs())
    assert main(["merge", str(llama_dir), str(tmp_path / "peft"), "-o", str(tmp_path / "out")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert rel_err(LLAMA.out(merged, LLAMA.inputs()), want) <= 1e-5


def test_export_peft_command(llama_dir, tmp_path):
    from peft import PeftModel

    ours = adapter_file(llama_dir, REGISTRY["LoRA"](r=4, alpha=8), LLAMA.where, tmp_path / "lora.safetensors")
    assert main(["export-peft", str(llama_dir), str(tmp_path / "lora.safetensors"), "-o", str(tmp_path / "peft")]) == 0
    pm = PeftModel.from_pretrained(load_model(str(llama_dir)), tmp_path / "peft").eval()
    x = LLAMA.inputs()
    assert rel_err(LLAMA.out(pm, x), LLAMA.out(ours, x)) <= 1e-5


def test_merge_reports_a_bad_adapter_as_one_line(llama_dir, tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04 not safetensors")
    assert main(["merge", str(llama_dir), str(tmp_path / "junk.safetensors"), "-o", str(tmp_path / "out")]) == 2
    assert "pickle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_real_minilm_keeps_its_tokenizer(tmp_path):
    base_dir = tmp_path / "minilm"
    shutil.copytree(minilm_path(), base_dir)
    ours = adapter_file(base_dir, REGISTRY["LoRA"](r=4, alpha=8), MINILM.where, tmp_path / "lora.safetensors")
    assert main(["merge", str(base_dir), str(tmp_path / "lora.safetensors"), "-o", str(tmp_path / "out")]) == 0
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "out" / name).read_bytes() == (base_dir / name).read_bytes()
    merged = AutoModel.from_pretrained(tmp_path / "out").eval()
    x = MINILM.inputs()
    want = MINILM.out(ours, x)
    assert rel_err(want, MINILM.out(load_model(str(base_dir)), x)) > 1e-4
    assert rel_err(MINILM.out(merged, x), want) <= 1e-5


@pytest.mark.parametrize("command", ["merge", "export-peft"])
@pytest.mark.parametrize("target", ["a-file", "the-base"])
def test_an_output_that_would_write_nothing_or_overwrite_the_base_is_refused(command, target, llama_dir, tmp_path, capsys):
    adapter_file(llama_dir, REGISTRY["LoRA"](r=2), "*.k_proj", tmp_path / "a.safetensors")
    before = {p.name: p.read_bytes() for p in llama_dir.iterdir()}
    out = tmp_path / "merged.txt" if target == "a-file" else llama_dir
    if target == "a-file":
        out.write_text("keep me")
    assert main([command, str(llama_dir), str(tmp_path / "a.safetensors"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("is a file" if target == "a-file" else "overwrite the base") in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in llama_dir.iterdir()} == before
    if target == "a-file":
        assert out.read_text() == "keep me"
