"""rewrite / merge / restore over a model.

Every call is two-phase: build everything without touching the model (sites, folded weights,
checks), then commit by swapping modules. Anything that fails after the first swap rolls back,
so a failed call leaves the model exactly as it was.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

if TYPE_CHECKING:
    from adapters.base import SiteInit, Variant

from .errors import (
    AlreadyRewrittenError,
    DenseWeightError,
    IdentityError,
    NonFiniteError,
    MetaDeviceError,
    NotRewrittenError,
    TiedWeightError,
    UnsupportedModuleError,
    VariantContractError,
    WhereTypeError,
)
from .site import Site, adaptable, build_site, layout, linear_weight
from .trace import is_traced
from .where import Where, match

_FLAGS = "_surgery_requires_grad"  # original requires_grad of every base parameter, kept on the model


def candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every named submodule that a pattern may match: sites' own internals excluded."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for path, mod in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in inside):
            continue
        out[path] = mod
        if isinstance(mod, Site):
            inside.append(path)
    return out


def resolve(model: nn.Module, where: Where) -> list[str]:
    """The adaptable paths `where` selects, with our errors for the bad cases."""
    cands = candidates(model)
    found = match(cands, lambda m: adaptable(m) or isinstance(m, Site), where).paths
    done = [p for p in found if isinstance(cands[p], Site)]
    if done:
        raise AlreadyRewrittenError(
            f"{done[0]} is already rewritten with {cands[done[0]].variant.short()}"
            f"{f' (and {len(done) - 1} more matched sites)' if len(done) > 1 else ''}. One variant per site: "
            "call surgery.restore(model) or surgery.merge(model) first, or narrow `where` to untouched modules."
        )
    return found


def rewrite(model: nn.Module, variant: Variant, where: Where, *, calibration: Iterable[Any] | None = None) -> nn.Module:
    """Splice ``variant`` into every module matched by ``where``, in place; returns ``model``."""
    from adapters.base import Variant

    if isinstance(variant, type) and issubclass(variant, Variant):
        raise WhereTypeError(
            f"`variant` must be a variant config instance; got the class {variant.__name__} itself. "
            f"Call it: surgery.rewrite(model, {variant.__name__}(r=8), where)."
        )
    if not isinstance(variant, Variant):
        raise WhereTypeError(
            f"`variant` must be a variant config such as adapters.LoRA(r=8); got {type(variant).__name__} "
            f"{variant!r}. Argument order: surgery.rewrite(model, variant, where)."
        )
    if not isinstance(model, nn.Module):
        raise WhereTypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    if is_traced(model):
        from . import graph

        return graph.rewrite(model, variant, where, calibration=calibration)
    paths = resolve(model, where)
    plan = {p: variant for p in paths}
    states: dict[str, Any] = {}
    if variant.needs_calibration:
        from .calibrate import collect, hooks

        modules = dict(model.named_modules())
        leaves = {p: modules[p] for p in paths}
        states = collect(model, variant, paths, calibration, lambda emit: hooks(leaves, emit))
        plan = variant.configure(states)
    apply_plan(model, plan, states=states)
    return model


def site_init(path: str, leaf: nn.Module, variant: Variant, *, calibration=None, loading=False,
              lay: str | None = None) -> SiteInit:
    from adapters.base import SiteInit

    lay = lay or layout(leaf)  # graph scope passes it: there the leaf is a plain container of parameters
    w = leaf.weight
    d_in, d_out = (w.shape[1], w.shape[0]) if lay == "linear" else (w.shape[0], w.shape[1])
    dense = isinstance(w, torch.Tensor) and w.device.type != "meta" and w.is_floating_point()
    if variant.needs_weight and not dense:
        raise DenseWeightError(
            f"{variant.name} needs the dense base weight of {path}, which is "
            f"{'on the meta device' if isinstance(w, torch.Tensor) and w.device.type == 'meta' else f'of type {type(w).__name__}'}. "
            "Load real weights first, or use a variant that only needs the layer's shape (LoRA, IA3)."
        )
    if isinstance(w, torch.Tensor) and w.device.type != "meta" and not w.is_floating_point():
        # the site traces the leaf's own forward, which cannot run on an integer weight
        raise UnsupportedModuleError(
            f"{path} has a weight of dtype {str(w.dtype).removeprefix('torch.')}, so it is not a float linear layer "
            f"that {variant.name} can adapt (a quantised stand-in?). Dequantise it to a float dtype first, "
            "or leave it out of `where`."
        )
    dt = torch.promote_types(w.dtype, torch.float32) if dense else torch.float32
    return SiteInit(
        path=path, d_in=d_in, d_out=d_out,
        weight=linear_weight(w.detach(), lay).to(dt) if dense else None,
        bias=None if leaf.bias is None or not dense else leaf.bias.detach().to(dt),
        dtype=variant.adapter_dtype(w.dtype), device=w.device, calibration=calibration, loading=loading,
    )


def _owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def apply_plan(model: nn.Module, plan: dict[str, Variant], *, states: dict[str, Any] | None = None,
               loading: bool = False, check_identity: bool = True) -> dict[str, Site]:
    """Build a site for each (path, variant) and swap them in; all or nothing."""
    states = states or {}
    modules = dict(model.named_modules())
    owners = _owners(model)
    built: dict[str, Site] = {}
    new_weights: dict[str, torch.Tensor] = {}
    probes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, variant in plan.items():
        leaf = modules[path]
        ctx = site_init(path, leaf, variant, calibration=states.get(path), loading=loading)
        variant.check(ctx)
        tensors = variant.init(ctx)
        if ctx.new_weight is not None:
            tied = [n for n in owners.get(id(leaf.weight), []) if n != f"{path}.weight"]
            if tied:
                raise TiedWeightError(
                    f"{variant.name} rewrites the base weight of {path}, which is shared with {tied[0]}; "
                    f"changing it would silently change {tied[0]} too. Untie them first "
                    f"(e.g. model.{path}.weight = torch.nn.Parameter(model.{path}.weight.detach().clone()) "
                    "and config.tie_word_embeddings = False), or leave this module out of `where`."
                )
            new_weights[path] = ctx.new_weight
        built[path] = build_site(path, leaf, variant, ctx, tensors)
        if check_identity and not loading and variant.identity_tol is not None and leaf.weight.device.type != "meta":
            x = torch.randn(3, ctx.d_in, dtype=leaf.weight.dtype, device=leaf.weight.device)
            with torch.no_grad():
                probes[path] = (x, leaf(x))

    first = not any(isinstance(m, Site) for m in modules.values())
    if first:
        model.__dict__[_FLAGS] = {n: p.requires_grad for n, p in model.named_parameters()}
    flags_now = [(p, p.requires_grad) for p in model.parameters()]
    # earlier sites' adapter tensors keep their flags: a second rewrite must not freeze the first
    earlier = {id(t) for m in modules.values() if isinstance(m, Site) for t in m.adapter_tensors().values()}
    done: list[str] = []
    try:
        for path, site in built.items():
            _set(model, path, site)
            done.append(path)
            if path in new_weights:
                site._orig_weight = site.weight.detach().clone()
                with torch.no_grad():
                    site.weight.copy_(linear_weight(new_weights[path], site.layout).to(site.weight.dtype))
        for p in model.parameters():
            if id(p) not in earlier:
                p.requires_grad_(False)
        for site in built.values():
            for t in site.adapter_tensors().values():
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(True)
        for path, (x, ref) in probes.items():
            _check_identity(built[path], x, ref)
    except BaseException:
        _undo(model, {p: built[p] for p in done})
        if first:
            _restore_flags(model)
        for p, flag in flags_now:
            p.requires_grad_(flag)
        raise
    return built


def _check_identity(site: Site, x: torch.Tensor, ref: torch.Tensor) -> None:
    was = site.training
    site.eval()
    try:
        with torch.no_grad():
            got = site(x)
    finally:
        site.train(was)
    require_identity(site.variant, site.path, got, ref, "model")


def require_identity(variant: Variant, path: str, got: torch.Tensor, ref: torch.Tensor, owner: str) -> None:
    """Raise IdentityError unless ``got`` equals the base output ``ref`` within the variant's promise."""
    scale = ref.abs().max().clamp_min(1e-12)
    err = ((got.to(ref.dtype) - ref).abs().max() / scale).item()
    tol = max(variant.identity_tol, 16 * torch.finfo(ref.dtype).eps)
    if not err <= tol:
        raise IdentityError(
            f"{variant.short()} at {path} should start as the identity, but its output differs "
            f"from the base by {err:.3g} (relative; allowed {tol:.1g}). This is a bug in the variant's init; "
            f"the {owner} was left unchanged."
        )


