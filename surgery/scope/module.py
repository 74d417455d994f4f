"""Module scope: each matched leaf of an ``nn.Module`` is replaced by a ``Site`` (a traced leaf with the
variant spliced in); the leaf itself is kept on the site's record and put back by ``remove``. A matched
Parameter gets a ``ParamSite`` beside it on its owner (``surgery/param.py``), which ``remove`` takes out again."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from .. import quant
from ..errors import UnsupportedModuleError
from ..offload import keep
from ..param import ParamSite, adaptable_parameter, attach, detach, layout_of_parameter, owns_sites, parameters
from ..site import Conv1D, Site, adaptable, layout, op_spec, set_param, stored_weight
from ..splice import (BASE_WEIGHT, SCALE, Part, Traces, add_constants, add_gate, base_caller, place, slot_prefix, splice,
                      trace)
from ..variant import SiteInfo, SiteInit
from .base import Base, Emit, Scope, Staged, Txn, record, unmodified

_PLAIN = tuple(c for c in (nn.Linear, Conv1D) if isinstance(c, type))
_FLAGS = "_surgery_requires_grad"  # original requires_grad of every parameter, kept on the model while it has sites
_UNFROZEN = "_surgery_unfrozen"  # surgery.unfreeze's records, kept on the model while it has any



@dataclass
class _Template:
    """A finished site graph (spliced, dead code gone) and its compiled forward, shared by a kind of site."""

    graph: fx.Graph
    code: tuple  # see Site.recompile
    x: str
    y: str
    out: str
    # the same forward returning (adapted output, base output): later sites of the kind check identity against
    # the base output their own graph computed, so a probe reads each weight once (None where y is gone)
    probe: Callable | None


@dataclass
class Templates:
    """What one rewrite (or load) builds once per kind of site: variant traces, then whole site graphs."""

    traces: Traces = field(default_factory=Traces)
    sites: dict[Hashable, _Template] = field(default_factory=dict)


def build_site(base: Base, parts: list[Part], ctx: SiteInit,
               templates: Templates | None = None) -> tuple[Site, Callable | None]:
    """Splice the active ``parts`` into a trace of the leaf and return the Site (the model is not touched), and,
    for a site that is not the first of its kind, its forward returning (adapted output, base output).

    The first site of a kind is traced and compiled; later ones share its graph (``Site.shared``) and reuse
    its compiled forward, so their generated code is the same text."""
    templates = templates or Templates()
    leaf, lay = base.module, base.layout
    bias = getattr(leaf, "bias", None)  # an nn.Embedding has none at all
    root = nn.Module()
    if base.quant:  # called, never traced: it keeps its own parameters and packed state
        root.add_module(quant.BASE, leaf)
    else:
        root.register_parameter("weight", leaf.weight)
        root.register_parameter("bias", bias)  # None stays a parameter slot, as on the leaf
    stack, tensors, modules = place(root, parts, leaf.weight)
    info = SiteInfo(path=base.path, d_in=ctx.d_in, d_out=ctx.d_out, layout=lay, spec=base.spec)
    vg, key = templates.traces.get(stack, tensors, modules, has_bias=bias is not None, site=info,
                                   cast=ctx.dtype != base.dtype)
    add_constants(root, vg)
    meta = {"site": base.path, "variant": stack.short()}
    # an nn.Linear traces the same whatever its shape; a Conv1D bakes its d_out in (x.view(..., nf)), and an opaque
    # (quantised) base, which is only called, keeps its class and shape in the key too; any other class may bake
    # its own state in
    if type(leaf) is nn.Linear and base.quant is None:
        leaf_kind: Hashable = nn.Linear
    elif type(leaf) in _PLAIN or base.quant is not None:
        leaf_kind = (type(leaf), ctx.d_in, ctx.d_out)
    else:
        leaf_kind = id(leaf)
    kind = None if key is None else (leaf_kind, key)
    tpl = templates.sites.get(kind) if kind is not None else None
    later = tpl is not None
    if tpl is None:
        site, tpl = _first_site(leaf, info, root, vg, meta, opaque=base.quant is not None)
        if kind is not None:
            templates.sites[kind] = tpl
    else:
        site = Site.shared(root, tpl.graph, tpl.code, meta, class_name=type(leaf).__name__)
    site.hold(root._parameters, root._buffers, root._modules, root._non_persistent_buffers_set,
              record(base, ctx, parts, x=tpl.x, y=tpl.y, out=tpl.out))
    site.train(leaf.training)  # new modules (dropout) follow the mode of the model they join
    return site, (tpl.probe if later else None)


def _opaque_graph(leaf: nn.Module) -> fx.Graph:
    """The graph of an opaque base, as a trace of an nn.Linear would give it: W is dequantised when the variant
    reads it (dead code, and gone, otherwise)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(quant.dequantized, (graph.get_attr(quant.BASE),))
    if leaf.bias is not None:
        graph.get_attr(f"{quant.BASE}.bias")
    graph.output(graph.call_module(quant.BASE, (x,)))
    return graph


