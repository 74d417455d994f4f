"""Quickstart: rewrite a small Llama with LoRA, train it a little, save, reload, merge.

Run with `./dev demo` (or `.venv/bin/python examples/quickstart.py`). No downloads: the model is
built from a config with random weights, and the task is to learn a fixed random token mapping.
"""

import copy
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from adapters import LoRA

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(config)
base = copy.deepcopy(model)

print(surgery.plan(model, "*.{q_proj,v_proj}"), end="\n\n")
surgery.rewrite(model, LoRA(r=8, alpha=16), where="*.{q_proj,v_proj}")
print(surgery.summary(model), end="\n\n")
print("the adapted forward of one site:")
print(surgery.sites(model)["model.layers.0.self_attn.q_proj"].code)

# a toy task: next token = a fixed permutation of the current token
perm = torch.randperm(config.vocab_size)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for step in (bar := tqdm(range(150), desc="training LoRA")):
    ids = torch.randint(0, config.vocab_size, (8, 16))
    labels = perm[ids]
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    bar.set_postfix(loss=f"{loss.item():.3f}")
model.eval()

ids = torch.randint(0, config.vocab_size, (2, 16))
with torch.no_grad():
    adapted = model(input_ids=ids).logits

with tempfile.TemporaryDirectory() as d:
    path = Path(d) / "lora.safetensors"
    surgery.save(model, path)
    print(f"\nsaved {path.stat().st_size:,} bytes of adapter")
    fresh = copy.deepcopy(base)
    surgery.load(fresh, path)
    fresh.eval()
    with torch.no_grad():
        reloaded = fresh(input_ids=ids).logits
    print(f"reloaded on a fresh base: max |diff| = {(reloaded - adapted).abs().max():.2e}")

surgery.merge(model)
with torch.no_grad():
    merged = model(input_ids=ids).logits
rel = ((merged - adapted).abs().max() / adapted.abs().max()).item()
print(f"merged into plain weights: {type(model.model.layers[0].self_attn.q_proj).__name__} modules again, "
      f"relative error {rel:.2e}")
assert rel <= 1e-5, "merged model differs from the adapted one"
assert sorted(model.state_dict()) == sorted(base.state_dict())
print("merged == unmerged, and the state_dict has exactly the original keys")
