"""Graph scope: sites are regions of a whole-model GraphModule from ``surgery.trace``.

A region is the part of the traced graph that computes one adaptable module:

- fx route: the module's ``call_module`` node (x = its input, y = the node itself);
- export route: ATen nodes whose innermost module path is the module: ``aten.linear`` for
  nn.Linear; ``view -> addmm -> view`` for GPT-2's Conv1D (x = the first view's input, y = the
  last view).

A path is adaptable only if the module the user traced there was an adaptable class (recorded by
``trace``), so both scopes agree on what can be adapted: a MoE router that computes ``F.linear``
with its own weight is not an nn.Linear and is refused in both.

At each site the engine inserts ``get_attr`` nodes for the weight (transposed to (d_out, d_in)
for Conv1D) and bias, then runs the same ``trace_variant`` + ``splice`` as module scope, with the
module path as prefix; the ones the variant does not read are erased again. The variant's tensors
live on a private shallow copy of the module at that path (``_holder``), so state_dict keys read
``<path>.lora_A`` as in module scope, while the eager model that shares its parameters with the
GraphModule is never written to: a replaced base weight (PiSSA) or a merged weight is a new
Parameter on that copy, and ``remove`` puts the original module back.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from ..errors import ConfigError, GraphScopeError
from ..param import adaptable_parameter, parameters
from ..site import SiteAPI, SiteRecord, base_output, layout_of_class, op_spec, stored_weight
from ..splice import (BASE_WEIGHT, SCALE, Part, Traces, add_constants, add_gate, base_caller, place, put, slot_prefix,
                      splice)
from ..capture import module_path, route
from ..variant import SiteInfo, SiteInit
from .base import Base, Emit, Scope, Staged, Txn, record, unmodified

_aten = torch.ops.aten


@dataclass
class Region:
    """Where one adaptable module sits in the graph (before any splice)."""

    path: str
    layout: str
    x: fx.Node
    y: fx.Node
    first: fx.Node  # the region's first node: weight/bias get_attr nodes go before it
    calls: int  # how many times the module runs in the graph (graph scope needs exactly one)
    x_arg: int = 0  # which argument of ``first`` is x (aten.embedding takes the weight first, the ids second)


def _state(gm: fx.GraphModule) -> dict[str, Any]:
    return gm.meta["surgery"]


def _get_attr_target(node: Any) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def regions(gm: fx.GraphModule, graph: fx.Graph | None = None) -> dict[str, Region]:
    """Adaptable, not yet rewritten modules of ``gm`` (nodes taken from ``graph``, default ``gm.graph``)."""
    graph = gm.graph if graph is None else graph
    modules = _state(gm)["modules"]
    out: dict[str, Region] = {}

    def add(path, lay, x, y, first, x_arg=0):
        if lay is None or path not in modules or layout_of_class(type(modules[path])) != lay:  # e.g. a router computing F.linear with its weight
            return
        if path in out:
            out[path].calls += 1
        else:
            out[path] = Region(path, lay, x, y, first, 1, x_arg)

    fx_route = route(gm) == "fx"
    for n in graph.nodes:
        if "surgery" in n.meta:
            continue
        if fx_route:
            if n.op == "call_module" and len(n.args) == 1 and not n.kwargs:
                add(n.target, layout_of_class(type(gm.get_submodule(n.target))), n.args[0], n, n)
            continue
        path = module_path(n)
        if n.target is _aten.linear.default and _get_attr_target(n.args[1]) == f"{path}.weight":
            add(path, "linear", n.args[0], n, n)
        elif n.target is _aten.addmm.default and _get_attr_target(n.args[2]) == f"{path}.weight":
            flat, users = n.args[1], list(n.users)
            if (isinstance(flat, fx.Node) and flat.target is _aten.view.default and len(users) == 1
                    and users[0].target is _aten.view.default and module_path(flat) == path):
                add(path, "conv1d", flat.args[0], users[0], flat)
        elif n.target is _aten.embedding.default and _get_attr_target(n.args[0]) == f"{path}.weight":
            add(path, "embedding", n.args[1], n, n, x_arg=1)
        elif n.target in _CONVS and _get_attr_target(n.args[1]) == f"{path}.weight":
            add(path, "conv", n.args[0], n, n)
    return out


_CONVS = (_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.conv1d.padding,
          _aten.conv2d.padding, _aten.conv3d.padding)


def _tied(modules: dict[str, nn.Module], path: str) -> list[str]:
    """The other modules of the traced model holding the very weight Parameter of ``path``."""
    w = getattr(modules.get(path), "weight", None)
    return [p for p, m in modules.items() if p != path and w is not None and getattr(m, "weight", None) is w]


def _holder(module: nn.Module) -> nn.Module:
    """A shallow copy with its own parameter/buffer/module tables: same tensors, separate names."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    if "bias" not in new._parameters:
        new.register_parameter("bias", None)
    return new



