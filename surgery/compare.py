"""What a surgery changed: a structural diff of graphs, grouped by site.

``diff(before, after)`` takes two models (module scope: each site's graph against the traced
graph of the leaf it replaced, plus module class changes such as Linear -> Site) or two
GraphModules from ``surgery.trace`` (graph scope: the whole graphs). Nodes are matched by name
(fx keeps the names of a graph's existing nodes when new ones are spliced in); a node stamped with
``node.meta["surgery"]`` is the variant's, so it counts as added whatever its name. A matched node
whose op, target, arguments or tensor value differ is ``changed``.

This module only computes; ``surgery/render.py`` draws (SVG, HTML) and is imported lazily.
"""

from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import DiffInputError
from .scope import ModuleScope
from . import quant
from .param import ParamSite
from .site import Site, adaptable
from .weights import WeightChange, of_model, table
from .weights import changes as weight_changes

ADDED, REMOVED, CHANGED = "added", "removed", "changed"
GRAPH = "(graph)"  # group of graph-scope changes that belong to no module path


@dataclass(frozen=True)
class NodeChange:
    """One node added, removed or changed, with its line before and after (None where absent)."""

    group: str  # the site path it belongs to (or a module path / GRAPH in graph scope)
    name: str
    kind: str  # ADDED | REMOVED | CHANGED
    op: str
    before: str | None
    after: str | None
    reason: str = ""  # for CHANGED: what differs ("arguments", "target", "weights", ...)

    def __str__(self) -> str:
        if self.kind == ADDED:
            return f"+ {self.after}"
        if self.kind == REMOVED:
            return f"- {self.before}"
        return f"- {self.before}\n+ {self.after}   # changed: {self.reason}"


@dataclass
class Group:
    """The changes at one site (or one module path), with both graphs for drawing."""

    path: str
    variant: str | None = None
    before_class: str | None = None
    after_class: str | None = None
    before_graph: fx.Graph | None = None
    after_graph: fx.Graph | None = None
    before_code: str = ""
    after_code: str = ""
    changes: list[NodeChange] = field(default_factory=list)

    @property
    def class_change(self) -> bool:
        return self.before_class != self.after_class

    def count(self, kind: str) -> int:
        return sum(c.kind == kind for c in self.changes)

    def signature(self) -> tuple:
        """Equal for groups whose changes have the same shape (layer 0's k_proj and layer 1's)."""
        return (self.before_class, self.after_class, self.variant,
                tuple(sorted(_strip(c.kind + str(c.before) + str(c.after)) for c in self.changes)))


def _strip(line: str) -> str:
    # node names differ between layers only by fx's numeric suffixes and the layer index in paths
    return re.sub(r"\d+", "#", re.sub(r"(?:_\d+)+\b", "", line))


@dataclass
class Diff:
    """The result of ``surgery.diff``: ``.added``, ``.removed``, ``.changed``, ``str()``, SVG, HTML."""

    scope: str  # "module", "graph", or "checkpoint" (two checkpoint directories: weights only)
    groups: dict[str, Group]
    weights: list[WeightChange] = field(default_factory=list)  # tensors whose values differ (surgery/weights.py)
    # (path, class) of every module of the after side, sites as their base class; "" is the root. Empty for two
    # checkpoints, whose map is built from the tensor names
    modules: list[tuple[str, str]] = field(default_factory=list)

    @property
    def added(self) -> list[NodeChange]:
        return [c for g in self.groups.values() for c in g.changes if c.kind == ADDED]

    @property
    def removed(self) -> list[NodeChange]:
        return [c for g in self.groups.values() for c in g.changes if c.kind == REMOVED]

    @property
    def changed(self) -> list[NodeChange]:
        return [c for g in self.groups.values() for c in g.changes if c.kind == CHANGED]

    @property
    def classes(self) -> dict[str, tuple[str | None, str | None]]:
        """Module class changes, path -> (class before, class after); module scope only."""
        return {p: (g.before_class, g.after_class) for p, g in self.groups.items() if g.class_change}

    @property
    def sites(self) -> list[str]:
        return list(self.groups)

    def __bool__(self) -> bool:
        return bool(self.weights) or any(g.changes or g.class_change for g in self.groups.values())

    def folded(self) -> list[tuple[Group, list[Group]]]:
        """Groups with identical changes folded together: (first, the others like it), in order."""
        out: dict[tuple, tuple[Group, list[Group]]] = {}
        for g in self.groups.values():
            key = g.signature()
            if key in out:
                out[key][1].append(g)
            else:
                out[key] = (g, [])
        return list(out.values())

    def __str__(self) -> str:
        n_sites = sum(1 for g in self.groups.values() if g.variant)
        if self.scope == "checkpoint":  # two checkpoints: weights only
            lines = [f"surgery diff (checkpoints): {len(self.weights)} tensor{'s' * (len(self.weights) != 1)} differ"]
        else:
            lines = [f"surgery diff ({self.scope} scope): {n_sites} site{'s' * (n_sites != 1)}, +{len(self.added)} "
                     f"added, -{len(self.removed)} removed, ~{len(self.changed)} changed nodes"]
        if not self:
            lines.append("no changes")
        for first, same in self.folded():
            for g in [first, *same]:
                head = f"@@ {g.path}"
                if g.class_change:
                    head += f"  {g.before_class or '(none)'} -> {g.after_class or '(none)'}"
                if g.variant:
                    head += f"  {g.variant}"
                head += f"  (+{g.count(ADDED)} -{g.count(REMOVED)} ~{g.count(CHANGED)})"
                if g is not first:
                    lines.append(f"{head}: same changes as {first.path}")
                    continue
                lines.append(head)
                lines += [str(c) for c in g.changes]
        if self.weights:
            lines.append(f"@@ weights: {len(self.weights)} tensor{'s' * (len(self.weights) != 1)} differ")
            lines += table(self.weights)
        return "\n".join(lines)

    __repr__ = __str__

    def map_svg(self, path=None) -> str:
        """The whole model as a map (surgery/modelmap.py): its module tree with repeated blocks drawn once
        with a count, sites and weight changes marked; writes ``path`` if given and returns the SVG text."""
        from .modelmap import svg

        text = svg(self, title=str(self).splitlines()[0])
        if path is not None:
            from pathlib import Path

            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_svg(self, path=None, *, context: int = 2) -> str:
        """Draw the diff with Graphviz; writes ``path`` if given and returns the SVG text."""
        from .render import to_svg

        return to_svg(self, path, context=context)

    def to_html(self, path=None, *, context: int = 2) -> str:
        """One standalone page: the drawing, a table of sites, each site's code before and after."""
        from .render import to_html

        return to_html(self, path, context=context)


