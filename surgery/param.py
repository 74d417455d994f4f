"""Parameter sites: a Parameter that its module uses functionally (MoE experts stored as (E, d_out, d_in) and
read as ``F.linear(x, W[e])``, nn.MultiheadAttention's ``in_proj_weight``) adapted in weight space.

Experts whose module says ``is_transposed`` (transformers' ``use_experts_implementation(is_transposed=True)``:
GptOss, Aria) are stored (E, d_in, d_out) and read as ``x @ W[e]``: their site has GPT-2 Conv1D's layout
'conv1d', so every variant folds each expert's map W[e]^T in nn.Linear layout and W' is stored back transposed.

Every read of the Parameter gets ``W' = variant.fold(W)`` built from the adapter tensors, so gradients
reach them; a 3D parameter is E linear maps, each with its own adapter tensors (stacked along a first
dimension of size E) and its own fold. The site (``ParamSite``) is registered on the Parameter's owner
under the Parameter's own name, so its path is the Parameter's path and the engine sees it as any other
site, while the owner keeps the Parameter itself (its ``state_dict`` key does not change). The owner's
class gets a property of that name (as ``torch.nn.utils.parametrize`` does), so every read of the
attribute, by the owner's forward or by a parent that reads it directly, runs the fold. Within one call of
the owner, the fold runs once however often the forward reads the Parameter (an experts loop reads it per
expert).

Only what a fold can express works in weight space: a variant with modules of its own (dropout acts on x),
one that needs calibration inputs (EVA) or one that replaces the base weight (PiSSA) is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from . import quant
from .errors import ConfigError
from .site import Site, SiteAPI, fold_each, linear_weight, own_tensors, stored_weight
from .splice import blend, compute_dtype
from .variant import Variant

_FOLDED = "_surgery_folded"  # on an owner during its forward: name -> W', so the fold runs once per call
_ADAPTED: dict[type, type] = {}  # owner class -> its subclass with a property per adapted parameter name


def adaptable_parameter(p: nn.Parameter) -> bool:
    """A float matrix, or a stack of them (experts, d_out, d_in); not a packed 4-bit weight in float storage."""
    return p.dim() in (2, 3) and quant.stored_as_floats(p)


def layout_of_parameter(owner: nn.Module, p: torch.Tensor) -> str:
    """'conv1d' for a stack of experts its owner marks ``is_transposed`` (stored (E, d_in, d_out)), else 'linear'.
    As in PEFT 0.21 and transformers, the mark speaks of the 3D expert weights only: a 2D Parameter beside them
    (GptOss's per-expert biases, (E, d)) keeps the plain reading."""
    return "conv1d" if p.dim() == 3 and getattr(owner, "is_transposed", False) else "linear"


def parameters(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """The Parameters of ``modules`` (path -> module, "" the root) by path, except those that are sites."""
    out = {}
    for path, mod in modules.items():
        if isinstance(mod, (Site, ParamSite)):  # a site's own tensors
            continue
        for name, p in mod._parameters.items():
            if p is not None and not isinstance(mod._modules.get(name), ParamSite):
                out[f"{path}.{name}" if path else name] = p
    return out


def owns_sites(module: nn.Module) -> bool:
    return any(isinstance(m, ParamSite) for m in module._modules.values())


class ParamSite(nn.Module, SiteAPI):
    """Module scope: a Parameter adapted in weight space; ``self()`` is W' in the Parameter's layout."""

    bias = None  # a parameter site folds a weight only

    def __init__(self, record):
        super().__init__()
        self.__dict__["record"] = record

    def _owner(self) -> nn.Module:
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The owner's Parameter as it is now (model.to() or load_state_dict(assign=True) may replace it)."""
        return self.record.original._parameters[self.record.param]

    def forward(self) -> torch.Tensor:
        rec, W = self.record, self.weight
        out = None
        for name in rec.active:
            v, slot = rec.adapters[name].variant, self._slot(name)
            tensors = own_tensors(slot)
            c = slot.surgery_scale
            Wd = linear_weight(W.to(compute_dtype(next(iter(tensors.values())), W)), rec.layout)
            Wi = fold_each(v, Wd, None, tensors, self.info, c, rec.experts)[0]
            if (rec.gated or len(rec.active) > 1) and not v.steered:
                Wi = blend(Wd, Wi, c)  # the runtime strength c, in weight space: W + c (W' - W)
            out = Wi if out is None else out + (Wi - Wd)
        return W if out is None else stored_weight(out, rec.layout).to(W.dtype)

    def describe(self) -> str:
        experts = f" x {self.record.experts} experts" if self.record.experts else ""
        return f"{self.variant.short()}, in={self.d_in}, out={self.d_out}{experts}, base={self.base_class}"

    def extra_repr(self) -> str:
        return self.describe()


def _read(owner: nn.Module, name: str) -> torch.Tensor:
    site = owner._modules.get(name)
    if not isinstance(site, ParamSite):  # an owner of this class whose `name` is not adapted
        return nn.Module.__getattr__(owner, name)
    cache = owner.__dict__.get(_FOLDED)
    if cache is None:
        return site()
    if name not in cache:
        cache[name] = site()
    return cache[name]


def _open(owner, args):
    owner.__dict__[_FOLDED] = {}


def _close(owner, args, out):
    owner.__dict__.pop(_FOLDED, None)


def _reads_fold(cls: type, name: str) -> None:
    if not isinstance(cls.__dict__.get(name), property):
        setattr(cls, name, property(lambda m, name=name: _read(m, name)))


def _rebuild(cls: type) -> nn.Module:
    sub = _adapted(cls)
    return sub.__new__(sub)


def _reduce_ex(self, protocol):
    # the subclass is made at run time, so pickle cannot name it: it names the owner's own class and remakes it
    return _rebuild, (type(self).__mro__[1],), self.__getstate__()


def _setstate(self, state) -> None:
    type(self).__mro__[1].__setstate__(self, state)
    for name, m in self._modules.items():  # a fresh process has a fresh subclass, without the properties yet
        if isinstance(m, ParamSite):
            _reads_fold(type(self), name)


def _adapted(cls: type) -> type:
    """The subclass of ``cls`` that an owner of parameter sites takes: one per class (not per instance), so a deep
    copy shares it safely; a property per adapted name reads the fold, or the attribute where it is not adapted."""
    sub = _ADAPTED.get(cls)
    if sub is None:
        sub = _ADAPTED[cls] = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__reduce_ex__": _reduce_ex,
            "__setstate__": _setstate})
    return sub