def _spliced(graph: fx.Graph, path: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.meta.get("surgery", {}).get("site") == path]


def _region(spliced: list[fx.Node], x: fx.Node, y: fx.Node, out: fx.Node, holder: nn.Module,
            path: str) -> tuple[nn.Module, fx.Graph]:
    """A site's spliced nodes as a standalone graph ``(x, y) -> adapted y``, and a root holding its tensors."""
    g = fx.Graph()
    env = {x: g.placeholder("x"), y: g.placeholder("y")}
    for n in spliced:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[out])
    root = nn.Module()
    put(root, path, holder)
    return root, g


def region_module(graph: fx.Graph, holder: nn.Module, rec: SiteRecord) -> fx.GraphModule:
    """The site's spliced nodes as a standalone GraphModule ``(x, y) -> adapted y``."""
    nodes = {n.name: n for n in graph.nodes}
    root, g = _region(_spliced(graph, rec.path), nodes[rec.x], nodes[rec.y], nodes[rec.out], holder, rec.path)
    return fx.GraphModule(root, g, class_name=f"{rec.base_class}Site")


def _unsplice(graph: fx.Graph, records: list[SiteRecord]) -> None:
    """Erase the sites' nodes from ``graph`` and route each base output back to their users (one pass over
    the graph for all of them)."""
    nodes = {n.name: n for n in graph.nodes}
    spliced: dict[str, list[fx.Node]] = {rec.path: [] for rec in records}
    for n in graph.nodes:
        path = n.meta.get("surgery", {}).get("site")
        if path in spliced:
            spliced[path].append(n)
    for rec in records:
        keep = set(spliced[rec.path])
        if rec.out != rec.y:
            nodes[rec.out].replace_all_uses_with(nodes[rec.y], delete_user_cb=lambda u: u not in keep)
        for n in reversed(spliced[rec.path]):
            graph.erase_node(n)


class GraphSite(SiteAPI):
    """A graph-scope site: a view of its nodes in the GraphModule and of the module holding its tensors."""

    def __init__(self, gm: fx.GraphModule, record: SiteRecord, holder: nn.Module, graph: fx.Graph | None = None):
        self._gm, self.record, self.holder = gm, record, holder
        self._graph = graph  # while staged: the working copy of the graph

    def _owner(self) -> nn.Module:
        return self.holder

    def __getattr__(self, name: str) -> torch.Tensor:
        """An adapter tensor by name (``site.lora_A``), as on a module-scope Site."""
        if name.startswith("_") or name in ("record", "holder"):
            raise AttributeError(name)
        tensors = self.adapter_tensors()
        if name in tensors:
            return tensors[name]
        raise AttributeError(f"{type(self).__name__} at {self.path} has no attribute or adapter tensor {name!r}")

    @property
    def weight(self) -> torch.Tensor:
        return self.holder.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.holder.bias

    @property
    def code(self) -> str:
        """The spliced region as Python: ``forward(x, y)`` -> the adapted output."""
        graph = self._gm.graph if self._graph is None else self._graph
        return region_module(graph, self.holder, self.record).code.strip("\n") + "\n"

    def __repr__(self) -> str:
        return f"GraphSite({self.path}: {self.describe()})"


