"""QLoRA on the CPU: a 4-bit base, LoRA on top, a few steps, save, reload onto a fresh 4-bit base, merge.

Run with `.venv/bin/python examples/qlora.py`. No downloads: a small Llama is built from a config, saved to a
temporary directory and loaded back through transformers' BitsAndBytesConfig (nf4, float32 compute), which
bitsandbytes 0.50 runs forward and backward on the CPU. Each Linear4bit stays whole inside its site (an
opaque base): the adapter runs beside it, and no dense copy of its weight is kept.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import surgery
from adapters import LoRA

WHERE = "*.{q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}"


def load_4bit(path: Path):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def main(steps: int = 30) -> dict[str, float]:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(work / "base")

    model = load_4bit(work / "base")
    print(type(model.model.layers[0].self_attn.q_proj).__name__, "weights:",
          model.model.layers[0].self_attn.q_proj.weight.dtype)
    surgery.rewrite(model, LoRA(r=8, alpha=16), where=WHERE)
    print(surgery.summary(model), end="\n\n")
    print("the adapted forward of one site (the 4-bit layer is called whole):")
    print(surgery.sites(model)["model.layers.0.self_attn.q_proj"].code)

    # a toy task: next token = a fixed permutation of the current token
    perm = torch.randperm(128)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for step in range(steps):
        ids = torch.randint(0, 128, (8, 16))
        labels = perm[ids]
        loss = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    probe = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = model(probe).logits
    surgery.save(model, work / "adapter.safetensors")
    print(f"\nadapter file: {(work / 'adapter.safetensors').stat().st_size:,} bytes (no base weights)")

    fresh = load_4bit(work / "base").train()  # training mode: bitsandbytes computes in float32 there
    surgery.load(fresh, work / "adapter.safetensors")
    with torch.no_grad():
        reloaded = fresh(probe).logits
    print("reloaded onto a fresh 4-bit base, max |difference|:", (reloaded - trained).abs().max().item())

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        surgery.merge(fresh)  # W' quantised again as nf4: it says how far that moves the weights
    for w in said:
        if "quantised again" in str(w.message):
            print("merge:", str(w.message).split(": ", 1)[1].split(";")[0])
    with torch.no_grad():
        requantised = fresh(probe).logits
    exact = surgery.load(load_4bit(work / "base").train(), work / "adapter.safetensors")
    surgery.merge(exact, dequantize=True)  # float layers holding W' exactly
    with torch.no_grad():
        dense = exact(probe).logits
    out = {
        "first_loss": sum(losses[:5]) / 5,
        "last_loss": sum(losses[-5:]) / 5,
        "reload_diff": (reloaded - trained).abs().max().item(),
        "requantised_rel": ((requantised - trained).abs().max() / trained.abs().max()).item(),
        "dequantized_rel": ((dense - trained).abs().max() / trained.abs().max()).item(),
    }
    print(f"merged (nf4 again) vs adapted: {out['requantised_rel']:.3g} relative; "
          f"merged (dequantize=True, {type(exact.model.layers[0].self_attn.q_proj).__name__}): "
          f"{out['dequantized_rel']:.3g}")
    return out


if __name__ == "__main__":
    main()
