"""rewrite / merge / restore, and the one path that installs sites, written once over a Scope.

Every call is two-phase: build everything without touching the model (site inits, spliced graphs,
identity probes, folded weights, file tensors), then commit. A commit that fails part way is rolled
back by the scope, so a failed call leaves the model exactly as it was: same weights (bit for bit),
same module objects, same ``requires_grad`` flags, no stray sites.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .calibrate import collect
from .errors import (
    AdapterFileError,
    AlreadyRewrittenError,
    BaseMismatchError,
    ConfigError,
    DenseWeightError,
    IdentityError,
    MetaDeviceError,
    NonFiniteError,
    NotRewrittenError,
    SurgeryError,
    TiedWeightError,
    UnsupportedModuleError,
    VariantContractError,
    WhereTypeError,
    ShardedModelError,
    SHOWN,
    clip,
)
from . import hf, quant
from .scope import Scope, scope_of
from .scope.base import Base, Staged, Txn
from .param import ParamSite, replacing, require_weight_space
from .site import SiteAPI, dims, gathered, is_sharded, layout, probe_input
from .splice import DEFAULT, SCALE, Part
from .variant import REGISTRY, SiteInit, Variant
from .where import Matches, Where, match


# ----- where -----


def matches(scope: Scope, where: Where, *, strict: bool = True) -> Matches:
    """`where` over the scope's paths; sites count as matchable, so a second rewrite can name them."""
    cands = nameable(scope)
    ok = {id(cands[p]) for p in scope.adaptable() | set(scope.sites()) if p in cands}
    weight_space = lambda m: isinstance(m, (nn.Parameter, ParamSite))  # noqa: E731
    return match(cands, lambda m: id(m) in ok, where, strict=strict, weight_space=weight_space,
                 opt_in=lambda m: weight_space(m) or layout(m) in ("embedding", "conv"))


def nameable(scope: Scope) -> dict[str, nn.Module | nn.Parameter]:
    """What `where` and files may name: the scope's modules, then their Parameters (opt-in: a pattern reaches
    a Parameter only where it reaches no layer, so "*" still means every linear layer)."""
    return {**scope.candidates(), **scope.parameters()}


def resolve(scope: Scope, where: Where, name: str = DEFAULT) -> list[str]:
    """The adaptable paths `where` selects, with our errors for the bad cases."""
    found = matches(scope, where).paths
    sites = scope.sites()
    done = [p for p in found if p in sites and name in sites[p].record.adapters]
    if done:
        raise already_rewritten(scope, done[0], name, sites[done[0]].adapter(name).variant, len(done) - 1)
    return found


def already_rewritten(scope: Scope, path: str, name: str = DEFAULT, variant: Variant | None = None,
                      more: int = 0) -> AlreadyRewrittenError:
    what = f" with {variant.short()}" if variant is not None else ""
    also = f" (and {more} more matched sites)" if more else ""
    return AlreadyRewrittenError(
        f"{path} already has an adapter named {name!r}{what}{also}. Each name once per site: pass another "
        f"name (surgery.rewrite(..., name='second')) to add a second adapter, surgery.delete({call_arg(scope)}, "
        f"{name!r}) to replace it, or narrow `where` to modules without it."
    )


def check_name(name: Any) -> str:
    """An adapter name: it becomes a module name on each site (``adapters.<name>``) and a key in files."""
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ConfigError(
            f"an adapter name must be 1-64 letters, digits, '_' or '-' (it names a submodule and file keys), got "
            f"name={clip(repr(name))}. Use e.g. name='reviewer'."
        )
    return name


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def call_arg(scope: Scope) -> str:
    return "gm" if scope.noun == "GraphModule" else "model"


# ----- rewrite -----


def check_variant(variant: Any) -> None:
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


def rewrite(model: nn.Module, variant: Variant, where: Where, *, calibration: Iterable[Any] | None = None,
            name: str = DEFAULT) -> nn.Module:
    """Splice ``variant`` into every module matched by ``where``, in place, as the adapter ``name`` (a site
    may hold several, each name once; the new one is active); returns ``model``."""
    check_variant(variant)
    check_name(name)
    scope = scope_of(model)
    paths = resolve(scope, where, name)
    plan: dict[str, Variant] = {p: variant for p in paths}
    for p in paths:  # before calibration runs the model
        require_layout(scope.base(p), variant, scope)
    states: dict[str, Any] = {}
    if variant.needs_calibration:
        states = collect(scope, variant, paths, calibration)
        plan = variant.configure(states)
    install(scope, {p: {name: v} for p, v in plan.items()}, states=states)
    return model


_LAYERS = {"linear": "linear layer", "conv1d": "GPT-2 Conv1D", "embedding": "nn.Embedding", "conv": "convolution"}


