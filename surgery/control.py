"""Switching adapters off and setting their strength at run time, without retracing.

``disabled`` puts the original modules (graph scope: a graph without the sites' nodes) in for the
length of a ``with`` block, so no adapter op runs and the outputs are the base model's, bit for bit.
``set_scale`` / ``scaled`` write the strength c into each site's ``surgery_scale`` buffer: a
variant that is ``steered`` (AntiPaSTO) reads it itself; for the others the first call adds a blend
``y + c (out - y)`` after each site (exactly ``y`` at 0 and ``out`` at 1). c is a tensor, so changing
it retraces nothing and recompiles nothing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError, MetaDeviceError
from .ops import all_sites, require_unsharded
from .scope import DISABLED, Scope, scope_of, unwrap
from .site import SiteAPI

NAMES = ("default",)  # one adapter per site for now: the name every rewrite gives


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with surgery.disabled(model):`` the model computes its original outputs (no adapter op runs);
    everything is put back on exit, also on an exception. Nested blocks are allowed."""
    inner = unwrap(model)
    if isinstance(inner, nn.Module) and inner.__dict__.get(DISABLED):
        yield model
        return
    scope = scope_of(inner)
    require_unsharded(scope, all_sites(scope), "disable")
    with scope.bypass():
        inner.__dict__[DISABLED] = True
        try:
            yield model
        finally:
            del inner.__dict__[DISABLED]


def set_scale(model: nn.Module, c: float, name: str | None = None) -> None:
    """Run the adapters at strength ``c`` from now on: 0 is the base model, 1 the adapter as trained."""
    scope = scope_of(model)
    sites = _named(scope, name)
    value = _strength(c)
    meta = [p for p, s in sites.items() if s.weight.device.type == "meta"]
    if meta:
        raise MetaDeviceError(
            f"cannot set the strength of {meta[0]}: it is on the meta device, whose buffers are not kept by "
            "model.to_empty(). Materialise the model (to_empty, then load its weights) and set it afterwards."
        )
    _gate(scope, sites)
    _write(sites, {p: value for p in sites})


@contextmanager
def scaled(model: nn.Module, c: float, name: str | None = None) -> Iterator[nn.Module]:
    """``with surgery.scaled(model, c):`` the adapters run at strength ``c``; the old strengths come back on exit."""
    scope = scope_of(model)
    sites = _named(scope, name)
    before = {p: s.scale for p, s in sites.items()}
    set_scale(model, c, name)
    try:
        yield model
    finally:
        _write(sites, before)


def _write(sites: dict[str, SiteAPI], values: dict[str, float]) -> None:
    with torch.no_grad():
        for p, site in sites.items():
            site.record.scale = values[p]
            site.scale_buffer.fill_(values[p])


def _named(scope: Scope, name: str | None) -> dict[str, SiteAPI]:
    sites = all_sites(scope)
    if name is not None and name not in NAMES:
        raise ConfigError(
            f"this model has no adapter named {name!r}; its adapters are {list(NAMES)}. "
            "Pass one of those, or name=None for all of them."
        )
    return sites


def _strength(c: float) -> float:
    if isinstance(c, torch.Tensor) and c.numel() == 1:
        c = c.item()
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        raise ConfigError(f"the adapter strength must be a finite number, got c={c!r}. Use e.g. 0.5, 1.0 or -1.0.")
    return float(c)


def _gate(scope: Scope, sites: dict[str, SiteAPI]) -> None:
    todo = [p for p, s in sites.items() if not s.variant.steered and not s.record.gated]
    if todo:
        scope.gate(todo)
        # torch.compile does not guard on a submodule's generated code, so a model compiled before the blend
        # went in would go on without it: drop compiled code once (the next call recompiles, then never again)
        torch._dynamo.reset()
