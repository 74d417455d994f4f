"""Whole modules that train with an adapter and travel with it: ``surgery.unfreeze`` (PEFT's ``modules_to_save``).

A classifier head put on a pretrained body (``score`` of ``LlamaForSequenceClassification``) starts
random, so a low-rank change of it is not enough: it trains whole, beside the adapter. Such a module
belongs to one adapter name: ``save`` writes its state with that adapter (``<path>.<tensor>``, listed
under the metadata's ``unfrozen``), ``load`` fills it in on a fresh base, ``export_peft`` writes it as
PEFT's ``modules_to_save`` and ``import_peft`` reads that back. ``restore`` (and deleting the adapter)
gives the original values back bit for bit, ``disabled`` runs the originals, ``merge`` keeps the trained
values as plain weights.

Module scope trains the module in place and keeps a frozen copy of its values; graph scope puts a copy
into the GraphModule and trains that, since the GraphModule's Parameters are the eager model's too
(``Scope.hold``).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import (
    AdapterFileError,
    AlreadyRewrittenError,
    BaseMismatchError,
    ConfigError,
    GraphScopeError,
    MetaDeviceError,
    NotRewrittenError,
    ShardedModelError,
    TiedWeightError,
    UnsupportedModuleError,
    clip,
)
from .ops import call_arg, check_name, check_value
from .scope import Scope, Unfrozen, scope_of
from .site import is_sharded
from .splice import DEFAULT
from .where import Where, compile_where, raise_no_match


def unfreeze(model: nn.Module, where: Where, *, name: str = DEFAULT) -> nn.Module:
    """Train the modules ``where`` matches whole, with adapter ``name``; they are saved, loaded and exported
    with it, and ``restore`` gives their original values back. Returns ``model``."""
    check_name(name)
    scope = scope_of(model)
    paths = _resolve(scope, where)
    check(scope, dict.fromkeys(paths, name), f"surgery.unfreeze({call_arg(scope)}, ...)")
    hold(scope, dict.fromkeys(paths, name))
    return model


def _resolve(scope: Scope, where: Where) -> list[str]:
    """The outermost modules with parameters that ``where`` names (a glob such as ``*`` hits a module and its
    children: the module, whole, is meant)."""
    cands = scope.candidates()
    found: list[str] = []
    for pat in compile_where(where):
        hit = [p for p, m in cands.items() if pat.test(p, m)]
        if not hit:
            raise_no_match(pat, [], cands, lambda m: True)
        bare = [p for p in hit if next(cands[p].parameters(), None) is None]
        if len(bare) == len(hit):
            raise UnsupportedModuleError(
                f"`where` pattern {clip(str(pat.label))} matches only modules without parameters "
                f"({', '.join(f'{p} ({type(cands[p]).__name__})' for p in bare[:3])}), so there is nothing to "
                "train. Name a module that holds weights, e.g. the classifier head ('score')."
            )
        found += [p for p in hit if p not in bare]
    found = list(dict.fromkeys(found))
    return [p for p in found if not any(p.startswith(q + ".") for q in found)]


def check(scope: Scope, paths: dict[str, str], caller: str, coming: dict[str, list[str]] | None = None) -> None:
    """Refuse, before anything changes, a path (-> adapter name) that cannot train whole with that adapter.
    ``coming``: site path -> adapter names that the same call adds (a load), before they are there."""
    have = scope.sites()
    sites = {**{p: s.names for p, s in have.items()}, **(coming or {})}
    if not sites:
        raise NotRewrittenError(
            f"{caller}: the {scope.noun} has no adapter yet, and an unfrozen module trains with an adapter and is "
            f"saved with it. Call surgery.rewrite({call_arg(scope)}, variant, where) first, then unfreeze."
        )
    names = {n for ns in sites.values() for n in ns} | {n for s in have.values() for n in s.names}
    held = scope.get_unfrozen()
    owners: dict[int, list[str]] = {}
    for n, p in scope.model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    for path, name in paths.items():
        if name not in names:
            raise ConfigError(
                f"cannot unfreeze {path} with adapter {name!r}: this {scope.noun} has no adapter of that name; its "
                f"adapters are {sorted(names)}. Pass name= one of those (the module is saved with that adapter)."
            )
        site = next((s for s in sites if s == path or s.startswith(path + ".")), None)
        if site is not None:
            raise AlreadyRewrittenError(
                f"cannot unfreeze {path}: it {'is' if site == path else 'contains'} the site {site}, whose base weight "
                "stays frozen under its adapter; training it whole as well would change what the adapter was "
                f"trained against. Unfreeze a module without sites (e.g. the classifier head), or narrow `where`."
            )
        if path in held:
            same = held[path].name == name
            raise (AlreadyRewrittenError if same else ConfigError)(
                f"cannot unfreeze {path} with adapter {name!r}: it is unfrozen already, with adapter "
                f"{held[path].name!r}" + (". Each module once; it trains already." if same else
                "; a module trains whole for one adapter (one trained copy of it). Unfreeze another module, or "
                f"surgery.delete({call_arg(scope)}, {held[path].name!r}) first.")
            )
        other = next((u for u in held if path.startswith(u + ".") or u.startswith(path + ".")), None)
        if other is not None:
            raise ConfigError(
                f"cannot unfreeze {path}: {other} {'holds it' if path.startswith(other + '.') else 'is inside it'} and "
                f"is unfrozen already (adapter {held[other].name!r}); a module trains whole once. Name one of the two."
            )
        try:
            module = scope.model.get_submodule(path)
        except AttributeError:
            module = None
        if module is None or next(module.parameters(), None) is None:
            raise GraphScopeError(
                f"cannot unfreeze {path}: the traced graph never reads its parameters, so training them would be "
                "a silent no-op. Unfreeze a module the forward uses, or unfreeze the eager model (module scope)."
            )
        for n, p in module.named_parameters():
            if p.device.type == "meta":
                raise MetaDeviceError(
                    f"cannot unfreeze {path}: {path}.{n} is on the meta device (shapes only), so there are no values "
                    "to train or to give back. Materialise the model (model.to_empty, then load its weights) first."
                )
            if is_sharded(p):
                raise ShardedModelError(
                    f"cannot unfreeze {path}: the model is sharded by FSDP2 (fully_shard), and a copy of its "
                    "original values is kept whole. Unfreeze first, then call fully_shard."
                )
            outside = [o for o in owners[id(p)] if not o.startswith(path + ".")]
            if outside:
                raise TiedWeightError(
                    f"cannot unfreeze {path}: {path}.{n} is shared with {outside[0]}, which would train with it (and "
                    f"restore would write both). Untie them first (e.g. model.{path}.{n} = "
                    f"torch.nn.Parameter(model.{path}.{n}.detach().clone())), or leave {path} out of `where`."
                )


def hold(scope: Scope, paths: dict[str, str], values: dict[str, torch.Tensor] | None = None) -> None:
    """Unfreeze ``paths`` (-> adapter name), checked already; ``values``: ``<path>.<tensor>`` -> what to fill in
    (from a file), checked already too. All or nothing."""
    held = scope.get_unfrozen()
    flags = [(p, p.requires_grad) for path in paths for p in scope.model.get_submodule(path).parameters()]
    done: list[Unfrozen] = []
    try:
        for path, name in paths.items():
            rec = scope.hold(path, name)
            done.append(rec)
            module = scope.model.get_submodule(path)
            with torch.no_grad():
                for k, t in module.state_dict(keep_vars=True).items():
                    if values is not None:
                        t.copy_(values[f"{path}.{k}"].reshape(t.shape))
            for p in module.parameters():
                p.requires_grad_(True)
            held[path] = rec
    except BaseException:
        for rec in reversed(done):
            scope.release(rec, keep=False)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    scope.set_unfrozen(held)


def check_values(scope: Scope, paths: dict[str, str], tensors: dict[str, torch.Tensor], source: str,
                 keys: dict[str, str] | None = None) -> None:
    """A file's state for each unfrozen module: exactly the module's tensors, each of the module's shape.
    ``keys``: our key -> the file's (PEFT's prefix), if they differ."""
    keys = keys or {}
    for path in paths:
        want = scope.model.get_submodule(path).state_dict(keep_vars=True)
        have = {k for k in tensors if k.startswith(path + ".")}
        missing = [k for k in want if f"{path}.{k}" not in tensors]
        if missing:
            raise AdapterFileError(
                f"{source} lacks {keys.get(f'{path}.{missing[0]}', f'{path}.{missing[0]}')}, a tensor of the unfrozen "
                f"module {path} ({type(scope.model.get_submodule(path)).__name__}); the file is incomplete. Re-save it."
            )
        extra = sorted(have - {f"{path}.{k}" for k in want})
        if extra:
            raise BaseMismatchError(
                f"{source} has {clip(keys.get(extra[0], extra[0]))} for the unfrozen module {path}, which this "
                f"{scope.noun}'s {path} does not have; the file was saved for another base. Load it onto that base."
            )
        for k, t in want.items():
            key = f"{path}.{k}"
            check_value(source, keys.get(key, key), tensors[key], t, f"the unfrozen module {path}")