def attach(site: ParamSite) -> None:
    """Put ``site`` in: reads of the Parameter on its owner get the fold from now on."""
    owner, name = site.record.original, site.record.param
    if type(owner) not in _ADAPTED.values():
        owner.__class__ = _adapted(type(owner))
        owner.register_forward_pre_hook(_open)
        owner.register_forward_hook(_close, always_call=True)
    _reads_fold(type(owner), name)
    owner._modules[name] = site  # beside the Parameter of the same name, which nn.Module.__setattr__ would drop


def detach(site: ParamSite) -> None:
    """Take ``site`` out: the owner reads its Parameter again (and is of its own class once it has no site)."""
    owner, name = site.record.original, site.record.param
    del owner._modules[name]
    if owns_sites(owner):
        return
    owner.__class__ = type(owner).__mro__[1]
    for hooks in (owner._forward_pre_hooks, owner._forward_hooks):
        for k in [k for k, f in hooks.items() if f in (_open, _close)]:
            del hooks[k]
            owner._forward_hooks_always_called.pop(k, None)


def require_weight_space(path: str, variant: Variant, noun: str) -> None:
    """Refuse a variant whose adapter a fold of the weight cannot express, before anything changes."""
    if variant.needs_calibration:
        why = ("it is initialised from the inputs of a layer, and a parameter site sees no input, only the weight its "
               "module reads")
        fix = f"use LoRA there (EVA is a LoRA with a data-driven init), or adapt a layer with {variant.name}"
    elif variant.modules():
        why = (f"its forward runs {', '.join(variant.modules())} on the layer's input, and a parameter site computes "
               "no input, only the weight W' = fold(W) its module reads (PEFT refuses lora_dropout there too)")
        fix = f"use {variant.name} without it (dropout=0.0)"
    else:
        return
    raise ConfigError(f"{variant.short()} cannot adapt the parameter {path}: {why}. Fix: {fix}; the {noun} was left "
                      "unchanged.")


def replacing(path: str, variant: Variant, noun: str) -> ConfigError:
    return ConfigError(
        f"{variant.short()} cannot adapt the parameter {path}: its init replaces the base weight by a residual, "
        f"which a parameter site (a fold of the untouched Parameter) does not do. Use LoRA there (PiSSA's init "
        f"is a LoRA whose base changed), or adapt a layer; the {noun} was left unchanged."
    )
