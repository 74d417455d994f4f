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

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
import torch.fx as fx
from torch import nn

from .errors import SurgeryError, VariantContractError
from .variant import SiteInfo, Variant

_ASSERT_IS_NONE = fx._symbolic_trace._assert_is_none  # fx's guard for a concrete None bias: bookkeeping
SCALE = "surgery_scale"  # the runtime strength c on each site's module: a 0-d, non-persistent buffer
BASE_WEIGHT = "surgery_base_weight"  # the original weight of a site whose variant replaced it (storage layout)
DEFAULT = "default"  # the adapter name a rewrite gives unless told otherwise
ADAPTERS = "adapters"  # the submodule of a site holding its named adapters other than "default"


def slot_prefix(name: str) -> str:
    """Where adapter ``name``'s tensors sit on a site's module: "default" directly (``k_proj.lora_A``, the
    names files and PEFT exports have always used), any other under ``adapters.<name>``."""
    return "" if name == DEFAULT else f"{ADAPTERS}.{name}."


def compute_dtype(adapter: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    """The dtype a site computes in: the wider of its adapter tensors' and its input's. Asked at run time
    (a leaf call in the graph), so a model moved to another dtype after the rewrite computes in the new one."""
    return torch.promote_types(adapter.dtype, x.dtype)


fx.wrap("compute_dtype")


def base_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``t.base(x)`` in a variant's forward: the site's base layer on another input. Traced as a marker that
    ``splice`` replaces by the base op itself (F.linear on the weight, a convolution or lookup with the layer's
    own arguments, or the call of an opaque base), so an input-side variant (HRA, IA3 on the input) runs on a
    quantised base too. Eagerly, the linear map."""
    return torch.nn.functional.linear(x, weight, bias)


fx.wrap("base_op")


Add = Callable[[str, Any, tuple], fx.Node]  # (op, target, args) -> a new node after the last one added


def base_caller(site: SiteInfo, module: str | None) -> Callable[[tuple, Add], fx.Node]:
    """How a site makes the nodes of ``base_op(x, W, b)`` (W in nn.Linear layout): a call of its opaque base
    ``module``, or the dense op of its layout."""
    def call(args: tuple, add: Add) -> fx.Node:
        x, w, b = args
        if module is not None:
            return add("call_module", module, (x,))
        if site.layout in ("linear", "conv1d"):
            return add("call_function", torch._C._nn.linear, (x, w, b))
        spec = site.spec
        if site.layout == "conv":
            kernel = add("call_method", "view", (w, (spec.out_channels, spec.in_channels, *spec.kernel_size)))
            return add("call_function", spec.conv, (x, kernel, b, spec.stride, spec.padding))
        table = add("call_method", "t", (w,))
        return add("call_function", torch.nn.functional.embedding, (x, table, spec.padding_idx))
    return call


class _Holder(nn.Module):
    """Holds a variant's tensors while its forward is traced into a standalone fx graph."""

    def __init__(self, variant: Variant, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                 site: SiteInfo, cast: bool):
        super().__init__()
        for name, t in tensors.items():
            put(self, name, t)
        for name, m in modules.items():
            put(self, name, m)
        self.__dict__["_variant"] = variant
        self.__dict__["site"] = site  # static facts a forward may branch on at trace time
        # adapters in another dtype than the base (float32 on a bf16 model): casts in and out, by the dtypes seen at
        # run time, so that they stay right after model.float() / .bfloat16(); none where the dtypes agree, since
        # model.to(dtype) keeps them agreeing
        self.__dict__["_ref"] = next((n for n in tensors if not n.endswith(SCALE)), None) if cast else None

    def base(self, x):
        """The site's base layer on ``x`` (see ``base_op``), with the weight and bias the forward was given."""
        return base_op(x, *self._wb)

    def forward(self, x, y, weight, bias):
        if self._ref is None:
            self.__dict__["_wb"] = (weight, bias)
            return self._variant.forward(x, y, weight, bias, self)
        if self.site.layout == "embedding":  # x holds token ids: the dtypes are y's, and the ids stay integers
            dt = compute_dtype(_fetch(self, self._ref), y)
            self.__dict__["_wb"] = (weight.to(dt), None)
            out = self._variant.forward(x, y.to(dt), *self._wb, self)
            return out.to(y.dtype) if isinstance(out, fx.Proxy) else out
        dt = compute_dtype(_fetch(self, self._ref), x)
        self.__dict__["_wb"] = (weight.to(dt), None if bias is None else bias.to(dt))
        out = self._variant.forward(x.to(dt), y.to(dt), *self._wb, self)
        return out.to(x.dtype) if isinstance(out, fx.Proxy) else out  # anything else: trace_variant names it


@dataclass
class VariantGraph:
    """A variant's forward as an fx graph, plus the constants the tracer made while tracing it."""

    graph: fx.Graph
    constants: dict[str, torch.Tensor]  # get_attr target -> tensor, e.g. '_tensor_constant0'


class SiteTracer(fx.Tracer):
    """fx's tracer as site code needs it; also what a pickled site's saved code is traced again with."""

    def __init__(self):
        # no autowrapping of `math`: scanning globals for it was a third of rewrite time, and site code
        # only ever calls math on Python numbers (fixed at trace time), never on tensors
        super().__init__(autowrap_modules=())
        # a buffer read as a get_attr node: else fx computes `2 * t.buffer` once at trace time and bakes the result
        # in as a constant, so later values of the buffer (a load, a new runtime strength) would never be seen
        self.proxy_buffer_attributes = True


def trace(root: nn.Module, **kwargs) -> fx.Graph:
    """``SiteTracer``'s trace of ``root``, with the tracer's state dropped afterwards: the Tracer ends in a
    reference cycle with closures it made while tracing, and holds ``root`` and its tensors, which would
    then outlive the user's model until Python's cyclic collector ran."""
    t = SiteTracer()
    try:
        return t.trace(root, **kwargs)
    finally:
        t.__dict__.clear()


class _Watched:
    """``t.site`` while a forward is traced: the same facts, noting whether the forward may have seen the
    site's shape (d_in, d_out) and its path (anything but the shape, layout and spec, which every key
    holds, counts as the path). A traced graph is otherwise shape-free: the variant's tensors are proxies
    while it is traced, so their shapes cannot steer it."""

    _KEYED = ("layout", "spec")
    _SHAPE = ("d_in", "d_out")

    def __init__(self, info: SiteInfo):
        self.info, self.read_shape, self.read_path = info, False, False

    def __getattr__(self, name: str) -> Any:
        if name in self._SHAPE:
            self.read_shape = True
        elif name not in self._KEYED:
            self.read_path = True
        return getattr(self.info, name)

    def _whole(self) -> SiteInfo:
        self.read_shape = self.read_path = True
        return self.info

    def __repr__(self) -> str:
        return repr(self._whole())

    def __eq__(self, other: object) -> bool:
        return self._whole() == other

    def __hash__(self) -> int:
        return hash(self._whole())


@dataclass
class Traces:
    """The variant graphs of one rewrite (or load), each traced once per kind of site.

    Two sites trace to the same graph when they agree on everything a forward can branch on while it
    is traced: the variant's fields, the site's layout and bias, the cast, the names, dtypes and
    devices of the tensors, the modules; for a forward that reads ``t.site.d_in`` or ``d_out``, the
    site's shape and its tensors' shapes; and, for a forward that reads ``t.site.path``, the variant's
    ``trace_key`` of it (by default the path itself, so such sites are traced one by one). So the
    q, k, v, o, gate, up and down projections of a transformer share one graph unless a forward
    asks for more.
    """

    graphs: dict[Hashable, VariantGraph] = field(default_factory=dict)
    # per kind: does forward read (t.site.d_in or d_out, t.site.path)?
    reads: dict[Hashable, tuple[bool, bool]] = field(default_factory=dict)

    @staticmethod
    def _key(kind: Hashable, reads: tuple[bool, bool], variant: Variant, tensors: dict[str, torch.Tensor],
             site: SiteInfo) -> Hashable:
        shape = (site.d_in, site.d_out, tuple(tuple(t.shape) for t in tensors.values())) if reads[0] else None
        return kind, shape, variant.trace_key(site) if reads[1] else None

    def key(self, variant: Variant, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module],
            has_bias: bool, site: SiteInfo, cast: bool) -> Hashable | None:
        """The kind of a site, or None when it cannot be told (a variant with an unhashable field)."""
        specs = tuple((n, t.dtype, t.device.type) for n, t in tensors.items())
        kind = (variant, site.layout, site.spec, has_bias, cast, specs, tuple(modules))
        try:
            hash(kind)
        except TypeError:
            return None
        reads = self.reads.get(kind)
        return (kind, None, None) if reads is None else self._key(kind, reads, variant, tensors, site)

    def get(self, variant: Variant, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module],
            has_bias: bool, site: SiteInfo, cast: bool) -> tuple[VariantGraph, Hashable | None]:
        """The variant graph of this site and its key (None: traced for this site alone)."""
        key = self.key(variant, tensors, modules, has_bias, site, cast)
        if key is not None and key in self.graphs:
            return self.graphs[key], key
        watched = _Watched(site)
        vg = trace_variant(variant, tensors, modules, has_bias, watched, cast)
        if key is not None:
            kind = key[0]
            self.reads[kind] = (watched.read_shape, watched.read_path)
            key = self._key(kind, self.reads[kind], variant, tensors, site)
            self.graphs[key] = vg
        return vg, key