def _undo(model: nn.Module, built: dict[str, Site]) -> None:
    """Take sites out again, putting back the original leaves and weights."""
    for path, site in built.items():
        if site._orig_weight is not None:
            with torch.no_grad():
                site.weight.copy_(site._orig_weight)
        leaf = site.base
        leaf.weight.requires_grad_(site._orig_requires_grad[0])
        if leaf.bias is not None:
            leaf.bias.requires_grad_(site._orig_requires_grad[1])
        _set(model, path, leaf)


def _restore_flags(model: nn.Module) -> None:
    flags = model.__dict__.pop(_FLAGS, None)
    if flags is None:
        return
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _all_sites(model: nn.Module) -> dict[str, Site]:
    if is_traced(model):
        from . import graph

        return graph._all(model)
    out = {p: m for p, m in model.named_modules() if isinstance(m, Site)}
    if not out:
        raise NotRewrittenError(
            "the model has no sites: nothing to merge, restore, save or export. "
            "Call surgery.rewrite(model, variant, where) first."
        )
    return out


def restore(model: nn.Module) -> nn.Module:
    """Remove every site and give back the exact original modules and weights; returns ``model``."""
    if is_traced(model):
        from . import graph

        return graph.restore(model)
    _undo(model, _all_sites(model))
    _restore_flags(model)
    return model


