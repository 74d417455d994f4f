"""Named adapters and what runs at run time: switching adapters on and off, their strength, deleting and
combining them, without retracing anything the user did not ask to change.

- ``disabled`` puts the original modules (graph scope: a graph without the sites' nodes) in for the
  length of a ``with`` block, so no adapter op runs and the outputs are the base model's, bit for bit.
- ``set_scale`` / ``scaled`` write the strength c into each adapter's ``surgery_scale`` buffer: a
  variant that is ``steered`` (AntiPaSTO) reads it itself; for the others a site running one adapter
  gets a blend ``y + c (out - y)`` on the first call (exactly ``y`` at 0 and ``out`` at 1), and a site
  running several blends each one already. c is a tensor, so changing it recompiles nothing.
- ``disabled`` runs the original values of modules unfrozen with ``surgery.unfreeze`` too, and ``delete`` gives
  them back for good.
- ``activate``, ``delete`` and ``combine`` change which adapters a site holds or runs: the sites concerned
  are built again from the same tensor objects, so an optimizer holding them trains on.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import ConfigError, MetaDeviceError, NonFiniteError
from .ops import all_sites, call_arg, check_name, drop, install, kept_parts, rebuild, release, require_unsharded
from .scope import DISABLED, Scope, scope_of, unwrap
from .site import AdapterView, SiteAPI
from .variant import variant_from_config


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
    with scope.bypass(), scope.originals_in(list(scope.get_unfrozen().values())):
        inner.__dict__[DISABLED] = True
        try:
            yield model
        finally:
            del inner.__dict__[DISABLED]


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapter names, in the order they were added."""
    return _names(scope_of(model))


def _names(scope: Scope) -> list[str]:
    first: dict[str, int] = {}
    for site in scope.sites().values():
        for n, a in site.record.adapters.items():
            first[n] = min(first.get(n, a.order), a.order)
    return sorted(first, key=first.__getitem__)


def _require_names(scope: Scope, names, verb: str) -> None:
    have = _names(scope)
    for n in names:
        if n not in have:
            raise ConfigError(
                f"cannot {verb} {n!r}: this {scope.noun} has no adapter named {n!r}; its adapters are {have}. "
                "Pass one of those (surgery.adapter_names lists them)."
            )


def set_scale(model: nn.Module, c: float, name: str | None = None) -> None:
    """Run the adapters (or only adapter ``name``) at strength ``c`` from now on: 0 is the base model, 1 the
    adapter as trained."""
    scope = scope_of(model)
    views = _views(scope, name)
    value = _strength(c)
    meta = [v.path for v in views if v.base_weight.device.type == "meta"]
    if meta:
        raise MetaDeviceError(
            f"cannot set the strength of {meta[0]}: it is on the meta device, whose buffers are not kept by "
            "model.to_empty(). Materialise the model (to_empty, then load its weights) and set it afterwards."
        )
    _gate(scope, views)
    _write(views, [value] * len(views))


@contextmanager
def scaled(model: nn.Module, c: float, name: str | None = None) -> Iterator[nn.Module]:
    """``with surgery.scaled(model, c):`` the adapters (or adapter ``name``) run at strength ``c``; the old
    strengths come back on exit."""
    scope = scope_of(model)
    views = _views(scope, name)
    before = [v.scale for v in views]
    set_scale(model, c, name)
    try:
        yield model
    finally:
        _write(views, before)


def _write(views: list[AdapterView], values: list[float]) -> None:
    with torch.no_grad():
        for v, value in zip(views, values):
            v.record.adapters[v.name].scale = value
            v.scale_buffer.fill_(value)


def _views(scope: Scope, name: str | None) -> list[AdapterView]:
    sites = all_sites(scope)
    if name is not None:
        _require_names(scope, [name], "set the strength of")
    return [s.adapter(n) for s in sites.values() for n in s.names if name is None or n == name]


def _strength(c: float) -> float:
    if isinstance(c, torch.Tensor) and c.numel() == 1:
        c = c.item()
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        raise ConfigError(f"the adapter strength must be a finite number, got c={c!r}. Use e.g. 0.5, 1.0 or -1.0.")
    return float(c)


def _gate(scope: Scope, views: list[AdapterView]) -> None:
    todo = sorted({v.path for v in views if not v.record.gated and v.record.active == (v.name,)
                   and not v.variant.steered})
    if todo:
        scope.gate(todo)
        # torch.compile does not guard on a submodule's generated code, so a model compiled before the blend
        # went in would go on without it: drop compiled code once (the next call recompiles, then never again)
        torch._dynamo.reset()


