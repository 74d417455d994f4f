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