def require_layout(base: Base, variant: Variant, scope: Scope) -> None:
    """Refuse a variant on a kind of layer it does not declare (``Variant.layouts``), or on a Parameter when a fold
    cannot express it (``param.require_weight_space``), before anything changes."""
    if base.layout in variant.layouts:
        if base.param:
            require_weight_space(base.path, variant, scope.noun)
        return
    can = sorted(n for n, cls in REGISTRY.items() if base.layout in cls.layouts)
    raise ConfigError(
        f"{variant.name} cannot adapt {base.path}, a {base.base_class} ({_LAYERS.get(base.layout, base.layout)}): "
        f"it adapts {', '.join(_LAYERS.get(lay, lay) for lay in variant.layouts)} layers only, as its forward is "
        f"written on a linear layer's input x and an embedding or convolution is a linear map only of one-hot rows "
        f"or unfolded patches. Variants that adapt it: {', '.join(can) or 'none'}. Leave {base.path} out of `where` "
        f"for {variant.name}; the {scope.noun} was left unchanged."
    )


def site_init(base: Base, variant: Variant, *, calibration: Any = None, loading: bool = False) -> SiteInit:
    w, path = base.weight, base.path
    if variant.dtype is not None and not (isinstance(variant.dtype, torch.dtype) and variant.dtype.is_floating_point):
        raise ConfigError(
            f"{variant.short()}: dtype must be a floating torch dtype for the adapter tensors, got {variant.dtype!r}. "
            f"Use e.g. {variant.name}(dtype=torch.float32), or leave it None (float32 on half-precision bases)."
        )
    d_in, d_out = dims(w, base.layout)
    meta = isinstance(w, torch.Tensor) and w.device.type == "meta"
    if isinstance(w, torch.Tensor) and not meta and not w.is_floating_point() and not base.quant:
        if variant.needs_weight:
            raise DenseWeightError(
                f"{variant.name} needs the dense base weight of {path}, which is of type {str(w.dtype).removeprefix('torch.')}. "
                "Dequantise it first, or use a variant that only needs the layer's shape (LoRA, IA3)."
            )
        # the site traces the leaf's own forward, which cannot run on an integer weight
        raise UnsupportedModuleError(
            f"{path} has a weight of dtype {str(w.dtype).removeprefix('torch.')}, so it is not a float linear layer "
            f"that {variant.name} can adapt (a quantised stand-in?). Dequantise it to a float dtype first, "
            "or leave it out of `where`."
        )
    if variant.needs_weight and meta:
        raise DenseWeightError(
            f"{variant.name} needs the dense base weight of {path}, which is on the meta device (shapes only). "
            "Load real weights first, or use a variant that only needs the layer's shape (LoRA, IA3)."
        )
    dense = not meta
    dt = torch.promote_types(base.dtype, torch.float32)
    b = base.bias
    # only for a variant that reads it: on a 4-bit base each W is a dequantisation, on a bf16 one a float32 copy
    given = dense and variant.needs_weight
    return SiteInit(
        path=path, d_in=d_in, d_out=d_out,
        weight=base.dense().detach().to(dt) if given else None,
        bias=None if b is None or not dense else b.detach().to(dt),
        dtype=variant.adapter_dtype(base.dtype), device=w.device, calibration=calibration, loading=loading,
        layout=base.layout, spec=base.spec,
    )


def _call_variant(variant: Variant, what: str, path: str, fn: Callable[[], Any]) -> Any:
    """Run a variant's own code; anything but our errors is a bug in the variant, said as such."""
    try:
        return fn()
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise VariantContractError(
            f"{variant.short()}.{what} failed at {path} ({type(e).__name__}: {str(e).strip() or 'no message'}). "
            f"This is a bug in the variant; a variant reports a configuration that cannot work at a site with "
            "ConfigError from check(). The model was left unchanged."
        ) from e


