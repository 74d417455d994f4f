"""Which weights differ between two models or two checkpoints, by how much, and with what rank.

``changes(before, after)`` walks two name -> tensor maps (state dicts, or the tensors of two
checkpoint directories read one at a time) and reports every tensor whose values differ, or that
exists on one side only. For a 2-D change it gives the numerical rank: the singular values of the
change above the size that rounding the weight to its dtype can reach, ``2 eps max|W| (sqrt(m) +
sqrt(n))``, so a merged LoRA of rank r shows rank r, and a change that is only rounding shows 0.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import quant
from .errors import DiffInputError

SKETCH = 512  # larger changes get their rank from a random sketch of this width ("> 512" when it is full)
CHANGED, ONLY_BEFORE, ONLY_AFTER = "changed", "only before", "only after"


@dataclass(frozen=True)
class WeightChange:
    path: str  # the tensor's state-dict name
    kind: str  # CHANGED | ONLY_BEFORE | ONLY_AFTER
    shape: tuple[int, ...]
    rel: float = float("nan")  # ||after - before||_F / ||before||_F
    max_abs: float = float("nan")
    rank: int | None = None  # numerical rank of the change (2-D tensors); None otherwise
    rank_capped: bool = False  # the rank is at least ``rank`` (a sketch was full)

    def row(self) -> tuple[str, str, str, str, str, str]:
        shape = "x".join(map(str, self.shape)) or "scalar"
        if self.kind != CHANGED:
            return (self.path, self.kind, shape, "", "", "")
        rank = "" if self.rank is None else (f"> {self.rank}" if self.rank_capped else str(self.rank))
        return (self.path, CHANGED, shape, f"{self.rel:.3g}", f"{self.max_abs:.3g}", rank)


HEAD = ("tensor", "change", "shape", "rel. change", "max |change|", "rank")


def table(rows: list[WeightChange]) -> list[str]:
    """The changes as aligned text lines (a header, then one line per tensor)."""
    cells = [HEAD, *(w.row() for w in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEAD))]
    return ["  ".join(c.ljust(w) for c, w in zip(cells_row, widths)).rstrip() for cells_row in cells]


def changes(before: dict[str, Callable[[], torch.Tensor]], after: dict[str, Callable[[], torch.Tensor]],
            progress: Callable[[Iterable], Iterable] | None = None) -> list[WeightChange]:
    """Compare two name -> (tensor getter) maps; getters let a checkpoint be read one tensor at a time."""
    out: list[WeightChange] = []
    names = list(dict.fromkeys([*before, *after]))
    for name in (progress or iter)(names):
        if name not in after:
            out.append(WeightChange(name, ONLY_BEFORE, tuple(before[name]().shape)))
            continue
        if name not in before:
            out.append(WeightChange(name, ONLY_AFTER, tuple(after[name]().shape)))
            continue
        change = compare(name, before[name](), after[name]())
        if change is not None:
            out.append(change)
    return out


def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> WeightChange | None:
    """The change from ``a`` to ``b``, or None when they are equal (shape, dtype and every value)."""
    a, b = a.detach(), b.detach()
    if a.device.type == "meta" or b.device.type == "meta":
        return None if (a.shape, a.dtype) == (b.shape, b.dtype) else WeightChange(name, CHANGED, tuple(b.shape))
    if a.shape != b.shape:
        return WeightChange(name, CHANGED, tuple(b.shape), rank=None)
    if a.dtype == b.dtype and torch.equal(a, b):
        return None
    if not (a.is_floating_point() and b.is_floating_point()):
        return WeightChange(name, CHANGED, tuple(b.shape))
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    base = a.to(dt)
    d = b.to(dt) - base
    if not d.any():  # a dtype change with equal values
        return None
    norm = base.norm().item()
    rel = d.norm().item() / norm if norm else math.inf
    rank, capped = (_rank(d, b) if d.dim() == 2 else (None, False))
    return WeightChange(name, CHANGED, tuple(b.shape), rel, d.abs().max().item(), rank, capped)


def _rank(d: torch.Tensor, after: torch.Tensor) -> tuple[int, bool]:
    m, n = d.shape
    eps = torch.finfo(after.dtype).eps if after.is_floating_point() else torch.finfo(torch.float32).eps
    tol = 2 * eps * after.abs().max().item() * (math.sqrt(m) + math.sqrt(n))
    if min(m, n) <= SKETCH:
        return int((torch.linalg.svdvals(d) > tol).sum()), False
    g = torch.Generator(device=d.device).manual_seed(0)
    sketch = d @ torch.randn(n, SKETCH, generator=g, dtype=d.dtype, device=d.device) / math.sqrt(SKETCH)
    r = int((torch.linalg.svdvals(sketch) > tol).sum())
    return r, r >= SKETCH


def of_model(model: torch.nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """A model's parameters and persistent buffers (its state dict), as getters; an opaque base inside a site
    (``<path>.base_layer.weight``) under the keys it had before it became one (``<path>.weight``)."""
    bare = quant.bare_keys(model)
    return {bare(k): (lambda v=v: v) for k, v in model.state_dict().items()}


def of_checkpoint(directory: str | os.PathLike) -> dict[str, Callable[[], torch.Tensor]]:
    """The tensors of a checkpoint directory's safetensors files (sharded or not), each read when asked for."""
    from safetensors import safe_open

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        raise DiffInputError(
            f"{directory} holds no .safetensors files; `surgery diff A B` compares two checkpoint directories "
            "written by save_pretrained (safetensors, sharded or not)."
        )
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                names = list(handle.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise DiffInputError(f"{f}: safetensors cannot read it ({e}).") from None
        for name in names:
            out[name] = lambda f=f, name=name: _read(f, name)
    return out


def _read(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)

