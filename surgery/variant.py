"""The Variant contract: what an adapter method must say, and nothing about where it goes.

``adapters/`` imports this module and ``surgery.errors`` only; the engine imports no variant.

A variant is a frozen dataclass of hyper-parameters plus three pieces of behaviour:

1. ``init(site)``: create its tensors from the base weight (a ``SiteInit``), returned as a dict
   ``name -> tensor``. Names in ``frozen`` become buffers, the rest trainable parameters.
   A variant that changes the base weight (PiSSA's residual) calls ``site.replace_weight(W)``;
   the engine applies it and keeps the original for ``restore``.
2. ``forward(x, y, weight, bias, t)``: the adapted output of the site, written as plain torch
   code. ``x`` is the site input, ``y`` the base output ``x W^T + b``, ``weight`` is W in
   nn.Linear layout (d_out, d_in) whatever the storage layout, ``bias`` is b or None, and ``t``
   gives the variant's tensors and modules by name (``t.lora_A``) and static facts about the site
   as ``t.site`` (path, d_in, d_out, layout, spec: fixed at trace time, so plain ``if`` works).
   ``t.base(x2)`` is the base layer on another input (an input-side variant writes ``t.base(R x)``
   rather than ``F.linear(R x, weight, bias)``, and so works on quantised bases, which run their own
   kernel). On a quantised (bitsandbytes) base, ``weight`` is dequantised when the forward reads it,
   at every step: only a variant that needs W itself in its forward (DoRA's norm) should read it. On an
   embedding (layout 'embedding') x holds token ids and W is the table transposed, (dim, num_embeddings);
   on a convolution ('conv') x is the image and W the kernel flattened to (out, in * prod(kernel)); only a
   variant that lists those layouts in ``layouts`` is ever given them. The engine traces this
   function with torch.fx and splices the resulting ops into the site's graph, so the same
   definition serves a single leaf and a whole-model graph. When the adapter dtype differs from
   the base dtype, the engine casts x, y, weight and bias in and the result back out.
3. ``fold(weight, bias, t)``: return the merged ``(W', b')`` in nn.Linear layout (``t`` as in forward). Every
   variant here is linear in x, so each folds exactly.

Rules for ``forward`` (it is traced with torch.fx, so it must be a static graph; the trace is shared by
every site of one rewrite with the same shape, layout, bias and tensor shapes, so a forward that branches
on ``t.site.path`` says what of the path it reads with ``trace_key``):

- no control flow on tensor values (``if t.lora_B.abs().sum() > 0`` cannot be traced); branch only
  on Python values: the variant's own fields and ``t.site`` (path, d_in, d_out, layout, spec);
- build constant tensors from an input (``x.new_ones(8)``, ``t.lora_A.new_zeros(...)``) so they
  follow its dtype and device; a factory call such as ``torch.ones(8)`` is traced as a constant,
  which the engine copies onto the site as a non-persistent buffer (float32, on the CPU);
- no ``len(tensor)`` or Python loops over a tensor (``for row in t.lora_B``);
- return one tensor of the shape and dtype of ``y``.
A forward that breaks a rule fails at rewrite with ``VariantContractError`` naming the variant and
the rule. ``fold`` runs eagerly on plain tensors (``t`` holds detached tensors and ``t.site``).

Optional: ``modules()`` (nn.Modules the forward calls, e.g. dropout), ``check(site)``
(validate against the site's shape before anything changes), and for data-driven variants
``needs_calibration``, ``observe(state, rows)`` and ``configure(states)``.

Registration: decorate the class with ``@register``; ``adapters/__init__.py`` imports every
module in that package, so a new variant touches its own file only. A second class under a name
that is already registered is an error.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Hashable

import torch
from torch import nn

from .errors import ConfigError, RegistrationError, UnknownVariantError, VariantContractError

REGISTRY: dict[str, type["Variant"]] = {}


def register(cls: type["Variant"]) -> type["Variant"]:
    """Class decorator: make a variant known to ``load`` and the CLI under its class name."""
    if not (isinstance(cls, type) and issubclass(cls, Variant)):
        raise RegistrationError(f"@register decorates Variant subclasses; got {cls!r}.")
    old = REGISTRY.get(cls.__name__)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):  # not a reload
        raise RegistrationError(
            f"a variant named {cls.__name__!r} is already registered (from {old.__module__}); adapter files "
            f"record variants by class name, so two would be ambiguous. Rename {cls.__module__}.{cls.__name__}."
        )
    REGISTRY[cls.__name__] = cls
    return cls


def variant_from_config(name: str, config: dict[str, Any]) -> "Variant":
    """Rebuild a variant from ``Variant.to_config()`` output (used by load)."""
    if name not in REGISTRY:
        raise UnknownVariantError(
            f"unknown variant {name!r}: this version of model-surgery knows {sorted(REGISTRY)}. "
            "Upgrade model-surgery, or check that the file was written by it."
        )
    return REGISTRY[name].from_config(config)


@dataclass(frozen=True)
class SiteInfo:
    """Static facts about a site, visible to a variant's forward and fold as ``t.site``."""

    path: str
    d_in: int
    d_out: int
    layout: str  # storage layout of the base weight: 'linear', 'conv1d', 'embedding' or 'conv' (see surgery.site)
    # the base op's call arguments beyond its weight: surgery.site.EmbeddingSpec (padding_idx, ...) or ConvSpec
    # (kernel_size, stride, padding, ...); None for the linear layouts
    spec: Any = None


