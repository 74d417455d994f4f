"""A Site: one matched leaf, traced with torch.fx, with a variant's ops spliced into its graph.

``Site`` is a ``torch.fx.GraphModule`` whose ``weight`` and ``bias`` are the leaf's own
Parameter objects (no copy), so the base keys of ``state_dict()`` do not change and the
adapter's tensors sit beside them (``k_proj.lora_A``). ``print(site.code)`` shows the adapted
forward as plain Python. The splice itself (``splice``) works on any fx graph, which is what lets
one variant definition serve both a single leaf and a whole traced model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

if TYPE_CHECKING:  # adapters imports surgery.errors; import it lazily to avoid a cycle
    from adapters.base import SiteInit, Variant

try:  # GPT-2's Conv1D: an nn.Linear with the weight stored transposed, (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but keep the engine importable without it
    Conv1D = ()


def layout(module: nn.Module) -> str | None:
    """'linear' (weight d_out x d_in), 'conv1d' (weight d_in x d_out), or None if not adaptable."""
    if isinstance(module, Site):
        return module.layout
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    return None


def adaptable(module: nn.Module) -> bool:
    return layout(module) is not None and not isinstance(module, Site)


def dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an adaptable leaf."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if layout(module) == "linear" else (w.shape[0], w.shape[1])


def linear_weight(w: torch.Tensor, lay: str) -> torch.Tensor:
    """The weight in nn.Linear layout (d_out, d_in), whatever the storage layout."""
    return w if lay == "linear" else w.t()


@dataclass(frozen=True)
class SiteInfo:
    """Static facts about a site, visible to a variant's forward and fold as ``t.site``."""

    path: str
    d_in: int
    d_out: int
    layout: str  # 'linear' or 'conv1d' (storage layout of the base weight)


class _Splice(nn.Module):
    """Holds a variant's tensors while its forward is traced into a standalone fx graph."""

    def __init__(self, variant: Variant, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                 adapter_dtype: torch.dtype, base_dtype: torch.dtype, site: SiteInfo):
        super().__init__()
        for name, t in tensors.items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)
        for name, m in modules.items():
            self.add_module(name, m)
        self.__dict__["_variant"] = variant
        self.__dict__["site"] = site  # static facts a forward may branch on at trace time
        self.__dict__["_cast"] = (adapter_dtype, base_dtype) if adapter_dtype != base_dtype else None

    def forward(self, x, y, weight, bias):
        if self._cast is None:
            return self._variant.forward(x, y, weight, bias, self)
        a, b = self._cast
        out = self._variant.forward(
            x.to(a), y.to(a), weight.to(a), None if bias is None else bias.to(a), self
        )
        return out.to(b)


def _tracer() -> fx.Tracer:
    # no autowrapping of `math`: scanning globals for it was a third of rewrite time, and site code
    # only ever calls math on Python numbers (fixed at trace time), never on tensors
    return fx.Tracer(autowrap_modules=())


def trace_variant(variant: Variant, tensors, modules, adapter_dtype, base_dtype, has_bias: bool,
                  site: SiteInfo) -> fx.Graph:
    holder = _Splice(variant, tensors, modules, adapter_dtype, base_dtype, site)
    concrete = None if has_bias else {"bias": None}
    return _tracer().trace(holder, concrete_args=concrete)


def splice(graph: fx.Graph, variant_graph: fx.Graph, *, x: fx.Node, y: fx.Node, weight: fx.Node,
           bias: fx.Node | None, prefix: str, meta: dict[str, Any]) -> list[fx.Node]:
    """Copy ``variant_graph`` into ``graph`` after ``y`` and route every use of ``y`` to its output.

    get_attr / call_module targets are prefixed with ``prefix`` (empty inside a Site, the module
    path in a whole-model graph). Returns the new nodes, each stamped with ``meta``.
    """
    inputs = iter((x, y, weight, bias))  # the placeholders of _Splice.forward, in order
    env: dict[fx.Node, Any] = {}
    new: list[fx.Node] = []
    out_value = None
    anchor = y
    for node in variant_graph.nodes:
        if node.op == "placeholder":
            env[node] = next(inputs)
            continue
        if node.op == "output":
            out_value = fx.graph.map_arg(node.args[0], lambda n: env[n])
            continue
        with graph.inserting_after(anchor):
            copied = graph.node_copy(node, lambda n: env[n])
        if node.op in ("get_attr", "call_module"):
            copied.target = prefix + node.target
        copied.meta["surgery"] = dict(meta)
        env[node] = copied
        new.append(copied)
        anchor = copied
    assert isinstance(out_value, fx.Node), "a variant's forward must return one tensor"
    keep = set(new)
    y.replace_all_uses_with(out_value, delete_user_cb=lambda user: user not in keep)
    return new


