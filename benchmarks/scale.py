"""The costs around training, ours against PEFT's, on a model of a real size.

    .venv/bin/python benchmarks/scale.py --size tiny                      # smoke (seconds)
    .venv/bin/python benchmarks/scale.py --size 0.6b --layers 8           # Qwen3-0.6B's shape, 8 layers
    .venv/bin/python benchmarks/scale.py --size 0.6b --growth 2,8,28 --variants lora
    .venv/bin/python benchmarks/scale.py --size 0.6b --scope graph        # ours on surgery.trace's graph

For each variant, both sides run interleaved in one process (ours first on even reps, PEFT first on odd
ones) on copies of one random base, all seven projections of every layer: apply (``surgery.rewrite`` vs
``get_peft_model``; PiSSA's SVD and EVA's calibration are part of it),
one training step (AdamW, batch 1 x 256 tokens, after one warm-up step), save, merge
(``surgery.merge`` vs ``merge_and_unload``), load onto a fresh copy of the base (``surgery.load`` vs
``PeftModel.from_pretrained``), the file size, and the peak memory of apply, the step and merge above the
level before the call. ``lora-4bit`` is LoRA on a copy of the base whose projections are bitsandbytes nf4
layers, against PEFT's QLoRA on the same. A ratio is the median of the per-rep ratios ours / PEFT, with
quartiles. ``--growth`` adds the apply cost per site as the number of layers grows. With ``--scope graph``
our side works on the model traced once by ``surgery.trace`` (the trace itself is not timed: it is printed
once), PEFT's on the model itself.

EVA calibrates both sides on the same 2 batches of 2 x 128 tokens. PEFT's ``initialize_lora_eva_weights``
cycles its batches until every layer's components stop moving (cosine similarity >= ``tau``); on random
weights and tokens they never settle (at tau=0.99 it was still cycling after 30 minutes, at tau=0 after 10
at 2 layers), so its side gets a ``forward_fn`` that, after the second batch, marks every layer converged:
it then stops where ours does, after the same data.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402
from common import ALL7, WHERE, Knobs, PeakMemory, markdown, med, mib, ratio_stats  # noqa: E402

warnings.filterwarnings("ignore")

SIZES = {  # Qwen3-0.6B: hidden 1024, intermediate 3072, 16 heads of 128, 8 KV heads, vocab 151,936, tied head
    "tiny": dict(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=128, layers=2, reps=2, seq=16),
    "0.6b": dict(hidden=1024, intermediate=3072, heads=16, kv_heads=8, head_dim=128, vocab=151936, layers=8, reps=5,
                 seq=256),
}
DEFAULT = "lora,dora,pissa,hra,ia3,eva,lora-4bit"
QLORA = "lora-4bit"  # LoRA on the base with nf4 projections (bitsandbytes)


def base_model(sz: dict, layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=sz["vocab"], hidden_size=sz["hidden"], intermediate_size=sz["intermediate"],
                      num_hidden_layers=layers, num_attention_heads=sz["heads"], num_key_value_heads=sz["kv_heads"],
                      head_dim=sz["head_dim"], max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def quantised(base: torch.nn.Module) -> torch.nn.Module:
    """The base with its projections as bitsandbytes nf4 layers (float32 compute), loaded as users load one."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        return AutoModelForCausalLM.from_pretrained(d, quantization_config=config, dtype=torch.float32).eval()