@dataclass
class SiteInit:
    """What a variant sees when it creates its tensors at one site."""

    path: str
    d_in: int
    d_out: int
    weight: torch.Tensor | None  # (d_out, d_in), float32 or wider, detached; None if opaque or needs_weight is False
    bias: torch.Tensor | None  # (d_out,)
    dtype: torch.dtype  # adapter tensor dtype
    device: torch.device
    calibration: Any = None  # what ``observe`` accumulated for this site
    loading: bool = False  # tensors will be overwritten from a file right after init
    layout: str = "linear"  # as SiteInfo.layout: a variant listing other layouts in ``layouts`` may init by it
    spec: Any = None  # as SiteInfo.spec
    new_weight: torch.Tensor | None = field(default=None, repr=False)

    def replace_weight(self, w: torch.Tensor) -> None:
        """Ask the engine to overwrite the base weight (d_out, d_in) when the rewrite commits."""
        if not isinstance(w, torch.Tensor) or w.shape != (self.d_out, self.d_in):
            raise VariantContractError(
                f"replace_weight at {self.path} got {tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}; "
                f"the new base weight must be a tensor of shape {(self.d_out, self.d_in)} (d_out, d_in), in "
                "nn.Linear layout whatever the layer stores. This is a bug in the variant."
            )
        self.new_weight = w