def trace_variant(variant: Variant, tensors: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                  has_bias: bool, site: SiteInfo | _Watched, cast: bool) -> VariantGraph:
    holder = _Holder(variant, tensors, modules, site, cast)
    concrete = None if has_bias else {"bias": None}
    try:
        graph = trace(holder, concrete_args=concrete)
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure is the variant's forward breaking a rule
        raise VariantContractError(
            f"{variant.short()}.forward at {site.path} cannot be traced with torch.fx ({type(e).__name__}: "
            f"{_first_line(e)}). A variant's forward must be a static graph: no `if` or `while` on tensor values, "
            "no `len()` or Python iteration over a tensor; branch only on the variant's fields and t.site. "
            "See the rules in surgery/variant.py."
        ) from e
    for node in reversed(graph.nodes):  # the casts of inputs a variant never reads (y, for one that recomputes it)
        if node.op == "call_method" and node.target == "to" and not node.users:
            graph.erase_node(node)
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in tensors and not node.target.startswith(
                tuple(m + "." for m in modules)):
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


def put(root: nn.Module, name: str, value: torch.Tensor | nn.Module, persistent: bool = True) -> None:
    """Register a tensor (a Parameter as a parameter, anything else as a buffer) or module under a dotted
    ``name``, making plain container modules for the levels that are not there yet."""
    *parents, leaf = name.split(".")
    for p in parents:
        if p not in root._modules:
            root.add_module(p, nn.Module())
        root = root._modules[p]
    if isinstance(value, nn.Module):
        root.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        root.register_parameter(leaf, value)
    else:
        root.register_buffer(leaf, value, persistent=persistent)


