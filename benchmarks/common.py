"""Shared pieces of the benchmarks: the variant table (ours next to PEFT's), models, timing, tables.

Each row of ``SPECS`` names one of our variants and the PEFT 0.21 configuration that computes the
same thing, built from the same hyper-parameters. A variant whose file has not landed in
``adapters/`` yet is skipped, so the benchmarks cover whatever ``adapters.REGISTRY`` holds.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WHERE = "*.{" + ",".join(ALL7) + "}"


@dataclass(frozen=True)
class Knobs:
    """Hyper-parameters shared by both sides of every comparison."""

    r: int = 8
    alpha: float = 16.0
    group_size: int = 64  # ROAD: must divide every targeted d_out
    lambda0: float = 15.0  # DeLoRA
    rho: float = 2.0  # EVA


@dataclass(frozen=True)
class Spec:
    name: str  # class name in adapters.REGISTRY
    ours: Callable[[Knobs], dict[str, Any]]  # keyword arguments for our config
    peft: Callable[[Knobs, list[str]], Any] | None  # PEFT config for the given targets; None: no PEFT peer
    peft_text: str  # the PEFT equivalent, as shown in the README table
    calibrate: bool = False  # needs calibration batches (EVA)


def _lora_cfg(**extra):
    def make(k: Knobs, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=k.r, lora_alpha=k.alpha, lora_dropout=0.0, target_modules=targets, **extra)

    return make


def _eva_cfg(k: Knobs, targets: list[str]):
    from peft import EvaConfig, LoraConfig

    return LoraConfig(r=k.r, lora_alpha=k.alpha, target_modules=targets, init_lora_weights="eva",
                      eva_config=EvaConfig(rho=k.rho))


def _ia3_cfg(k: Knobs, targets: list[str]):
    from peft import IA3Config

    return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t == "down_proj"])


def _hra_cfg(k: Knobs, targets: list[str]):
    from peft import HRAConfig

    return HRAConfig(r=k.r, target_modules=targets)


def _delora_cfg(k: Knobs, targets: list[str]):
    from peft import DeloraConfig

    return DeloraConfig(r=k.r, delora_lambda=k.lambda0, target_modules=targets)


def _road_cfg(k: Knobs, targets: list[str]):
    from peft import RoadConfig

    return RoadConfig(variant="road_1", group_size=k.group_size, target_modules=targets)


SPECS: list[Spec] = [
    Spec("LoRA", lambda k: dict(r=k.r, alpha=k.alpha), _lora_cfg(), "LoraConfig(r, lora_alpha)"),
    Spec("PiSSA", lambda k: dict(r=k.r, alpha=k.alpha), _lora_cfg(init_lora_weights="pissa"),
         'LoraConfig(init_lora_weights="pissa")'),
    Spec("EVA", lambda k: dict(r=k.r, alpha=k.alpha, rho=k.rho), _eva_cfg,
         'LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho)) + initialize_lora_eva_weights',
         calibrate=True),
    Spec("DoRA", lambda k: dict(r=k.r, alpha=k.alpha), _lora_cfg(use_dora=True), "LoraConfig(use_dora=True)"),
    Spec("IA3", lambda k: {}, _ia3_cfg, 'IA3Config(feedforward_modules=["down_proj"])'),
    Spec("HRA", lambda k: dict(r=k.r), _hra_cfg, "HRAConfig(r)"),
    Spec("DeLoRA", lambda k: dict(r=k.r, lambda0=k.lambda0), _delora_cfg, "DeloraConfig(r, delora_lambda)"),
    Spec("ROAD", lambda k: dict(variant="road_1", group_size=k.group_size), _road_cfg,
         'RoadConfig(variant="road_1", group_size)'),
    Spec("AntiPaSTO", lambda k: dict(r=k.r), None, "- (no PEFT peer)"),
]


def available(only: str | None = None) -> list[Spec]:
    """The specs whose variant exists in adapters.REGISTRY, filtered by a comma list (case-insensitive)."""
    from adapters import REGISTRY

    want = None if not only else {s.strip().lower() for s in only.split(",") if s.strip()}
    if want:
        unknown = want - {s.name.lower() for s in SPECS}
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(s.name for s in SPECS)}")
    return [s for s in SPECS if s.name in REGISTRY and (want is None or s.name.lower() in want)]


def our_variant(spec: Spec, knobs: Knobs):
    """Our config from the shared knobs, passing only the fields the variant declares."""
    from adapters import REGISTRY

    cls = REGISTRY[spec.name]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in spec.ours(knobs).items() if k in fields})


def llama(*, hidden: int, intermediate: int, layers: int, vocab: int, heads: int = 4, kv_heads: int = 2,
          max_pos: int = 256, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_pos, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def road_group(model: torch.nn.Module, want: int = 64) -> int:
    """The largest even divisor of `want` that divides every targeted d_out (PEFT's ROAD requires it)."""
    g = want
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in ALL7:
            g = math.gcd(g, m.out_features)
    return g


def build_ours(base: torch.nn.Module, spec: Spec, knobs: Knobs, calibration=None, seed: int = 0):
    import surgery

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    surgery.rewrite(model, our_variant(spec, knobs), WHERE, calibration=calibration if spec.calibrate else None)
    return model


def build_peft(base: torch.nn.Module, spec: Spec, knobs: Knobs, calibration=None, seed: int = 0):
    if spec.peft is None:
        return None
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), spec.peft(knobs, ALL7))
    if spec.calibrate:
        from peft import initialize_lora_eva_weights

        initialize_lora_eva_weights(model, dataloader=calibration, show_progress_bar=False)
    return model


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----- timing -----


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, sync: Callable[[], None] = lambda: None,
                progress=None, cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall time of each callable, `reps` times, A B / B A alternating so neither side always runs first.

    If `cpu` is given it is filled with the process CPU time of the same calls: on a CPU shared with
    other jobs, time spent descheduled inflates wall time but not CPU time.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        for n in names if i % 2 == 0 else reversed(names):
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(n, []).append(time.process_time() - c0)
        if progress is not None:
            progress.update(1)
    return times


