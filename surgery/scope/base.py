"""The Scope protocol: what the verbs in ``surgery/ops.py`` need from a model, in either scope.

- ``ModuleScope`` (``module.py``): any ``nn.Module``; each site is a ``Site`` swapped in for its leaf.
- ``GraphScope`` (``graph.py``): a GraphModule from ``surgery.trace``; each site is a region of its graph.

``scope_of`` is the one place that decides which one a model gets. Everything a verb does beyond
"where does a site go and how does it come out again" (resolving `where`, init, identity probe,
flags, rollback, fold checks, files) is written once, in ``surgery/ops.py``, over this protocol.

A rewrite is a transaction: ``begin()`` returns a ``Txn``; ``Txn.stage`` builds one site without
touching the model and returns a ``Staged`` (its site and a probe of its adapted output); ``commit``
puts every staged site in at once, or raises with the model unchanged. ``remove`` takes sites out
again, putting back the original modules or, for ``merge``, modules holding the folded weights.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import quant
from ..offload import Spill, Spilled
from ..site import Adapter, SiteAPI, SiteRecord, base_output, linear_weight
from ..splice import Part
from ..variant import SiteInit

Emit = Callable[[str, torch.Tensor], None]  # (site path, that site's input) for calibration taps


@dataclass
class Base:
    """The unadapted linear map at one path, as a scope found it."""

    path: str
    layout: str  # storage layout: 'linear', 'conv1d', 'embedding' or 'conv'
    base_class: str
    module: nn.Module  # the module at ``path`` (under export: a container of its parameters); a site's original
    site: SiteAPI | None = None  # the site already at ``path``, whose adapters a new build keeps
    spec: Any = None  # the base op's other call arguments (surgery.site.op_spec)
    param: str = ""  # a parameter site's base: the Parameter's name on ``module``, its owner (surgery/param.py)
    experts: int = 0  # E for a 3D parameter (E, d_out, d_in), or (E, d_in, d_out) in layout 'conv1d'; else 0

    @property
    def weight(self) -> Any:  # the Parameter as stored (any dtype, possibly meta; packed integers when quantised)
        return self.module._parameters[self.param] if self.param else self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.param else getattr(self.module, "bias", None)

    @property
    def quant(self) -> str | None:
        """The bitsandbytes format of an opaque base ('nf4', 'fp4', 'int8'), None for a dense one."""
        return quant.kind(self.module)

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the layer computes in."""
        return quant.compute_dtype(self.module) if self.quant else self.weight.dtype

    def dense(self) -> torch.Tensor:
        """The weight in nn.Linear layout (a view of a dense one; dequantised now from an opaque one)."""
        return quant.dequantized(self.module) if self.quant else linear_weight(self.weight, self.layout)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The unadapted layer's output on ``x`` (an opaque base runs its own forward, never repacking)."""
        if not self.quant:
            return base_output(x, self.weight, self.bias, self.layout, self.spec)
        # in eval mode, as the probe runs the site: an 8-bit layer computes otherwise in training mode
        was, mode = quant.hold_packing(self.module), self.module.training
        try:
            return self.module.eval()(x)
        finally:
            self.module.train(mode)
            quant.release_packing(self.module, was)


@dataclass
class Staged:
    """One built site, not yet in the model."""

    site: SiteAPI
    # (N, d_in) -> (adapted output in eval mode, the base output computed on the way, or None where the site
    # never computes it from the original weight): the probe then reads each weight once instead of twice
    probe: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    # the replacement base weight (storage layout) if the variant asked, out of memory until commit: a call stages
    # every site before it commits any, and would otherwise hold all of them at once
    new_weight: Spilled | None = None


def unmodified(y: torch.Tensor | None) -> torch.Tensor | None:
    """``y`` if nothing wrote to it in place since it was computed (a forward's ``y.add_(...)`` would make it
    equal the adapted output and hide a broken init), else None."""
    return y if y is not None and y._version == 0 else None


def record(base: Base, ctx: SiteInit, parts: list[Part], **nodes: str) -> SiteRecord:
    """The record of a site built from ``parts`` at ``base``: adapters already there keep theirs (strength,
    order); a new one is added last."""
    old = base.site.record.adapters if base.site is not None else {}
    adapters = {p.name: old[p.name] if p.name in old else Adapter(p.variant) for p in parts}
    return SiteRecord(
        path=base.path, layout=base.layout, base_class=base.base_class, d_in=ctx.d_in, d_out=ctx.d_out,
        original=base.site.record.original if base.site is not None else base.module,
        adapters=adapters, active=tuple(p.name for p in parts if p.active),
        replaced=ctx.new_weight is not None, gated=sum(p.active for p in parts) > 1, spec=base.spec, param=base.param,
        experts=base.experts, quant=base.quant,
        packing=base.site.record.packing if base.site is not None else None, **nodes,
    )


@dataclass
class Unfrozen:
    """A whole module that trains with adapter ``name`` and travels with it (``surgery.unfreeze``)."""

    path: str
    name: str
    # the values to give back on restore: module scope keeps a frozen deep copy (the live module trains in place,
    # so an optimizer built before holds its Parameters); graph scope keeps the module object that was at the
    # path, shared with the eager model, and trains a copy, since graph-scope calls never write the eager model's
    original: nn.Module


