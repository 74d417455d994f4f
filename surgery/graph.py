"""Graph scope: rewrite / merge / restore / sites on a whole-model GraphModule from ``surgery.trace``.

A site here is a region of the traced graph that computes one adaptable module:

- fx route: the module's ``call_module`` node (x = its input, y = the node itself);
- export route: ATen nodes whose innermost module path is the module: ``aten.linear`` for
  nn.Linear; ``view -> addmm -> view`` for GPT-2's Conv1D (x = the first view's input, y = the
  last view).

At each site the engine inserts ``get_attr`` nodes for the weight (transposed to (d_out, d_in)
for Conv1D) and bias, then runs the same ``trace_variant`` + ``splice`` as module scope, with the
module path as prefix. The variant's tensors live on a private shallow copy of the module at that
path, so state_dict keys read ``<path>.lora_A`` as in module scope, while the eager model that
shares its parameters with the GraphModule is never written to: a replaced base weight (PiSSA)
or a merged weight is a new Parameter on that copy, and ``restore`` puts the original module back.

Every call builds on a copy of the graph and swaps it in at the end, undoing on failure.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn

if TYPE_CHECKING:
    from adapters.base import Variant

from .errors import AlreadyRewrittenError, GraphScopeError, NonFiniteError, NotRewrittenError
from .rewrite import require_identity
from .site import Site, SiteInfo, attach, linear_weight, splice, trace_variant
from .trace import module_classes, module_path, route
from .where import Matches, Where, match

_aten = torch.ops.aten


@dataclass
class Region:
    """Where one adaptable module sits in the graph (before any splice)."""

    path: str
    layout: str
    base_class: str
    x: fx.Node
    y: fx.Node
    first: fx.Node  # the region's first node: weight/bias get_attr nodes go before it
    calls: int  # how many times the module runs in the graph (graph scope needs exactly one)


@dataclass
class _Record:
    """What graph scope keeps per site in ``gm.meta['surgery']['sites']``."""

    variant: Variant
    layout: str
    base_class: str
    d_in: int
    d_out: int
    x: str  # node names in the graph
    y: str
    out: str
    original: nn.Module  # the module at ``path`` before the rewrite (restore puts it back)


def _state(gm: fx.GraphModule) -> dict[str, Any]:
    return gm.meta["surgery"]


def _get_attr_target(node: Any) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def regions(gm: fx.GraphModule, graph: fx.Graph | None = None) -> dict[str, Region]:
    """Adaptable, not yet rewritten modules of ``gm`` (nodes taken from ``graph``, default ``gm.graph``)."""
    from .site import layout

    graph = gm.graph if graph is None else graph
    classes = module_classes(gm)
    out: dict[str, Region] = {}

    def add(path, lay, x, y, first):
        if path in out:
            out[path].calls += 1
        else:
            out[path] = Region(path, lay, classes.get(path, "?"), x, y, first, 1)

    for n in graph.nodes:
        if "surgery" in n.meta:
            continue
        if route(gm) == "fx":
            if n.op == "call_module" and layout(gm.get_submodule(n.target)) and len(n.args) == 1 and not n.kwargs:
                add(n.target, layout(gm.get_submodule(n.target)), n.args[0], n, n)
            continue
        path = module_path(n)
        if n.target is _aten.linear.default and _get_attr_target(n.args[1]) == f"{path}.weight":
            add(path, "linear", n.args[0], n, n)
        elif (n.target is _aten.addmm.default and _get_attr_target(n.args[2]) == f"{path}.weight"
              and classes.get(path) == "Conv1D"):
            flat, users = n.args[1], list(n.users)
            if (isinstance(flat, fx.Node) and flat.target is _aten.view.default and len(users) == 1
                    and users[0].target is _aten.view.default and module_path(flat) == path):
                add(path, "conv1d", flat.args[0], users[0], flat)
    return out


def candidates(gm: fx.GraphModule) -> tuple[dict[str, nn.Module], set[str]]:
    """(path -> module, adaptable-or-site paths) for `where` matching.

    Under export the modules are the GraphModule's containers of parameters (the original classes
    are gone); a path that owns no parameter gets an empty stand-in, so every path can be matched.
    """
    sites_ = _state(gm)["sites"]
    paths = [p for p in module_classes(gm) if not p.startswith("_guards")]
    inside = tuple(p + "." for p in sites_)
    out: dict[str, nn.Module] = {}
    for p in paths:
        if p.startswith(inside):
            continue
        try:
            out[p] = gm.get_submodule(p)
        except AttributeError:
            out[p] = nn.Module()
    return out, set(regions(gm)) | set(sites_)


def matches(gm: fx.GraphModule, where: Where, *, strict: bool = True) -> Matches:
    """`where` over the module paths present in the graph (see ``surgery.where.match``)."""
    cands, ok = candidates(gm)
    ids = {id(cands[p]) for p in ok if p in cands}
    return match(cands, lambda m: id(m) in ids, where, strict=strict)


def resolve(gm: fx.GraphModule, where: Where) -> list[str]:
    found = matches(gm, where).paths
    done = [p for p in found if p in _state(gm)["sites"]]
    if done:
        raise AlreadyRewrittenError(
            f"{done[0]} is already rewritten with {_state(gm)['sites'][done[0]].variant.short()}. One variant per "
            "site: call surgery.restore(gm) or surgery.merge(gm) first, or narrow `where` to untouched modules."
        )
    return found


def rewrite(gm: fx.GraphModule, variant: Variant, where: Where, *, calibration: Iterable[Any] | None = None):
    paths = resolve(gm, where)
    plan, states = {p: variant for p in paths}, {}
    if variant.needs_calibration:
        from .calibrate import collect

        states = collect(gm, variant, paths, calibration, lambda emit: taps(gm, paths, emit))
        plan = variant.configure(states)
    apply_plan(gm, plan, states=states)
    return gm


_EMIT: dict[int, Any] = {}  # live tap callbacks by id: graph arguments must be plain values


def _tap(x: torch.Tensor, key: int, path: str) -> None:
    _EMIT[key](path, x)



@contextmanager
def taps(gm: fx.GraphModule, paths: list[str], emit) -> Iterator[None]:
    """Graph scope's calibration hooks: a temporary graph with a tap on each site's input node."""
    found = regions(gm)
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    key = id(emit)
    for p in paths:
        x = by_name[found[p].x.name]
        with graph.inserting_after(x):
            graph.call_function(_tap, (x, key, p))
    old = gm.graph
    _EMIT[key] = emit
    gm.graph = graph
    gm.recompile()
    try:
        yield
    finally:
        _EMIT.pop(key, None)
        gm.graph = old
        gm.recompile()


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


def _set(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def apply_plan(gm: fx.GraphModule, plan: dict[str, Variant], *, loading: bool = False,
               states: dict[str, Any] | None = None) -> dict[str, "GraphSite"]:
    """Splice each (path, variant) into a copy of the graph, then swap it in; all or nothing."""
    from .rewrite import site_init

    graph = copy.deepcopy(gm.graph)
    found = regions(gm, graph)
    holders: dict[str, nn.Module] = {}
    records: dict[str, _Record] = {}
    for path, variant in plan.items():
        reg = found.get(path)
        if reg is None or reg.calls != 1:
            raise GraphScopeError(
                f"{path} cannot be a graph-scope site: "
                + ("it does not appear as a plain linear region in the graph" if reg is None else
                   f"it runs {reg.calls} times in the graph, and each call would need its own site")
                + ". Rewrite the eager model instead (module scope), or leave it out of `where`."
            )
        original = gm.get_submodule(path)
        holder = _holder(original)
        ctx = site_init(path, holder, variant, loading=loading, lay=reg.layout,
                        calibration=(states or {}).get(path))
        variant.check(ctx)
        tensors = variant.init(ctx)
        if ctx.new_weight is not None:  # a new Parameter: the shared original stays untouched for restore
            w = linear_weight(ctx.new_weight, reg.layout).to(holder.weight.dtype).contiguous()
            holder.weight = nn.Parameter(w, requires_grad=False)
        modules = attach(holder, variant, tensors)
        for m in modules.values():
            m.train(gm.training)
        meta = {"site": path, "variant": variant.short()}
        with graph.inserting_before(reg.first):
            w_node = graph.get_attr(f"{path}.weight")
            b_node = graph.get_attr(f"{path}.bias") if holder.bias is not None else None
            w_lin = graph.call_method("t", (w_node,)) if reg.layout == "conv1d" else w_node
        for n in {w_node, b_node, w_lin} - {None}:
            n.meta["surgery"] = dict(meta)
        info = SiteInfo(path=path, d_in=ctx.d_in, d_out=ctx.d_out, layout=reg.layout)
        live = {n: getattr(holder, n) for n in tensors}
        vgraph = trace_variant(variant, live, modules, ctx.dtype, holder.weight.dtype,
                               has_bias=holder.bias is not None, site=info)
        new = splice(graph, vgraph, x=reg.x, y=reg.y, weight=w_lin, bias=b_node, prefix=path + ".", meta=meta)
        stack = reg.y.meta.get("nn_module_stack")
        for n in new + [w_node, w_lin] + ([b_node] if b_node is not None else []):
            if stack is not None:  # spliced nodes belong to the site's module, like the region they extend
                n.meta["nn_module_stack"] = stack.copy()
        out = next(n for n in new if any(u not in new for u in n.users))
        records[path] = _Record(variant, reg.layout, reg.base_class, ctx.d_in, ctx.d_out,
                                reg.x.name, reg.y.name, out.name, original)
        holders[path] = holder
        if not loading and variant.identity_tol is not None:
            _check_identity(graph, path, holder, original.weight, records[path])
    _commit(gm, graph, holders, records)
    return {p: GraphSite(gm, p) for p in records}


def _commit(gm: fx.GraphModule, graph: fx.Graph, holders: dict[str, nn.Module], records: dict[str, _Record]) -> None:
    state = _state(gm)
    old_graph = gm.graph
    first = state.get("flags") is None
    if first:
        state["flags"] = {n: p.requires_grad for n, p in gm.named_parameters()}
    earlier = {id(t) for p in state["sites"] for t in GraphSite(gm, p).adapter_tensors().values()}
    try:
        for path, holder in holders.items():
            _set(gm, path, holder)
        gm.graph = graph
        gm.graph.lint()
        gm.recompile()
        state["sites"].update(records)
        for p in gm.parameters():
            if id(p) not in earlier:
                p.requires_grad_(False)
        for path in records:
            for t in GraphSite(gm, path).adapter_tensors().values():
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(True)
    except BaseException:
        for path, rec in records.items():
            state["sites"].pop(path, None)
            _set(gm, path, rec.original)
        gm.graph = old_graph
        gm.recompile()
        if first:
            _restore_flags(gm)
        raise


def _spliced(graph: fx.Graph, path: str) -> list[fx.Node]:
    return [n for n in graph.nodes if n.meta.get("surgery", {}).get("site") == path]


def _region_module(graph: fx.Graph, path: str, holder: nn.Module, rec: _Record) -> fx.GraphModule:
    """The site's spliced nodes as a standalone GraphModule ``(x, y) -> adapted y``."""
    nodes = {n.name: n for n in graph.nodes}
    g = fx.Graph()
    env = {nodes[rec.x]: g.placeholder("x"), nodes[rec.y]: g.placeholder("y")}
    for n in _spliced(graph, path):
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[nodes[rec.out]])
    root = nn.Module()
    _set_nested(root, path, holder)
    return fx.GraphModule(root, g, class_name=f"{rec.base_class}Site")


