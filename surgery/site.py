"""One site interface, whatever the scope: what was adapted, with what, and how it folds.

A site is one matched linear map ``y = x W^T + b`` with a variant's ops spliced in. Both scopes'
sites carry a ``SiteRecord`` (declared fields: path, variant, base layout and shape, the original
module, the original weight where the variant replaced it) and get their behaviour from
``SiteAPI``: ``adapter_tensors()``, ``trainable_count()``, ``fold(dtype)``, ``original_weight``,
``info``. Each scope only says where the weight and the adapter tensors live (``_owner()``).

- Module scope: ``Site`` is a ``torch.fx.GraphModule`` swapped in for the leaf. Its ``weight`` and
  ``bias`` are the leaf's own Parameter objects (no copy), so the base keys of ``state_dict()`` do
  not change, the adapter's tensors sit beside them (``k_proj.lora_A``), and ``print(site.code)``
  shows the adapted forward as plain Python.
- Graph scope: ``GraphSite`` (in ``surgery/scope/graph.py``) is a view of nodes in a whole-model graph.
- A Parameter read functionally (MoE experts, nn.MultiheadAttention's ``in_proj_weight``) is a site in weight
  space: ``ParamSite`` (``surgery/param.py``, module scope), whose record names the Parameter (``param``) and,
  for a 3D stack of experts, their number (``experts``).
"""

from __future__ import annotations

import copy
import itertools
import math
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.graph_module import _WrappedCall

from . import quant
from .errors import ConfigError, TraceError, UnsupportedModuleError
from .splice import ADAPTERS, DEFAULT, SiteTracer, Stack, slot_prefix
from .variant import SiteInfo, Variant

try:  # GPT-2's Conv1D: an nn.Linear with the weight stored transposed, (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but keep the engine importable without it
    Conv1D = ()


@dataclass(frozen=True)
class EmbeddingSpec:
    """The call arguments of an nn.Embedding other than its weight (fixed at trace time)."""

    padding_idx: int | None
    scale_grad_by_freq: bool
    sparse: bool


@dataclass(frozen=True)
class ConvSpec:
    """The call arguments of an nn.Conv1d/2d/3d other than its weight and bias (fixed at trace time)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    in_channels: int
    out_channels: int

    @property
    def conv(self):
        """F.conv1d, F.conv2d or F.conv3d, by the kernel's rank."""
        return (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]


# exact classes only: a subclass (Gemma's scaled embedding, a conv with a custom forward) computes something
# else than its weight alone says, so a fold of the adapter into that weight would not equal its forward
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layout_of_class(cls: type) -> str | None:
    """'linear' (weight d_out x d_in), 'conv1d' (GPT-2's Conv1D, weight d_in x d_out), 'embedding'
    (nn.Embedding, weight num_embeddings x dim: a linear map of one-hot rows, d_in = num_embeddings),
    'conv' (nn.Conv1d/2d/3d, weight out x in x kernel: d_in = in * prod(kernel)), or None if not adaptable."""
    if issubclass(cls, Site):
        return None
    if issubclass(cls, nn.Linear):
        return "linear"
    if Conv1D and issubclass(cls, Conv1D):
        return "conv1d"
    if cls is nn.Embedding:
        return "embedding"
    if cls in _CONVS:
        return "conv"
    return None


def layout(module: nn.Module) -> str | None:
    """The storage layout of an adaptable leaf (or of a Site's base), None for anything else."""
    if isinstance(module, Site):
        return module.layout
    return layout_of_class(type(module))


def adaptable(module: nn.Module) -> bool:
    return layout_of_class(type(module)) is not None