def _owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def install(scope: Scope, plan: dict[str, dict[str, Variant]], *, states: dict[str, Any] | None = None,
            loading: bool = False, fill: Callable[[str, SiteAPI], None] | None = None,
            inactive: frozenset[tuple[str, str]] = frozenset()) -> dict[str, SiteAPI]:
    """Stage a site for each path with the adapters ``plan[path]`` (name -> variant), probe identity (or
    ``fill`` each adapter from a file: ``fill(path, site.adapter(name))``), then commit. A path that is a
    site already keeps its adapters and gets these too; the new ones are active unless (path, name) is in
    ``inactive``.

    All or nothing: nothing touches the model before every site is built, probed and filled.
    """
    states = states or {}
    owners = _owners(scope.model)
    sites = scope.sites()
    held = scope.get_unfrozen()
    for path in plan:
        inside = next((u for u in held if path == u or path.startswith(u + ".")), None)
        if inside is not None:
            raise ConfigError(
                f"cannot adapt {path}: it is {'' if path == inside else 'inside '}{inside}, which trains whole with adapter "
                f"{held[inside].name!r} (surgery.unfreeze), so an adapter there would train on top of a training weight. "
                f"Leave {path} out of `where`, or surgery.restore({call_arg(scope)}) first."
            )
    txn = scope.begin(rebuild=[p for p in plan if p in sites])
    for path, named in plan.items():
        base = scope.base(path)
        if is_sharded(base.weight):
            raise ShardedModelError(
                f"cannot adapt {path}: the model is already sharded by FSDP2 (its weight is a DTensor), and a site is "
                "built around the whole weight. Rewrite (or load) first, then call fully_shard on the rewritten model."
            )
        aliases = scope.aliases(path)
        if aliases:
            what = "Parameter" if base.param else "module"
            raise UnsupportedModuleError(
                f"{path} is the same {what} object as {aliases[0]}: adapting it at one path would leave the other "
                f"reading the original, and merging would change both. Give {aliases[0]} its own {what} (e.g. "
                f"copy.deepcopy), or adapt a model where each {what} is registered once."
            )
        if base.site is not None and base.site.replaced_base:
            raise _no_stack(scope, path, base.site.variant, next(iter(named)))
        parts, ctx = [], None
        for name, variant in named.items():
            require_layout(base, variant, scope)
            ctx = site_init(base, variant, calibration=states.get(path), loading=loading)
            _call_variant(variant, "check", path, lambda: variant.check(ctx))
            require_bounded_rank(variant, ctx)
            tensors = _call_variant(variant, "init", path, lambda: _init(variant, ctx, base.experts))
            _check_init(variant, path, ctx, tensors)
            if ctx.new_weight is not None:
                if base.param:
                    raise replacing(path, variant, scope.noun)
                if base.quant:
                    raise ConfigError(
                        f"{variant.short()} replaces the base weight of {path} by its residual, and {path} is a "
                        f"bitsandbytes {base.quant} layer: the residual would have to be quantised again, so the "
                        "model would not start where it was (PEFT refuses PiSSA on quantised weights too). Rewrite "
                        "the float model with PiSSA, or use LoRA or EVA on the quantised one; the "
                        f"{scope.noun} was left unchanged."
                    )
                if base.site is not None or len(named) > 1:
                    raise _no_stack(scope, path, variant, name)
                tied = [n for n in owners.get(id(base.weight), []) if n != f"{path}.weight"]
                if tied:
                    raise TiedWeightError(
                        f"{variant.name} rewrites the base weight of {path}, which is shared with {tied[0]}; "
                        f"changing it would silently change {tied[0]} too. Untie them first "
                        f"(e.g. model.{path}.weight = torch.nn.Parameter(model.{path}.weight.detach().clone()) "
                        "and config.tie_word_embeddings = False), or leave this module out of `where`."
                    )
            if parts and ctx.dtype != parts[0][2]:
                raise _dtype_clash(path, name, ctx.dtype, parts[0][0], parts[0][1].variant, parts[0][2])
            parts.append((name, Part(name, variant, tensors, active=(path, name) not in inactive), ctx.dtype))
        kept = kept_parts(base.site, ctx.dtype, next(iter(named)))
        staged = txn.stage(base, kept + [p for _, p, _ in parts], ctx)
        for name, _, _ in parts:
            if fill is not None:
                fill(path, staged.site.adapter(name))
            elif not loading and named[name].identity_tol is not None and base.weight.device.type != "meta":
                _probe_identity(scope, staged, base, ctx, name)
    _commit(scope, txn)
    hf.attach(scope.model)
    return {p: st.site for p, st in txn.staged.items()}


def _dtype_clash(path: str, adding: str, dtype: torch.dtype, other: str, variant: Variant,
                 have: torch.dtype) -> ConfigError:
    return ConfigError(
        f"cannot add adapter {adding!r} at {path}: its tensors would be {_dt(dtype)} while adapter {other!r} there "
        f"({variant.short()}) has {_dt(have)}, and the adapters of one site run in one dtype. Give the new variant "
        "the same dtype= (or leave both at None)."
    )