class Site(fx.GraphModule):
    """A traced leaf with a variant spliced in. Knows its variant, base shape, path and code."""

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        for name, value in self._parameters.items():  # GraphModule's copy drops a None bias
            if value is None:
                res.register_parameter(name, None)
        for k in ("variant", "path", "layout", "d_in", "d_out", "base_class"):
            res.__dict__[k] = self.__dict__[k]
        for k in ("_base", "_orig_weight", "_orig_requires_grad"):
            res.__dict__[k] = copy.deepcopy(self.__dict__[k], memo)
        return res

    @property
    def info(self) -> SiteInfo:
        return SiteInfo(path=self.path, d_in=self.d_in, d_out=self.d_out, layout=self.layout)

    @property
    def base(self) -> nn.Module:
        """The original leaf module (not registered, so state_dict keys stay as they were)."""
        return self._base

    @property
    def code(self) -> str:
        """The adapted forward as Python source."""
        return super().code.strip("\n") + "\n"

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The variant's tensors on this site (parameters and buffers), by name."""
        base = {"weight", "bias"}
        out = {n: p for n, p in self.named_parameters(recurse=False) if n not in base}
        out.update({n: b for n, b in self.named_buffers(recurse=False) if n not in base})
        return out

    def trainable_count(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters(recurse=False) if n not in ("weight", "bias") and p.requires_grad)

    def extra_repr(self) -> str:
        return f"{self.variant.short()}, in={self.d_in}, out={self.d_out}, base={self.base_class}"

    def __repr__(self) -> str:  # GraphModule's str dumps the code; keep print(model) readable
        return f"Site({self.extra_repr()})"

    __str__ = __repr__

    def fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Merged (W', b') in nn.Linear layout, computed in float32 (or wider)."""
        w = self.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        W = linear_weight(w.detach(), self.layout).to(dt)
        b = None if self.bias is None else self.bias.detach().to(dt)
        t = SimpleNamespace(site=self.info, **{n: v.detach().to(dt) for n, v in self.adapter_tensors().items()})
        with torch.no_grad():
            return self.variant.fold(W, b, t)


def attach(module: nn.Module, variant: Variant, tensors: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Register a variant's tensors (``frozen`` ones as buffers) and modules on ``module``."""
    for name, t in tensors.items():
        if name in variant.frozen:
            module.register_buffer(name, t)
        else:
            module.register_parameter(name, t if isinstance(t, nn.Parameter) else nn.Parameter(t))
    modules = variant.modules()
    for name, m in modules.items():
        module.add_module(name, m)
    return modules


def build_site(path: str, leaf: nn.Module, variant: Variant, ctx: SiteInit,
               tensors: dict[str, torch.Tensor]) -> Site:
    """Trace ``leaf``, splice ``variant`` into it, and return the Site (the model is not touched)."""
    lay = layout(leaf)
    base_graph = _tracer().trace(leaf)  # a graph owned by no module yet
    x = next(n for n in base_graph.nodes if n.op == "placeholder")
    out = next(n for n in base_graph.nodes if n.op == "output")
    y = out.args[0]
    w = next(n for n in base_graph.nodes if n.op == "get_attr" and n.target == "weight")
    b = next((n for n in base_graph.nodes if n.op == "get_attr" and n.target == "bias"), None)
    if lay == "conv1d":  # present W in (d_out, d_in) layout to the variant
        with base_graph.inserting_after(w):
            w = base_graph.call_method("t", (w,))

    root = nn.Module()
    root.weight = leaf.weight
    root.bias = leaf.bias
    modules = attach(root, variant, tensors)
    live = {n: getattr(root, n) for n in tensors}

    base_dtype = leaf.weight.dtype
    info = SiteInfo(path=path, d_in=ctx.d_in, d_out=ctx.d_out, layout=lay)
    vgraph = trace_variant(variant, live, modules, ctx.dtype, base_dtype, has_bias=leaf.bias is not None, site=info)
    splice(base_graph, vgraph, x=x, y=y, weight=w, bias=b if leaf.bias is not None else None, prefix="",
           meta={"site": path, "variant": variant.short()})
    site = Site(root, base_graph, class_name=type(leaf).__name__)
    if leaf.bias is None:
        site.register_parameter("bias", None)
    site.graph.eliminate_dead_code()  # e.g. the base op, when a variant recomputes it from x
    site.graph.lint()
    site.recompile()
    site.train(leaf.training)  # new modules (dropout) follow the mode of the model they join
    site.__dict__.update(variant=variant, path=path, layout=lay, d_in=ctx.d_in, d_out=ctx.d_out,
                         base_class=type(leaf).__name__, _base=leaf, _orig_weight=None,
                         _orig_requires_grad=(leaf.weight.requires_grad,
                                              None if leaf.bias is None else leaf.bias.requires_grad))
    return site