@dataclass
class Part:
    """One named adapter going into a site: new (tensors from ``init``) or already there (its live tensors,
    modules and strength buffer, so an optimizer holding them goes on training the same objects)."""

    name: str
    variant: Variant
    tensors: dict[str, torch.Tensor]
    active: bool = True
    modules: dict[str, nn.Module] | None = None  # None: the variant's modules(), made now
    scale: torch.Tensor | None = None  # None: a new strength buffer at 1

    def place(self, root: nn.Module, like: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
        """Register the part on a site's module (``frozen`` tensors as buffers, the rest as parameters); returns
        its tensors (with its strength buffer) and modules by their names under ``root``."""
        prefix = slot_prefix(self.name)
        tensors: dict[str, torch.Tensor] = {}
        for n, t in self.tensors.items():
            if not isinstance(t, nn.Parameter):
                # an SVD's factors come out strided (PiSSA's A and B); FSDP2's fully_shard refuses those
                t = t.contiguous()
                if n not in self.variant.frozen:
                    t = nn.Parameter(t)
            put(root, prefix + n, t)
            tensors[prefix + n] = t
        if self.modules is None:
            self.modules = self.variant.modules()
        for n, m in self.modules.items():
            put(root, prefix + n, m)
        if self.scale is None:
            self.scale = new_scale(like)
        put(root, prefix + SCALE, self.scale, persistent=False)
        tensors[prefix + SCALE] = self.scale
        return tensors, {prefix + n: m for n, m in self.modules.items()}


def place(root: nn.Module, parts: list[Part], like: torch.Tensor) -> tuple["Stack", dict[str, torch.Tensor],
                                                                          dict[str, nn.Module]]:
    """Register every part on ``root``; returns the variant the site's forward runs (its active parts) and
    all tensors and modules by name."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}
    for part in parts:
        t, m = part.place(root, like)
        tensors.update(t)
        modules.update(m)
    return Stack(parts=tuple((p.name, p.variant) for p in parts if p.active)), tensors, modules


class _Slot:
    """A named adapter's module seen by its variant's forward as ``t``: its own tensors and strength, and the
    site's static facts as ``t.site``."""

    def __init__(self, module: nn.Module, site: Any, base: Callable):
        self.__dict__.update(_module=module, site=site, base=base)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@dataclass(frozen=True)
class Stack(Variant):
    """The adapters a site runs, as one forward: a single one exactly as its variant writes it; several as
    ``y + sum_i (out_i - y)``, each ``out_i`` blended with its own strength c_i (``y + c_i (out_i - y)``), so
    that strengths change without a retrace. No adapter at all: the base output."""

    parts: tuple[tuple[str, Variant], ...] = ()

    def forward(self, x, y, weight, bias, t):
        if len(self.parts) == 1:
            name, v = self.parts[0]
            return v.forward(x, y, weight, bias, _view(t, name))
        out = y
        for name, v in self.parts:
            tv = _view(t, name)
            o = v.forward(x, y, weight, bias, tv)
            if not v.steered:
                o = blend(y, o, tv.surgery_scale)
            out = out + (o - y)
        return out

    def trace_key(self, site: SiteInfo) -> Hashable:
        return tuple(v.trace_key(site) for _, v in self.parts)

    def short(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0][1].short()
        return " + ".join(f"{name}: {v.short()}" for name, v in self.parts) or "no active adapter"


def _view(t: Any, name: str) -> Any:
    return t if name == DEFAULT else _Slot(getattr(getattr(t, ADAPTERS), name), t.site, t.base)


def add_constants(module: nn.Module, vg: VariantGraph) -> None:
    """Register the constants traced from a variant's forward on ``module``, outside its state_dict."""
    for target, value in vg.constants.items():
        module.register_buffer(constant_name(target), value, persistent=False)


def new_scale(like: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=like.device)


def blend(y: torch.Tensor, out: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``y + c (out - y)``, exactly ``out`` at c = 1 and exactly ``y`` at c = 0, with no branch on c
    (so a compiled model never recompiles for a new c)."""
    return torch.where(c == 1, out, torch.where(c == 0, y, y + (out - y) * c))


def add_gate(graph: fx.Graph, *, x: str, y: str, out: str, layout: str, has_bias: bool, replaced: bool,
             prefix: str, scale: str, meta: dict[str, Any], opaque: str | None = None) -> str:
    """Insert ``blend(base output, adapted output, c)`` after ``out`` and route ``out``'s users to it.

    The base output is the graph's own ``y`` where it is still there and unchanged, else it is
    recomputed from ``x`` (from the original weight when the variant replaced it; by calling ``opaque``, the
    site's opaque base, if it has one). Returns the blend's name.
    """
    nodes = {n.name: n for n in graph.nodes}
    anchor = nodes[out]
    new: list[fx.Node] = []

    def add(op: str, target: Any, args: tuple = ()) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            node = graph.create_node(op, target, args)
        node.meta["surgery"] = dict(meta)
        new.append(node)
        anchor = node
        return node

    if y and not replaced:
        base = nodes[y]
    elif opaque is not None:
        base = add("call_module", prefix + opaque, (nodes[x],))
    else:
        if layout not in ("linear", "conv1d"):  # every variant on the other layouts reads y and keeps the weight
            raise AssertionError(f"no base output to blend with at a site of layout {layout!r}")
        w = add("get_attr", prefix + (BASE_WEIGHT if replaced else "weight"))
        if layout == "conv1d":
            w = add("call_method", "t", (w,))
        b = add("get_attr", prefix + "bias") if has_bias else None
        base = add("call_function", torch.nn.functional.linear, (nodes[x], w, b))
    c = add("get_attr", prefix + scale)
    gate = add("call_function", blend, (base, nodes[out], c))
    keep = set(new)
    nodes[out].replace_all_uses_with(gate, delete_user_cb=lambda user: user not in keep)
    return gate.name


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
           prefix: str, meta: dict[str, Any], base: Callable[[tuple, Add], fx.Node]) -> list[fx.Node]:
    """Copy ``vg`` into ``graph`` after ``y`` and route every use of ``y`` to its output.

    get_attr / call_module targets are prefixed with ``prefix`` (empty inside a module-scope Site,
    the module path in a whole-model graph); a traced constant is renamed to ``constant_name``, and
    the caller registers it there. fx's guard on a None bias is dropped, and ``t.base(x)`` (``base_op``) becomes
    ``base(args)``'s nodes (``base_caller``). Returns the new nodes, each stamped with ``meta``.
    """
    inputs = iter((x, y, weight, bias))  # the placeholders of _Holder.forward, in order
    env: dict[fx.Node, Any] = {}
    new: list[fx.Node] = []
    out_value = None
    anchor = y

    def add(op: str, target: Any, args: tuple) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.create_node(op, target, args)
        anchor.meta["surgery"] = dict(meta)
        new.append(anchor)
        return anchor

    for node in vg.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(inputs)
            continue
        if node.op == "output":
            out_value = fx.graph.map_arg(node.args[0], lambda n: env[n])
            continue
        if node.op == "call_function" and node.target is _ASSERT_IS_NONE:
            continue
        if node.op == "call_function" and node.target is base_op:
            env[node] = base(fx.graph.map_arg(node.args, lambda n: env[n]), add)
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
