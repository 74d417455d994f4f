"""Calibration for data-driven variants (EVA): stream batches, hand each site its input rows.

The scope's temporary taps see every matched site's input (forward pre-hooks on the leaves in module
scope, tap nodes in a temporary copy of the graph in graph scope), drop padding positions when the batch
carries an ``attention_mask``, and pass the rows to ``variant.observe`` batch by batch, so memory
stays bounded by one batch. The taps are always removed, even on error.

Sites that read one input (q, k and v of an attention; gate and up of an MLP) share one state: ``observe``
runs once for them, and ``configure`` and ``init`` get the same state object at each of their paths. The
sharing is proven batch by batch, never assumed: two taps share only when they hand over the same live
tensor, or a view of the same memory with the same shape and strides, not written in place in between
(its version counter unchanged). Within a batch, an input joins the shared state only once every member has handed it
over; a group whose members disagree in some batch splits at its end, each part going on from a copy of
what all of them saw, plus what it saw itself. So a shared state always holds the same sums as the state
each member would have built alone.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import quant
from .errors import CalibrationError, SurgeryError
from .variant import Variant

if TYPE_CHECKING:  # only for annotations: scopes do not import this module
    from .scope import Scope


def _call(model: nn.Module, batch: Any):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise CalibrationError(
        f"calibration batches must be dicts of tensors, tuples of tensors or tensors; got {type(batch).__name__}. "
        "Example: calibration=[tokenizer(texts, return_tensors='pt', padding=True)]."
    )


class _Input:
    """One tensor a tap handed over in this batch, and which members of its group have handed it over."""

    def __init__(self, x: torch.Tensor, rows: torch.Tensor, who: str, group: "_Group"):
        self.ref = weakref.ref(x)  # only while x lives can its address not be reused by another tensor
        self.key = _key(x)
        self.rows: torch.Tensor | None = rows  # kept until every member has handed x over
        self.who = {who}
        self.group = group

    def is_(self, x: torch.Tensor) -> bool:
        t = self.ref()
        return t is not None and self.key is not None and _key(t) == self.key == _key(x)


def _key(x: torch.Tensor):
    """What identifies x's values while x lives: its memory, shape, strides and in-place version."""
    if type(x) is not torch.Tensor or x.is_inference() or x.layout != torch.strided:  # no plain memory or no
        return None  # version counter: never shared
    return x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version


class _Group:
    """Sites that were handed the same inputs in every batch so far, and their one state."""

    def __init__(self, path: str, born: int):
        self.members = [path]
        self.state: Any = None
        self.born = born  # the batch it formed in: only then may a site join it
        self.inputs = 0  # inputs seen in this batch
        self.pending: list[_Input] = []  # inputs of this batch that some member has not handed over yet