def kept_parts(site: SiteAPI | None, dtype: torch.dtype | None = None, adding: str = "") -> list[Part]:
    """The adapters already at a site, as parts of a new build of it (their live tensors, modules and strength)."""
    if site is None:
        return []
    parts = []
    for n in site.names:
        view = site.adapter(n)
        tensors = view.adapter_tensors()
        have = next((t.dtype for t in tensors.values() if t.is_floating_point()), dtype)
        if dtype is not None and have != dtype:
            raise _dtype_clash(site.path, adding, dtype, n, view.variant, have)
        slot = site._slot(n)
        modules = {m: getattr(slot, m) for m in view.variant.modules()}
        parts.append(Part(n, view.variant, tensors, active=n in site.active, modules=modules,
                          scale=slot._buffers[SCALE]))
    return parts


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _no_stack(scope: Scope, path: str, variant: Variant, name: str) -> ConfigError:
    return ConfigError(
        f"cannot add adapter {name!r} at {path}: {variant.short()} replaces the base weight there (by its residual), "
        "so another adapter on the same site would add to the residual's output instead of the base's. "
        f"A replacing variant must be a site's only adapter: merge it first (surgery.merge({call_arg(scope)})), or "
        "adapt other modules."
    )


def _init(variant: Variant, ctx: SiteInit, experts: int) -> dict[str, torch.Tensor]:
    """The variant's tensors at one site; for a stack of experts, each expert's (from its own weight), stacked."""
    if not experts:
        return variant.init(ctx)
    each = []
    for e in range(experts):
        one = dataclasses.replace(ctx, weight=None if ctx.weight is None else ctx.weight[e])
        each.append(variant.init(one))
        if one.new_weight is not None:
            ctx.new_weight = one.new_weight
    return {n: torch.stack([t[n] for t in each]) for n in each[0]}


def _check_init(variant: Variant, path: str, ctx: SiteInit, tensors: Any) -> None:
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise VariantContractError(
            f"{variant.short()}.init at {path} returned {type(tensors).__name__}; it must return a dict of "
            "tensor name -> torch.Tensor (e.g. {'lora_A': ..., 'lora_B': ...}). This is a bug in the variant."
        )


def _probe_identity(scope: Scope, staged: Staged, base: Base, ctx: SiteInit, name: str) -> None:
    """The staged site on random rows against its output without the new adapter: the original base output,
    or, beside other active adapters, the same site with the new adapter's strength at 0 (which drops its
    term exactly)."""
    # one random row: a nonzero change of the output shows on it almost surely, and a single row runs as a
    # matrix-vector product, about three times cheaper than a few rows on a large weight
    spec = staged.site.record.spec
    x = probe_input(base.layout, spec, ctx.d_in, base.dtype, base.weight.device)
    with torch.no_grad():
        got, ref = staged.probe(x)
        if len(staged.site.active) > 1:
            c = staged.site.adapter(name).scale_buffer
            c.fill_(0)
            try:
                ref = staged.probe(x)[0]
            finally:
                c.fill_(1)
        if ref is None:
            ref = base.output(x)
        if not torch.isfinite(ref).all():  # not the variant's fault: say so instead of blaming its init
            held = [t for t in (base.weight, base.bias) if t is not None and quant.stored_as_floats(t)]
            if all(_finite(t) for t in held):
                raise NonFiniteError(
                    f"the base output of {base.path} overflows {_dt(ref.dtype)} on a random input of unit scale "
                    f"(its weights are finite, but as large as {max(t.abs().max().item() for t in held):.3g}), so no "
                    f"adapter there can be checked to start as the identity. Rescale or upcast the model (e.g. "
                    f"model.float()); the {scope.noun} was left unchanged."
                )
            raise NonFiniteError(
                f"the base weight or bias of {base.path} holds NaN or Inf, so no adapter there can start as the "
                f"identity. Fix or reload the base checkpoint; the {scope.noun} was left unchanged."
            )
    require_identity(staged.site.adapter(name).variant, base.path, got, ref, scope.noun)


def require_identity(variant: Variant, path: str, got: torch.Tensor, ref: torch.Tensor, owner: str) -> None:
    """Raise IdentityError unless ``got`` equals the base output ``ref`` within the variant's promise."""
    if got.shape != ref.shape:  # a difference could broadcast to zero
        raise VariantContractError(
            f"{variant.short()}.forward at {path} returned shape {tuple(got.shape)} where the base output has shape "
            f"{tuple(ref.shape)}; a forward must return the shape of y. This is a bug in the variant; the {owner} "
            "was left unchanged."
        )
    scale = ref.abs().max().clamp_min(1e-12)
    err = ((got.to(ref.dtype) - ref).abs().max() / scale).item()
    tol = max(variant.identity_tol, 16 * torch.finfo(ref.dtype).eps)
    if not err <= tol:
        raise IdentityError(
            f"{variant.short()} at {path} should start as the identity, but its output differs "
            f"from the base by {err:.3g} (relative; allowed {tol:.1g}). This is a bug in the variant's init; "
            f"the {owner} was left unchanged."
        )