def _first_site(leaf: nn.Module, info: SiteInfo, root: nn.Module, vg, meta: dict, opaque: bool) -> tuple[Site, _Template]:
    graph = _opaque_graph(leaf) if opaque else trace(leaf)  # a graph owned by no module yet
    x = next(n for n in graph.nodes if n.op == "placeholder")
    y = next(n for n in graph.nodes if n.op == "output").args[0]
    if opaque:
        w = next(n for n in graph.nodes if n.target is quant.dequantized)
        b = next((n for n in graph.nodes if n.op == "get_attr" and n.target == f"{quant.BASE}.bias"), None)
    else:
        w = next(n for n in graph.nodes if n.op == "get_attr" and n.target == "weight")
        b = next((n for n in graph.nodes if n.op == "get_attr" and n.target == "bias"), None)
    if info.layout != "linear":  # present W in (d_out, d_in) layout to the variant
        with graph.inserting_after(w):
            w = graph.call_method("flatten", (w, 1)) if info.layout == "conv" else graph.call_method("t", (w,))
    splice(graph, vg, x=x, y=y, weight=w, bias=b if getattr(leaf, "bias", None) is not None else None, prefix="",
           meta=meta, base=base_caller(info, quant.BASE if opaque else None))
    site = Site(root, graph, class_name=type(leaf).__name__)
    site.graph.eliminate_dead_code()  # e.g. the base op, when a variant recomputes it from x (needs the module)
    site.graph.lint()
    site.recompile()
    names = {n.name for n in site.graph.nodes}
    out = next(n for n in site.graph.nodes if n.op == "output").args[0]
    tpl = _Template(copy.deepcopy(site.graph), site.compiled(), x=x.name, y=y.name if y.name in names else "",
                    out=out.name, probe=None)
    if tpl.y and tpl.y != out.name:
        tpl.probe = _with_base_output(site, tpl.y)
    return site, tpl


def _with_base_output(site: Site, y: str) -> Callable:
    """The forward of ``site``'s graph returning (adapted output, base output ``y``), as a function of a site."""
    graph = copy.deepcopy(site.graph)
    end = next(n for n in graph.nodes if n.op == "output")
    base_out = next(n for n in graph.nodes if n.name == y)
    with graph.inserting_before(end):
        graph.output((end.args[0], base_out))
    graph.erase_node(end)
    gm = fx.GraphModule(site, graph)
    graph.owning_module = None  # no cycle: gm (and the site's tensors it names) goes with this frame
    return type(gm).forward


def _give_back(leaf: nn.Module, site: Site) -> None:
    if site.record.quant:  # the base kept its own parameters all along
        return
    leaf.weight = site.weight
    if "bias" in leaf._parameters:  # not on an nn.Embedding: restore leaves it without a stray `bias`
        leaf.bias = site.bias