def op_spec(path: str, module: nn.Module) -> EmbeddingSpec | ConvSpec | None:
    """What a variant needs to know of the base op at ``path`` beyond the weight's shape (None for linear maps),
    or UnsupportedModuleError for settings under which the layer is not a fixed linear map of its weight."""
    lay = layout(module)
    if isinstance(module, Site):
        return module.record.spec
    if lay == "embedding":
        if module.max_norm is not None:
            raise UnsupportedModuleError(
                f"cannot adapt {path}: this nn.Embedding has max_norm={module.max_norm}: every forward renormalises "
                "the rows it reads in "
                "place, so the layer is not a fixed linear map of its weight and an adapter could neither match "
                "PEFT nor fold exactly. Leave it out of `where`, or build it with max_norm=None."
            )
        return EmbeddingSpec(module.padding_idx, bool(module.scale_grad_by_freq), bool(module.sparse))
    if lay == "conv":
        name = type(module).__name__
        bad = [f"{k}={v}" for k, v, ok in (("groups", module.groups, 1), ("padding_mode", module.padding_mode, "zeros"))
               if v != ok]
        if any(d != 1 for d in module.dilation):
            bad.append(f"dilation={module.dilation}")
        if bad:
            raise UnsupportedModuleError(
                f"cannot adapt {path}: this {name} has {', '.join(bad)}: LoRA on a conv (as in PEFT 0.21) is a "
                f"{name} of the same kernel, "
                "stride and padding followed by a 1x1 one, with zero padding, no dilation and one group, so it "
                "would not match this layer's own geometry (PEFT does not merge grouped convs either). Leave it "
                "out of `where`."
            )
        pad = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return ConvSpec(tuple(module.kernel_size), tuple(module.stride), pad, module.in_channels, module.out_channels)
    return None


def dims(weight: torch.Tensor, lay: str) -> tuple[int, int]:
    """(d_in, d_out) of a weight stored in layout ``lay`` (of each expert, for a stack of experts: (E, d_out, d_in),
    or (E, d_in, d_out) in layout 'conv1d')."""
    shape = quant.logical_shape(weight)  # a bitsandbytes 4-bit weight is stored packed, (n, 1)
    if shape is not None:
        return shape[1], shape[0]
    if lay == "linear":
        return weight.shape[-1], weight.shape[-2]
    if lay == "conv":
        return math.prod(weight.shape[1:]), weight.shape[0]
    return weight.shape[-2], weight.shape[-1]  # conv1d, embedding: stored (d_in, d_out)


def is_sharded(t: torch.Tensor | None) -> bool:
    """True for a DTensor (a parameter sharded by FSDP2's ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(t, DTensor)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def linear_weight(w: torch.Tensor, lay: str) -> torch.Tensor:
    """The weight in nn.Linear layout (d_out, d_in), whatever the storage layout (a view, no copy); a stack of
    experts stays a stack, each expert transposed."""
    if lay == "linear":
        return w
    if lay == "conv":  # (out, in, *kernel) -> (out, in * prod(kernel)): the map on unfolded patches
        return w.flatten(1)
    return w.mT


def stored_weight(w: torch.Tensor, lay: str, shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of ``linear_weight``: an nn.Linear-layout weight in storage layout ``lay``; ``shape``, the
    stored weight's shape, is needed for 'conv' (the kernel cannot be told from a flattened weight)."""
    if lay == "linear":
        return w
    if lay == "conv":
        if shape is None:
            raise TypeError("stored_weight of a conv weight needs the stored shape")
        return w.reshape(shape)
    return w.mT


def set_param(owner: nn.Module, name: str, value: torch.Tensor, *, new: bool) -> None:
    """Write a folded weight (storage layout) into the owner's Parameter ``name``: the same Parameter object holds
    it (no second pass over the weight to copy it in), or with ``new`` a new Parameter (untying a shared one)."""
    p = owner._parameters[name]
    value = value.detach().to(p.dtype).contiguous()
    if new:
        owner._parameters[name] = nn.Parameter(value, requires_grad=p.requires_grad)
    else:
        p.data = value


def base_output(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, lay: str, spec=None) -> torch.Tensor:
    """The unadapted layer's output from its stored weight (for identity probes)."""
    if lay == "embedding":
        return F.embedding(x, w, spec.padding_idx)
    if lay == "conv":
        return spec.conv(x, w, b, spec.stride, spec.padding)
    return F.linear(x, linear_weight(w, lay), b)