def merge(model: nn.Module, *, progress: Callable[[Iterable], Iterable] | None = None) -> nn.Module:
    """Fold every site into its weights and put back modules of the original class; returns ``model``.

    ``progress`` wraps the ``(path, site)`` pairs while they are folded (e.g. ``tqdm``), for long merges.
    """
    if is_traced(model):
        from . import graph

        return graph.merge(model)
    sites = _all_sites(model)
    owners = _owners(model)
    folded = {}
    for path, site in (progress or iter)(sites.items()):
        if site.weight.device.type == "meta":
            raise MetaDeviceError(
                f"cannot merge {path}: its weights are on the meta device (shapes only, no values), so there is "
                "nothing to fold. Load real weights (e.g. model.to_empty(device='cpu') and load a checkpoint) first."
            )
        W, b = site.fold()
        bad = [n for n, t in (("weight", W), ("bias", b)) if t is not None and not torch.isfinite(t).all()]
        bad += [n for n, t in site.adapter_tensors().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise NonFiniteError(
                f"cannot merge {path}: NaN or Inf in {', '.join(sorted(set(bad)))} ({site.variant.short()}). "
                "The model was left unchanged; check the learning rate or the loss, or surgery.restore(model)."
            )
        if (b is None) != (site.bias is None):
            raise VariantContractError(
                f"{site.variant.name}.fold changed whether {path} has a bias; this is a bug in the variant. "
                "The model was left unchanged."
            )
        # checked for every site before any weight is written, so a bad fold cannot leave a half-merged model
        if tuple(W.shape) != (site.d_out, site.d_in) or (b is not None and tuple(b.shape) != (site.d_out,)):
            raise VariantContractError(
                f"{site.variant.name}.fold returned W' of shape {tuple(W.shape)}"
                f"{'' if b is None else f' and b of shape {tuple(b.shape)}'} at {path}; expected "
                f"({site.d_out}, {site.d_in}) and ({site.d_out},). This is a bug in the variant; the model was "
                "left unchanged."
            )
        tied = [n for n in owners.get(id(site.weight), []) if n != f"{path}.weight"]
        folded[path] = (W, b, tied)
    for path, (W, b, tied) in folded.items():
        site = sites[path]
        leaf = site.base
        w_store = linear_weight(W, site.layout).to(leaf.weight.dtype)
        with torch.no_grad():
            if tied:
                warnings.warn(
                    f"merge: {path}.weight was tied to {', '.join(tied)}; it is now untied so that folding the "
                    f"adapter does not change {tied[0]}. config.tie_word_embeddings is set to False where present.",
                    stacklevel=2,
                )
                leaf.weight = nn.Parameter(w_store.contiguous(), requires_grad=site._orig_requires_grad[0])
                _untie_config(model)
            else:
                leaf.weight.copy_(w_store)
            if b is not None:
                leaf.bias.copy_(b.to(leaf.bias.dtype))
        leaf.weight.requires_grad_(site._orig_requires_grad[0])
        if leaf.bias is not None:
            leaf.bias.requires_grad_(site._orig_requires_grad[1])
        _set(model, path, leaf)
    _restore_flags(model)
    return model


def _untie_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    targets = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        targets.append(text())
    for c in targets:
        if hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False