def _commit(scope: Scope, txn: Txn) -> None:
    """Put the staged sites in, freeze the base, train the active adapters of the staged sites (and freeze
    their inactive ones); undo all of it on failure."""
    model, staged = scope.model, txn.staged
    first = scope.get_flags() is None
    if first:
        scope.set_flags({n: p.requires_grad for n, p in model.named_parameters()})
    flags_now = [(p, p.requires_grad) for p in model.parameters()]
    # other sites' adapter tensors keep their flags: a second rewrite must not freeze the first; nor unfrozen modules
    earlier = {id(t) for s in scope.sites().values() for t in s.adapter_tensors().values()}
    earlier |= {id(t) for t in unfrozen_tensors(scope).values()}
    committed = False
    try:
        scope.commit(txn)
        committed = True
        for p in model.parameters():
            if id(p) not in earlier:
                p.requires_grad_(False)
        for st in staged.values():
            for n in st.site.names:
                for t in st.site.adapter(n).adapter_tensors().values():
                    if isinstance(t, nn.Parameter):
                        t.requires_grad_(n in st.site.active)
        # a single active adapter runs without a blend until its strength leaves 1
        blend = [p for p, st in staged.items() if len(st.site.active) == 1 and not st.site.record.gated
                 and not st.site.adapter(st.site.active[0]).variant.steered
                 and st.site.adapter(st.site.active[0]).scale != 1]
        if blend:
            scope.gate(blend)
    except BaseException:
        if committed:
            scope.uncommit(txn)
        for p, flag in flags_now:
            p.requires_grad_(flag)
        if first:
            scope.set_flags(None)
        raise


# ----- sites, merge, restore -----


def all_sites(scope: Scope) -> dict[str, SiteAPI]:
    sites = scope.sites()
    if not sites:
        raise NotRewrittenError(
            f"the {scope.noun} has no sites (nothing was rewritten or loaded into it), so there is no adapter to "
            "merge, restore, save, export, switch off or scale. "
            f"Call surgery.rewrite({call_arg(scope)}, variant, where) first."
        )
    return sites


def unfrozen_tensors(scope: Scope, name: str | None = None) -> dict[str, torch.Tensor]:
    """The state of the modules that train whole with an adapter (all, or adapter ``name``'s), keyed
    ``<path>.<tensor>``: what a file holds for them."""
    out = {}
    for path, rec in scope.get_unfrozen().items():
        if name in (None, rec.name):
            for k, t in scope.model.get_submodule(path).state_dict(keep_vars=True).items():
                out[f"{path}.{k}"] = t
    return out


def unfrozen_state(scope: Scope, name: str | None, verb: str) -> dict[str, torch.Tensor]:
    """The unfrozen modules' state as a file holds it (whole, on the CPU), refusing NaN or Inf as
    ``require_finite`` does for adapter tensors."""
    out = {}
    for key, t in unfrozen_tensors(scope, name).items():
        t = gathered(t).detach()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(
                f"cannot {verb} {key}: NaN or Inf in the unfrozen module's values; the file would load as NaN "
                f"outputs. Nothing was written; check the learning rate or the loss, or "
                f"surgery.restore({call_arg(scope)})."
            )
        out[key] = t.to("cpu").contiguous()
    return out


def release(scope: Scope, *, keep: bool, names: set[str] | None = None) -> None:
    """Stop training the unfrozen modules (all, or those of adapter ``names``): their original values back,
    or (``keep``, as merge does) the trained ones left in as plain weights; frozen again like the base."""
    held = scope.get_unfrozen()
    for path, rec in list(held.items()):
        if names is None or rec.name in names:
            scope.release(rec, keep)
            for p in scope.model.get_submodule(path).parameters():
                p.requires_grad_(False)
            del held[path]
    scope.set_unfrozen(held)


def warn_untracked(scope: Scope, verb: str) -> None:
    """Say which trainable parameters a file leaves out: neither adapter tensors nor unfrozen modules (a head
    unfrozen by hand would otherwise come back as its base values on load, without a word)."""
    kept = {id(t) for s in scope.sites().values() for t in s.adapter_tensors().values()}
    kept |= {id(t) for t in unfrozen_tensors(scope).values()}
    left = [n for n, p in scope.model.named_parameters() if p.requires_grad and id(p) not in kept]
    if not left:
        return
    modules = list(dict.fromkeys(n.rpartition(".")[0] or n for n in left))
    warnings.warn(
        f"{verb}: {len(left)} trainable parameter(s) are neither adapter tensors nor in modules unfrozen with "
        f"surgery.unfreeze, so the file leaves them out and a load gives their base values back: "
        f"{', '.join(clip(n) for n in left[:5])}{' ...' if len(left) > 5 else ''}. To keep them, "
        f"surgery.unfreeze({call_arg(scope)}, {modules[0]!r}) before training; to silence this, set their "
        "requires_grad to False.",
        stacklevel=3,
    )


