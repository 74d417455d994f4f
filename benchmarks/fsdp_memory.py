"""Memory each rank holds under FSDP2 (``fully_shard``), ours against PEFT's, and a training step's time.

    .venv/bin/python benchmarks/fsdp_memory.py             # starts torchrun --nproc_per_node=2 (gloo) on itself
    .venv/bin/python benchmarks/fsdp_memory.py --quick     # a tiny model, for the smoke test (seconds)
    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_memory.py   # the same, launched by hand

Every rank builds the same Llama from a config (same seed, no downloads) and adapts all seven projections
with LoRA r=16, alpha 32: ours with ``surgery.rewrite``, PEFT's with ``get_peft_model``. Then
``fully_shard`` goes on each decoder layer and on the root. Per rank and side, measured with only that
side's model alive (each deleted before the next is built), after a warm-up step of both sides at the same
size, in rounds ours, PEFT / PEFT, ours / ...; the tables show each number's median over the rounds (a
buffer of about 12 MiB sometimes lands inside one round's window, on either side), the JSON each round:

- parameter bytes held: the local shard of every DTensor parameter plus every plain parameter;
- retained full-weight bytes: tensors still allocated, outside the shards, with the shape of a whole
  adapted weight (or its transpose), found by scanning ``gc.get_objects()`` after ``gc.collect()``, once
  after sharding and once after a training step; FSDP2's own unsharded parameters count only while their
  storage is allocated (it frees them to 0 bytes after each use);
- RSS (VmRSS, after ``gc.collect()`` and ``malloc_trim(0)``) above the level before the model was built:
  after sharding and after a forward + backward + AdamW step; the peak (VmHWM) of building, adapting and
  sharding, and of the step alone; ``ru_maxrss`` of the process at the end.

Then both models are built again, side by side, and a training step (forward + backward + AdamW step +
zero_grad, each rank its own batch) is timed A B / B A interleaved after a warm-up, with a barrier around
each step, so a step's time is the slower rank's; each rank's CPU time per step is printed beside it (on a
shared CPU, time spent descheduled inflates wall time, not CPU time). Rank 0 gathers every rank's numbers,
prints them and writes JSON (``benchmarks/results/fsdp-cpu.json`` unless ``--out`` or ``--quick``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import resource
import subprocess
import sys
import time
import warnings
import weakref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402
from common import ALL7, WHERE, interleaved, markdown, med, mib, ratio_stats  # noqa: E402

warnings.filterwarnings("ignore")

SIZES = {
    "quick": dict(hidden=64, intermediate=128, layers=2, vocab=128, heads=4, kv_heads=2, batch=2, seq=16,
                  reps=2, warmup=1, mem_rounds=1),
    "full": dict(hidden=512, intermediate=1408, layers=4, vocab=8192, heads=8, kv_heads=4, batch=4, seq=128,
                 reps=20, warmup=2, mem_rounds=3),
}
R, ALPHA = 16, 32.0
SIDES = ("ours", "peft")

try:
    _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc: freed pages may stay resident and RSS reads high
    _TRIM = lambda _: 0  # noqa: E731


def status(key: str) -> int:
    """A field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


def settle() -> int:
    """RSS once garbage is collected and glibc has handed its free pages back."""
    gc.collect()
    _TRIM(0)
    return status("VmRSS")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


# ----- the two sides -----


def build(sz: dict) -> nn.Module:
    return common.llama(hidden=sz["hidden"], intermediate=sz["intermediate"], layers=sz["layers"],
                        vocab=sz["vocab"], heads=sz["heads"], kv_heads=sz["kv_heads"], seed=0)


def adapt(side: str, base: nn.Module) -> nn.Module:
    torch.manual_seed(1)  # every rank draws the same lora_A, so the shards of one tensor agree
    if side == "ours":
        import surgery
        from adapters import LoRA

        surgery.rewrite(base, LoRA(r=R, alpha=ALPHA), WHERE)
        return base
    from peft import LoraConfig, get_peft_model

    return get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=ALL7))