class ModuleTxn(Txn):
    def __init__(self):
        super().__init__()
        self.templates = Templates()

    def stage(self, base: Base, parts: list[Part], ctx: SiteInit) -> Staged:
        if base.param:
            return self._stage_param(base, parts, ctx)
        site, with_base = build_site(base, parts, ctx, self.templates)
        new = None
        if ctx.new_weight is not None:  # the leaf's Parameter takes it at commit; the site keeps the original
            what = f"base weight of {base.path}"
            new = self.spill.put(stored_weight(ctx.new_weight, base.layout, base.weight.shape).to(base.weight.dtype),
                                 f"the new {what}")
            site.register_buffer(BASE_WEIGHT, keep(base.weight, f"the original {what}"), persistent=False)

        def probe(x: torch.Tensor) -> tuple[torch.Tensor, None]:
            was = site.training
            site.eval()
            packing = quant.hold_packing(base.module) if base.quant else None  # the user's base, untouched
            try:
                with torch.no_grad():
                    if new is not None:
                        return functional_call(site, {"weight": new.load()}, (x,)), None
                    # the first site of a kind is checked against the layer's own output (which checks the
                    # kind's traced base op too); later ones run the same code on their own tensors
                    if with_base is not None:
                        got, y = with_base(site, x)
                        return got, unmodified(y)
                    return site(x), None
            finally:
                site.train(was)
                quant.release_packing(base.module, packing)

        staged = Staged(site, probe, new)
        self.staged[base.path] = staged
        return staged

    def _stage_param(self, base: Base, parts: list[Part], ctx: SiteInit) -> Staged:
        site = ParamSite(record(base, ctx, parts))
        place(site, parts, base.weight)
        site.train(base.module.training)

        def probe(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # in weight space: W' against W
            with torch.no_grad():
                return site(), base.weight

        staged = Staged(site, probe)
        self.staged[base.path] = staged
        return staged


class ModuleScope(Scope):
    def candidates(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        inside: list[str] = []
        for path, mod in self.model.named_modules():
            if not path or any(path.startswith(p + ".") for p in inside):
                continue
            out[path] = mod
            if isinstance(mod, (Site, ParamSite)):
                inside.append(path)
        return out

    def parameters(self) -> dict[str, nn.Parameter]:
        return parameters({"": self.model, **self.candidates()})

    def adaptable(self) -> set[str]:
        layers = {p for p, m in self.candidates().items() if adaptable(m)}
        return layers | {p for p, w in self.parameters().items() if adaptable_parameter(w)}

    def sites(self) -> dict[str, Site | ParamSite]:
        return {p: m for p, m in self.model.named_modules() if isinstance(m, (Site, ParamSite))}

    def _param_base(self, path: str, owner: nn.Module | None = None) -> Base | None:
        """The base of a parameter path (a Parameter, or a parameter site), None for a module path; ``owner``
        is the module at the path's parent, when the caller has it."""
        owner_path, _, name = path.rpartition(".")
        owner = self.model.get_submodule(owner_path) if owner is None else owner
        site = owner._modules.get(name)
        if not isinstance(site, ParamSite) and name not in owner._parameters:
            return None
        w = owner._parameters[name]
        return Base(path, layout_of_parameter(owner, w), f"{type(owner).__name__}.{name}", owner,
                    site=site if isinstance(site, ParamSite) else None, param=name,
                    experts=w.shape[0] if w.dim() == 3 else 0)

    def base(self, path: str) -> Base:
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)  # one walk of the path, not three: a rewrite asks twice a site
        found = self._param_base(path, parent)
        if found is not None:
            return found
        if isinstance(parent, nn.MultiheadAttention):
            raise UnsupportedModuleError(
                f"{path} is the output projection of an nn.MultiheadAttention, which reads its weight directly "
                "(F.multi_head_attention_forward) instead of calling it, so an adapter there would be a silent "
                f"no-op. Adapt its weight in weight space instead (where='{path}.weight', and '{parent_path}.in_proj_weight' "
                f"for the input projections), or leave {path} out of `where`."
            )
        leaf = parent._modules.get(name)
        if not isinstance(leaf, nn.Module):  # get_submodule's own error
            leaf = self.model.get_submodule(path)
        if owns_sites(leaf):
            held = next(n for n, m in leaf._modules.items() if isinstance(m, ParamSite))
            raise UnsupportedModuleError(
                f"cannot adapt {path} as a layer: its Parameter {path}.{held} is a parameter site already, which its "
                f"forward reads as the fold, and a layer site traces that forward. Add the adapter to the parameter "
                f"instead (where='{path}.{held}', with another name=), or surgery.merge / surgery.restore first."
            )
        if isinstance(leaf, Site):  # a site getting another adapter: built again around the original leaf
            return Base(path, leaf.layout, leaf.base_class, leaf.base, site=leaf, spec=leaf.record.spec)
        quant.refuse_foreign(path, leaf)
        quant.refuse_repacked(path, leaf)
        return Base(path, layout(leaf), type(leaf).__name__, leaf, spec=op_spec(path, leaf))

    def aliases(self, path: str) -> list[str]:
        if getattr(self, "_paths_of", None) is None:  # every path of every module or Parameter, found once per call
            self._paths_of: dict[int, list[str]] = {}
            for p, m in (*self.model.named_modules(remove_duplicate=False),
                         *self.model.named_parameters(remove_duplicate=False)):
                self._paths_of.setdefault(id(m), []).append(p)
        base = self._param_base(path)
        obj = base.weight if base is not None else self.model.get_submodule(path)
        return [p for p in self._paths_of[id(obj)] if p != path]

    def class_name(self, path: str) -> str:
        base = self._param_base(path)
        return "Parameter" if base is not None else type(self.model.get_submodule(path)).__name__

    def begin(self, rebuild: list[str] = ()) -> Txn:
        return ModuleTxn()

    def commit(self, txn: Txn) -> None:
        done: list[str] = []
        try:
            for path, st in txn.staged.items():
                if isinstance(st.site, ParamSite):
                    txn.previous[path] = self.sites().get(path)
                    if txn.previous[path] is not None:
                        detach(txn.previous[path])
                    attach(st.site)
                    done.append(path)
                    continue
                txn.previous[path] = self.model.get_submodule(path)
                self.put(path, st.site)
                done.append(path)
                if st.site.record.quant and not isinstance(txn.previous[path], Site):
                    st.site.record.packing = quant.hold_packing(st.site.base)
                if st.new_weight is not None:  # the leaf's own Parameter takes the new values (the site kept the old)
                    with torch.no_grad():
                        st.site.weight.copy_(st.new_weight.load())
        except BaseException:
            self.uncommit(txn, done)
            raise
        finally:
            txn.spill.close()

    def uncommit(self, txn: Txn, paths: list[str] | None = None) -> None:
        for path in list(txn.staged) if paths is None else paths:
            prev = txn.previous[path]
            if isinstance(prev, ParamSite):
                detach(txn.staged[path].site)
                attach(prev)
            elif isinstance(prev, Site):  # a site built again: the one it replaced goes back
                self.put(path, prev)
            else:
                self.remove([path])

    def remove(self, paths, folded=None, untie=frozenset(), dequantize=False) -> dict[str, float]:
        sites = self.sites()
        errors = {}
        for path in paths:
            site = sites[path]
            if isinstance(site, ParamSite):
                detach(site)
                if folded is not None:
                    set_param(site.record.original, site.record.param, stored_weight(folded(path)[0], site.layout),
                              new=path in untie)
                continue
            leaf = site.base
            if site.record.quant:
                quant.release_packing(leaf, site.record.packing)
                if folded is not None:
                    leaf, errors[path] = quant.merged(leaf, *folded(path), dequantize=dequantize)
                self.put(path, leaf)
                continue
            # the site's Parameters are the ones that lived on since the rewrite (model.to_empty() or a
            # load_state_dict(assign=True) replaces them); the leaf takes those, not its stale originals
            _give_back(leaf, site)
            with torch.no_grad():
                if folded is not None:
                    W, b = folded(path)
                    set_param(leaf, "weight", stored_weight(W, site.layout, leaf.weight.shape), new=path in untie)
                    if b is not None:
                        leaf.bias.copy_(b.to(leaf.bias.dtype))
                elif site.replaced_base:
                    leaf.weight.copy_(site.kept_weight)
            self.put(path, leaf)
        return errors

    def gate(self, paths: list[str]) -> None:
        sites = self.sites()
        for path in paths:
            site = sites[path]
            rec = site.record
            if isinstance(site, ParamSite):  # its forward blends when told to
                rec.gated = True
                continue
            rec.out = add_gate(site.graph, x=rec.x, y=rec.y, out=rec.out, layout=rec.layout,
                               has_bias=site.base_bias is not None, replaced=rec.replaced, prefix="",
                               opaque=quant.BASE if rec.quant else None,
                               scale=slot_prefix(rec.active[0]) + SCALE,
                               meta={"site": path, "variant": site.variant.short()})
            rec.gated = True
            site.graph.lint()
            site.recompile()

    @contextmanager
    def bypass(self):
        """Each site's original leaf back at its path (with its original weight), then the sites again."""
        sites = self.sites()
        swapped = []
        try:
            for path, site in sites.items():
                if isinstance(site, ParamSite):
                    detach(site)
                    swapped.append((path, site, []))
                    continue
                leaf = site.base
                _give_back(leaf, site)  # the live Parameters, as in remove()
                if site.replaced_base:
                    leaf._parameters["weight"] = nn.Parameter(site.kept_weight, requires_grad=False)
                # the leaf shows the site's buffers meanwhile: DDP re-reads a model's buffers at every forward
                # and broadcasts them, and a model whose buffers all vanished makes it fail
                mirrored = [n for n, b in site.named_buffers(recurse=False) if n not in leaf._buffers]
                for n in mirrored:
                    leaf.register_buffer(n, site._buffers[n], persistent=False)
                self.put(path, leaf)
                swapped.append((path, site, mirrored))
            yield
        finally:
            for path, site, mirrored in swapped:
                if isinstance(site, ParamSite):
                    attach(site)
                    continue
                for n in mirrored:
                    del site.base._buffers[n]
                    site.base._non_persistent_buffers_set.discard(n)
                if not site.record.quant:
                    site.base._parameters["weight"] = site.weight
                self.put(path, site)

    @contextmanager
    def taps(self, paths: list[str], emit: Emit):
        """A forward pre-hook on each leaf hands its input to ``emit``."""

        def hook_for(path: str):
            def hook(module, args, kwargs):
                emit(path, args[0] if args else next(iter(kwargs.values())))
            return hook

        handles = [self.model.get_submodule(p).register_forward_pre_hook(hook_for(p), with_kwargs=True) for p in paths]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def get_flags(self):
        return self.model.__dict__.get(_FLAGS)

    def set_flags(self, flags) -> None:
        if flags is None:
            self.model.__dict__.pop(_FLAGS, None)
        else:
            self.model.__dict__[_FLAGS] = flags

    def get_unfrozen(self):
        return dict(self.model.__dict__.get(_UNFROZEN, {}))

    def set_unfrozen(self, unfrozen) -> None:
        if unfrozen:
            self.model.__dict__[_UNFROZEN] = dict(unfrozen)
        else:
            self.model.__dict__.pop(_UNFROZEN, None)