# ----- describing nodes -----


def target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return str(t)  # aten.addmm.default, under torch.export
        return getattr(t, "__name__", str(t))
    return str(t)


_INFIX = {operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/", operator.matmul: "@"}


def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"({inner},)" if isinstance(a, tuple) and len(a) == 1 else (f"({inner})" if isinstance(a, tuple) else f"[{inner}]")
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, float):
        return f"{a:g}"
    return repr(a) if not isinstance(a, (torch.dtype, torch.device)) else str(a)


def node_line(node: fx.Node) -> str:
    """One node as a line of Python-like code: ``linear_1 = linear(input_1, lora_a)``."""
    args = ", ".join([_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()])
    if node.op == "placeholder":
        return f"{node.name} = <input {node.target}>"
    if node.op == "output":
        return f"return {args}"
    if node.op == "get_attr":
        return f"{node.name} = self.{node.target}"
    if node.op == "call_module":
        return f"{node.name} = self.{node.target}({args})"
    if node.op == "call_method":
        first, rest = (_arg(node.args[0]), node.args[1:]) if node.args else ("?", ())
        rest_s = ", ".join([_arg(a) for a in rest] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()])
        return f"{node.name} = {first}.{node.target}({rest_s})"
    if node.target in _INFIX and len(node.args) == 2 and not node.kwargs:
        return f"{node.name} = {_arg(node.args[0])} {_INFIX[node.target]} {_arg(node.args[1])}"
    return f"{node.name} = {target_name(node)}({args})"


def _key(node: fx.Node) -> tuple:
    """What must be equal for a node to count as unchanged (besides a tensor's value)."""
    t = node.target if node.op != "call_function" else target_name(node)
    return node.op, t, _arg(tuple(node.args)), _arg(dict(node.kwargs))