def shard(model: nn.Module, base: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the root: PEFT's wrapper for PEFT, the Llama itself for ours


def make_model(side: str, sz: dict) -> tuple[nn.Module, dict]:
    """The sharded model of one side, and what its adapted weights were before sharding."""
    base = build(sz)
    adapted = {n: m.weight for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in ALL7}
    info = {"shapes": {tuple(w.shape) for w in adapted.values()} | {tuple(w.shape[::-1]) for w in adapted.values()},
            "refs": {n: weakref.ref(w) for n, w in adapted.items()},  # the Parameter objects the base had
            "full_bytes": sum(w.numel() * w.element_size() for w in adapted.values())}
    del adapted
    model = adapt(side, base)
    shard(model, base)
    return model, info


def batch_for(sz: dict, rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch, as data parallelism has it
    ids = torch.randint(0, sz["vocab"], (sz["batch"], sz["seq"]), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def trainer(model: nn.Module, batch: dict):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ----- what a rank holds -----


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def param_bytes(model: nn.Module) -> dict:
    """Bytes of the parameters this rank holds: local shards of DTensors, plain tensors whole."""
    out = {"params": 0, "adapter": 0, "base": 0, "storage": 0, "plain_params": 0}
    storages = {}
    for p in model.parameters():
        local = p.to_local() if is_dtensor(p) else p
        n = local.numel() * local.element_size()
        out["params"] += n
        out["adapter" if p.requires_grad else "base"] += n
        out["plain_params"] += 0 if is_dtensor(p) else 1
        st = local.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()  # FSDP2 pads a shard to even size: the storage can be larger
    out["storage"] = sum(storages.values())
    return out


def shard_storages(model: nn.Module) -> set[int]:
    return {(p.to_local() if is_dtensor(p) else p).untyped_storage().data_ptr() for p in model.parameters()}


def holder(t: torch.Tensor, model: nn.Module) -> str:
    """Where a tensor is kept: the module attribute (registered path, or the unregistered module's class)."""
    paths = {id(m): n for n, m in model.named_modules()}
    for ref in gc.get_referrers(t):
        if isinstance(ref, dict):
            key = next((k for k, v in ref.items() if v is t), "?")
            for owner in gc.get_referrers(ref):
                if isinstance(owner, nn.Module):
                    path = paths.get(id(owner))
                    return f"{path}.{key}" if path is not None else f"<unregistered {type(owner).__name__}>.{key}"
                if hasattr(owner, "__dict__") and getattr(owner, "__dict__", None) is ref:
                    return f"<{type(owner).__name__}>.{key}"
    return "held by " + ", ".join(sorted({type(r).__name__ for r in gc.get_referrers(t)})) or "?"


def retained(model: nn.Module, info: dict) -> dict:
    """Allocated tensors outside this rank's shards shaped like a whole adapted weight, one per storage."""
    gc.collect()
    own = shard_storages(model)
    found: dict[int, dict] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or is_dtensor(obj) or obj.device.type == "meta":
            continue
        if tuple(obj.shape) not in info["shapes"]:
            continue
        st = obj.untyped_storage()
        if st.nbytes() == 0 or st.data_ptr() in own or st.data_ptr() in found:
            continue
        found[st.data_ptr()] = {"shape": list(obj.shape), "bytes": st.nbytes(), "held_by": holder(obj, model)}
    originals = [n for n, r in info["refs"].items() if r() is not None and r().untyped_storage().nbytes() > 0]
    return {"bytes": sum(f["bytes"] for f in found.values()), "count": len(found),
            "tensors": sorted(found.values(), key=lambda f: -f["bytes"])[:20],
            "original_params_alive": len(originals), "original_params_alive_names": originals[:20]}


def measure_side(side: str, sz: dict, rank: int) -> dict:
    """One side alone: what the rank holds after sharding and after a training step."""
    start = settle()
    reset_peak()
    box: dict = {}
    box["model"], info = make_model(side, sz)
    built_peak = status("VmHWM") - start
    model = box.pop("model")
    after_shard = settle()
    row = {"side": side, "rank": rank, **param_bytes(model), "full_adapted_bytes": info["full_bytes"],
           "rss_start": start, "rss_after_shard": after_shard - start, "peak_build_shard": built_peak}
    row["retained_after_shard"] = retained(model, info)
    step = trainer(model, batch_for(sz, rank))
    before_step = settle()
    reset_peak()
    row["first_loss"] = step()
    row["peak_step"] = status("VmHWM") - before_step
    row["rss_after_step"] = settle() - start
    row["retained_after_step"] = retained(model, info)
    del model, step
    row["rss_after_free"] = settle() - start
    return row


def combine(rounds: list[dict]) -> dict:
    """A side's rounds as one row: the median of each number, the round that retained the most."""
    out = dict(rounds[0])
    for k, v in rounds[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "rank":
            out[k] = med([r[k] for r in rounds])
    for k in ("retained_after_shard", "retained_after_step"):
        out[k] = max((r[k] for r in rounds), key=lambda x: x["bytes"])
    return out


# ----- output -----


def _mib(b: int) -> str:
    return f"{mib(b):.2f}"


def _ratio(a: float, b: float) -> str:
    return "-" if not b else f"{a / b:.3f}"


METRICS = [  # (key, label, format)
    ("params", "parameter bytes held (MiB)", _mib),
    ("adapter", "  of which adapter (MiB)", _mib),
    ("base", "  of which frozen base (MiB)", _mib),
    ("storage", "parameter storage incl. FSDP2 padding (MiB)", _mib),
    ("ret_shard", "retained full-weight bytes after shard", str),
    ("ret_step", "retained full-weight bytes after step", str),
    ("rss_after_shard", "RSS after shard, above start (MiB)", _mib),
    ("rss_after_step", "RSS after step, above start (MiB)", _mib),
    ("peak_build_shard", "peak RSS build+adapt+shard, above start (MiB)", _mib),
    ("peak_step", "peak RSS of the step, above its start (MiB)", _mib),
    ("step_ms", "training step, median (ms)", lambda v: f"{v:.1f}"),
    ("cpu_ms", "training step, median CPU time of this rank (ms)", lambda v: f"{v:.1f}"),
    ("first_loss", "loss of the first step (same base, B = 0)", lambda v: f"{v:.6f}"),
]


def flat(row: dict) -> dict:
    return {**row, "ret_shard": row["retained_after_shard"]["bytes"], "ret_step": row["retained_after_step"]["bytes"]}


def report(ranks: list[dict], sz: dict, machine: dict, timing: dict) -> dict:
    print(f"\n## FSDP2 per rank, ours vs PEFT (Llama {sz['layers']} layers, hidden {sz['hidden']}, intermediate "
          f"{sz['intermediate']}, vocab {sz['vocab']}; LoRA r={R} on all 7 projections; {len(ranks)} ranks, gloo; "
          f"batch {sz['batch']} x {sz['seq']} per rank; memory: median of {sz['mem_rounds']} rounds; "
          f"{sz['reps']} interleaved steps; threads "
          f"{machine['threads']}; torch {machine['torch']}, peft {machine.get('peft')}; load avg "
          f"{machine['load_avg_before'][0]} -> {machine.get('load_avg', ['?'])[0]})", flush=True)
    for r in ranks:
        o, p = flat(r["ours"]), flat(r["peft"])
        o["step_ms"], p["step_ms"] = timing["ours_ms"], timing["peft_ms"]
        o["cpu_ms"], p["cpu_ms"] = r["timing"]["ours_cpu_ms"], r["timing"]["peft_cpu_ms"]
        rows = [{"metric": label, "ours": fmt(o[k]), "peft": fmt(p[k]), "ratio": _ratio(o[k], p[k])}
                for k, label, fmt in METRICS]
        print(f"\n### rank {r['rank']} (ru_maxrss at the end: {r['ru_maxrss'] / 2**20:.0f} MiB)\n")
        print(markdown(rows, [("metric", "metric"), ("ours", "ours"), ("peft", "PEFT"), ("ratio", "ours/PEFT")]))
        for side, row in (("ours", r["ours"]), ("peft", r["peft"])):
            for when in ("retained_after_shard", "retained_after_step"):
                for t in row[when]["tensors"]:
                    print(f"  {side} {when}: {t['shape']} {t['bytes']} B, {t['held_by']}")
    summary = []
    for r in ranks:
        o, p = flat(r["ours"]), flat(r["peft"])
        summary.append({"rank": r["rank"], "params": f"{_mib(o['params'])} / {_mib(p['params'])}",
                        "retained": f"{o['ret_step']} / {p['ret_step']}",
                        "rss": f"{_mib(o['rss_after_step'])} / {_mib(p['rss_after_step'])}",
                        "peak": f"{_mib(o['peak_build_shard'])} / {_mib(p['peak_build_shard'])}",
                        "peak_step": f"{_mib(o['peak_step'])} / {_mib(p['peak_step'])}",
                        "step": f"{timing['ours_ms']:.0f} / {timing['peft_ms']:.0f}",
                        "cpu": f"{r['timing']['ours_cpu_ms']:.0f} / {r['timing']['peft_cpu_ms']:.0f}",
                        "ratio": f"{timing['ratio']:.3f} [{timing['q1']:.3f}, {timing['q3']:.3f}]",
                        "min_ratio": f"{timing['min_ratio']:.3f}"})
    print("\n### summary, ours / PEFT\n")
    print(markdown(summary, [("rank", "rank"), ("params", "param MiB held"),
                             ("retained", "retained full-weight bytes"), ("rss", "RSS after step MiB"),
                             ("peak", "peak build+shard MiB"), ("peak_step", "step peak MiB"),
                             ("step", "step ms"), ("cpu", "step CPU ms"), ("ratio", "step ours/PEFT [IQR]"),
                             ("min_ratio", "ours/PEFT of minima")]), flush=True)
    return {"summary": summary}


# ----- driver -----


def launch(argv: list[str], nproc: int) -> int:
    """Run this file under torchrun, one process per rank, gloo on CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), *argv]
    return subprocess.run(cmd, env=env).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and two steps (smoke test)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks torchrun starts (default 2)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: 4; 2 with --quick)")
    ap.add_argument("--reps", type=int, help="timed steps per side (default: 10; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--mem-rounds", type=int, help="memory rounds, A B then B A (default: 3; 1 with --quick)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/fsdp-cpu.json; none with --quick)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        return launch(sys.argv[1:] if argv is None else list(argv), args.nproc)

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    sz = dict(SIZES["quick" if args.quick else "full"])
    sz["layers"] = args.layers or sz["layers"]
    sz["reps"] = args.reps or sz["reps"]
    sz["mem_rounds"] = args.mem_rounds or sz["mem_rounds"]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    # imports and first calls stay out of the numbers: a first step at this size keeps ~30 MiB (gloo's and
    # the allocator's buffers) that would otherwise land on whichever side goes first
    for side in SIDES:
        model = make_model(side, sz)[0]
        trainer(model, batch_for(sz, rank))()
        del model
    mine: dict = {"rank": rank, "rounds": {side: [] for side in SIDES}}
    order = list(SIDES)
    for _ in range(sz["mem_rounds"]):  # one side alive at a time, so RSS above the start is that side's alone
        for side in order:
            mine["rounds"][side].append(row := measure_side(side, sz, rank))
            print(f"# rank {rank} {side}: params {_mib(row['params'])} MiB, retained full-weight "
                  f"{row['retained_after_shard']['bytes']} / {row['retained_after_step']['bytes']} B (shard / step), "
                  f"RSS +{_mib(row['rss_after_shard'])} / +{_mib(row['rss_after_step'])} MiB, "
                  f"peak +{_mib(row['peak_build_shard'])} MiB, step peak +{_mib(row['peak_step'])} MiB, "
                  f"loss {row['first_loss']:.6f}", flush=True)
            dist.barrier()
        order.reverse()  # A B, B A: what is left of one side's pages favours neither
    for side in SIDES:
        mine[side] = combine(mine["rounds"][side])

    models = {side: make_model(side, sz)[0] for side in SIDES}
    steps = {side: trainer(models[side], batch_for(sz, rank)) for side in SIDES}
    cpu: dict[str, list[float]] = {}
    times = interleaved(steps, reps=sz["reps"], warmup=sz["warmup"], sync=dist.barrier, cpu=cpu)
    r = ratio_stats(times["ours"], times["peft"])
    timing = {"ours_ms": 1000 * med(times["ours"]), "peft_ms": 1000 * med(times["peft"]), "ratio": r["median"],
              "q1": r["q1"], "q3": r["q3"], "ours_cpu_ms": 1000 * med(cpu["ours"]),
              "peft_cpu_ms": 1000 * med(cpu["peft"]), "min_ratio": min(times["ours"]) / min(times["peft"]),
              "ours_s": times["ours"], "peft_s": times["peft"]}
    del models, steps
    mine["timing"] = timing
    mine["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        machine = common.machine(torch.device("cpu"))
        machine.update(load_avg_before=[round(x, 2) for x in load_before], world_size=world, backend="gloo")
        timing = gathered[0]["timing"]  # a barrier brackets every step: the ranks time the same steps
        result = {"size": "quick" if args.quick else "full", "config": {**sz, "r": R, "alpha": ALPHA,
                                                                          "targets": ALL7},
                  "machine": machine, "ranks": gathered, "timing": timing}
        result.update(report(gathered, sz, machine, timing))
        result["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"\ntotal {result['seconds']} s", flush=True)
        out = args.out or (None if args.quick else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                "results", "fsdp-cpu.json"))
        if out:
            common.write_json(out, result)
    # together: a rank that tore gloo down while rank 0 was still writing its report once aborted at exit (CI,
    # "terminate called without an active exception"); destroy_process_group is meant to be called collectively
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