def _restore_flags(scope: Scope, originals: dict[str, nn.Parameter]) -> None:
    """Give every parameter (and the originals of removed sites) its flag from before the first rewrite."""
    flags = scope.get_flags() or {}
    scope.set_flags(None)
    params = dict(originals)
    params.update(dict(scope.model.named_parameters()))
    for n, p in params.items():
        if n in flags:
            p.requires_grad_(flags[n])


def _originals(sites: dict[str, SiteAPI]) -> dict[str, nn.Parameter]:
    return {f"{p}.{n}": t for p, s in sites.items() if not s.record.param
            for n, t in s.record.original.named_parameters()}


def rebuild(scope: Scope, changes: dict[str, list[Part]]) -> None:
    """Build sites again from the given parts (adapters kept, dropped, switched on or off), all or nothing."""
    sites = scope.sites()
    txn = scope.begin(rebuild=list(changes))
    for path, parts in changes.items():
        base = scope.base(path)
        w = base.weight
        dtype = next((t.dtype for p in parts for t in p.tensors.values() if t.is_floating_point()), w.dtype)
        ctx = SiteInit(path=path, d_in=sites[path].d_in, d_out=sites[path].d_out, weight=None, bias=None,
                       dtype=dtype, device=w.device)
        txn.stage(base, parts, ctx)
    _commit(scope, txn)


def drop(scope: Scope, paths: list[str]) -> None:
    """Take some sites out, giving back their original modules and the flags those had before the first rewrite."""
    sites = scope.sites()
    originals = _originals({p: sites[p] for p in paths})
    scope.remove(paths)
    flags = scope.get_flags() or {}
    for n, p in originals.items():
        if n in flags:
            p.requires_grad_(flags[n])
    if not scope.sites():
        release(scope, keep=False)
        hf.detach(scope.model)
        _restore_flags(scope, {})


def restore(model: nn.Module) -> nn.Module:
    """Remove every site and give back the exact original modules and weights; returns ``model``."""
    scope = scope_of(model)
    sites = all_sites(scope)
    scope.remove(list(sites))
    release(scope, keep=False)
    hf.detach(scope.model)
    _restore_flags(scope, _originals(sites))
    return model


def merge(model: nn.Module, *, dequantize: bool = False,
          progress: Callable[[Iterable], Iterable] | None = None) -> nn.Module:
    """Fold every site into its weights and put back modules of the original class; returns ``model``.

    A quantised (bitsandbytes) base gets W' quantised again in its own format, with a warning that gives the
    error that costs; ``dequantize=True`` puts a float nn.Linear holding W' exactly there instead.
    ``progress`` wraps the ``(path, site)`` pairs while they are folded (e.g. ``tqdm``), for long merges.
    """
    scope = scope_of(model)
    sites = all_sites(scope)
    require_unsharded(scope, sites, "merge")
    owners = _owners(scope.model)
    untie = {}
    for path, site in (progress or iter)(sites.items()):
        if site.base_weight.device.type == "meta":
            raise MetaDeviceError(
                f"cannot merge {path}: its weights are on the meta device (shapes only, no values), so there is "
                "nothing to fold. Load real weights (e.g. model.to_empty(device='cpu') and load a checkpoint) first."
            )
        _fold_checked(scope, site)  # checked, then dropped: holding every W' at once would double the model
        # the site's own names for its weight (path.weight, path.base_layer.weight, a parameter site's path) are no tie
        tied = [n for n in owners.get(id(site.base_weight), []) if n != path and not n.startswith(path + ".")]
        if tied:
            untie[path] = tied
    for path, tied in untie.items():
        warnings.warn(
            f"merge: {path}.weight was tied to {', '.join(tied)}; it is now untied so that folding the "
            f"adapter does not change {tied[0]}. config.tie_word_embeddings is set to False where present.",
            stacklevel=2,
        )
    # every site was folded and checked before any weight is written, so a bad fold cannot half-merge; each is
    # folded again as it is written (the same ops on the same tensors), so only one W' is alive at a time
    errors = scope.remove(list(sites), lambda path: sites[path].fold(), frozenset(untie), dequantize)
    if errors and not dequantize:
        worst = max(errors, key=errors.get)
        warnings.warn(
            f"merge: {len(errors)} quantised layer(s) hold the merged weight quantised again in their own format, "
            f"which moves it by up to {errors[worst]:.3g} of its largest entry (at {worst}); the merged model "
            "is that far from the adapted one. surgery.merge(model, dequantize=True) gives float layers holding "
            "the merged weights exactly.",
            stacklevel=2,
        )
    release(scope, keep=True)  # trained whole modules are plain weights already
    hf.detach(scope.model)
    if untie:
        _untie_config(scope.model)
    _restore_flags(scope, _originals(sites))
    return model