def _set_nested(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, name = path.split(".")
    for p in parents:
        if not hasattr(root, p):
            root.add_module(p, nn.Module())
        root = getattr(root, p)
    root.add_module(name, module)


def _check_identity(graph: fx.Graph, path: str, holder: nn.Module, w0: torch.Tensor, rec: _Record) -> None:
    """The spliced region alone, on random rows, against the original weight (not a replaced one)."""
    w = linear_weight(holder.weight, rec.layout)
    x = torch.randn(3, rec.d_in, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, linear_weight(w0, rec.layout), holder.bias)
        y = torch.nn.functional.linear(x, w, holder.bias)
        got = _region_module(graph, path, holder, rec).eval()(x, y)
    require_identity(rec.variant, path, got, ref, "GraphModule")


class GraphSite:
    """A graph-scope site, with the interface of ``surgery.site.Site`` that summary and save use."""

    def __init__(self, gm: fx.GraphModule, path: str):
        self._gm, self.path = gm, path
        rec: _Record = _state(gm)["sites"][path]
        self._rec = rec
        self.variant, self.layout, self.base_class = rec.variant, rec.layout, rec.base_class
        self.d_in, self.d_out = rec.d_in, rec.d_out

    info = Site.info
    fold = Site.fold  # uses only weight, bias, layout, info, adapter_tensors and variant

    @property
    def holder(self) -> nn.Module:
        return self._gm.get_submodule(self.path)

    @property
    def weight(self) -> torch.Tensor:
        return self.holder.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.holder.bias

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        h, base = self.holder, {"weight", "bias"}
        out = {n: p for n, p in h.named_parameters(recurse=False) if n not in base}
        out.update({n: b for n, b in h.named_buffers(recurse=False) if n not in base})
        return out

    def trainable_count(self) -> int:
        return sum(t.numel() for t in self.adapter_tensors().values() if isinstance(t, nn.Parameter) and t.requires_grad)

    @property
    def code(self) -> str:
        """The spliced region as Python: ``forward(x, y)`` -> the adapted output."""
        return _region_module(self._gm.graph, self.path, self.holder, self._rec).code.strip("\n") + "\n"

    def __repr__(self) -> str:
        return f"GraphSite({self.path}: {self.variant.short()}, in={self.d_in}, out={self.d_out}, base={self.base_class})"


def sites(gm: fx.GraphModule) -> dict[str, GraphSite]:
    return {p: GraphSite(gm, p) for p in _state(gm)["sites"]}


def _all(gm: fx.GraphModule) -> dict[str, GraphSite]:
    out = sites(gm)
    if not out:
        raise NotRewrittenError(
            "the GraphModule has no sites: nothing to merge, restore, save or export. "
            "Call surgery.rewrite(gm, variant, where) first."
        )
    return out


def _unsplice(gm: fx.GraphModule, paths: Iterable[str]) -> None:
    """Erase each site's spliced nodes and route the base output back to its users."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    for path in paths:
        rec = _state(gm)["sites"][path]
        spliced = _spliced(graph, path)
        keep = set(spliced)
        nodes[rec.out].replace_all_uses_with(nodes[rec.y], delete_user_cb=lambda u: u not in keep)
        for n in reversed(spliced):
            graph.erase_node(n)
    graph.lint()
    gm.recompile()


def _restore_flags(gm: fx.GraphModule) -> None:
    flags = _state(gm).pop("flags", None) or {}
    _state(gm)["flags"] = None
    for n, p in gm.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def restore(gm: fx.GraphModule) -> fx.GraphModule:
    """Erase every site's nodes and put back the original modules (original Parameter objects)."""
    _take_out(gm, list(_all(gm)))
    _restore_flags(gm)
    return gm


def _take_out(gm: fx.GraphModule, paths: list[str]) -> None:
    _unsplice(gm, paths)
    for p in paths:
        _set(gm, p, _state(gm)["sites"].pop(p).original)


def merge(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every site into new weight/bias Parameters at its path and erase its nodes."""
    folded = {}
    for path, s in _all(gm).items():
        W, b = s.fold()
        bad = [n for n, t in (("weight", W), ("bias", b)) if t is not None and not torch.isfinite(t).all()]
        bad += [n for n, t in s.adapter_tensors().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise NonFiniteError(
                f"cannot merge {path}: NaN or Inf in {', '.join(sorted(set(bad)))} ({s.variant.short()}). "
                "The GraphModule was left unchanged; check the learning rate or the loss, or surgery.restore(gm)."
            )
        folded[path] = (W, b)
    flags = _state(gm).get("flags") or {}
    _unsplice(gm, list(folded))
    for path, (W, b) in folded.items():
        rec = _state(gm)["sites"].pop(path)
        for n, p in rec.original.named_parameters():  # shared with the eager model: give its flags back
            p.requires_grad_(flags.get(f"{path}.{n}", p.requires_grad))
        merged = _holder(rec.original)
        merged.weight = nn.Parameter(linear_weight(W, rec.layout).to(rec.original.weight.dtype).contiguous(),
                                     requires_grad=flags.get(f"{path}.weight", True))
        if b is not None:
            merged.bias = nn.Parameter(b.to(rec.original.bias.dtype), requires_grad=flags.get(f"{path}.bias", True))
        _set(gm, path, merged)
    _restore_flags(gm)
    return gm


def load(gm: fx.GraphModule, path, meta: dict[str, Any], plan: dict[str, Variant]) -> fx.GraphModule:
    """``surgery.load`` on a traced GraphModule: check the file's sites against the graph, splice, fill."""
    import difflib

    from .errors import BaseMismatchError
    from .io import fill

    found, done = regions(gm), _state(gm)["sites"]
    for p, info in meta["sites"].items():
        if p in done:
            raise AlreadyRewrittenError(f"{p} is already rewritten; load onto a freshly traced base (or surgery.restore(gm) first).")
        if p not in found:
            close = difflib.get_close_matches(p, list(found), n=2, cutoff=0.0)
            raise BaseMismatchError(
                f"{path} was saved for another base: it adapts {p}, which is not a linear region of this graph "
                f"(closest: {', '.join(close) or 'none'}). Load it onto a trace of the base it was trained on."
            )
        w = gm.get_submodule(p).weight
        have = (w.shape[1], w.shape[0]) if found[p].layout == "linear" else (w.shape[0], w.shape[1])
        want = (info.get("base", {}).get("d_in"), info.get("base", {}).get("d_out"))
        if tuple(have) != want:
            raise BaseMismatchError(
                f"{path} was saved for another base: {p} had in/out {want[0]}x{want[1]}, this graph's is "
                f"{have[0]}x{have[1]}. Load it onto a trace of the base it was trained on."
            )
    built = apply_plan(gm, plan, loading=True)
    try:
        fill(path, built)
    except BaseException:
        _take_out(gm, list(built))
        if not _state(gm)["sites"]:
            _restore_flags(gm)
        raise
    return gm
