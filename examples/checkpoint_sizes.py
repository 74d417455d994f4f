"""Checkpoint sizes under the Hugging Face Trainer: model-surgery's LoRA against PEFT's on the same tiny Llama.

Both adapt the same seven projections of every layer with rank 4 (alpha 8), train two steps with
`Trainer` and save `checkpoint-2`; printed are the adapter file, the whole checkpoint directory
(optimizer, scheduler, RNG and trainer state included) and the bare adapter tensors, in bytes.

    python examples/checkpoint_sizes.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import surgery
from adapters import LoRA
from surgery.hf import ADAPTER_FILE

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the tests' tiny Llama (tests/models.py)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


class Tokens(torch.utils.data.Dataset):
    ids = torch.randint(0, 96, (8, 8), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def checkpoint(model, out: Path) -> Path:
    args = TrainingArguments(output_dir=str(out), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, logging_steps=100, seed=0)
    Trainer(model=model, args=args, train_dataset=Tokens()).train()
    return out / "checkpoint-2"


def tensor_bytes(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def main() -> dict[str, int]:
    from peft import LoraConfig, get_peft_model

    with tempfile.TemporaryDirectory() as tmp:
        ours = base()
        surgery.rewrite(ours, LoRA(r=4, alpha=8), "*.{" + ",".join(PROJECTIONS) + "}")
        mine = checkpoint(ours, Path(tmp) / "ours")
        theirs = checkpoint(get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              target_modules=PROJECTIONS)), Path(tmp) / "peft")
        whole = base()
        whole.save_pretrained(Path(tmp) / "whole")
        sizes = {
            "ours_adapter_file": (mine / ADAPTER_FILE).stat().st_size,
            "peft_adapter_file": (theirs / "adapter_model.safetensors").stat().st_size,
            "ours_adapter_tensors": tensor_bytes(mine / ADAPTER_FILE),
            "peft_adapter_tensors": tensor_bytes(theirs / "adapter_model.safetensors"),
            "ours_checkpoint_dir": sum(p.stat().st_size for p in mine.iterdir()),
            "peft_checkpoint_dir": sum(p.stat().st_size for p in theirs.iterdir()),
            "whole_model_file": (Path(tmp) / "whole" / "model.safetensors").stat().st_size,
        }
    for name, size in sizes.items():
        print(f"{name:22s} {size:>9,} bytes")
    return sizes


if __name__ == "__main__":
    main()