def train_batch(sz: dict) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, sz["vocab"], (1, sz["seq"]), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def calibration(sz: dict) -> list[dict[str, torch.Tensor]]:
    """EVA's calibration: 2 batches of 2 x 128 tokens (2 x 16 at the tiny size)."""
    seq = 16 if sz["vocab"] < 1000 else 128
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(0, sz["vocab"], (2, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


class _StopAfter:
    """PEFT's EVA ``forward_fn``: the model on a batch, and after the n-th one every EVA hook reads as converged,
    so ``initialize_lora_eva_weights`` stops after n batches (see EVA above)."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def __call__(self, model, inputs):
        from peft.tuners.lora.eva import SVDHook

        out = model(**inputs)
        self.seen += 1
        if self.seen >= self.n:
            hooks = [h for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, SVDHook)]
            for h in hooks:
                h.converged[:] = True
        return out


class Side:
    """One library's verbs on one variant; ``traced``: our side works on this graph of the base (graph scope)."""

    def __init__(self, name: str, spec, knobs: Knobs, calib, traced=None):
        self.name, self.spec, self.knobs, self.calib = name, spec, knobs, calib
        self.traced = traced if name == "ours" else None

    def fresh(self, base):
        return copy.deepcopy(base if self.traced is None else self.traced)

    def apply(self, model):
        if self.name == "ours":
            import surgery

            surgery.rewrite(model, common.our_variant(self.spec, self.knobs), WHERE,
                            calibration=self.calib if self.spec.calibrate else None)
            return model
        from peft import get_peft_model

        peft = get_peft_model(model, self.spec.peft(self.knobs, ALL7))
        if self.spec.calibrate:
            from peft import initialize_lora_eva_weights

            initialize_lora_eva_weights(peft, dataloader=self.calib, forward_fn=_StopAfter(len(self.calib)),
                                        show_progress_bar=False)
        return peft

    def save(self, model, where: str) -> int:
        if self.name == "ours":
            import surgery

            path = os.path.join(where, "adapter.safetensors")
            surgery.save(model, path)
            return os.path.getsize(path)
        model.save_pretrained(where)
        return sum(os.path.getsize(os.path.join(where, f)) for f in os.listdir(where) if f.endswith(".safetensors"))

    def load(self, model, where: str):
        if self.name == "ours":
            import surgery

            return surgery.load(model, os.path.join(where, "adapter.safetensors"))
        from peft import PeftModel

        return PeftModel.from_pretrained(model, where)

    def merge(self, model):
        if self.name == "ours":
            import surgery

            return surgery.merge(model)
        return model.merge_and_unload()


def timed(fn, mem: PeakMemory | None = None) -> tuple[float, int, object]:
    """Seconds of ``fn()`` alone, the peak bytes above the start while it ran (when ``mem``), its result."""
    box: dict = {}

    def run():
        t = time.perf_counter()
        box["out"] = fn()
        box["s"] = time.perf_counter() - t

    peak = mem.measure(run) if mem is not None else run() or 0
    return box["s"], peak, box["out"]


def step_of(model, batch):
    """One AdamW step as a closure (the optimizer lives with it)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    ids = batch["input_ids"]

    def step():  # the next-token loss computed here: a traced graph takes only the inputs it was traced with
        logits = model(**batch)["logits"]
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def one_rep(side: Side, base, mem: PeakMemory, batch) -> dict[str, float]:
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as where:
        model = side.fresh(base)
        out["apply"], out["apply_mem"], model = timed(lambda: side.apply(model), mem)
        step = step_of(model, batch)
        step()  # warm-up: the optimizer's state, first-call costs
        out["step"], out["step_mem"], _ = timed(step, mem)
        step = None
        model.eval()
        gc.collect()
        out["save"], _, out["file"] = timed(lambda: side.save(model, where))
        out["merge"], out["merge_mem"], _ = timed(lambda: side.merge(model), mem)
        model = None
        gc.collect()
        fresh = side.fresh(base)
        out["load"], _, _ = timed(lambda: side.load(fresh, where))
        fresh = None
        gc.collect()
    return out


COSTS = ("apply", "step", "save", "load", "merge")
PEAKS = ("apply_mem", "step_mem", "merge_mem")


def bench_variant(spec, base, knobs: Knobs, calib, reps: int, mem: PeakMemory, batch, name: str,
                  traced=None) -> dict:
    sides = [Side("ours", spec, knobs, calib, traced), Side("peft", spec, knobs, calib)]
    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    one_rep(sides[0], base, mem, batch)  # warm-up: imports, first-call costs
    one_rep(sides[1], base, mem, batch)
    for i in range(reps):
        for side in sides if i % 2 == 0 else sides[::-1]:
            runs[side.name].append(one_rep(side, base, mem, batch))
    row: dict = {"variant": name}
    for cost in COSTS:
        r = ratio_stats([x[cost] for x in runs["ours"]], [x[cost] for x in runs["peft"]])
        row[cost] = f"{r['median']:.2f} [{r['q1']:.2f}, {r['q3']:.2f}]"
        row[f"{cost}_s"] = f"{med([x[cost] for x in runs['ours']]):.3f} / {med([x[cost] for x in runs['peft']]):.3f}"
    for cost in PEAKS:
        row[cost] = f"{mib(med([x[cost] for x in runs['ours']])):.0f} / {mib(med([x[cost] for x in runs['peft']])):.0f}"
    row["file"] = f"{runs['ours'][0]['file'] / runs['peft'][0]['file']:.2f}"
    return row


def growth(spec, sz: dict, layer_counts: list[int], knobs: Knobs, calib, reps: int, scope: str) -> list[dict]:
    """Apply cost per site (ms) as layers grow, ours and PEFT's."""
    rows = []
    for n in layer_counts:
        base = base_model(sz, n)
        sides = [Side("ours", spec, knobs, calib, trace(base, scope)), Side("peft", spec, knobs, calib)]
        times: dict[str, list[float]] = {"ours": [], "peft": []}
        for i in range(reps + 1):
            for side in sides if i % 2 == 0 else sides[::-1]:
                model = side.fresh(base)
                t = time.perf_counter()
                side.apply(model)
                if i:  # the first round warms up
                    times[side.name].append(time.perf_counter() - t)
                del model
                gc.collect()
        sites = 7 * n
        rows.append({"variant": spec.name, "layers": n, "sites": sites,
                     "ours_ms_per_site": round(1000 * med(times["ours"]) / sites, 2),
                     "peft_ms_per_site": round(1000 * med(times["peft"]) / sites, 2),
                     "ratio": round(med(times["ours"]) / med(times["peft"]), 2)})
        del base
        gc.collect()
    return rows


def trace(base, scope: str):
    """The base as one GraphModule (graph scope), or None (module scope)."""
    if scope != "graph":
        return None
    import surgery

    ids = torch.randint(0, 100, (2, 8))
    t = time.perf_counter()
    gm = surgery.trace(base, input_ids=ids, attention_mask=torch.ones_like(ids))
    print(f"(surgery.trace of {sum(1 for _ in base.modules())} modules: {time.perf_counter() - t:.2f} s, once)",
          flush=True)
    return gm


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--quick", action="store_true", help="the tiny size (what the smoke test runs)")
    ap.add_argument("--out", help="write the tables as JSON here (default: benchmarks/results/scale-cpu.json)")
    ap.add_argument("--layers", type=int, help="layers of the model for the ratio table (default: the size's)")
    ap.add_argument("--reps", type=int, help="interleaved repetitions per variant (default: the size's)")
    ap.add_argument("--variants", default=DEFAULT, help=f"comma list (default {DEFAULT})")
    ap.add_argument("--growth", default="", help="comma list of layer counts for the per-site apply cost")
    ap.add_argument("--skip-table", action="store_true", help="only the growth lines")
    ap.add_argument("--scope", choices=("module", "graph"), default="module", help="our side's scope (default module)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size = "tiny"
    sz = SIZES[args.size]
    result: dict = {"size": args.size, "scope": args.scope, "machine": common.machine(torch.device("cpu")), "table": [],
                    "growth": []}
    reps = args.reps or sz["reps"]
    knobs = Knobs(r=16 if args.size != "tiny" else 4, alpha=32.0)
    names = [v.strip().lower() for v in args.variants.split(",") if v.strip()]
    qlora = QLORA in names and args.scope == "module"  # graph scope cannot trace bitsandbytes layers
    dense = ",".join(v for v in names if v != QLORA)  # available("") would be every variant
    specs = [s for s in common.available(dense) if s.peft is not None] if dense else []
    mem = PeakMemory(torch.device("cpu"))
    print(f"# scale benchmark: size {args.size}, {args.scope} scope, {reps} reps, "
          f"{common.machine(torch.device('cpu'))}", flush=True)
    batch = train_batch(sz)
    if not args.skip_table:
        layers = args.layers or sz["layers"]
        base = base_model(sz, layers)
        n = sum(p.numel() for p in base.parameters())
        print(f"\n## ours / PEFT at {layers} layers ({n / 1e6:.0f}M parameters, {7 * layers} sites), "
              "median [quartiles]; seconds and MiB as ours / PEFT\n", flush=True)
        calib = calibration(sz)
        cols = [("variant", "variant")] + [(c, c) for c in COSTS] + [(f"{c}_s", f"{c} s") for c in COSTS]
        cols += [(p, p.replace("_mem", " peak MiB")) for p in PEAKS] + [("file", "file size")]
        print("\n".join(markdown([], cols).splitlines()[:2]), flush=True)
        traced = trace(base, args.scope)
        rows = []
        for spec in specs:  # a row as soon as it is measured: the slow variants (PiSSA, EVA) take minutes each
            rows.append(bench_variant(spec, base, knobs, calib, reps, mem, batch, spec.name, traced))
            print(markdown(rows[-1:], cols).splitlines()[2], flush=True)
        if qlora:
            lora = common.available("lora")[0]
            rows.append(bench_variant(lora, quantised(base), knobs, calib, reps, mem, batch, "LoRA 4-bit"))
            print(markdown(rows[-1:], cols).splitlines()[2], flush=True)
        traced = None
        result["table"], result["layers"] = rows, layers
        del base
        gc.collect()
    if args.growth:
        counts = [int(x) for x in args.growth.split(",")]
        print("\n## apply cost per site as layers grow\n", flush=True)
        rows = []
        for spec in specs:
            rows += growth(spec, sz, counts, knobs, calibration(sz), reps=max(1, reps // 2), scope=args.scope)
        print(markdown(rows, [(k, k) for k in ("variant", "layers", "sites", "ours_ms_per_site", "peft_ms_per_site",
                                               "ratio")]), flush=True)
        result["growth"] = rows
    out = args.out or (None if args.quick else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                            f"scale-cpu{'-graph' if args.scope == 'graph' else ''}.json"))
    if out:
        common.write_json(out, result)


if __name__ == "__main__":
    main()
