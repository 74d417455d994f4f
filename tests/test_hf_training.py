"""A rewritten transformers model in the Hugging Face training stack: Trainer checkpoints hold the adapter,
not the base; resuming from one is exact; `from_pretrained` of one fails loudly instead of returning the
base without its adapter (or PiSSA's residual model)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import surgery
from adapters import LoRA, PiSSA
from models import LLAMA
from surgery.hf import ADAPTER_FILE


class Tokens(Dataset):
    def __init__(self, n: int = 16, seq: int = 8):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, LLAMA.vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def rewritten(variant=None):
    model = LLAMA.model()
    surgery.rewrite(model, variant or LoRA(r=4, alpha=8), LLAMA.where)
    return model


def trainer(model, out, **kw):
    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, logging_steps=100, **kw)
    return Trainer(model=model, args=args, train_dataset=Tokens())


def adapter(model):
    return {f"{p}.{n}": t.detach().clone() for p, s in surgery.sites(model).items()
            for n, t in s.adapter_tensors().items()}


def test_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    whole = rewritten()
    trainer(whole, tmp_path / "a").train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / ADAPTER_FILE).is_file() and (ckpt / "config.json").is_file()
    assert not [p.name for p in ckpt.iterdir() if p.name.startswith(("model.", "model-0", "pytorch_model"))]
    full = sum(t.numel() * t.element_size() for t in LLAMA.model().state_dict().values())
    assert (ckpt / ADAPTER_FILE).stat().st_size < full / 4

    resumed = rewritten()  # a fresh base, rewritten the same way
    surgery.resumable(trainer(resumed, tmp_path / "b")).train(resume_from_checkpoint=str(ckpt))
    mine, theirs = adapter(whole), adapter(resumed)
    assert mine.keys() == theirs.keys()
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-6, rtol=0) for k in mine), \
        max((mine[k] - theirs[k]).abs().max().item() for k in mine)

    fresh = LLAMA.model()
    surgery.load(fresh, ckpt)  # surgery.load reads a checkpoint directory
    x = LLAMA.inputs()
    step2 = rewritten()
    surgery.restore(step2)
    surgery.load(step2, ckpt / ADAPTER_FILE)
    assert torch.equal(LLAMA.out(fresh, x), LLAMA.out(step2, x))


@pytest.mark.parametrize("variant", [LoRA(r=4, alpha=8), PiSSA(r=4)], ids=["lora", "pissa"])
def test_from_pretrained_of_a_model_with_live_adapters_fails_loudly(variant, tmp_path):
    model = rewritten(variant)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_(0, 0.1)
    x = LLAMA.inputs()
    want = LLAMA.out(model, x)
    model.save_pretrained(tmp_path / "live")
    with pytest.raises(OSError):  # no weights file: never the base (or PiSSA's residual) without a word
        LlamaForCausalLM.from_pretrained(tmp_path / "live")
    base = LLAMA.model()
    surgery.load(base, tmp_path / "live")
    assert torch.equal(LLAMA.out(base, x), want)

    surgery.merge(model)  # a merged model saves as a plain checkpoint again
    model.save_pretrained(tmp_path / "merged")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (LLAMA.out(again, x) - want).abs().max() <= 1e-5


def test_accelerate_save_state_holds_the_adapter_and_load_state_resumes_exactly(tmp_path):
    from accelerate import Accelerator

    from surgery.errors import ConfigError

    data = Tokens().ids

    def prepared(model, hooks=True):
        accelerator = Accelerator(cpu=True)
        if hooks:
            assert surgery.resumable(surgery.resumable(accelerator)) is accelerator  # twice is once
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return (accelerator, *accelerator.prepare(model, opt))

    def steps(accelerator, model, opt, first, n=2):
        model.train()
        for i in range(first, first + n):
            ids = data[4 * i: 4 * i + 4]
            accelerator.backward(model(input_ids=ids, labels=ids).loss)
            opt.step()
            opt.zero_grad()
        model.eval()

    x = LLAMA.inputs()
    accelerator, model, opt = prepared(rewritten())
    steps(accelerator, model, opt, 0)
    accelerator.save_state(tmp_path / "state")
    at_2, out_2 = adapter(model), LLAMA.out(model, x)
    steps(accelerator, model, opt, 2)
    final = adapter(model)
    assert not all(torch.equal(final[k], at_2[k]) for k in final)  # the last two steps moved the adapter

    files = {p.name: p.stat().st_size for p in (tmp_path / "state").iterdir()}
    assert ADAPTER_FILE in files and not [n for n in files if n.startswith("model") and n != ADAPTER_FILE], files
    plain_acc, plain, _ = prepared(rewritten(), hooks=False)  # what save_state writes without the hooks
    plain_acc.save_state(tmp_path / "plain")
    whole = (tmp_path / "plain" / "model.safetensors").stat().st_size
    assert files[ADAPTER_FILE] < whole / 4
    print(f"\nsave_state sizes: adapter {files[ADAPTER_FILE]} B vs model.safetensors {whole} B; directory "
          f"{sum(files.values())} B vs {sum(p.stat().st_size for p in (tmp_path / 'plain').iterdir())} B")

    again, resumed, opt2 = prepared(rewritten())  # a fresh base rewritten the same way, optimizer already made
    again.load_state(tmp_path / "state")
    assert all(torch.equal(at_2[k], t) for k, t in adapter(resumed).items())
    assert torch.equal(LLAMA.out(resumed, x), out_2)
    steps(again, resumed, opt2, 2)  # the optimizer state came back onto the very parameters it steps
    assert all(torch.equal(final[k], t) for k, t in adapter(resumed).items())

    bare_acc, bare = Accelerator(cpu=True), LLAMA.model()  # a model without sites is rewritten from the file
    surgery.resumable(bare_acc)
    bare = bare_acc.prepare(bare)
    bare_acc.load_state(tmp_path / "state")
    assert torch.equal(LLAMA.out(bare, x), out_2)

    other_acc, other, _ = prepared(rewritten(LoRA(r=2, alpha=8)))
    with pytest.raises(ConfigError, match=r"is LoRA\(r=2.* here but LoRA"):
        other_acc.load_state(tmp_path / "state")


def test_resumable_refuses_what_is_neither_a_trainer_nor_an_accelerator():
    from surgery.errors import ConfigError

    with pytest.raises(ConfigError, match="Trainer"):
        surgery.resumable(rewritten())


def test_checkpoint_sizes_example_against_peft():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "checkpoint_sizes.py"
    spec = importlib.util.spec_from_file_location("checkpoint_sizes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sizes = module.main()
    assert sizes["ours_adapter_tensors"] == sizes["peft_adapter_tensors"] > 0  # the same LoRA tensors
    assert sizes["ours_adapter_file"] < sizes["whole_model_file"] / 2  # no base weights in our checkpoint
    assert sizes["ours_checkpoint_dir"] < sizes["peft_checkpoint_dir"] + sizes["whole_model_file"] / 2