def _fold_checked(scope: Scope, site: SiteAPI) -> tuple[torch.Tensor, torch.Tensor | None]:
    path, v = site.path, site.variant
    out = _call_variant(v, "fold", path, site.fold)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
        raise VariantContractError(
            f"{v.name}.fold returned {type(out).__name__} at {path}; it must return (W', b') with W' a tensor "
            f"and b' a tensor or None. This is a bug in the variant; the {scope.noun} was left unchanged."
        )
    W, b = out
    if (b is None) != (site.base_bias is None):
        raise VariantContractError(
            f"{v.name}.fold changed whether {path} has a bias; this is a bug in the variant. "
            f"The {scope.noun} was left unchanged."
        )
    want = (site.record.experts,) * bool(site.record.experts) + (site.d_out, site.d_in)
    if tuple(W.shape) != want or (b is not None and tuple(b.shape) != (site.d_out,)):
        raise VariantContractError(
            f"{v.name}.fold returned W' of shape {tuple(W.shape)}"
            f"{'' if b is None else f' and b of shape {tuple(b.shape)}'} at {path}; expected "
            f"{want} and ({site.d_out},). This is a bug in the variant; the {scope.noun} was "
            "left unchanged."
        )
    bad = [n for n, t in (("weight", W), ("bias", b)) if t is not None and not _finite(t)]
    bad += [n for n, t in site.adapter_tensors().items() if t.is_floating_point() and not _finite(t)]
    if bad:
        raise NonFiniteError(
            f"cannot merge {path}: NaN or Inf in {', '.join(sorted(set(bad)))} ({v.short()}). The {scope.noun} was "
            f"left unchanged; check the learning rate or the loss, or surgery.restore({call_arg(scope)})."
        )
    return W, b


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. Its sum first (NaN and Inf propagate through it, and a sum is about twice as
    fast as aminmax); a sum that overflows (large half-precision weights) is settled by the min and max."""
    if t.numel() == 0:
        return True
    t = t.detach()
    if torch.isfinite(t.sum()):
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def require_unsharded(scope: Scope, sites: dict[str, SiteAPI], verb: str) -> None:
    """Refuse a verb that needs whole weights on a model sharded by FSDP2."""
    for path, site in sites.items():
        if is_sharded(site.base_weight) or any(is_sharded(t) for t in site.adapter_tensors().values()):
            raise ShardedModelError(
                f"cannot {verb} {path}: the model is sharded by FSDP2 (fully_shard), so each rank holds a slice of "
                f"its weights, and {verb} needs them whole. surgery.save gathers the adapter on rank 0: save it, "
                f"load it onto an unsharded base, and {verb} there."
            )


def require_finite(scope: Scope, sites: dict[str, SiteAPI], verb: str,
                   tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Refuse to write an adapter holding NaN or Inf (load and merge refuse it too); ``tensors``: the sites'
    adapter tensors as they will be written (gathered), if not the sites' own."""
    for path, site in sites.items():
        own = site.adapter_tensors() if tensors is None else tensors[path]
        bad = [n for n, t in own.items() if t.is_floating_point() and t.device.type != "meta"
               and not torch.isfinite(t).all()]
        if bad:
            raise NonFiniteError(
                f"cannot {verb} {path}: NaN or Inf in {', '.join(sorted(bad))} ({site.variant.short()}); the file "
                f"would load as NaN outputs. Nothing was written; check the learning rate or the loss, or "
                f"surgery.restore({call_arg(scope)})."
            )


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


# ----- files: check every target before anything changes -----


def require_bounded_rank(variant: Variant, site: SiteInit) -> None:
    """A rank ``r`` above the weight's larger side is refused before anything is allocated: the update of a
    d_out x d_in layer has rank at most min(d_in, d_out), so such an r buys nothing and can ask for gigabytes."""
    r = getattr(variant, "r", None)
    if isinstance(r, int) and not isinstance(r, bool) and r > max(site.d_in, site.d_out):
        useful = min(site.d_in, site.d_out)
        raise ConfigError(
            f"{variant.short()}: r={r} at {clip(site.path)} is larger than both sides of its {site.d_out}x{site.d_in} "
            f"weight; an update of that layer has rank at most {useful}, so the extra directions would only "
            f"take memory ({r * (site.d_in + site.d_out) * 4 / 2**30:.1f} GiB of float32 tensors or more). "
            f"Use r <= {useful}."
        )