def _fetch(root: nn.Module | None, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _changed(b: fx.Node, a: fx.Node, root_b: nn.Module | None, root_a: nn.Module | None) -> str:
    if b.op != a.op or target_name(b) != target_name(a):
        return "target"
    if _arg(tuple(b.args)) != _arg(tuple(a.args)) or _arg(dict(b.kwargs)) != _arg(dict(a.kwargs)):
        return "arguments"
    if b.op == "get_attr":
        tb, ta = _fetch(root_b, b.target), _fetch(root_a, a.target)
        if isinstance(tb, torch.Tensor) and isinstance(ta, torch.Tensor):
            if tb.shape != ta.shape or tb.dtype != ta.dtype:
                return "weights (shape or dtype)"
            if tb is not ta and not torch.equal(tb.detach().cpu(), ta.detach().cpu()):
                return "weights"
    if b.op == "call_module":
        mb, ma = _fetch(root_b, b.target), _fetch(root_a, a.target)
        if mb is not None and ma is not None and type(mb) is not type(ma):
            return f"module {type(mb).__name__} -> {type(ma).__name__}"
    return ""


def compare(before: fx.Graph, after: fx.Graph, root_b: nn.Module | None, root_a: nn.Module | None,
            group_of=lambda node, side: "") -> list[NodeChange]:
    """Node changes from ``before`` to ``after``, in the after graph's order (removed nodes where they were)."""
    b_nodes = {n.name: n for n in before.nodes}
    # a node matches the same-named node on the other side only if both came from the same splice
    # (or neither did); a variant's node is never "the same" as a base node that shares its name
    matched = {n.name for n in after.nodes
               if n.name in b_nodes and b_nodes[n.name].meta.get("surgery") == n.meta.get("surgery")}
    order: dict[str, float] = {n.name: i for i, n in enumerate(after.nodes)}
    out: list[tuple[float, NodeChange]] = []
    last = -1.0
    for n in before.nodes:  # removed nodes sit just after the closest surviving node before them
        if n.name in matched:
            last = order[n.name]
        else:
            last += 1e-3
            out.append((last, NodeChange(group_of(n, "before"), n.name, REMOVED, n.op, node_line(n), None)))
    for n in after.nodes:
        if n.name not in matched:
            out.append((order[n.name], NodeChange(group_of(n, "after"), n.name, ADDED, n.op, None, node_line(n))))
            continue
        b = b_nodes[n.name]
        reason = _changed(b, n, root_b, root_a)
        if reason:
            out.append((order[n.name], NodeChange(group_of(n, "after"), n.name, CHANGED, n.op, node_line(b),
                                                  node_line(n), reason)))
    return [c for _, c in sorted(out, key=lambda t: t[0])]


def context(before: fx.Graph | None, after: fx.Graph | None, changed: set[str], hops: int) -> set[str]:
    """Names of ``changed`` nodes plus every node within ``hops`` edges of one, in either graph."""
    nbrs: dict[str, set[str]] = {}
    for g in (before, after):
        if g is None:
            continue
        for n in g.nodes:
            for m in n.all_input_nodes:
                nbrs.setdefault(n.name, set()).add(m.name)
                nbrs.setdefault(m.name, set()).add(n.name)
    shown, frontier = set(changed), set(changed)
    for _ in range(hops):
        frontier = {m for n in frontier for m in nbrs.get(n, ())} - shown
        shown |= frontier
    return shown


# ----- the two scopes -----


_FREES = re.compile(r";\s+(?:\w+ = )+None$", re.M)


def _code(gm: fx.GraphModule) -> str:
    # fx appends "; x = None" to free values early; that bookkeeping would show up as changed lines
    return _FREES.sub("", gm.code.strip()) + "\n"


def _graph_of(module: nn.Module) -> tuple[fx.Graph | None, str]:
    """The graph and code to compare for one side of a site: a Site's own, or the traced leaf's (a quantised
    leaf is never traced: it is one call, as inside its site)."""
    if isinstance(module, fx.GraphModule):
        return module.graph, _code(module)
    if quant.kind(module):
        root = nn.Module()
        root.add_module(quant.BASE, module)
        graph = fx.Graph()
        graph.output(graph.call_module(quant.BASE, (graph.placeholder("x"),)))
        gm = fx.GraphModule(root, graph, class_name=type(module).__name__)
        return gm.graph, _code(gm)
    if adaptable(module):
        gm = fx.GraphModule(module, fx.Tracer().trace(module), class_name=type(module).__name__)
        return gm.graph, _code(gm)
    return None, ""


def _class(module: nn.Module | None, other: nn.Module | None) -> str | None:
    # a Site is a GraphModule subclass that fx names after the leaf it traced; call it what it is
    if module is None:  # a Parameter on one side is a parameter site on the other
        return "Parameter" if isinstance(other, ParamSite) else None
    return "Site" if isinstance(module, Site) else type(module).__name__


def _module_diff(before: nn.Module, after: nn.Module) -> Diff:
    mb, ma = ModuleScope(before).candidates(), ModuleScope(after).candidates()
    groups: dict[str, Group] = {}
    for path in [*ma, *(p for p in mb if p not in ma)]:
        b, a = mb.get(path), ma.get(path)
        cb, ca = _class(b, a), _class(a, b)
        sited = (Site, ParamSite)
        if not (isinstance(b, sited) or isinstance(a, sited) or cb != ca):
            continue
        g = Group(path=path, before_class=cb, after_class=ca,
                  variant=a.variant.short() if isinstance(a, sited) else (b.variant.short() if isinstance(b, sited) else None))
        if b is not None and a is not None:
            g.before_graph, g.before_code = _graph_of(b)
            g.after_graph, g.after_code = _graph_of(a)
        if g.before_graph is not None and g.after_graph is not None:
            g.changes = compare(g.before_graph, g.after_graph, b, a, lambda n, side, p=path: p)
        if g.changes or g.class_change:
            groups[path] = g
    return Diff("module", groups, weight_changes(of_model(before), of_model(after)), module_list(after))


def module_path(node: fx.Node) -> str | None:
    """The module a node of a whole-model graph came from: call_module target, else nn_module_stack."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path.startswith("_empty_nn_module_stack"):  # export's marker for nodes outside any module
            return None
        # torch.export writes L['self'].model.layers[0] style paths in some versions; normalise them
        path = re.sub(r"^L\['self'\]\.?", "", path)
        return re.sub(r"\[(\d+)\]", r".\1", path).strip(".") or None
    return None


def _graph_diff(before: fx.GraphModule, after: fx.GraphModule, hops: int = 2) -> Diff:
    sites: dict[str, str] = {}  # site path -> variant
    for n in after.graph.nodes:
        prov = n.meta.get("surgery")
        if prov:
            sites.setdefault(prov["site"], prov.get("variant"))

    def group_of(node: fx.Node, side: str) -> str:
        prov = node.meta.get("surgery")
        if prov:
            return prov["site"]
        for m in node.all_input_nodes:  # a consumer now fed by a site's output belongs to that site
            if "surgery" in m.meta:
                return m.meta["surgery"]["site"]
        path = module_path(node)
        if path:
            for s in sites:
                if path == s or path.startswith(s + "."):
                    return s
            return path
        return GRAPH

    changes = compare(before.graph, after.graph, before, after, group_of)
    groups: dict[str, Group] = {}
    for c in changes:
        g = groups.get(c.group)
        if g is None:
            g = groups[c.group] = Group(path=c.group, variant=sites.get(c.group),
                                        before_graph=before.graph, after_graph=after.graph)
        g.changes.append(c)
    for g in groups.values():
        shown = context(before.graph, after.graph, {c.name for c in g.changes}, hops)
        # the code of a region of a big graph: the lines of the changed nodes and their neighbours
        g.before_code = "\n".join(node_line(n) for n in before.graph.nodes if n.name in shown) + "\n"
        g.after_code = "\n".join(node_line(n) for n in after.graph.nodes if n.name in shown) + "\n"
    return Diff("graph", groups, weight_changes(of_model(before), of_model(after)), module_list(after))


def diff(before: nn.Module, after: nn.Module) -> Diff:
    """What changed from ``before`` to ``after``: two models, or two GraphModules from surgery.trace."""
    whole = [isinstance(m, fx.GraphModule) and not isinstance(m, Site) for m in (before, after)]
    if not all(isinstance(m, nn.Module) for m in (before, after)):
        bad = next(m for m in (before, after) if not isinstance(m, nn.Module))
        raise DiffInputError(
            f"surgery.diff compares two torch.nn.Modules (models) or two GraphModules; got "
            f"{type(bad).__name__}. Call surgery.diff(copy.deepcopy(model) taken before rewrite, model)."
        )
    if any(whole) and not all(whole):
        raise DiffInputError(
            "surgery.diff got one GraphModule and one plain model; compare like with like: two models "
            "(module scope) or two graphs from surgery.trace (graph scope), e.g. "
            "surgery.diff(surgery.trace(base, *inputs), traced_after_rewrite)."
        )
    if all(whole):
        return _graph_diff(before, after)
    return _module_diff(before, after)


def module_list(model: nn.Module) -> list[tuple[str, str]]:
    """(path, class name) of a model's modules as the user sees them: a site as the class it adapts, a
    GraphModule from surgery.trace as the modules that were traced."""
    if isinstance(model, fx.GraphModule) and not isinstance(model, Site) and "surgery" in model.meta:
        return [(p, type(m).__name__) for p, m in model.meta["surgery"]["modules"].items()]
    out = [("", type(model).__name__)]
    for p, m in ModuleScope(model).candidates().items():
        out.append((p, m.base_class if isinstance(m, Site) else type(m).__name__))
    return out


def unified(before: str, after: str, n: int = 3) -> list[tuple[str, str, str]]:
    """Side-by-side rows (tag, left, right) of two code texts; tag in equal/replace/delete/insert/skip."""
    a, b = before.splitlines(), after.splitlines()
    rows: list[tuple[str, str, str]] = []
    for i, grp in enumerate(difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(n)):
        if i:
            rows.append(("skip", "...", "..."))
        for tag, i1, i2, j1, j2 in grp:
            left, right = a[i1:i2], b[j1:j2]
            for k in range(max(len(left), len(right))):
                rows.append((tag, left[k] if k < len(left) else "", right[k] if k < len(right) else ""))
    return rows