def ratio_stats(a: list[float], b: list[float]) -> dict[str, float]:
    """Median of the paired ratios a_i / b_i and its interquartile range (pairs ran back to back)."""
    r = sorted(x / y for x, y in zip(a, b))
    # inclusive: quartiles within the measured ratios (the default extrapolates past them on few pairs)
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) >= 2 else [r[0]] * 3
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2]}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# ----- peak memory -----


class PeakMemory:
    """Peak bytes allocated during a call, above the level at its start.

    CUDA: the caching allocator's counters. CPU: the process high-water mark (VmHWM, reset through
    /proc/self/clear_refs). glibc keeps freed blocks resident and would serve the call from them
    unseen, so ``malloc_trim(0)`` first hands every free page back to the kernel; pages freed and
    reused inside the call still count, so on CPU this is an upper bound of the live tensor peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: the number is then only a rough bound
            self._trim = lambda _: 0

    @staticmethod
    def _status() -> tuple[int, int]:
        s = open("/proc/self/status").read()
        get = lambda k: int(re.search(k + r":\s+(\d+)", s).group(1)) * 1024  # noqa: E731
        return get("VmRSS"), get("VmHWM")

    def measure(self, fn: Callable[[], Any]) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - start
        self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start, _ = self._status()
        fn()
        _, peak = self._status()
        return max(0, peak - start)


# ----- output -----


def machine(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import peft
        import transformers

        info["peft"], info["transformers"] = peft.__version__, transformers.__version__
    except ImportError:
        pass
    return info


def markdown(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """A Markdown table; `cols` is (key, header); missing values print as '-'."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(cell(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


def mib(b: float | None) -> float | None:
    return None if b is None else b / 2**20