def activate(model: nn.Module, *names: str) -> None:
    """Run exactly the adapters ``names`` from now on (at each site, those of them it holds; several at one
    site add up: ``y + sum_i (out_i - y)``). Their tensors train; the others' are frozen and kept."""
    scope = scope_of(model)
    sites = all_sites(scope)
    require_unsharded(scope, sites, "activate adapters of")
    if not names:
        raise ConfigError(
            "surgery.activate needs at least one adapter name; for the base model use `with surgery.disabled(model):`."
        )
    _require_names(scope, names, "activate")
    changes = {}
    for path, site in sites.items():
        active = tuple(n for n in site.names if n in names)
        if active == site.active:
            continue
        if site.replaced_base and not active:
            raise ConfigError(
                f"cannot switch off {site.names[0]!r} at {path}: {site.variant.short()} replaced the base weight "
                "there by its residual, so without it the layer would compute the residual alone. Keep it active, "
                f"or use `with surgery.disabled({call_arg(scope)}):` (which puts the original weight back) for the base."
            )
        parts = kept_parts(site)
        for p in parts:
            p.active = p.name in active
        changes[path] = parts
    if changes:
        rebuild(scope, changes)


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; the other adapters stay as they were (tensors, strengths, which run).
    A site left without adapters gets its original module back."""
    scope = scope_of(model)
    sites = all_sites(scope)
    require_unsharded(scope, sites, "delete an adapter of")
    _require_names(scope, [name], "delete")
    changes, gone = {}, []
    for path, site in sites.items():
        if name not in site.names:
            continue
        if len(site.names) == 1:
            gone.append(path)
        else:
            changes[path] = [p for p in kept_parts(site) if p.name != name]
    if changes:
        rebuild(scope, changes)
    if gone:
        drop(scope, gone)
    release(scope, keep=False, names={name})  # the modules it trained whole go back to their original values


def combine(model: nn.Module, weights: dict[str, float], name: str, how: str = "linear", r: int | None = None) -> None:
    """A new adapter ``name`` (a LoRA, active) whose weight change is ``sum_i w_i (W'_i - W)`` over the given
    adapters, each as trained (strength 1) - PEFT's ``add_weighted_adapter``.

    ``how="linear"``: the sum exactly (plain LoRAs concatenate, rank the sum of theirs; any other variant's
    change is factored by an SVD keeping every direction above rounding). ``how="svd"``: the best rank-``r``
    approximation of the sum (default r: the largest rank among the sources).
    """
    scope = scope_of(model)
    sites = all_sites(scope)
    require_unsharded(scope, sites, "combine adapters of")
    check_name(name)
    if name in _names(scope):
        raise ConfigError(f"cannot combine into {name!r}: an adapter of that name exists. Pick a new name.")
    if how not in ("linear", "svd"):
        raise ConfigError(f"combine: how must be 'linear' or 'svd', got how={how!r}.")
    if not isinstance(weights, dict) or not weights:
        raise ConfigError("combine: weights must be a non-empty dict of adapter name -> weight, e.g. {'a': 0.7, 'b': 0.3}.")
    _require_names(scope, list(weights), "combine")
    for n, w in weights.items():
        _strength(w)
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ConfigError(f"combine: r must be a positive integer, got r={r!r}.")
    plan, tensors = {}, {}
    for path, site in sites.items():
        sources = [(site.adapter(n), float(w)) for n, w in weights.items() if n in site.names]
        if not sources:
            continue
        A, B = _combined(path, sources, how, r)
        dtype = next(t.dtype for t in sources[0][0].adapter_tensors().values() if t.is_floating_point())
        lora = variant_from_config("LoRA", {"r": A.shape[0], "alpha": float(A.shape[0])})
        if lora.adapter_dtype(site.base_dtype) != dtype:  # the sources asked for another dtype: so does the sum
            lora = variant_from_config("LoRA", {**lora.to_config(), "dtype": str(dtype).removeprefix("torch.")})
        plan[path] = {name: lora}
        tensors[path] = {"lora_A": A, "lora_B": B}

    def fill(path: str, view: SiteAPI) -> None:
        with torch.no_grad():
            for n, t in view.adapter_tensors().items():
                t.copy_(tensors[path][n])

    install(scope, plan, loading=True, fill=fill)


def _combined(path: str, sources: list[tuple[AdapterView, float]], how: str, r: int | None):
    """(A, B) of a LoRA with scale 1 whose B A is the weighted sum of the sources' weight changes."""
    ranks = [getattr(v.variant, "r", 0) for v, _ in sources]
    if how == "linear" and all(type(v.variant).__name__ == "LoRA" for v, _ in sources):
        A = torch.cat([v.adapter_tensors()["lora_A"].detach().double() for v, _ in sources])
        B = torch.cat([v.adapter_tensors()["lora_B"].detach().double() * (w * v.variant.scale) for v, w in sources], 1)
        return A, B
    delta = None
    W0, b0 = sources[0][0].fold(torch.float64, at=0.0)  # the site's base: the same for every source
    for v, w in sources:
        W1, b1 = v.fold(torch.float64, at=1.0)
        if b0 is not None and not torch.equal(b0, b1):
            raise ConfigError(
                f"cannot combine {v.name!r} at {path}: {v.variant.short()} changes the bias, which the combined "
                "adapter (a LoRA) cannot express."
            )
        d = w * (W1 - W0)
        delta = d if delta is None else delta + d
    if not torch.isfinite(delta).all():
        raise NonFiniteError(f"cannot combine at {path}: the adapters' weight changes hold NaN or Inf.")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    if how == "svd":
        k = min(r or max(ranks) or 1, S.numel())
    else:
        tol = S.max() * max(delta.shape) * torch.finfo(torch.float32).eps if S.numel() else 0
        k = max(int((S > tol).sum()), 1)
    return Vh[:k], U[:, :k] * S[:k]
