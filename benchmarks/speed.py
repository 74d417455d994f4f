"""Training-step speed and memory of each variant against PEFT's, plus merge, rewrite and compile checks.

    .venv/bin/python benchmarks/speed.py                     # default sizes, every variant that exists
    .venv/bin/python benchmarks/speed.py --variants lora,dora --reps 31
    .venv/bin/python benchmarks/speed.py --device cuda
    .venv/bin/python benchmarks/speed.py --quick             # tiny sizes, for the smoke test

Both sides start from the same base weights, hyper-parameters, target modules (all seven Llama
projections) and batch; one training step is forward + backward + AdamW step + zero_grad. The two
sides run in one process, interleaved (A B, B A, ...) after a warm-up; the reported ratio is the
median of the back-to-back pair ratios, with its interquartile range; the ratio of the two
fastest steps and the median ratio of process CPU time are printed beside it: on a CPU shared
with other jobs they are the estimates least disturbed by that load. Targets are judged on the median.
The vocabulary is kept small (1024) so the LM head does not drown the adapter's cost.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import warnings  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import common  # noqa: E402
warnings.filterwarnings("ignore", category=FutureWarning)
from common import ALL7, WHERE, Knobs, PeakMemory, interleaved, markdown, med, mib, ratio_stats  # noqa: E402

QLORA = "LoRA on 4-bit"

TARGETS = {"LoRA": 1.0, "IA3": 1.0, "DoRA": 0.95, "HRA": 0.6, QLORA: 1.0}  # ours/PEFT step time
MERGED_TARGET = 1.02


def sizes(quick: bool) -> dict:
    if quick:
        return dict(hidden=64, intermediate=128, layers=1, vocab=128, batch=2, seq=16, reps=4, warmup=1,
                    rewrite_layers=3, rewrite_reps=1)
    return dict(hidden=256, intermediate=704, layers=2, vocab=1024, batch=4, seq=96, reps=41, warmup=3,
                rewrite_layers=24, rewrite_reps=3)


def batch_for(sz: dict, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, sz["vocab"], (sz["batch"], sz["seq"]), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def trainer(model, batch):
    """One training step as a closure; the optimizer and its state live with it."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile_step(step, label: str, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for _ in range(2):
        step()
    with profile(activities=acts) as prof:
        for _ in range(5):
            step()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return f"### {label}\n\n```\n{prof.key_averages().table(sort_by=key, row_limit=rows)}\n```\n"


def bench_steps(specs, base, sz, knobs, device, sync, calib):
    rows, pairs = [], []
    batch = batch_for(sz, device)
    bar = tqdm(total=len(specs) * sz["reps"], desc="train steps", unit="pair", leave=False)
    for spec in specs:
        bar.set_postfix_str(spec.name)
        ours = common.build_ours(base, spec, knobs, calib).to(device)
        theirs = common.build_peft(base, spec, knobs, calib)
        theirs = None if theirs is None else theirs.to(device)
        fns = {"ours": trainer(ours, batch)}
        if theirs is not None:
            fns["peft"] = trainer(theirs, batch)
        cpu: dict[str, list[float]] = {}
        t = interleaved(fns, sz["reps"], sz["warmup"], sync, progress=bar, cpu=cpu)
        row = {"variant": spec.name, "peft_config": spec.peft_text, "ours_ms": 1e3 * med(t["ours"]),
               "trainable_ours": common.trainable(ours)}
        if theirs is not None:
            st = ratio_stats(t["ours"], t["peft"])
            row.update(peft_ms=1e3 * med(t["peft"]), ratio=st["median"], ratio_q1=st["q1"], ratio_q3=st["q3"],
                       ratio_of_min=min(t["ours"]) / min(t["peft"]),
                       cpu_ratio=None if device.type == "cuda" else ratio_stats(cpu["ours"], cpu["peft"])["median"],
                       trainable_peft=common.trainable(theirs))
            if spec.name in TARGETS:
                row["target"] = TARGETS[spec.name]
                row["meets_target"] = st["median"] <= TARGETS[spec.name]
        rows.append(row)
        pairs.append((spec, ours, theirs, fns))
    bar.close()
    return rows, pairs