def check_ranks(plan: dict[str, Variant], shapes: dict[str, list[tuple[int, ...]]], source: str) -> None:
    """A rank from a file must be a dimension of that site's saved tensors, before anything is allocated
    (a config r of 10**7 beside (2, 8) tensors would otherwise ask for gigabytes first)."""
    for path, variant in plan.items():
        r = getattr(variant, "r", None)
        dims_ = {d for shape in shapes.get(path, []) for d in shape}
        if isinstance(r, int) and dims_ and r not in dims_:
            raise AdapterFileError(
                f"{source}: the config gives {variant.short()} at {path}, but its saved tensors have shapes "
                f"{sorted(set(shapes[path]))}, none with a dimension r={r}; the config and the tensors do not belong "
                "together. Re-save the adapter."
            )


def check_targets(scope: Scope, targets: dict[str, tuple[int, int] | None], source: str,
                  names: dict[str, list[str]] | None = None) -> None:
    """Each path a file adapts must be an adaptable layer of this model with the saved shape, without an
    adapter of the name it brings (``names[path]``, default "default")."""
    cands, sites = nameable(scope), scope.sites()
    ok = scope.adaptable() | set(sites)
    for p, want in targets.items():
        clash = [n for n in (names or {}).get(p, [DEFAULT]) if p in sites and n in sites[p].record.adapters]
        if clash:
            raise already_rewritten(scope, p, clash[0])
        if p not in cands:
            # on a prefix: difflib is quadratic, and a file may name a path of millions of characters
            close = difflib.get_close_matches(p[:4 * SHOWN], list(cands), n=2, cutoff=0.0)
            raise BaseMismatchError(
                f"{source} was saved for another base: it adapts {clip(p)}, which this {scope.noun} does not have "
                f"(closest: {', '.join(close) or 'none'}). Load it onto the base it was trained on."
            )
        if p not in ok:
            raise BaseMismatchError(
                f"{source} adapts {clip(p)}, but in this {scope.noun} {clip(p)} is a {scope.class_name(p)}, not a linear layer "
                "that can be adapted. Load it onto the base it was trained on."
            )
        base = scope.base(p)
        have = dims(base.weight, base.layout)
        if want is not None and tuple(have) != tuple(want):
            raise BaseMismatchError(
                f"{source} was saved for another base: {clip(p)} had in/out {want[0]}x{want[1]}, this {scope.noun}'s is "
                f"{have[0]}x{have[1]}. Load it onto the base it was trained on."
            )


def fill_value(source: str, key: str, value: torch.Tensor, target: torch.Tensor, site: SiteAPI, *,
               squeeze: bool = False) -> None:
    """Copy a tensor read from a file into a staged site's tensor. The shape must be the expected one
    (``squeeze``: up to size-1 dimensions, for formats that store a vector as (n,) or (n, 1)); adapter
    tensors are floating point and finite."""
    if target.device.type == "meta":
        raise MetaDeviceError(
            f"cannot load {clip(key)} from {source}: {site.path} is on the meta device (shapes only), where the file's "
            "values would be dropped. Materialise the base first (model.to_empty(device='cpu') and load its "
            "checkpoint), then load the adapter."
        )
    check_value(source, key, value, target, f"{site.variant.short()} at {site.path}", squeeze=squeeze)
    with torch.no_grad():
        target.copy_(value.reshape(target.shape))


def check_value(source: str, key: str, value: torch.Tensor, target: torch.Tensor, owner: str, *,
                squeeze: bool = False) -> None:
    """A tensor read from a file fits ``target``: its shape (``squeeze``: up to size-1 dimensions), floating
    point, finite. ``owner`` says who expects it, for the message."""
    shape = lambda t: tuple(d for d in t.shape if d != 1) if squeeze else tuple(t.shape)  # noqa: E731
    if shape(value) != shape(target):
        raise BaseMismatchError(
            f"{source}: tensor {clip(key)} has shape {tuple(value.shape)}, but {owner} "
            f"expects {tuple(target.shape)}. The file does not belong to this base or config."
        )
    if not value.is_floating_point() and target.is_floating_point():
        raise AdapterFileError(
            f"{source}: tensor {clip(key)} is stored as {str(value.dtype).removeprefix('torch.')}; adapter tensors are "
            "floating point, and reading integers as weights would give garbage. Re-save the adapter."
        )
    if value.dtype != target.dtype and not target.is_floating_point():  # an unfrozen module's counter
        raise AdapterFileError(
            f"{source}: tensor {clip(key)} is stored as {str(value.dtype).removeprefix('torch.')}, but {owner} holds "
            f"{str(target.dtype).removeprefix('torch.')} there. Re-save the adapter."
        )
    if not torch.isfinite(value).all():
        raise NonFiniteError(
            f"{source}: tensor {clip(key)} holds NaN or Inf; loading it would make every output NaN. "
            "Re-save the adapter from a model whose adapter is finite (surgery.merge refuses it too)."
        )