def collect(scope: Scope, variant: Variant, paths: list[str], calibration: Iterable[Any] | None) -> dict[str, Any]:
    """Run the batches with the scope's taps on ``paths``; return each path's ``observe`` state (one object
    for the paths of a shared group)."""
    model = scope.model
    if calibration is None:
        raise CalibrationError(
            f"{variant.name} initialises from activations and needs calibration data: "
            f"surgery.rewrite(model, {variant.short()}, where, calibration=batches), where batches is an "
            "iterable of model inputs (dicts such as a tokenizer's output, tuples or tensors)."
        )
    groups: dict[str, _Group] = {}
    joinable: dict[tuple, _Input] = {}  # by key, this batch's inputs of groups formed in this batch
    mask: list[torch.Tensor | None] = [None]

    def observe(group: _Group, rows: torch.Tensor) -> None:
        group.state = variant.observe(group.state, rows)

    def rows_of(path: str, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        m = mask[0]
        if m is not None and x.dim() == m.dim() + 1 and x.shape[:-1] == m.shape:
            rows = x[m]
        else:
            rows = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(rows).all():
            raise CalibrationError(
                f"{variant.name}: the calibration batches give NaN or Inf inputs at {path} (batch {n + 1}); "
                "check the batches (and the base weights before that layer)."
            )
        return rows.float()

    def emit(path: str, x: torch.Tensor) -> None:
        group = groups.get(path)
        if group is None:  # a site's first input: it may join a group formed this batch that has seen x alone
            seen = joinable.get(_key(x))
            if seen is not None and seen.group.inputs == 1 and seen.is_(x):
                seen.group.members.append(path)
                seen.who.add(path)
                groups[path] = seen.group
                return
            group = groups[path] = _Group(path, n)
        for seen in group.pending:
            if path not in seen.who and seen.is_(x):
                seen.who.add(path)
                if len(seen.who) == len(group.members):
                    observe(group, seen.rows)
                    group.pending.remove(seen)
                return
        seen = _Input(x, rows_of(path, x), path, group)
        group.inputs += 1
        if len(group.members) == 1:
            observe(group, seen.rows)
            seen.rows = None
        else:  # a copy: rows may be a view of x, which the model may write in place before the group settles
            seen.rows = seen.rows.clone()
            group.pending.append(seen)
        if group.born == n and seen.key is not None:
            joinable[seen.key] = seen

    def settle() -> None:
        """End of a batch: split each group whose members were not all handed the same inputs."""
        for group in {id(g): g for g in groups.values()}.values():
            group.inputs = 0
            if not group.pending:
                continue
            parts: dict[tuple[int, ...], list[str]] = {}
            for p in group.members:
                parts.setdefault(tuple(i for i, s in enumerate(group.pending) if p in s.who), []).append(p)
            pending, group.pending = group.pending, []
            split = [(group, list(parts.values())[0])]
            for members in list(parts.values())[1:]:  # copies first: observe may update the state in place
                part = _Group(members[0], group.born)
                part.state = copy.deepcopy(group.state)
                split.append((part, members))
            for (part, members), seen in zip(split, parts):
                part.members = members
                for p in members:
                    groups[p] = part
                for i in seen:
                    observe(part, pending[i].rows)
        joinable.clear()

    modes = [(m, m.training) for m in model.modules()]  # per module: model.train(was) would flatten mixed modes
    for m, _ in modes:  # the flag itself: a GraphModule from torch.export refuses .eval()
        m.training = False
    # an eval-mode forward without gradients is where bitsandbytes repacks a 4-bit layer, lossily, on a CPU with
    # AVX512-BF16: calibration must leave every layer as it found it, and a repacked base could not be adapted
    packing = [(m, quant.hold_packing(m)) for m in model.modules()]
    n = 0
    try:
        with torch.no_grad(), scope.taps(paths, emit):
            for batch in tqdm(calibration, desc=f"{variant.name} calibration", unit="batch", leave=False):
                am = batch.get("attention_mask") if isinstance(batch, dict) else None
                mask[0] = None if am is None else am.bool()
                try:
                    _call(model, batch)
                except SurgeryError:
                    raise
                except Exception as e:  # noqa: BLE001 - the model refused the batch: say which and why
                    raise CalibrationError(
                        f"{variant.name}: the model failed on calibration batch {n + 1} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}). Pass batches exactly "
                        "as the model takes them: dicts of keyword tensors (a tokenizer's output), tuples or tensors "
                        "of the right shape and dtype."
                    ) from e
                settle()
                n += 1
    finally:
        for m, mode in modes:
            m.training = mode
        for m, was in packing:
            quant.release_packing(m, was)
    if n == 0:
        raise CalibrationError(f"{variant.name}: the calibration iterable yielded no batches; pass at least one batch.")
    states = {p: groups[p].state if p in groups else None for p in paths}
    empty = [p for p, s in states.items() if s is None]
    if empty:
        raise CalibrationError(
            f"{variant.name}: no calibration tokens reached {empty[0]}"
            f"{f' (and {len(empty) - 1} more sites)' if len(empty) > 1 else ''}; check that the batches run "
            "through that part of the model and that the attention mask is not all zeros."
        )
    return states
