"""The README's variant table: trainable parameters on a reference model, identity and fold errors.

    .venv/bin/python benchmarks/variants.py [--quick]

Reference model: a 2-layer Llama (hidden 256, intermediate 704, so ROAD's group_size 64 divides it) built from a config with a fixed
seed; every variant adapts all seven projections. Errors are relative (max |diff| / max |base|)
on random token batches: "identity" compares the freshly rewritten model with the base, "fold"
compares merged with unmerged after the adapter tensors are randomised.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import adapters
import surgery

WHERE = "*.{q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}"
EXAMPLES = {  # one representative configuration per variant, as a user would write it
    "LoRA": dict(r=8, alpha=16),
    "PiSSA": dict(r=8, alpha=8),
    "DoRA": dict(r=8, alpha=16),
    "IA3": dict(),
    "HRA": dict(r=8),
    "DeLoRA": dict(r=8),
    "EVA": dict(r=8, alpha=16),
    "ROAD": dict(variant="road_1", group_size=64),
    "AntiPaSTO": dict(r=8),
}


def reference(hidden: int, inter: int, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def measure(variant, base: torch.nn.Module, batches: list[dict]) -> tuple[int, float, float]:
    model = copy.deepcopy(base)
    calibration = batches if variant.needs_calibration else None
    surgery.rewrite(model, variant, WHERE, calibration=calibration)
    x = batches[0]
    with torch.no_grad():
        ref = base(**x).logits
        identity = rel(model(**x).logits, ref)
        g = torch.Generator().manual_seed(1)
        for s in surgery.sites(model).values():
            for t in s.adapter_tensors().values():
                if isinstance(t, torch.nn.Parameter):
                    t.add_(0.05 * torch.randn(t.shape, generator=g).to(t))
        unmerged = model(**x).logits
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        surgery.merge(model)
        fold = rel(model(**x).logits, unmerged)
    return trainable, identity, fold


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    hidden, inter = (64, 128) if args.quick else (256, 704)
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 512, (4, 32), generator=g)} for _ in range(2)]
    rows = []
    names = [n for n in EXAMPLES if n in adapters.REGISTRY]
    missing = [n for n in EXAMPLES if n not in adapters.REGISTRY]
    bases = {dt: reference(hidden, inter, dt) for dt in (torch.float32, torch.bfloat16)}
    total = sum(p.numel() for p in bases[torch.float32].parameters())
    for name in tqdm(names, desc="variants"):
        kwargs = dict(EXAMPLES[name])
        if args.quick and "group_size" in kwargs:
            kwargs["group_size"] = 32
        variant = adapters.REGISTRY[name](**kwargs)
        n, id32, fold32 = measure(variant, bases[torch.float32], batches)
        _, id16, fold16 = measure(variant, bases[torch.bfloat16], batches)
        spec = f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        rows.append((name, spec, n, 100 * n / total, id32, fold32, id16, fold16))
    print(f"reference: 2-layer Llama, hidden {hidden}, intermediate {inter}, {total:,} parameters; "
          f"all seven projections adapted\n")
    print("| variant | config | trainable | % of model | identity fp32 | fold fp32 | identity bf16 | fold bf16 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, spec, n, pct, a, b, c, d in rows:
        print(f"| {name} | `{spec}` | {n:,} | {pct:.2f}% | {a:.1e} | {b:.1e} | {c:.1e} | {d:.1e} |")
    if missing:
        print(f"\nnot available in this build: {', '.join(missing)}", file=sys.stderr)


if __name__ == "__main__":
    main()