def bench_qlora(base, sz, knobs, device, sync) -> dict | None:
    """LoRA on a 4-bit (nf4, float32 compute) copy of the base, ours against PEFT's QLoRA on another copy
    quantised the same way: step time, interleaved, and peak memory. None without bitsandbytes."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import surgery
    from adapters import LoRA

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(d)

        def load():
            placed = {"device_map": {"": device}} if device.type == "cuda" else {}
            return AutoModelForCausalLM.from_pretrained(d, quantization_config=config, dtype=torch.float32, **placed)

        ours = surgery.rewrite(load(), LoRA(r=knobs.r, alpha=knobs.alpha), where=WHERE)
        theirs = get_peft_model(load(), LoraConfig(r=knobs.r, lora_alpha=knobs.alpha, target_modules=ALL7))
    batch = batch_for(sz, device)
    fns = {"ours": trainer(ours, batch), "peft": trainer(theirs, batch)}
    cpu: dict[str, list[float]] = {}
    t = interleaved(fns, sz["reps"], sz["warmup"], sync, cpu=cpu)
    st = ratio_stats(t["ours"], t["peft"])
    meter = PeakMemory(device)
    peaks = {n: med([meter.measure(f) for _ in range(3)]) for n, f in fns.items()}
    return {"variant": QLORA, "peft_config": f"LoraConfig(r={knobs.r}) on BitsAndBytesConfig nf4",
            "ours_ms": 1e3 * med(t["ours"]), "peft_ms": 1e3 * med(t["peft"]), "ratio": st["median"],
            "ratio_q1": st["q1"], "ratio_q3": st["q3"], "ratio_of_min": min(t["ours"]) / min(t["peft"]),
            "cpu_ratio": None if device.type == "cuda" else ratio_stats(cpu["ours"], cpu["peft"])["median"],
            "target": TARGETS[QLORA], "meets_target": st["median"] <= TARGETS[QLORA],
            "trainable_ours": common.trainable(ours), "trainable_peft": common.trainable(theirs),
            "ours_peak_mib": mib(peaks["ours"]), "peft_peak_mib": mib(peaks["peft"])}


def bench_memory(specs, base, sz, knobs, device, calib, reps: int = 3) -> tuple[dict, str]:
    """Peak memory of one training step per side: {variant: {"ours": bytes, "peft": bytes}}."""
    meter = PeakMemory(device)
    batch = batch_for(sz, device)
    out = {}
    for spec in tqdm(specs, desc="peak memory", leave=False):
        ours = common.build_ours(base, spec, knobs, calib).to(device)
        theirs = common.build_peft(base, spec, knobs, calib)
        fns = {"ours": trainer(ours, batch)}
        if theirs is not None:
            fns["peft"] = trainer(theirs.to(device), batch)
        for f in fns.values():  # the first step creates AdamW's state: measure steady steps
            f()
        peaks = {n: [] for n in fns}
        for i in range(reps):
            for n in list(fns) if i % 2 == 0 else reversed(list(fns)):
                peaks[n].append(meter.measure(fns[n]))
        out[spec.name] = {n: med(v) for n, v in peaks.items()}
        del ours, theirs, fns
    how = ("torch.cuda.max_memory_allocated above the step's start" if device.type == "cuda" else
           "peak RSS (VmHWM) above the step's start, after malloc_trim(0); median of 3 steady steps")
    return out, how


def bench_merged(rows, pairs, base, sz, device, sync):
    """Forward time of each merged model against the untouched base (both eval, no grad)."""
    import surgery
    from surgery.site import Site

    batch = {k: v for k, v in batch_for(sz, device, seed=1).items() if k != "labels"}
    base = copy.deepcopy(base).to(device).eval()
    for row, (spec, ours, _, _) in tqdm(list(zip(rows, pairs)), desc="merged inference", leave=False):
        with torch.no_grad():
            for p in ours.parameters():  # move the adapter off identity so the fold does real work
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        surgery.merge(ours)
        ours.eval()
        leftover = [n for n, m in ours.named_modules() if isinstance(m, Site)]

        def fwd(m):
            def run():
                with torch.no_grad():
                    m(**batch)
            return run

        t = interleaved({"merged": fwd(ours), "base": fwd(base)}, 2 * sz["reps"], sz["warmup"], sync)
        row["merged_over_base"] = ratio_stats(t["merged"], t["base"])["median"]
        row["merged_plain"] = not leftover


def bench_rewrite(specs, sz, knobs):
    """Wall time of the rewrite itself on a deep model (copies made before the clock starts)."""
    names = [s for s in specs if s.name in ("LoRA", "PiSSA")]
    if not names:
        return []
    base = common.llama(hidden=sz["hidden"], intermediate=sz["intermediate"], layers=sz["rewrite_layers"],
                        vocab=sz["vocab"])
    out = []
    for spec in tqdm(names, desc=f"rewrite {sz['rewrite_layers']} layers", leave=False):
        import surgery
        from peft import get_peft_model

        times = {"ours": [], "peft": []}
        for _ in range(sz["rewrite_reps"]):
            for side in ("ours", "peft"):
                m = copy.deepcopy(base)
                t0 = time.perf_counter()
                if side == "ours":
                    surgery.rewrite(m, common.our_variant(spec, knobs), WHERE)
                else:
                    get_peft_model(m, spec.peft(knobs, ALL7))
                times[side].append(time.perf_counter() - t0)
                del m
        out.append({"variant": spec.name, "layers": sz["rewrite_layers"], "sites": 7 * sz["rewrite_layers"],
                    "ours_s": med(times["ours"]), "peft_s": med(times["peft"])})
    return out


def bench_compile(specs, base, sz, knobs, device, backend: str):
    """torch.compile(fullgraph=True) of an adapted model: fullgraph makes any graph break an error."""
    import torch._dynamo

    out = []
    batch = {k: v for k, v in batch_for(sz, device, seed=2).items() if k != "labels"}
    for spec in tqdm(specs, desc="torch.compile", leave=False):
        model = common.build_ours(base, spec, knobs, None if not spec.calibrate else calib_batches(sz, "cpu"))
        model = model.to(device).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
            eager = model(**batch).logits
        torch._dynamo.reset()
        row = {"variant": spec.name, "backend": backend}
        try:
            compiled = torch.compile(model, fullgraph=True, backend=backend)
            t0 = time.perf_counter()
            with torch.no_grad():
                got = compiled(**batch).logits
            row["compile_s"] = time.perf_counter() - t0
            row["graph_breaks"] = 0
            row["max_abs_diff"] = (got - eager).abs().max().item()
            row["max_abs_logit"] = eager.abs().max().item()
        except Exception as e:  # a graph break under fullgraph=True, or a backend failure: report it
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        out.append(row)
    return out


def calib_batches(sz, device, n: int = 4):
    return [{k: v for k, v in batch_for(sz, device, seed=100 + i).items() if k != "labels"} for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (smoke test)")
    ap.add_argument("--variants", default=None, help="comma list, e.g. lora,dora (default: all available)")
    ap.add_argument("--reps", type=int, default=None, help="timed pairs per variant")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    ap.add_argument("--compile", default="LoRA", help="variants to torch.compile (comma list, 'all' or 'none')")
    ap.add_argument("--compile-backend", default=None, help="default: inductor (eager with --quick)")
    ap.add_argument("--profile", default=None, help="comma list of variants: print the top ops of both sides")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/speed-<device>.json)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    sz = sizes(args.quick)
    if args.reps:
        sz["reps"] = args.reps
    specs = common.available(args.variants)
    if not specs:
        print("no variants to benchmark", file=sys.stderr)
        return 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = common.llama(hidden=sz["hidden"], intermediate=sz["intermediate"], layers=sz["layers"], vocab=sz["vocab"])
    knobs = Knobs(group_size=common.road_group(base))
    calib = calib_batches(sz, "cpu")
    load_before = os.getloadavg()

    rows, pairs = bench_steps(specs, base, sz, knobs, device, sync, calib)
    profiles = []
    if args.profile:
        for spec, ours, theirs, fns in pairs:
            if spec.name.lower() in {v.strip().lower() for v in args.profile.split(",")}:
                profiles += [profile_step(fns[n], f"{spec.name}: {n}") for n in fns]
    peaks, memory_how = bench_memory(specs, base, sz, knobs, device, calib)
    for row in rows:
        got = peaks.get(row["variant"], {})
        row["ours_peak_mib"], row["peft_peak_mib"] = mib(got.get("ours")), mib(got.get("peft"))
    bench_merged(rows, pairs, base, sz, device, sync)
    del pairs
    if args.variants is None or "lora" in args.variants.lower().split(","):
        qlora = bench_qlora(base, sz, knobs, device, sync)
        if qlora is not None:
            rows.append(qlora)
    rewrite = bench_rewrite(specs, sz, knobs)
    want = args.compile.lower()
    comp_specs = [] if want == "none" else [s for s in specs if want == "all" or s.name.lower() in want.split(",")]
    backend = args.compile_backend or ("eager" if args.quick else "inductor")
    compiled = bench_compile(comp_specs, base, sz, knobs, device, backend)

    info = common.machine(device)
    info["load_avg_before"] = [round(x, 2) for x in load_before]
    print(f"\n## Training step, ours vs PEFT ({device}; Llama {sz['layers']} layers, hidden {sz['hidden']}, "
          f"intermediate {sz['intermediate']}, vocab {sz['vocab']}; batch {sz['batch']} x {sz['seq']}; "
          f"r={knobs.r}; all 7 projections; {sz['reps']} interleaved pairs; threads {torch.get_num_threads()}; "
          f"load avg {info['load_avg_before'][0]} -> {info.get('load_avg', ['?'])[0]})\n")
    for r in rows:
        if "ratio" in r:
            r["ratio_iqr"] = f"{r['ratio']:.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]"
            r["target_txt"] = None if "target" not in r else f"<= {r['target']} {'yes' if r['meets_target'] else 'NO'}"
        r["merged_txt"] = None if "merged_over_base" not in r else (
            f"{r['merged_over_base']:.3f} {'yes' if r['merged_over_base'] <= MERGED_TARGET else 'NO'}")
    print(markdown(rows, [("variant", "variant"), ("peft_config", "PEFT equivalent"), ("ours_ms", "ours ms"),
                          ("peft_ms", "PEFT ms"), ("ratio_iqr", "ours/PEFT median [IQR]"),
                          ("ratio_of_min", "ours/PEFT of minima"), ("cpu_ratio", "ours/PEFT CPU time"),
                          ("target_txt", "target"),
                          ("ours_peak_mib", "ours peak MiB"), ("peft_peak_mib", "PEFT peak MiB"),
                          ("trainable_ours", "trainable ours"), ("trainable_peft", "trainable PEFT"),
                          ("merged_txt", f"merged/base (<= {MERGED_TARGET})")]))
    print(f"\nPeak memory: {memory_how}.")
    if rewrite:
        print(f"\n## Rewrite time, {sz['rewrite_layers']}-layer Llama, all 7 projections (median of "
              f"{sz['rewrite_reps']})\n")
        print(markdown(rewrite, [("variant", "variant"), ("sites", "sites"), ("ours_s", "surgery.rewrite s"),
                                 ("peft_s", "get_peft_model s")]))
    if compiled:
        print("\n## torch.compile(fullgraph=True), eval forward\n")
        print(markdown(compiled, [("variant", "variant"), ("backend", "backend"), ("graph_breaks", "graph breaks"),
                                  ("compile_s", "first call s"), ("max_abs_diff", "max abs(compiled - eager)"),
                                  ("max_abs_logit", "max abs(logit)"), ("error", "error")]))
    for p in profiles:
        print("\n" + p)

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"speed-{device.type}{'-quick' if args.quick else ''}.json")
    common.write_json(out, {"machine": info, "sizes": sz, "knobs": dataclasses.asdict(knobs),
                            "memory": memory_how, "train_step": rows, "rewrite": rewrite, "compile": compiled})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