def probe_input(lay: str, spec, d_in: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One random input of the layer: a row (linear maps), a few token ids (embedding), or one small image
    just larger than the kernel (conv)."""
    if lay == "embedding":
        return torch.randint(0, d_in, (1, 8), device=device)
    if lay == "conv":
        return torch.randn(1, spec.in_channels, *(k + 2 for k in spec.kernel_size), dtype=dtype, device=device)
    return torch.randn(1, d_in, dtype=dtype, device=device)


_ORDER = itertools.count()  # adapters are listed in the order they were added, across sites and calls


@dataclass
class Adapter:
    """One named adapter at one site."""

    variant: Variant
    # the runtime strength c, also held by the adapter's 0-d buffer ``surgery_scale`` for the forward; folds read
    # this one (a buffer made on the meta device holds garbage after model.to_empty())
    scale: float = 1.0
    order: int = field(default_factory=lambda: next(_ORDER))


@dataclass
class SiteRecord:
    """What the engine keeps about one site, in both scopes."""

    path: str
    layout: str  # storage layout of the base weight: 'linear', 'conv1d', 'embedding' or 'conv'
    base_class: str
    d_in: int
    d_out: int
    original: nn.Module  # the module at ``path`` before the rewrite; restore puts it back
    adapters: dict[str, Adapter]  # by name, in the order they were added
    active: tuple[str, ...]  # the adapters the forward runs, in that order
    # the variant replaced the base weight (PiSSA's residual); the original is kept on the site's module as the
    # non-persistent buffer ``surgery_base_weight`` (storage layout), so that it follows model.to(dtype / device);
    # in module scope on the CPU it maps an unlinked temporary file (surgery/offload.py), so it holds no memory
    replaced: bool = False
    # names of the site's input, base output and adapted output nodes (in the site's graph, or the model's);
    # y is "" when the variant never reads the base output and the base op was dropped from the graph
    x: str = ""
    y: str = ""
    out: str = ""
    # a runtime-strength blend follows ``out`` (added by the first set_scale); a site running several adapters
    # blends each one inside its forward, and counts as gated
    gated: bool = False
    spec: EmbeddingSpec | ConvSpec | None = None  # the base op's other call arguments (see op_spec)
    # a bitsandbytes base ('nf4', 'fp4', 'int8'): the site calls it as its submodule ``base_layer`` (an opaque base)
    quant: str | None = None
    packing: bool | None = None  # that base's own support_avx512bf16_for_cpu, held off while it is a base
    # a parameter site (surgery/param.py): the Parameter's name on ``original``, its owner; "" for a layer
    param: str = ""
    # a 3D parameter (E, d_out, d_in), or (E, d_in, d_out) in layout 'conv1d', is E linear maps, each with its own
    # adapter tensors: E; else 0
    experts: int = 0

    @property
    def running(self) -> Stack:
        """The variant the site's forward runs: its active adapters."""
        return Stack(parts=tuple((n, self.adapters[n].variant) for n in self.active))


class SiteAPI:
    """Behaviour shared by both scopes' sites. Subclasses set ``record`` and implement ``_owner``."""

    record: SiteRecord

    def _owner(self) -> nn.Module:
        """The module holding ``weight``, ``bias`` and the default adapter's tensors as direct attributes."""
        raise NotImplementedError

    def _slot(self, name: str) -> nn.Module:
        """The module holding adapter ``name``'s tensors, modules and strength as direct attributes."""
        owner = self._owner()
        return owner if name == DEFAULT else getattr(getattr(owner, ADAPTERS), name)

    path = property(lambda self: self.record.path)
    layout = property(lambda self: self.record.layout)
    base_class = property(lambda self: self.record.base_class)
    d_in = property(lambda self: self.record.d_in)
    d_out = property(lambda self: self.record.d_out)

    @property
    def names(self) -> list[str]:
        """The adapters at this site, in the order they were added."""
        return list(self.record.adapters)

    @property
    def active(self) -> tuple[str, ...]:
        return self.record.active

    def adapter(self, name: str) -> "AdapterView":
        """One adapter of this site, with the site's interface (variant, tensors, fold, strength)."""
        return AdapterView(self, name)

    def _one(self) -> "AdapterView":
        if len(self.record.adapters) != 1:
            raise ConfigError(
                f"the site at {self.path} holds {len(self.record.adapters)} adapters ({', '.join(self.names)}); "
                "ask one of them: site.adapter(name)."
            )
        return self.adapter(self.names[0])

    @property
    def variant(self) -> Variant:
        """The variant of a site's only adapter; with several, a ``Stack`` describing them all."""
        if len(self.record.adapters) == 1:
            return next(iter(self.record.adapters.values())).variant
        return Stack(parts=tuple((n, a.variant) for n, a in self.record.adapters.items()))

    @property
    def info(self) -> SiteInfo:
        return SiteInfo(path=self.path, d_in=self.d_in, d_out=self.d_out, layout=self.layout, spec=self.record.spec)

    @property
    def base_module(self) -> nn.Module:
        """The module holding the base weight and bias: the site's own, or its opaque ``base_layer``."""
        owner = self._owner()
        return getattr(owner, quant.BASE) if self.record.quant else owner

    @property
    def base_weight(self) -> torch.Tensor:
        """The base weight as stored (a packed integer Parameter under an opaque base)."""
        return self.base_module.weight

    @property
    def base_bias(self) -> torch.Tensor | None:
        return getattr(self.base_module, "bias", None)

    @property
    def base_dtype(self) -> torch.dtype:
        """The float dtype of the base weight (float32 for a quantised one, which dequantises to it)."""
        return torch.float32 if self.record.quant else self.base_weight.dtype

    def dense_weight(self) -> torch.Tensor:
        """The current base weight in nn.Linear layout, detached; dequantised now from an opaque base."""
        if self.record.quant:
            return quant.dequantized(self.base_module)
        return linear_weight(self.base_weight.detach(), self.layout)

    @property
    def replaced_base(self) -> bool:
        """True when the variant's init replaced the base weight (PiSSA's residual)."""
        return self.record.replaced

    @property
    def kept_weight(self) -> torch.Tensor:
        """The original base weight a replacing variant set aside (storage layout; see ``SiteRecord.replaced``)."""
        return self._owner().surgery_base_weight

    @property
    def original_weight(self) -> torch.Tensor:
        """The base weight as it was before the rewrite, nn.Linear layout, detached."""
        if self.replaced_base:
            return linear_weight(self.kept_weight.detach(), self.layout)
        return self.dense_weight()

    @property
    def scale_buffer(self) -> torch.Tensor:
        """The only adapter's 0-d strength buffer (``surgery.set_scale``): 0 is the base, 1 the adapter."""
        return self._one().scale_buffer

    @property
    def scale(self) -> float:
        return self._one().scale

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter's tensors on this site (parameters and buffers), by their names under the site
        (``lora_A``; ``adapters.<name>.lora_A`` for an adapter not named "default")."""
        out = {}
        for name in self.record.adapters:
            out.update({slot_prefix(name) + n: t for n, t in self.adapter(name).adapter_tensors().items()})
        return out

    def trainable_count(self) -> int:
        return sum(t.numel() for t in self.adapter_tensors().values() if isinstance(t, nn.Parameter) and t.requires_grad)

    def fold(self, dtype: torch.dtype | None = None, at: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Merged (W', b') in nn.Linear layout of the active adapters, each at its strength, computed in
        ``dtype`` (default: float32 or wider). Several active adapters fold to ``W + sum_i (W'_i - W)``, as
        their outputs add up: ``y + sum_i (out_i - y)``. ``at`` overrides the strength of a site's only adapter."""
        active = self.record.active
        if len(active) == 1:
            return self.adapter(active[0]).fold(dtype, at)
        W, b = self.adapter(DEFAULT if DEFAULT in self.record.adapters else self.names[0]).fold(dtype, at=0.0)
        if not active:
            return W, b
        W2 = W.clone()
        b2 = None if b is None else b.clone()
        for name in active:
            Wi, bi = self.adapter(name).fold(dtype)
            W2 += Wi - W
            if b2 is not None:
                b2 += bi - b
        return W2, b2

    def describe(self) -> str:
        return f"{self.variant.short()}, in={self.d_in}, out={self.d_out}, base={self.base_class}"


def own_tensors(module: nn.Module, skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """A module's own parameters and persistent buffers (not its children's), ``skip`` left out."""
    # the tables themselves, as named_parameters(recurse=False) lists them (no None, a tensor once) without its
    # generator machinery: merge and save ask for every site's, several times (an eighth of a LoRA merge)
    constants = module._non_persistent_buffers_set  # constants traced from a forward, the runtime strength, ...
    out: dict[str, torch.Tensor] = {}
    for table, leave in ((module._parameters, skip), (module._buffers, skip | constants)):
        seen: set[int] = set()
        for n, t in table.items():
            if t is not None and n not in leave and id(t) not in seen:
                seen.add(id(t))
                out[n] = t
    return out


def fold_each(variant: Variant, W: torch.Tensor, b: torch.Tensor | None, tensors: dict[str, torch.Tensor],
              info: SiteInfo, c: torch.Tensor, experts: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``variant.fold`` of one weight, or of each expert of a stack (W (E, d_out, d_in), every tensor (E, ...),
    no bias) as one batched call; differentiable, so a parameter site's forward runs it too."""
    def one(W, tensors):
        return variant.fold(W, b, SimpleNamespace(site=info, surgery_scale=c, **tensors))
    if not experts:
        return one(W, tensors)
    return torch.vmap(lambda W, ts: one(W, ts)[0])(W, tensors), None


class AdapterView(SiteAPI):
    """One named adapter of a site, seen as a site of its own: what save, export and inspect write per adapter."""

    def __init__(self, site: SiteAPI, name: str):
        if name not in site.record.adapters:
            raise KeyError(name)
        self.site, self.name, self.record = site, name, site.record

    def _owner(self) -> nn.Module:
        return self.site._owner()

    @property
    def weight(self) -> torch.Tensor:
        return self.site.base_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.site.base_bias

    @property
    def variant(self) -> Variant:
        return self.record.adapters[self.name].variant

    @property
    def scale(self) -> float:
        return self.record.adapters[self.name].scale

    @property
    def scale_buffer(self) -> torch.Tensor:
        return self._slot(self.name).surgery_scale

    @property
    def names(self) -> list[str]:
        return [self.name]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors by the names its variant gives them (``lora_A``)."""
        return own_tensors(self._slot(self.name), frozenset({"weight", "bias"}) if self.name == DEFAULT else frozenset())

    def fold(self, dtype: torch.dtype | None = None, at: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') of this adapter alone on the base, at strength ``at`` (default: its current one; files hold
        the adapter as trained, at 1)."""
        scale = self.scale if at is None else at
        dense, bias = self.dense_weight(), self.base_bias
        dt = dtype or torch.promote_types(dense.dtype, torch.float32)
        W = dense.to(dt)
        b = None if bias is None else bias.detach().to(dt)
        c = torch.tensor(scale, dtype=dt, device=W.device)
        tensors = {n: v.detach().to(dt) for n, v in self.adapter_tensors().items()}
        with torch.no_grad():
            if scale == 0 and not self.replaced_base:
                return W, b
            W2, b2 = fold_each(self.variant, W, b, tensors, self.info, c, self.record.experts)
            if self.variant.steered or scale == 1:
                return W2, b2
            base = self.original_weight.to(dt)  # the blend y + c (out - y) folds to W + c (W' - W)
            if scale == 0:
                return base, b
            return base + c * (W2 - base), (None if b2 is None else b + c * (b2 - b))

    def __repr__(self) -> str:
        return f"Adapter({self.name!r} at {self.path}: {self.describe()})"


class _SiteGraph(fx.Graph):
    """A site's graph, naming its module weakly. GraphModule sets ``graph.owning_module = module``, a reference
    cycle: a site, with its base weight, then outlived ``del model`` (or its removal by merge) until Python's
    cyclic collector ran, which in a loop of rewrites could hold many models at once."""

    @property
    def owning_module(self):
        owner = self.__dict__.get("_surgery_owner")
        return None if owner is None else owner()

    @owning_module.setter
    def owning_module(self, mod) -> None:
        self._owning_module = None  # what fx.Graph.__init__ set, strongly
        self.__dict__["_surgery_owner"] = None if mod is None else weakref.ref(mod)


def _weakly_owned(graph: fx.Graph) -> fx.Graph:
    if type(graph) is fx.Graph:  # the graphs fx's tracer and Graph.__deepcopy__ make
        graph.__class__ = _SiteGraph
    return graph


COMPILED = "_surgery_compiled"  # on a copied site graph: the compiled forward of the graph it was copied from
SHARED = "_surgery_shared"  # on a site made by Site.shared: (its kind's graph, its nodes' provenance) until read


def _call_wrapped(self, *args, **kwargs):
    return self._wrapped_call(self, *args, **kwargs)


_PROVENANCE = "_surgery_provenance"  # in a pickled site: (name, op, provenance) of each node, in graph order


def _unpickled_site(body: dict, import_block: str) -> "Site":
    """A pickled site, rebuilt: GraphModule's own reader traces the saved code again (keeping only what the
    graph reads), then the site takes back its node provenance and everything else it held. The trace makes
    a node per statement, in order, but names them afresh (a ``linear_1`` whose ``linear`` was dead code comes
    back as ``linear``): the record's node names follow them."""
    saved = body.pop(_PROVENANCE)
    rec = body["record"]
    gm = fx.graph_module.reduce_graph_module(body, import_block)
    nodes = list(gm.graph.nodes)
    if [op for _, op, _ in saved] != [n.op for n in nodes]:
        raise TraceError(
            f"cannot unpickle the site at {rec.path}: tracing its saved code again gave other nodes than it was "
            "saved with, so its input and output could not be found. Save the adapters with surgery.save and load "
            "them onto the base with surgery.load instead of pickling the whole model."
        )
    names = {}
    for (name, _, meta), n in zip(saved, nodes):
        names[name] = n.name
        if meta is not None:
            n.meta["surgery"] = meta
    rec.x, rec.y, rec.out = (names.get(v, v) for v in (rec.x, rec.y, rec.out))
    site = Site(gm, gm.graph, class_name=type(gm).__name__)
    site.hold(body["_parameters"], body["_buffers"], body["_modules"], body["_non_persistent_buffers_set"], rec)
    site.train(body["training"])
    return site


class Site(fx.GraphModule, SiteAPI):
    """Module scope: a traced leaf with a variant spliced in, swapped into the model at ``path``."""

    def _owner(self) -> nn.Module:
        return self

    def compiled(self) -> tuple:
        """This site's generated code and compiled forward, for a copy of its graph (``recompile``)."""
        return self._code, self._lineno_map, self._prologue_start, type(self).forward

    @classmethod
    def shared(cls, root: nn.Module, graph: fx.Graph, code: tuple, meta: dict, class_name: str) -> "Site":
        """A site running ``code`` (``compiled()`` of a site with this graph) that shares ``graph`` with the other
        sites of its kind until its own graph is read (a diff, a gate); ``meta`` is the provenance its nodes
        then get. Copying the graph for every site was a quarter of the cost of a rewrite, and apply, forward,
        save and merge never read it."""
        graph.__dict__[COMPILED] = code
        site = cls(root, graph, class_name=class_name)
        graph.owning_module = None  # the kind's graph belongs to no site
        site.__dict__[SHARED] = (graph, meta)
        return site

    def _unshare(self) -> None:
        """Its own copy of a shared graph, stamped with its own path (the compiled code is that copy's too)."""
        shared = self.__dict__.pop(SHARED, None)
        if shared is not None:
            graph, meta = shared
            own = copy.deepcopy(graph)
            for n in own.nodes:
                if "surgery" in n.meta:
                    n.meta["surgery"] = dict(meta)
            _weakly_owned(own).owning_module = self
            self.__dict__["_graph"] = own

    @property
    def graph(self) -> fx.Graph:
        self._unshare()
        return self._graph

    @graph.setter
    def graph(self, g: fx.Graph) -> None:
        self.__dict__.pop(SHARED, None)
        fx.GraphModule.graph.fset(self, _weakly_owned(g))

    def recompile(self):
        """GraphModule's recompile; a graph copied from a compiled site takes that site's forward instead
        of generating and compiling the same code again (a third of the cost of a site)."""
        code = self._graph.__dict__.pop(COMPILED, None)
        if code is None:
            return super().recompile()
        self._code, self._lineno_map, self._prologue_start, forward = code
        cls = type(self)  # GraphModule gives every instance its own class, as recompile does
        cls.forward = forward
        if "_wrapped_call" not in vars(cls):
            cls._wrapped_call = _WrappedCall(cls, None)
        cls.__call__ = _call_wrapped
        return None

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # the original leaf shares the site's weight and bias: when something puts new ones on the site
        # (FSDP2's fully_shard, load_state_dict(assign=True)), the leaf takes them too instead of keeping the
        # old, whole tensors alive
        if name in ("weight", "bias") and "record" in self.__dict__ and name in self._parameters:
            self.record.original._parameters[name] = self._parameters[name]

    def __deepcopy__(self, memo):
        self._unshare()  # first, so that the copy's nodes name this site
        res = super().__deepcopy__(memo)
        # the memo hands out the very copies GraphModule's copy made of what the graph reads
        copied = [{n: copy.deepcopy(v, memo) for n, v in table.items()}
                  for table in (self._parameters, self._buffers, self._modules)]
        res.hold(*copied, self._non_persistent_buffers_set, copy.deepcopy(self.record, memo))
        return res

    def hold(self, parameters: dict, buffers: dict, modules: dict, constants: set[str], record: SiteRecord) -> None:
        """Take what GraphModule leaves out, and the record. GraphModule keeps only what the graph reads (not a
        None bias whose dead code was dropped, an unread strength, the tensors of inactive adapters), gives a
        dotted target (adapters.b.lora_A) fresh containers, and drops the set of non-persistent buffers (the
        traced constants, the strength): the site holds all of them, in the real containers."""
        for table, held in ((self._parameters, parameters), (self._buffers, buffers)):
            for name, value in held.items():
                table.setdefault(name, value)
        self._modules.update(modules)
        self._non_persistent_buffers_set = set(constants)
        self.__dict__["record"] = record

    def __reduce__(self):
        """GraphModule's pickle (the generated code and this module's __dict__), rebuilt as a Site: torch.load
        of a whole rewritten model gives back sites that the verbs know, not plain GraphModules."""
        self._unshare()  # pickle writes the code and this module's __dict__, which must not carry a shared graph
        if any(n.target is quant.dequantized for n in self._graph.nodes):
            raise TraceError(
                f"cannot pickle the site at {self.record.path}: its forward dequantises its bitsandbytes base "
                "(a variant such as DoRA reads W at every step), and code that reads a layer's weight through the "
                "layer cannot be traced again when it is unpickled. Save the adapters with surgery.save and load "
                "them onto the quantised base with surgery.load."
            )
        _, (body, import_block) = super().__reduce__()
        body["_graphmodule_cls_name"] = type(self).__name__
        # traced again as splice.trace traced it, buffers as nodes: fx's default would compute `scale == 0` on the
        # runtime strength once and bake it in, and set_scale after a torch.load would change nothing (an opaque
        # base's graph, built by hand, names no tracer of its own)
        body["_tracer_cls"] = SiteTracer
        body[_PROVENANCE] = [(n.name, n.op, n.meta.get("surgery")) for n in self._graph.nodes]
        return _unpickled_site, (body, import_block)

    @property
    def base(self) -> nn.Module:
        """The original leaf module (not registered, so state_dict keys stay as they were)."""
        return self.record.original

    @property
    def code(self) -> str:
        """The adapted forward as Python source."""
        return super().code.strip("\n") + "\n"

    def extra_repr(self) -> str:
        return self.describe()

    def __repr__(self) -> str:  # GraphModule's str dumps the code; keep print(model) readable
        return f"Site({self.describe()})"

    __str__ = __repr__
