"""Trace a variant's forward with torch.fx and copy its nodes into another graph.

This is how one variant definition serves both scopes: ``trace_variant`` turns
``variant.forward(x, y, weight, bias, t)`` into a standalone fx graph, and ``splice`` copies that
graph into a site's graph (one traced leaf, or a whole traced model) after the base output ``y``.
Everything the tracer captured besides the variant's own tensors and modules (a constant tensor
built inside ``forward``) is handed back so the caller can register it next to them.

Failures while tracing a variant are the variant's, so they become ``VariantContractError`` naming
the variant and the rule it broke (see ``surgery/variant.py`` for the rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import SurgeryError, VariantContractError
from .variant import SiteInfo, Variant

_ASSERT_IS_NONE = fx._symbolic_trace._assert_is_none  # fx's guard for a concrete None bias: bookkeeping


class _Holder(nn.Module):
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
        out = self._variant.forward(x.to(a), y.to(a), weight.to(a), None if bias is None else bias.to(a), self)
        return out.to(b)


@dataclass
class VariantGraph:
    """A variant's forward as an fx graph, plus the constants the tracer made while tracing it."""

    graph: fx.Graph
    constants: dict[str, torch.Tensor]  # get_attr target -> tensor, e.g. '_tensor_constant0'


def tracer() -> fx.Tracer:
    # no autowrapping of `math`: scanning globals for it was a third of rewrite time, and site code
    # only ever calls math on Python numbers (fixed at trace time), never on tensors
    return fx.Tracer(autowrap_modules=())


def trace_variant(variant: Variant, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                  adapter_dtype: torch.dtype, base_dtype: torch.dtype, has_bias: bool, site: SiteInfo) -> VariantGraph:
    holder = _Holder(variant, tensors, modules, adapter_dtype, base_dtype, site)
    concrete = None if has_bias else {"bias": None}
    try:
        graph = tracer().trace(holder, concrete_args=concrete)
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure is the variant's forward breaking a rule
        raise VariantContractError(
            f"{variant.short()}.forward at {site.path} cannot be traced with torch.fx ({type(e).__name__}: "
            f"{_first_line(e)}). A variant's forward must be a static graph: no `if` or `while` on tensor values, "
            "no `len()` or Python iteration over a tensor; branch only on the variant's fields and t.site. "
            "See the rules in surgery/variant.py."
        ) from e
    known = set(tensors) | set(modules)
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target.split(".")[0] not in known:
            value = _fetch(holder, node.target)
            if not isinstance(value, torch.Tensor):
                raise VariantContractError(
                    f"{variant.short()}.forward at {site.path} reads attribute {node.target!r}, which is not one of "
                    f"its tensors {sorted(tensors)} or modules {sorted(modules)}. Return every tensor a forward "
                    "needs from init() (or modules()) and read it as t.<name>."
                )
            constants[node.target] = value.detach()
    outputs = [n for n in graph.nodes if n.op == "output"]
    if not isinstance(outputs[0].args[0], fx.Node):
        raise VariantContractError(
            f"{variant.short()}.forward at {site.path} returned {type(outputs[0].args[0]).__name__}; it must return "
            "one tensor, the adapted output with the shape of y."
        )
    return VariantGraph(graph, constants)


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


def add_constants(module: nn.Module, vg: VariantGraph) -> None:
    """Register the constants traced from a variant's forward on ``module``, outside its state_dict."""
    for target, value in vg.constants.items():
        module.register_buffer(constant_name(target), value, persistent=False)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def constant_name(target: str) -> str:
    """Where a traced constant lives on the site: '_tensor_constant0' -> 'surgery_constant0'."""
    return "surgery_constant" + target.removeprefix("_tensor_constant").replace(".", "_")


def splice(graph: fx.Graph, vg: VariantGraph, *, x: fx.Node, y: fx.Node, weight: fx.Node, bias: fx.Node | None,
           prefix: str, meta: dict[str, Any]) -> list[fx.Node]:
    """Copy ``vg`` into ``graph`` after ``y`` and route every use of ``y`` to its output.

    get_attr / call_module targets are prefixed with ``prefix`` (empty inside a module-scope Site,
    the module path in a whole-model graph); a traced constant is renamed to ``constant_name``, and
    the caller registers it there. fx's guard on a None bias is dropped. Returns the new nodes, each
    stamped with ``meta``.
    """
    inputs = iter((x, y, weight, bias))  # the placeholders of _Holder.forward, in order
    env: dict[fx.Node, Any] = {}
    new: list[fx.Node] = []
    out_value = None
    anchor = y
    for node in vg.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(inputs)
            continue
        if node.op == "output":
            out_value = fx.graph.map_arg(node.args[0], lambda n: env[n])
            continue
        if node.op == "call_function" and node.target is _ASSERT_IS_NONE:
            continue
        with graph.inserting_after(anchor):
            copied = graph.node_copy(node, lambda n: env[n])
        if node.op in ("get_attr", "call_module"):
            target = constant_name(node.target) if node.target in vg.constants else node.target
            copied.target = prefix + target
        copied.meta["surgery"] = dict(meta)
        env[node] = copied
        new.append(copied)
        anchor = copied
    keep = set(new)
    y.replace_all_uses_with(out_value, delete_user_cb=lambda user: user not in keep)
    return new