class Txn:
    """The sites of one call, staged before any of them goes in."""

    def __init__(self):
        self.staged: dict[str, Staged] = {}
        self.previous: dict[str, Any] = {}  # what was at each path before commit (scope-specific)
        self.spill = Spill()  # the staged replacement weights

    def stage(self, base: Base, parts: list[Part], ctx: SiteInit) -> Staged:
        raise NotImplementedError


class Scope:
    """A model seen as a set of places where a linear map can be adapted."""

    noun = "model"  # how messages name the object: "model" or "GraphModule"
    shares_weights = False  # graph scope: the model's Parameters are the eager model's too, never written

    def __init__(self, model: nn.Module):
        self.model = model

    # ----- what is there -----
    def candidates(self) -> dict[str, nn.Module]:
        """path -> module for `where` matching, in model order (sites' own internals excluded)."""
        raise NotImplementedError

    def parameters(self) -> dict[str, nn.Parameter]:
        """path -> Parameter of the candidates' own Parameters, for `where` (a parameter site adapts one in weight
        space, surgery/param.py); those that are sites already are in ``candidates``."""
        return {}

    def adaptable(self) -> set[str]:
        """Paths that can become sites now (modules and Parameters)."""
        raise NotImplementedError

    def sites(self) -> dict[str, SiteAPI]:
        raise NotImplementedError

    def base(self, path: str) -> Base:
        raise NotImplementedError

    def aliases(self, path: str) -> list[str]:
        """Other paths at which the module at ``path`` is registered too."""
        return []

    def class_name(self, path: str) -> str:
        """The class name of the module the user had at ``path``."""
        raise NotImplementedError

    def model_class(self) -> type:
        """The class of the model the user adapted (for a trace: of the model that was traced)."""
        return type(self.model)

    # ----- changing it -----
    def begin(self, rebuild: list[str] = ()) -> Txn:
        """A transaction; ``rebuild``: paths that are sites already and will be built again (more adapters,
        fewer, or another active set)."""
        raise NotImplementedError

    def commit(self, txn: Txn) -> None:
        """Put every staged site in; on failure, leave the model as it was and raise."""
        raise NotImplementedError

    def uncommit(self, txn: Txn) -> None:
        """Undo a successful ``commit``: every path as it was before (no site, or the site a rebuild replaced)."""
        raise NotImplementedError

    def remove(self, paths: list[str], folded: Callable[[str], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
               untie: frozenset[str] = frozenset(), dequantize: bool = False) -> dict[str, float]:
        """Take sites out: the original modules back, or modules holding W', b' (nn.Linear layout), which
        ``folded(path)`` computes as each site is written, so that one W' at a time is alive.

        A path in ``untie`` gets its folded weight as a new Parameter (its old one is shared with another module).
        An opaque base gets W' re-quantised in its own format, or a float nn.Linear with ``dequantize``; returns
        the relative error of each re-quantised weight (``quant.merged``) by path.
        """
        raise NotImplementedError

    def gate(self, paths: list[str]) -> None:
        """Add the runtime-strength blend after each site's adapted output (``splice.add_gate``)."""
        raise NotImplementedError

    def bypass(self) -> AbstractContextManager:
        """While open, the model computes its original function: no site's op runs, original weights."""
        raise NotImplementedError

    def taps(self, paths: list[str], emit: Emit) -> AbstractContextManager:
        """While open, every forward hands each path's input to ``emit``."""
        raise NotImplementedError

    # ----- whole modules that train with an adapter (surgery.unfreeze) -----
    def put(self, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, name, module)

    def hold(self, path: str, name: str) -> Unfrozen:
        """Make the module at ``path`` the one that trains, keeping what ``release`` gives back."""
        live = self.model.get_submodule(path)
        original = copy.deepcopy(live)
        if self.shares_weights:
            self.put(path, original)  # the copy trains; the shared module is what restore puts back
            original, live = live, original
        for p in original.parameters():
            p.requires_grad_(False)
        return Unfrozen(path, name, original)

    def release(self, rec: Unfrozen, keep: bool) -> None:
        """Give back the original values at ``rec.path`` (``keep``: leave the trained ones, as plain weights)."""
        if keep:
            return
        if self.shares_weights:
            self.put(rec.path, rec.original)
            return
        live = self.model.get_submodule(rec.path).state_dict(keep_vars=True)
        with torch.no_grad():
            for k, t in rec.original.state_dict(keep_vars=True).items():
                live[k].copy_(t)

    @contextmanager
    def originals_in(self, records: list[Unfrozen]) -> Iterator[None]:
        """While open, each unfrozen path holds its original values (``surgery.disabled``)."""
        swapped = []
        try:
            for rec in records:
                swapped.append((rec.path, self.model.get_submodule(rec.path)))
                self.put(rec.path, rec.original)
            yield
        finally:
            for path, live in swapped:
                self.put(path, live)

    # ----- bookkeeping kept with the model while it has sites -----
    def get_flags(self) -> dict[str, bool] | None:
        raise NotImplementedError

    def set_flags(self, flags: dict[str, bool] | None) -> None:
        raise NotImplementedError

    def get_unfrozen(self) -> dict[str, Unfrozen]:
        """path -> Unfrozen, in the order they were unfrozen (a copy: change it with ``set_unfrozen``)."""
        raise NotImplementedError

    def set_unfrozen(self, unfrozen: dict[str, Unfrozen]) -> None:
        raise NotImplementedError
