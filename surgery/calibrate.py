"""Calibration for data-driven variants (EVA): stream batches, hand each site its input rows.

The scope's temporary taps see every matched site's input (forward pre-hooks on the leaves in module
scope, tap nodes in a temporary copy of the graph in graph scope), drop padding positions when the batch
carries an ``attention_mask``, and pass the rows to ``variant.observe`` batch by batch, so memory
stays bounded by one batch. The taps are always removed, even on error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

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


def collect(scope: Scope, variant: Variant, paths: list[str], calibration: Iterable[Any] | None) -> dict[str, Any]:
    """Run the batches with the scope's taps on ``paths``; return each path's ``observe`` state."""
    model = scope.model
    if calibration is None:
        raise CalibrationError(
            f"{variant.name} initialises from activations and needs calibration data: "
            f"surgery.rewrite(model, {variant.short()}, where, calibration=batches), where batches is an "
            "iterable of model inputs (dicts such as a tokenizer's output, tuples or tensors)."
        )
    states: dict[str, Any] = {p: None for p in paths}
    mask: list[torch.Tensor | None] = [None]

    def emit(path: str, x: torch.Tensor) -> None:
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
        states[path] = variant.observe(states[path], rows.float())

    modes = [(m, m.training) for m in model.modules()]  # per module: model.train(was) would flatten mixed modes
    for m, _ in modes:  # the flag itself: a GraphModule from torch.export refuses .eval()
        m.training = False
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
                n += 1
    finally:
        for m, mode in modes:
            m.training = mode
    if n == 0:
        raise CalibrationError(f"{variant.name}: the calibration iterable yielded no batches; pass at least one batch.")
    empty = [p for p, s in states.items() if s is None]
    if empty:
        raise CalibrationError(
            f"{variant.name}: no calibration tokens reached {empty[0]}"
            f"{f' (and {len(empty) - 1} more sites)' if len(empty) > 1 else ''}; check that the batches run "
            "through that part of the model and that the attention mask is not all zeros."
        )
    return states