@dataclass(frozen=True)
class Variant:
    """Base class of every adapter configuration. Subclasses are frozen dataclasses."""

    dtype: torch.dtype | None = field(default=None, kw_only=True)

    identity_tol: ClassVar[float | None] = 1e-6  # relative identity error promised at init; None: no promise
    frozen: ClassVar[tuple[str, ...]] = ()  # tensor names stored as (persistent) buffers
    # init reads the dense base weight (False: works on opaque layers, and SiteInit.weight is None)
    needs_weight: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    base_bound: ClassVar[bool] = False  # init computes tensors from the base weight: another base makes them wrong
    # reads the runtime strength c (surgery.scaled / set_scale) itself, as the 0-d tensor t.surgery_scale, in
    # forward and fold; otherwise the engine blends base and adapted outputs: y + c * (out - y)
    steered: ClassVar[bool] = False
    # the storage layouts (SiteInfo.layout) whose layers this variant can adapt; anything else is refused before
    # the model changes. The linear maps by default: an embedding or a conv is a linear map too, but only of
    # one-hot rows or unfolded patches, so a forward written on x (a rescaled input, an inverse) would not be
    # what its fold computes there. A variant lists 'embedding' / 'conv' only with a forward written for them.
    layouts: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    # ----- behaviour every variant provides -----
    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x, y, weight, bias, t):
        raise NotImplementedError

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None, t) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    # ----- optional behaviour -----
    def modules(self) -> dict[str, nn.Module]:
        return {}

    def check(self, site: SiteInit) -> None:
        """Raise ConfigError if this configuration cannot work at this site."""

    def observe(self, state: Any, rows: torch.Tensor) -> Any:
        """Accumulate calibration rows (N, d_in) for one site; return the new state. Sites handed the same
        input tensor in every batch share one state (one object in ``configure``'s states and ``SiteInit``)."""
        raise NotImplementedError

    def trace_key(self, site: SiteInfo) -> Hashable:
        """What of ``site.path`` forward branches on; asked only for a forward that reads ``t.site.path``.
        Sites with equal keys (and equal shapes) share one traced graph; the default, the path itself,
        traces each such site on its own. IA3 returns which side of the layer it scales."""
        return site.path

    def configure(self, states: dict[str, Any]) -> dict[str, "Variant"]:
        """Per-site configurations after calibration (EVA's rank redistribution)."""
        return {path: self for path in states}

    # ----- description and serialisation -----
    @property
    def name(self) -> str:
        return type(self).__name__

    def short(self) -> str:
        """``LoRA(r=8, alpha=16)``: the rank and the fields that differ from their defaults."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "r" and f.default is not dataclasses.MISSING and v == f.default:
                continue
            parts.append(f"{f.name}={_show(v)}")
        return f"{self.name}({', '.join(parts)})"

    def to_config(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.dtype):
                v = str(v).removeprefix("torch.")
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Variant":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(names))
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown config fields {unknown} (written by a newer model-surgery?)",
                stacklevel=3,
            )
        kwargs = {}
        for k, v in config.items():
            if k not in names:
                continue
            if k == "dtype" and v is not None:
                v = getattr(torch, v)
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    def adapter_dtype(self, base_dtype: torch.dtype) -> torch.dtype:
        """float32 adapters on half-precision bases (like PEFT), else the base dtype; ``dtype=`` may ask for a
        wider one, never a narrower one."""
        if self.dtype is not None:
            if torch.promote_types(self.dtype, base_dtype) != self.dtype:
                raise ConfigError(
                    f"{type(self).__name__}: dtype={_show(self.dtype)} is narrower than the base weight's "
                    f"{_show(base_dtype)}: the adapter would have to run in {_show(self.dtype)}, rounding the base "
                    f"output it adds to, so it could not start at identity. Leave dtype=None (adapters in "
                    f"{_show(self.adapter_dtype_default(base_dtype))}), use a dtype at least as wide as the base's, "
                    f"or cast the model first (model.to(torch.{_show(self.dtype)}))."
                )
            return self.dtype
        return self.adapter_dtype_default(base_dtype)

    @staticmethod
    def adapter_dtype_default(base_dtype: torch.dtype) -> torch.dtype:
        if base_dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return base_dtype


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (at least 1-D) in float32 if it is in a half type, else unchanged: for ops such as linear solves
    that have no half-precision CPU kernels. Traceable (type promotion with a 1-element float32 tensor, no
    branch on the dtype); multiplying by one changes no value."""
    return t * t.new_ones(1, dtype=torch.float32)


def _show(v: Any) -> str:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, float):
        return f"{v:g}"
    return repr(v)


# ----- shared helpers for variant files -----


def require_positive_rank(variant: Variant, r: int) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(
            f"{type(variant).__name__}: r must be a positive integer, got r={r!r}. "
            f"Use e.g. {type(variant).__name__}(r=8)."
        )


def require_dropout(variant: Variant, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(
            f"{type(variant).__name__}: dropout must be in [0, 1), got dropout={p!r}. "
            f"Use e.g. {type(variant).__name__}(dropout=0.1), or 0.0 for none."
        )


def require_real(variant: Variant, name: str, value: float) -> None:
    """A finite real number (a NaN or Inf scale would make every output NaN, silently)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(
            f"{type(variant).__name__}: {name} must be a finite number, got {name}={value!r}. "
            f"Use e.g. {type(variant).__name__}({name}=16)."
        )


def require_bool(variant: Variant, name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(
            f"{type(variant).__name__}: {name} must be True or False, got {name}={value!r} "
            f"({type(value).__name__}; a string such as 'false' would read as true)."
        )


def require_rank_fits(variant: Variant, site: SiteInit, r: int) -> None:
    """For variants whose rank is bounded by the weight (SVD-based): r <= min(d_in, d_out)."""
    limit = min(site.d_in, site.d_out)
    if r > limit:
        raise ConfigError(
            f"{type(variant).__name__}: r={r} is larger than min(d_in, d_out)={limit} at {site.path} "
            f"(weight {site.d_out}x{site.d_in}); an SVD of that weight has only {limit} directions. "
            f"Use r <= {limit}, or leave {site.path} out of `where`."
        )


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """PEFT's LoRA scale: alpha / r, or alpha / sqrt(r) with rank-stabilised scaling."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, dtype: torch.dtype, device) -> torch.Tensor:
    """nn.Linear's default init (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound)