class GraphTxn(Txn):
    def __init__(self, gm: fx.GraphModule, rebuild: list[SiteRecord]):
        super().__init__()
        self.gm = gm
        self.graph = copy.deepcopy(gm.graph)
        _unsplice(self.graph, rebuild)  # sites built again: their regions come back, to be spliced anew
        self.found = regions(gm, self.graph)
        self.traces = Traces()
        # set by commit, for uncommit: the model's graph, site records and their inputs before it
        self.graph_before: fx.Graph | None = None
        self.records_before: dict[str, SiteRecord] = {}
        self.inputs_before: dict[str, str] = {}

    def stage(self, base: Base, parts: list[Part], ctx: SiteInit) -> Staged:
        gm, graph, path = self.gm, self.graph, base.path
        reg = self.found[path]
        x = reg.first.args[reg.x_arg]  # now: a site spliced before this one may feed it (its adapted output)
        original = base.module if base.site is None else base.site.record.original
        holder = _holder(original)
        if base.site is not None:  # the live base tensors (FSDP2 or load_state_dict(assign=True) may have new ones)
            holder._parameters["weight"], holder._parameters["bias"] = base.site.weight, base.site.bias
        replacement = None
        if ctx.new_weight is not None:  # a new Parameter at commit: the shared original stays untouched for restore
            w = stored_weight(ctx.new_weight, reg.layout, holder.weight.shape).to(holder.weight.dtype)
            replacement = self.spill.put(w, f"the new base weight of {path}")
            # the eager model's own tensor, no copy: the record's original module holds it anyway
            holder.register_buffer(BASE_WEIGHT, original.weight.detach(), persistent=False)
        stack, tensors, modules = place(holder, parts, holder.weight)
        for m in modules.values():  # the mode of the user's module (an exported GraphModule is always "training")
            m.train(_state(gm)["modules"][path].training)
        meta = {"site": path, "variant": stack.short()}
        with graph.inserting_before(reg.first):
            w_node = graph.get_attr(f"{path}.weight")
            b_node = graph.get_attr(f"{path}.bias") if holder.bias is not None else None
            w_lin = (w_node if reg.layout == "linear" else graph.call_method("flatten", (w_node, 1))
                     if reg.layout == "conv" else graph.call_method("t", (w_node,)))
        inputs = list(dict.fromkeys(n for n in (w_node, b_node, w_lin) if n is not None))  # in graph order
        for n in inputs:
            n.meta["surgery"] = dict(meta)
        info = SiteInfo(path=path, d_in=ctx.d_in, d_out=ctx.d_out, layout=reg.layout, spec=base.spec)
        vg, _ = self.traces.get(stack, tensors, modules, has_bias=holder.bias is not None, site=info,
                                cast=ctx.dtype != holder.weight.dtype)
        add_constants(holder, vg)
        new = splice(graph, vg, x=x, y=reg.y, weight=w_lin, bias=b_node, prefix=path + ".", meta=meta,
                     base=base_caller(info, None))
        for n in reversed(inputs):  # the weight/bias nodes the variant does not read are bookkeeping
            if not n.users:
                graph.erase_node(n)
        read = [n for n in inputs if n.users]
        stack = reg.y.meta.get("nn_module_stack")
        if stack is not None:  # spliced nodes belong to the site's module, like the region they extend
            for n in [*read, *new]:
                n.meta["nn_module_stack"] = stack.copy()
        out = next((n for n in new if any(u not in new for u in n.users)), reg.y)
        rec = record(base, ctx, parts, x=x.name, y=reg.y.name, out=out.name)
        site = GraphSite(gm, rec, holder, graph)

        def probe(x_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            modes = [(m, m.training) for m in holder.modules()]  # the region shares the holder
            weight = holder._parameters["weight"]
            try:
                if replacement is not None:  # until commit, the holder keeps the original
                    holder._parameters["weight"] = nn.Parameter(replacement.load(), requires_grad=False)
                root, g = _region([*read, *new], x, reg.y, out, holder, path)
                with torch.no_grad():
                    y = base_output(x_, holder.weight, holder.bias, rec.layout, rec.spec)
                    got = fx.Interpreter(root.eval(), graph=g).run(x_, y)  # no code generated for a probe
                    return got, (None if rec.replaced else unmodified(y))
            finally:
                holder._parameters["weight"] = weight
                for m, mode in modes:
                    m.training = mode

        staged = Staged(site, probe, replacement)
        self.staged[path] = staged
        return staged


class GraphScope(Scope):
    noun = "GraphModule"
    shares_weights = True

    def _regions(self) -> dict[str, Region]:
        """regions() of the current graph, found once per call: base() is asked once per site."""
        if getattr(self, "_found", None) is None:
            self._found = regions(self.model)
        return self._found

    @property
    def _records(self) -> dict[str, SiteRecord]:
        return _state(self.model)["sites"]

    def candidates(self) -> dict[str, nn.Module]:
        """The modules of the model that was traced, by path, as module scope sees them (a callable
        `where` gets the user's own module objects, whatever the GraphModule holds at that path)."""
        inside = tuple(p + "." for p in self._records)
        return {p: m for p, m in _state(self.model)["modules"].items() if p and not p.startswith(inside)}

    def parameters(self) -> dict[str, nn.Parameter]:
        return parameters({"": _state(self.model)["modules"][""], **self.candidates()})

    def _names_parameter(self, path: str) -> bool:
        """``path in self.parameters()``, looking at its owner only: base() asks once per site, and building
        every Parameter's path each time made a rewrite quadratic in the size of the model."""
        owner, _, name = path.rpartition(".")
        mod = _state(self.model)["modules"].get(owner)
        if mod is None or any(owner.startswith(p + ".") for p in self._records):
            return False
        return path in parameters({owner: mod})

    def adaptable(self) -> set[str]:
        # adaptable classes the graph never runs are included, so that naming one is refused by base() with
        # the reason, instead of "no variant can adapt a Linear"; so are Parameters, which base() refuses
        modules = _state(self.model)["modules"]
        return (set(self._regions()) | {p for p, m in modules.items() if p and layout_of_class(type(m))}
                | {p for p, w in self.parameters().items() if adaptable_parameter(w)})

    def sites(self) -> dict[str, GraphSite]:
        records = self._records
        return {p: GraphSite(self.model, records[p], self.model.get_submodule(p))  # in model order, as module scope
                for p in _state(self.model)["modules"] if p in records}

    def base(self, path: str) -> Base:
        if path in self._records:  # a site getting another adapter: its region comes back in the transaction
            rec = self._records[path]
            return Base(path, rec.layout, rec.base_class, self.model.get_submodule(path),
                        site=GraphSite(self.model, rec, self.model.get_submodule(path)), spec=rec.spec)
        if self._names_parameter(path):
            raise ConfigError(
                f"{path} is a Parameter, and a graph-scope site is a region of the traced graph around one call of a "
                f"layer, while a parameter site replaces the Parameter by its fold wherever it is read. Adapt it in "
                f"module scope: surgery.rewrite on the eager model (not on the output of surgery.trace)."
            )
        reg = self._regions().get(path)
        tied = _tied(_state(self.model)["modules"], path) if reg is None else []
        if tied:
            raise GraphScopeError(
                f"{path} cannot be a graph-scope site: its weight is tied to {tied[0]}.weight, and the traced graph "
                f"reads that one Parameter under a single name for both, so neither call can be told apart as "
                f"{path}'s region. Module scope handles it (surgery.rewrite on the eager model: an adapter on "
                f"{path} leaves {tied[0]} unchanged, and merge unties them), or untie them before surgery.trace."
            )
        if reg is None or reg.calls != 1:
            raise GraphScopeError(
                f"{path} cannot be a graph-scope site: "
                + ("it never runs as a plain linear map in the traced graph (not called by the forward that was "
                   "traced, so an adapter there would be a silent no-op, or called in a way the graph does not "
                   "show as one linear region)" if reg is None else
                   f"it runs {reg.calls} times in the graph, and each call would need its own site")
                + ". Rewrite the eager model instead (module scope), or leave it out of `where`."
            )
        spec = op_spec(path, _state(self.model)["modules"][path])
        return Base(path, reg.layout, self.class_name(path), self.model.get_submodule(path), spec=spec)

    def class_name(self, path: str) -> str:
        return type(_state(self.model)["modules"][path]).__name__

    def model_class(self) -> type:
        return type(_state(self.model)["modules"][""])

    def begin(self, rebuild: list[str] = ()) -> Txn:
        return GraphTxn(self.model, [self._records[p] for p in rebuild])

    def commit(self, txn: Txn) -> None:
        self._found = None
        gm = self.model
        records = {p: st.site.record for p, st in txn.staged.items()}
        # what uncommit puts back: the module at each path (as module scope keeps it), the graph, the records and
        # their inputs (a rebuilt site's new output renames the input of the sites it feeds)
        txn.previous.update({p: gm.get_submodule(p) for p in records})
        txn.graph_before, txn.records_before = gm.graph, dict(self._records)
        txn.inputs_before = {p: r.x for p, r in self._records.items()}
        try:
            for path, st in txn.staged.items():
                if st.new_weight is not None:
                    st.site.holder.weight = nn.Parameter(st.new_weight.load(), requires_grad=False)
                self.put(path, st.site.holder)
                st.site._graph = None  # from now on the site reads the GraphModule's graph
            txn.graph.lint()
            gm.graph = txn.graph  # the setter recompiles
            for path, rec in records.items():
                old = self._records.get(path)
                if old is not None:  # a site built again: the sites it fed read its new output
                    for other in self._records.values():
                        if other.path not in records and other.x == old.out:
                            other.x = rec.out
            self._records.update(records)
        except BaseException:
            self.uncommit(txn)
            raise
        finally:
            txn.spill.close()

    def uncommit(self, txn: Txn) -> None:
        self._found = None
        for path, module in txn.previous.items():
            self.put(path, module)
        self._records.clear()
        self._records.update(txn.records_before)
        for p, x in txn.inputs_before.items():
            self._records[p].x = x
        self.model.graph = txn.graph_before

    def remove(self, paths, folded=None, untie=frozenset(), dequantize=False) -> dict[str, float]:
        self._found = None
        gm, graph = self.model, self.model.graph
        _unsplice(graph, [self._records[p] for p in paths])
        fed: dict[str, list[SiteRecord]] = {}
        for rec in self._records.values():
            fed.setdefault(rec.x, []).append(rec)
        for path in paths:
            rec = self._records[path]
            for other in fed.get(rec.out, []):  # a site fed by this one now reads its base output
                other.x = rec.y
        graph.lint()
        gm.recompile()
        for path in paths:
            rec = self._records.pop(path)
            module = rec.original
            kept = gm.get_submodule(path)._buffers.get(BASE_WEIGHT)
            if kept is not None and kept.data_ptr() != rec.original.weight.data_ptr():
                with torch.no_grad():  # the model was cast or moved since the rewrite: the original follows
                    rec.original.weight.data = kept
            if folded is not None:  # new Parameters: the originals are shared with the eager model
                W, b = folded(path)
                module = _holder(rec.original)
                module.weight = nn.Parameter(stored_weight(W, rec.layout, rec.original.weight.shape)
                                             .to(rec.original.weight.dtype).contiguous())
                if b is not None:
                    module.bias = nn.Parameter(b.to(rec.original.bias.dtype))
            self.put(path, module)
        return {}  # a trace holds no opaque base (surgery.trace refuses quantised layers), so nothing re-quantised

    def gate(self, paths: list[str]) -> None:
        gm = self.model
        for path in paths:
            rec, holder = self._records[path], gm.get_submodule(path)
            out = add_gate(gm.graph, x=rec.x, y=rec.y, out=rec.out, layout=rec.layout, has_bias=holder.bias is not None,
                           replaced=rec.replaced, prefix=path + ".", scale=slot_prefix(rec.active[0]) + SCALE,
                           meta={"site": path, "variant": rec.running.short()})
            for other in self._records.values():  # a site fed by this one reads the blend now
                if other.x == rec.out:
                    other.x = out
            rec.out, rec.gated = out, True
        gm.graph.lint()
        gm.recompile()

    @contextmanager
    def bypass(self) -> Iterator[None]:
        """A temporary graph without the sites' nodes, their holders holding the original weights."""
        gm, old = self.model, self.model.graph
        graph = copy.deepcopy(old)
        swapped = []
        _unsplice(graph, list(self._records.values()))
        for path, rec in self._records.items():
            if rec.replaced:
                holder = gm.get_submodule(path)
                swapped.append((holder, holder._parameters["weight"]))
                holder._parameters["weight"] = nn.Parameter(holder.surgery_base_weight, requires_grad=False)
        graph.lint()
        gm.graph = graph
        try:
            yield
        finally:
            for holder, weight in swapped:
                holder._parameters["weight"] = weight
            gm.graph = old

    @contextmanager
    def taps(self, paths: list[str], emit: Emit) -> Iterator[None]:
        """A temporary graph with a tap on each site's input node."""
        gm = self.model
        found = regions(gm)
        graph = copy.deepcopy(gm.graph)
        by_name = {n.name: n for n in graph.nodes}
        key = id(emit)
        records = self._records
        for p in paths:  # a site getting another adapter: its input, as its record names it
            x = by_name[records[p].x if p in records else found[p].x.name]
            with graph.inserting_after(x):
                graph.call_function(_tap, (x, key, p))
        old = gm.graph
        _EMIT[key] = emit
        gm.graph = graph
        try:
            yield
        finally:
            _EMIT.pop(key, None)
            gm.graph = old

    def get_flags(self):
        return _state(self.model).get("flags")

    def set_flags(self, flags) -> None:
        _state(self.model)["flags"] = flags

    def get_unfrozen(self):
        return dict(_state(self.model).get("unfrozen", {}))

    def set_unfrozen(self, unfrozen) -> None:
        if unfrozen:
            _state(self.model)["unfrozen"] = dict(unfrozen)
        else:
            _state(self.model).pop("unfrozen", None)


_EMIT: dict[int, Any] = {}  # live tap callbacks by id: graph arguments must be plain values


def _tap(x: torch.Tensor, key: int, path: str) -> None:
    _EMIT[key](path, x)
