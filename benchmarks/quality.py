"""Does each variant learn, and as well as PEFT's implementation of it? A small synthetic transfer task.

    .venv/bin/python benchmarks/quality.py                   # every variant that exists; ~10 min on 2 cores
    .venv/bin/python benchmarks/quality.py --variants lora,ia3 --steps 200
    .venv/bin/python benchmarks/quality.py --quick           # tiny, for the smoke test

Pretraining (cached under benchmarks/.cache/): a small Llama learns three instructions over a
sequence of digits, ``COPY``, ``REVERSE`` and ``SORT`` (ascending), written as
``[INSTR, d1..dn, SEP, out1..outn]`` with the loss on the outputs only.
Adaptation: a fourth instruction token ``SHIFT`` that the base never saw, meaning "add 1 mod 10
to each digit, then copy". Only the adapters train (all seven projections); the score is greedy,
autoregressive exact match on held-out sequences. Both sides of a row use the same pretrained
weights, seed, batches, learning rate and step count; only the implementation differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
import common  # noqa: E402
from common import Knobs, PeakMemory, markdown, mib  # noqa: E402

SEP, COPY, REVERSE, SORT, SHIFT = 10, 11, 12, 13, 14
VOCAB = 16
PRETRAIN = (COPY, REVERSE, SORT)

# Learning rate per method, the same on both sides. Scale-only methods (IA3, ROAD) move one number
# per channel and need a larger step to get anywhere in a few hundred steps.
LR = {"IA3": 3e-2, "ROAD": 3e-2, "AntiPaSTO": 1e-2}
LR_DEFAULT = 3e-3


def answer(instr: int, d: torch.Tensor) -> torch.Tensor:
    if instr == COPY:
        return d
    if instr == REVERSE:
        return d.flip(-1)
    if instr == SORT:
        return d.sort(-1).values
    if instr == SHIFT:
        return (d + 1) % 10
    raise ValueError(instr)


def make_batch(instrs, n_digits: int, size: int, g: torch.Generator):
    """input_ids (size, 2n+2), labels with -100 outside the answer."""
    instr = torch.tensor(instrs)[torch.randint(len(instrs), (size,), generator=g)]
    d = torch.randint(0, 10, (size, n_digits), generator=g)
    out = torch.stack([answer(int(i), row) for i, row in zip(instr, d)])
    ids = torch.cat([instr[:, None], d, torch.full((size, 1), SEP), out], 1)
    labels = ids.clone()
    labels[:, : n_digits + 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@torch.no_grad()
def exact_match(model, instrs, n_digits: int, size: int, seed: int) -> float:
    """Greedy, autoregressive: the model writes all n digits itself, then the whole answer must match."""
    model.eval()
    b = make_batch(instrs, n_digits, size, torch.Generator().manual_seed(seed))
    ids = b["input_ids"][:, : n_digits + 2]
    for _ in range(n_digits):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :10]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return (ids[:, n_digits + 2:] == b["input_ids"][:, n_digits + 2:]).all(1).float().mean().item()


def sizes(quick: bool) -> dict:
    if quick:
        return dict(hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2, n_digits=3, pre_steps=60,
                    pre_batch=32, steps=8, batch=16, eval=64, calib_batches=2)
    return dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, n_digits=5, pre_steps=1500,
                pre_batch=64, steps=100, batch=32, eval=512, calib_batches=4)


def pretrained(sz: dict, cache: str):
    """The pretrained base, trained once and cached by its settings."""
    keys = ("hidden", "intermediate", "layers", "heads", "kv_heads", "n_digits", "pre_steps", "pre_batch")
    tag = hashlib.sha1(repr([sz[k] for k in keys]).encode()).hexdigest()[:10]
    path = os.path.join(cache, f"quality-base-{tag}.pt")
    model = common.llama(hidden=sz["hidden"], intermediate=sz["intermediate"], layers=sz["layers"], vocab=VOCAB,
                         heads=sz["heads"], kv_heads=sz["kv_heads"], max_pos=64)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, path, 0.0
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(1234)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=sz["pre_steps"], pct_start=0.1)
    model.train()
    for _ in tqdm(range(sz["pre_steps"]), desc="pretrain", leave=False):
        loss = model(**make_batch(PRETRAIN, sz["n_digits"], sz["pre_batch"], g)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    os.makedirs(cache, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, path, time.perf_counter() - t0


def adapt(model, sz: dict, lr: float, seed: int) -> tuple[float, int]:
    """Train the adapters on SHIFT; returns (seconds, peak bytes of one step above its start)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    batches = [make_batch([SHIFT], sz["n_digits"], sz["batch"], g) for _ in range(sz["steps"])]
    model.train()

    def step(b):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for b in batches[:-1]:
        step(b)
    secs = time.perf_counter() - t0
    peak = PeakMemory(torch.device("cpu")).measure(lambda: step(batches[-1]))
    return secs, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--variants", default=None, help="comma list, e.g. lora,ia3 (default: all available)")
    ap.add_argument("--steps", type=int, default=None, help="adaptation steps")
    ap.add_argument("--seeds", type=int, default=3, help="adaptation seeds per side (default 3; --quick: 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality-cpu.json)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    sz = sizes(args.quick)
    if args.steps:
        sz["steps"] = args.steps
    specs = common.available(args.variants)
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    base, ckpt, pre_s = pretrained(sz, args.cache)
    n = sz["n_digits"]
    base_acc = {name: exact_match(base, [i], n, sz["eval"], seed=99) for name, i in
                (("copy", COPY), ("reverse", REVERSE), ("sort", SORT), ("shift", SHIFT))}
    knobs = Knobs(group_size=common.road_group(base))
    g = torch.Generator().manual_seed(4321)
    calib = [{k: v for k, v in make_batch([SHIFT], n, sz["batch"], g).items() if k != "labels"}
             for _ in range(sz["calib_batches"])]

    seeds = list(range(1 if args.quick else args.seeds))
    if specs:  # one-time costs (allocator growth, kernel dispatch caches) stay out of the first timed run
        adapt(common.build_ours(base, specs[0], knobs, calib), dict(sz, steps=min(10, sz["steps"])), LR_DEFAULT, seed=0)
    rows = []
    bar = tqdm(total=len(seeds) * sum(1 + (s.peft is not None) for s in specs), desc="adapt", leave=False)
    for spec in specs:
        lr = LR.get(spec.name, LR_DEFAULT)
        row = {"variant": spec.name, "peft_config": spec.peft_text, "lr": lr}
        sides = [("ours", common.build_ours)] + ([("peft", common.build_peft)] if spec.peft is not None else [])
        got = {side: {"acc": [], "s": [], "peak": []} for side, _ in sides}
        for seed in seeds:  # sides alternate within each seed, so load drift hits both alike
            for side, build in sides if seed % 2 == 0 else reversed(sides):
                bar.set_postfix_str(f"{spec.name} {side} seed {seed}")
                model = build(base, spec, knobs, calib, seed=seed)
                torch.manual_seed(seed)
                secs, peak = adapt(model, sz, lr, seed=1000 + seed)
                got[side]["acc"].append(exact_match(model, [SHIFT], n, sz["eval"], seed=7))
                got[side]["s"].append(secs)
                got[side]["peak"].append(peak)
                row[f"{side}_params"] = common.trainable(model)
                del model
                bar.update(1)
        for side, g in got.items():
            accs = g["acc"]
            row[f"{side}_accs"] = accs
            row[f"{side}_acc"] = sum(accs) / len(accs)
            row[f"{side}_acc_txt"] = f"{row[f'{side}_acc']:.3f}" + (
                f" ({min(accs):.2f}-{max(accs):.2f})" if len(accs) > 1 else "")
            row[f"{side}_s"] = statistics.median(g["s"])
            row[f"{side}_peak_mib"] = mib(statistics.median(g["peak"]))
        rows.append(row)
    bar.close()

    info = common.machine(torch.device("cpu"))
    info["load_avg_before"] = [round(x, 2) for x in load_before]
    print(f"\n## Adaptation quality, ours vs PEFT (pretrained Llama {sz['layers']} layers, hidden {sz['hidden']}, "
          f"on copy/reverse/sort of {n} digits; adapted to SHIFT = add 1 mod 10 then copy, a new instruction "
          f"token; {sz['steps']} steps of batch {sz['batch']}; r={knobs.r}, all 7 projections; exact match on "
          f"{sz['eval']} held-out sequences; mean (min-max) over seeds {seeds}; threads {torch.get_num_threads()}; "
          f"load avg {info['load_avg_before'][0]} -> {info.get('load_avg', ['?'])[0]})\n")
    print("Base before adaptation: " + ", ".join(f"{k} {v:.3f}" for k, v in base_acc.items())
          + (f" (pretrained in {pre_s:.0f} s)" if pre_s else f" (cached: {os.path.relpath(ckpt)})") + "\n")
    print(markdown(rows, [("variant", "variant"), ("peft_config", "PEFT equivalent"), ("lr", "lr"),
                          ("ours_acc_txt", "ours acc"), ("peft_acc_txt", "PEFT acc"),
                          ("ours_params", "ours trainable"), ("peft_params", "PEFT trainable"),
                          ("ours_s", "ours train s"), ("peft_s", "PEFT train s"),
                          ("ours_peak_mib", "ours peak MiB"), ("peft_peak_mib", "PEFT peak MiB")]))
    total = time.perf_counter() - t_all
    print(f"\nPeak memory: peak RSS of one training step above its start, after malloc_trim(0). "
          f"Total {total:.0f} s.")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"quality-cpu{'-quick' if args.quick else ''}.json")
    lrs = {s.name: LR.get(s.name, LR_DEFAULT) for s in specs}
    common.write_json(out, {"machine": info, "sizes": sz, "seeds": seeds, "learning_rates": lrs,
                            "base_accuracy": base_acc, "pretrain_s": pre_s, "total_s": total, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
