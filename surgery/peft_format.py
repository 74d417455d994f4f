"""PEFT's on-disk adapter format (``adapter_config.json`` + ``adapter_model.safetensors``), both ways.

``export_peft(model, directory)`` writes what ``peft.PeftModel.from_pretrained(original_base,
directory)`` loads into the same outputs; ``import_peft(model, directory)`` rewrites a base so it
reproduces a PEFT adapter written by ``save_pretrained``. Both target PEFT 0.21.

Per-variant knowledge lives in two tables in this file, keyed by class name and looked up along
the MRO (so EVA, a LoRA subclass, exports as the LoRA it is): ``_EXPORT`` (our site -> PEFT keys
and config) and ``_IMPORT`` (PEFT config + tensors -> our variant). PEFT's format is an external
contract, so its field names, key spellings and defaults stay together here instead of spread over
the variant files; a variant with no PEFT peer needs no entry at all: it is exported as an exact
LoRA of its weight delta (an SVD) when that is smaller than the dense delta.

Rules that PEFT's format imposes:
- One model -> one PEFT adapter, so every site must map to the same ``peft_type`` and agree on the
  config fields PEFT keeps global (dropout, rslora, use_dora, RoAd's variant, ...). Per-site rank
  and alpha go to ``rank_pattern`` / ``alpha_pattern`` (LoRA, DeLoRA). Anything else is an error.
- A variant that changed the base weight at init (PiSSA) is exported as a plain LoRA on the
  ORIGINAL base: the base change is a rank-r matrix ``W_orig - W_res = s B0 A0``, recovered here by
  an SVD of that difference, and appended as ``A' = [A; A0]``, ``B' = [B, -B0]`` with alpha scaled so
  that s is unchanged (PEFT's own ``path_initial_model_for_weight_conversion`` does the same).
- Unfrozen modules (``surgery.unfreeze``) are PEFT's ``modules_to_save``: names in the config, state under
  ``base_model.model.<path>.<tensor>`` as PEFT's save_pretrained writes it; import reads them back.
- Import never unpickles: the config is JSON and the tensors safetensors (``adapter_model.bin`` is
  refused). A config field we would have to ignore, with a value other than PEFT's default, is an
  error naming the field.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import regex  # re with a timeout: rank_pattern keys are regexes read from a file
import torch
from safetensors.torch import save_file
from torch import nn

from .errors import AdapterFileError, BaseMismatchError, ConfigError, PeftFormatError, clip
from .io import atomic_write_all, decode, read_bytes, read_header
from . import trainable
from .ops import (all_sites, check_name, check_ranks, check_targets, fill_value, install, require_finite, require_unsharded,
                  unfrozen_state, warn_untracked)
from .splice import DEFAULT
from .scope import Scope, scope_of
from .site import SiteAPI
from .site import dims
from .variant import REGISTRY

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the PEFT release whose format and defaults are written here

# PEFT 0.21's config defaults per peft_type, for the fields that change what an adapter computes
# or where it goes. Export writes them (updated with ours); import accepts a field only when we
# map it or it still has this value.
_COMMON = {"task_type": None, "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
           "inference_mode": True, "peft_version": PEFT_VERSION, "target_modules": None, "modules_to_save": None}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "LORA": {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none",
             "use_rslora": False, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
             "rank_pattern": {}, "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
             "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
             "lora_ga_config": None, "use_dora": False, "velora_config": None, "alora_invocation_tokens": None,
             "use_qalora": False, "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
             "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
             "kasa_config": None, "ensure_weight_tying": False, "exclude_modules": None},
    "IA3": {"exclude_modules": None, "feedforward_modules": None, "fan_in_fan_out": False, "init_ia3_weights": True},
    "HRA": {"exclude_modules": None, "r": 8, "apply_GS": False, "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "bias": "none"},
    "DELORA": {"exclude_modules": None, "r": 8, "delora_lambda": 15, "module_dropout": 0.0, "bias": "none", "init_weights": True,
               "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "lambda_pattern": {}},
    "ROAD": {"variant": "road_1", "group_size": 64, "init_weights": True},
}
# Fields import may see with any value: bookkeeping, or choices that the saved tensors override
# (inits) or that the saved keys already settle (which modules, their storage layout).
_IGNORED = {"task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
            "target_modules", "exclude_modules", "fan_in_fan_out", "init_ia3_weights", "init_weights",
            "layers_pattern", "delora_lambda", "lambda_pattern", "peft_type", "runtime_config"}
_IGNORED_INIT_LORA = (True, False, "gaussian", "eva")  # inits that leave the base alone; A, B come from the file


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """One site as PEFT sees it."""

    peft_type: str
    tensors: dict[str, torch.Tensor]  # key suffix after the module path -> tensor
    shared: dict[str, Any] = field(default_factory=dict)  # config fields PEFT keeps global
    r: int | None = None
    alpha: float | None = None  # None with r set: choose alpha so that PEFT's scale is 1
    feedforward: bool = False  # IA3: input-side scaling


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """delta (d_out, d_in) ~ B A with A (rank, d_in), B (d_out, rank): the top `rank` of its SVD."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = S[:rank].sqrt()  # (rank,)
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def _numerical_rank(delta: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> int:
    """Singular values of delta above the base dtype's resolution of ref (numpy's matrix_rank rule)."""
    S = torch.linalg.svdvals(delta.double())
    tol = torch.finfo(dtype).eps * max(delta.shape) * torch.linalg.matrix_norm(ref.double(), ord=2)
    return int((S > tol).sum())


def _lora_tensors(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"lora_A.weight": A.to(dtype).contiguous(), "lora_B.weight": B.to(dtype).contiguous()}


def _export_lora(site: SiteAPI) -> _Part:
    v, ts = site.variant, site.adapter_tensors()
    A, B = ts["lora_A"].detach(), ts["lora_B"].detach()  # (r, d_in), (d_out, r)
    r, alpha = v.r, v.alpha
    if site.replaced_base:
        # PEFT re-runs no custom init on load, so the residual base must become part of the adapter:
        # s B0 A0 = W_orig - W_res, and W_orig + s (B A - B0 A0) = W_res + s B A.
        W_res = site.dense_weight()
        A0, B0 = _factor((site.original_weight.double() - W_res.double()) / v.scale, A.shape[0])
        A, B = torch.cat([A.double(), A0]), torch.cat([B.double(), -B0], dim=1)
        grown = A.shape[0] / r
        r, alpha = A.shape[0], alpha * (math.sqrt(grown) if v.rslora else grown)
    shared = {"lora_dropout": v.dropout, "use_rslora": v.rslora, "use_dora": False}
    dtype = ts["lora_A"].dtype
    if site.layout == "embedding":  # PEFT's Embedding keeps bare Parameters under other names, same shapes
        tensors = {"lora_embedding_A": A.to(dtype).contiguous(), "lora_embedding_B": B.to(dtype).contiguous()}
    elif site.layout == "conv":  # PEFT's lora_A / lora_B are convs: the layer's kernel, then 1x1
        shape = site.base_weight.shape
        tensors = _lora_tensors(A.reshape(A.shape[0], *shape[1:]), B.reshape(*B.shape, *(1,) * (len(shape) - 2)), dtype)
    else:
        tensors = _lora_tensors(A, B, dtype)
    return _Part("LORA", tensors, shared, r=r, alpha=alpha)


def _export_dora(site: SiteAPI) -> _Part:
    part = _export_lora(site)  # A and B under PEFT's names and shapes for the layer; m is kept in PEFT's shape
    part.tensors["lora_magnitude_vector"] = site.adapter_tensors()["lora_magnitude_vector"].detach()
    part.shared["use_dora"] = True
    return part


def _plain(peft_type: str, **shared_of: Callable[[Any], Any]) -> Callable[[SiteAPI], _Part]:
    """A variant whose tensors carry PEFT's names unchanged; ``shared_of`` maps config fields."""

    def export(site: SiteAPI) -> _Part:
        if site.layout != "linear" and peft_type in ("HRA", "DELORA", "ROAD"):
            raise PeftFormatError(
                f"{site.variant.short()} at {site.path} sits on a GPT-2 Conv1D, which PEFT's {peft_type} refuses "
                "(TypeError in PEFT 0.21). Keep it in model-surgery's format (surgery.save), or surgery.merge "
                "and save_pretrained for a plain checkpoint."
            )
        v = site.variant
        tensors = {n: t.detach() for n, t in site.adapter_tensors().items()}
        return _Part(peft_type, tensors, {k: f(v) for k, f in shared_of.items()}, r=getattr(v, "r", None))

    return export


def _export_ia3(site: SiteAPI) -> _Part:
    if site.layout == "conv" and len(site.info.spec.kernel_size) == 1:
        raise PeftFormatError(
            f"{site.variant.short()} at {site.path} sits on an nn.Conv1d, which PEFT 0.21's IA3 refuses (it adapts "
            "Linear, Conv2d, Conv3d and GPT-2 Conv1D only). Keep it in model-surgery's format (surgery.save), or "
            "surgery.merge and save_pretrained for a plain checkpoint."
        )
    return _Part("IA3", {"ia3_l": site.adapter_tensors()["ia3_l"].detach()},
                 feedforward=site.variant.input_side(site.path))


def _export_delta(site: SiteAPI) -> _Part:
    """A variant with no PEFT peer: its fold minus the original weight, as an exact LoRA."""
    W0 = site.original_weight.double()
    W1, b1 = site.fold(torch.float64, at=1.0)  # float64: the delta's rank is not rounding; at 1: as trained
    if site.base_bias is not None and not torch.allclose(b1, site.base_bias.detach().double(), rtol=0, atol=1e-12):
        raise PeftFormatError(
            f"{site.variant.short()} at {site.path} changes the bias, which a PEFT LoRA cannot express. "
            "Keep it in model-surgery's format (surgery.save), or surgery.merge and save_pretrained."
        )
    delta = W1 - W0  # (d_out, d_in)
    k = _numerical_rank(delta, W0, site.base_dtype)
    if k * (site.d_in + site.d_out) >= site.d_in * site.d_out:
        raise PeftFormatError(
            f"{site.variant.short()} at {site.path} has no PEFT peer, and its weight delta has rank {k} of "
            f"{min(site.d_in, site.d_out)}: a LoRA of that rank would be no smaller than the dense "
            f"{site.d_out}x{site.d_in} delta. Keep it in model-surgery's format (surgery.save), or "
            "surgery.merge and save_pretrained."
        )
    A, B = _factor(delta, max(k, 1))  # rank 0 (identity): one zero direction, still a valid LoRA
    if k == 0:
        A, B = torch.zeros_like(A), torch.zeros_like(B)
    dtype = next(iter(site.adapter_tensors().values())).dtype
    return _Part("LORA", _lora_tensors(A, B, dtype), {"use_dora": False}, r=A.shape[0], alpha=None)


_EXPORT: dict[str, Callable[[SiteAPI], _Part]] = {
    "LoRA": _export_lora,  # PiSSA and EVA inherit it along the MRO
    "DoRA": _export_dora,
    "IA3": _export_ia3,
    "HRA": _plain("HRA"),
    "DeLoRA": _plain("DELORA", module_dropout=lambda v: v.dropout),
    "ROAD": _plain("ROAD", variant=lambda v: v.variant, group_size=lambda v: v.group_size),
}


def _exporter(site: SiteAPI) -> Callable[[SiteAPI], _Part]:
    for cls in type(site.variant).__mro__:
        if cls.__name__ in _EXPORT:
            return _EXPORT[cls.__name__]
    return _export_delta


def _selector(paths: list[str], others: list[str], sep: str = ".") -> list[str] | str:
    """PEFT's list form (an entry matches a name equal to it or ending in sep + entry), or an exact regex
    when the list would also catch one of ``others``."""
    chosen = set(paths)
    if not any(q not in chosen and any(q.endswith(sep + p) for p in paths) for q in others):
        return sorted(paths)
    return "^(" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def _pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    return {re.escape(p): v for p, v in sorted(values.items()) if v != default}


def _most_common(values: dict[str, Any]) -> Any:
    counts: dict[Any, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -list(values.values()).index(v)))


def export_peft(model: nn.Module, directory: str | os.PathLike, *, name: str | None = None) -> Path:
    """Write the model's adapters (or only adapter ``name``) in PEFT 0.21's format; returns the directory.

    As PEFT's ``save_pretrained`` lays them out: the adapter "default" (or the one asked for, or a model's
    only adapter) in ``directory``, any other in ``directory/<name>``. ``peft.PeftModel.from_pretrained(
    original_base, directory)`` then reproduces this model's default adapter, and ``load_adapter(
    directory/<name>, adapter_name=<name>)`` adds the others. All files are written atomically (temporary
    files + renames), tensors first.
    """
    scope = scope_of(model)
    sites = all_sites(scope)
    require_unsharded(scope, sites, "export")
    names = list(dict.fromkeys(n for s in sites.values() for n in s.names))
    if name is not None and name not in names:
        raise ConfigError(f"cannot export adapter {name!r}: this {scope.noun} has none of that name; its adapters are {names}.")
    chosen = [name] if name is not None else names
    directory = Path(directory)
    writes = {}
    for n in chosen:
        where = directory if len(chosen) == 1 or n == DEFAULT else directory / n
        views = {p: s.adapter(n) for p, s in sites.items() if n in s.names}
        require_finite(scope, views, "export")
        config, tensors = _peft_files(model, scope, views)
        _modules_to_save(scope, n, config, tensors)
        where.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config, indent=2, sort_keys=True)
        writes[where / WEIGHTS_NAME] = lambda tmp, tensors=tensors: save_file(tensors, tmp, metadata={"format": "pt"})
        writes[where / CONFIG_NAME] = lambda tmp, text=text: Path(tmp).write_text(text + "\n")
    warn_untracked(scope, "surgery.export_peft")
    atomic_write_all(writes)  # every file written before any replaces its old one: a failure leaves the old set
    return directory


def _modules_to_save(scope: Scope, name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Adapter ``name``'s unfrozen modules as PEFT's ``modules_to_save``: their names in the config, their state
    under ``base_model.model.<path>.<tensor>`` (what PEFT 0.21's save_pretrained writes: the trained copy,
    without its ``modules_to_save.<adapter>.`` level)."""
    held = [p for p, r in scope.get_unfrozen().items() if r.name == name]
    if not held:
        return
    for path in held:  # PEFT wraps every module whose name ends with an entry, with no dot boundary
        also = [q for q in scope.candidates() if q != path and q.endswith(path) and not q.startswith(path + ".")]
        if also:
            raise PeftFormatError(
                f"cannot export the unfrozen module {path} as PEFT's modules_to_save: PEFT picks the modules whose "
                f"name ends with {path!r}, which would also train {also[0]}. Keep the model in model-surgery's "
                "format (surgery.save), or surgery.merge and save_pretrained."
            )
    config["modules_to_save"] = held
    tensors.update({PREFIX + k: t for k, t in unfrozen_state(scope, name, "export").items()})


def _param_part(site: SiteAPI) -> _Part:
    """A parameter site as PEFT 0.21's ``target_parameters`` LoRA (``lora.ParamWrapper``): LoRA only, and for
    E experts lora_A (E * r, d_in) with expert e's rows at e * r, lora_B (d_out, r * E) with its columns at
    k * E + e (its Linear's weight viewed as (d_out, r, E))."""
    if _exporter(site) is not _export_lora:
        raise PeftFormatError(
            f"{site.variant.short()} at the parameter {site.path} has no PEFT form: PEFT 0.21 adapts parameters "
            "(target_parameters) with plain LoRA only. Keep it in model-surgery's format (surgery.save), or "
            "surgery.merge and save_pretrained."
        )
    part = _export_lora(site)
    E = site.record.experts
    if E:
        A, B = part.tensors["lora_A.weight"], part.tensors["lora_B.weight"]  # (E, r, d_in), (E, d_out, r)
        part.tensors = {"lora_A.weight": A.reshape(-1, A.shape[-1]).contiguous(),
                        "lora_B.weight": B.permute(1, 2, 0).reshape(B.shape[1], -1).contiguous()}
    return part


def _nested(sites: dict[str, SiteAPI]) -> dict[str, str]:
    """Where PEFT keeps each site's tensors: a layer's under its path; a parameter's under its owner, one
    ``base_layer.`` deeper for each parameter of that owner adapted after it (PEFT wraps them one inside the
    other, in the owner's order of parameters)."""
    out = {}
    for p, s in sites.items():
        if not s.record.param:
            out[p] = p
            continue
        owner, order = p.rpartition(".")[0], list(s.record.original._parameters)
        later = [q for q in sites if sites[q].record.param and q.rpartition(".")[0] == owner
                 and order.index(sites[q].record.param) > order.index(s.record.param)]
        out[p] = owner + ".base_layer" * len(later)
    return out


def _peft_files(model: nn.Module, scope: Scope, sites: dict[str, SiteAPI]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config and tensors for one adapter (``sites``: its view at each path)."""
    parts = {p: (_param_part if s.record.param else _exporter(s))(s) for p, s in sites.items()}
    types = {p: part.peft_type for p, part in parts.items()}
    if len(set(types.values())) > 1:
        by = {}
        for p, t in types.items():
            by.setdefault(t, p)
        raise PeftFormatError(
            "one PEFT adapter has one peft_type, but this model's sites need several: "
            + ", ".join(f"{t} ({sites[p].variant.short()} at {p})" for t, p in by.items())
            + ". Export models that use one method, or keep mixed ones in model-surgery's format (surgery.save)."
        )
    peft_type = next(iter(types.values()))
    config = dict(_COMMON, **_DEFAULTS[peft_type], peft_type=peft_type)
    shared: dict[str, tuple[Any, str]] = {}
    for p, part in parts.items():
        for k, v in part.shared.items():
            if k in shared and shared[k][0] != v:
                q = shared[k][1]
                raise PeftFormatError(
                    f"PEFT keeps {k} global for one adapter, but {sites[q].variant.short()} at {q} needs {k}={shared[k][0]!r} "
                    f"and {sites[p].variant.short()} at {p} needs {k}={v!r}. Use one value for every site, or keep "
                    "the model in model-surgery's format (surgery.save)."
                )
            shared.setdefault(k, (v, p))
    config.update({k: v for k, (v, _) in shared.items()})

    ranks = {p: part.r for p, part in parts.items() if part.r is not None}
    if ranks:
        config["r"] = _most_common(ranks)
        if peft_type == "HRA" and len(set(ranks.values())) > 1:
            raise PeftFormatError(
                f"PEFT's HRA has one r for every module (no rank_pattern), but the sites use r={sorted(set(ranks.values()))}. "
                "Use one HRA(r=...) for the whole model, or keep it in model-surgery's format (surgery.save)."
            )
        if "rank_pattern" in config:
            config["rank_pattern"] = _pattern(ranks, config["r"])
    if peft_type == "LORA":
        root = math.sqrt if config["use_rslora"] else (lambda r: r)
        alphas = {p: part.alpha if part.alpha is not None else float(root(part.r)) for p, part in parts.items()}
        config["lora_alpha"] = _most_common(alphas)
        config["alpha_pattern"] = _pattern(alphas, config["lora_alpha"])
    layers = [p for p in parts if not sites[p].record.param]
    params = [p for p in parts if sites[p].record.param]
    for p in params:
        owner = p.rpartition(".")[0]
        if not owner:
            raise PeftFormatError(
                f"cannot export the parameter site {p} to PEFT: it is a Parameter of the model itself, and PEFT 0.21 "
                "wraps the module that holds a target parameter, which the root cannot be. Keep it in model-surgery's "
                "format (surgery.save), or surgery.merge and save_pretrained."
            )
        if isinstance(scope.model.get_submodule(owner.rpartition(".")[0]), nn.MultiheadAttention):
            raise PeftFormatError(
                f"cannot export the parameter site {p} to PEFT: its nn.MultiheadAttention reads {p} without calling "
                f"{owner}, and PEFT 0.21 applies a target_parameters LoRA only while the owner's forward runs, so it "
                f"would load as a silent no-op. Keep it in model-surgery's format (surgery.save), or surgery.merge and "
                "save_pretrained."
            )
    config["target_modules"] = _selector(layers, list(scope.candidates()))
    if params:  # PEFT matches target_parameters by name or by a ".<entry>" suffix: full paths, never a regex
        chosen = _selector(params, list(scope.parameters()) + list(scope.sites()))
        if isinstance(chosen, str):
            raise PeftFormatError(
                f"cannot export the parameter sites {', '.join(params[:3])}: PEFT picks target_parameters by name "
                "suffix, which would also adapt another parameter of this model. Keep it in model-surgery's format "
                "(surgery.save)."
            )
        config["target_parameters"] = chosen
    if peft_type == "IA3":  # PEFT tests feedforward entries with a bare endswith, among the targets
        ff = [p for p, part in parts.items() if part.feedforward]
        config["feedforward_modules"] = _selector(ff, list(parts), sep="") if ff else []
    if "fan_in_fan_out" in config:  # PEFT forces it per layer anyway; say it when it is true everywhere
        # not for transposed experts (layout 'conv1d' too): PEFT's ParamWrapper refuses fan_in_fan_out
        config["fan_in_fan_out"] = not params and all(s.layout == "conv1d" for s in sites.values())
    config["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    if config["task_type"] is None:
        cls = scope.model_class()
        config["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}

    keys = _nested(sites)
    tensors = {f"{PREFIX}{keys[p]}.{k}": t.to("cpu").contiguous() for p, part in parts.items() for k, t in part.tensors.items()}
    return config, tensors


# ----------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------


_PATTERN_SECONDS = 0.5  # a rank_pattern key is a regex from a file: bound the time it may take


def _pattern_value(patterns: Any, path: str, default: Any, field: str) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with re.match((.*\\.)?(k)$, path).

    The keys come from a file, so a key that is not a regex, or one that backtracks for ever, is our error.
    """
    if not isinstance(patterns, dict):
        raise PeftFormatError(f"{CONFIG_NAME}: {field} must map module patterns to values, got {type(patterns).__name__}.")
    for k, v in patterns.items():
        try:
            hit = regex.match(rf"(.*\.)?({k})$", path, timeout=_PATTERN_SECONDS)
        except regex.error as e:
            raise PeftFormatError(f"{CONFIG_NAME}: {field} key {k[:80]!r} is not a valid regex ({e}).") from None
        except TimeoutError:
            raise PeftFormatError(
                f"{CONFIG_NAME}: {field} key {k[:80]!r} took over {_PATTERN_SECONDS} s to match {path!r} (a regex that "
                "backtracks); write the key as the module's escaped name, as PEFT's own save does."
            ) from None
        if hit:
            return v
    return default


def _variant_class(name: str, peft_type: str):
    if name not in REGISTRY:
        raise PeftFormatError(
            f"this PEFT adapter is {peft_type}, which needs model-surgery's {name} variant; this installation "
            f"has {sorted(REGISTRY)}. Upgrade model-surgery."
        )
    return REGISTRY[name]


def _import_lora(config, path, tensors, site_dims):
    embedding = "lora_embedding_A" in tensors or "lora_embedding_B" in tensors
    A = tensors.get("lora_embedding_A" if embedding else "lora_A.weight")
    if A is None:
        raise AdapterFileError(f"{path}: the adapter has lora_B but no lora_A for this module; the file is incomplete.")
    r = _pattern_value(config.get("rank_pattern") or {}, path, config["r"], "rank_pattern")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"], "alpha_pattern")
    cls = _variant_class("DoRA" if config.get("use_dora") else "LoRA", "LORA")
    v = cls(r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0), rslora=config.get("use_rslora", False))
    if A.shape[-2] != r:  # (r, d_in), or (E, r, d_in) for a stack of experts
        raise AdapterFileError(
            f"{path}: lora_A has {A.shape[0]} rows but the config gives r={r} for this module; the adapter "
            "directory is inconsistent (config and tensors from different runs?)."
        )
    names = ({"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"} if embedding else
             {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"})
    if config.get("use_dora"):
        names["lora_magnitude_vector"] = "lora_magnitude_vector"
    return v, names


def _import_ia3(config, path, tensors, site_dims):
    cls = _variant_class("IA3", "IA3")
    d_in, d_out = site_dims
    if tensors["ia3_l"].dim() > 2:  # a conv's (1, C, 1, ...) is the same shape on both sides: PEFT's rule decides
        input_side = _peft_feedforward(config.get("feedforward_modules"), path)
    else:
        input_side = tuple(tensors["ia3_l"].shape) == (1, d_in) and d_out != 1
    return cls(feedforward=(path,) if input_side else ()), {"ia3_l": "ia3_l"}


def _peft_feedforward(entries: Any, path: str) -> bool:
    """PEFT's IA3 test of a module path against feedforward_modules: a regex string matches the whole path,
    a list entry matches its end."""
    if isinstance(entries, str):
        try:
            return bool(regex.fullmatch(entries, path, timeout=_PATTERN_SECONDS))
        except (regex.error, TimeoutError):
            raise PeftFormatError(
                f"{CONFIG_NAME}: feedforward_modules {entries[:80]!r} is not a regex that matches {path!r} in "
                f"{_PATTERN_SECONDS} s; re-save the adapter with PEFT."
            ) from None
    if not (isinstance(entries, list) and all(isinstance(e, str) for e in entries)):
        raise PeftFormatError(f"{CONFIG_NAME}: feedforward_modules must be a regex or a list of module names, "
                              f"got {clip(repr(entries))}.")
    return any(path.endswith(e) for e in entries)


def _import_hra(config, path, tensors, site_dims):
    return _variant_class("HRA", "HRA")(r=config["r"]), {"hra_u": "hra_u"}


def _import_delora(config, path, tensors, site_dims):
    r = _pattern_value(config.get("rank_pattern") or {}, path, config["r"], "rank_pattern")
    cls = _variant_class("DeLoRA", "DELORA")
    v = cls(r=r, dropout=config.get("module_dropout", 0.0))
    return v, {n: n for n in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")}


def _import_road(config, path, tensors, site_dims):
    cls = _variant_class("ROAD", "ROAD")
    v = cls(variant=config.get("variant", "road_1"), group_size=config.get("group_size", 64))
    return v, {"road_theta": "road_theta", "road_alpha": "road_alpha"}


_IMPORT = {"LORA": _import_lora, "IA3": _import_ia3, "HRA": _import_hra, "DELORA": _import_delora,
           "ROAD": _import_road}
_KEYS = {  # the tensor names PEFT saves per module, by peft_type
    "LORA": ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
             "lora_B.bias"),
    "IA3": ("ia3_l",),
    "HRA": ("hra_u",),
    "DELORA": ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
    "ROAD": ("road_theta", "road_alpha"),
}


def read_peft_config(directory: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter directory, checked against what import_peft supports."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(
            f"no {CONFIG_NAME} in {str(directory)!r}: a PEFT adapter directory (from save_pretrained) has one. "
            "For a model-surgery .safetensors file use surgery.load(model, path)."
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterFileError(f"{cfg_path} is not valid JSON ({e}); re-save the adapter with PEFT.") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object of config fields; "
                               "re-save the adapter with PEFT.")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in _IMPORT:
        raise PeftFormatError(
            f"{cfg_path}: peft_type={peft_type!r} is not supported; import_peft reads {sorted(_IMPORT)}. "
            "Merge it with PEFT (merge_and_unload) and load the merged checkpoint instead."
        )
    defaults = _DEFAULTS[peft_type]
    mapped = {"LORA": {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
                       "target_parameters"},
              "IA3": {"feedforward_modules"}, "HRA": {"r"}, "DELORA": {"r", "module_dropout", "rank_pattern"},
              "ROAD": {"variant", "group_size"}}[peft_type]
    for k, v in config.items():
        if k in mapped or k in _IGNORED:
            continue
        if k == "modules_to_save":  # read by import_peft as unfrozen modules
            if v is not None and not (isinstance(v, list) and all(isinstance(e, str) and e for e in v)):
                raise PeftFormatError(f"{cfg_path}: modules_to_save must be a list of module names, got {clip(repr(v))}.")
            continue
        if k == "init_lora_weights":
            if any(v is ok or (isinstance(ok, str) and v == ok) for ok in _IGNORED_INIT_LORA):
                continue
            raise PeftFormatError(
                f"{cfg_path}: init_lora_weights={v!r} is not supported by import_peft: that init changes the base "
                f"weights on load (PiSSA, OLoRA, LoftQ, CorDA, ...), which model-surgery would have to redo exactly. "
                f"Supported: {list(_IGNORED_INIT_LORA)}. Convert it to a plain LoRA with PEFT "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...)), or merge it with PEFT."
            )
        if k == "eva_config" and config.get("init_lora_weights") == "eva":
            continue
        default = defaults.get(k, _COMMON.get(k, None))
        if v == default or (k not in defaults and k not in _COMMON and v in (None, False, {}, [], "none")):
            continue
        raise PeftFormatError(
            f"{cfg_path}: {k}={v!r} is not supported by import_peft (PEFT's default is {default!r}); dropping it "
            f"would change what the adapter computes. Re-create the adapter without {k}, or merge it with PEFT "
            "(merge_and_unload) and load the merged checkpoint."
        )
    return config


def _read_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter's tensors, from one read of the file (refusing pickles, truncation, bad headers)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{directory} holds adapter_model.bin (a pickle) and no {WEIGHTS_NAME}. model-surgery never "
                "unpickles files, since that can run arbitrary code. Re-save it with PEFT's save_pretrained "
                "(safe_serialization=True is the default), in a process you trust."
            )
        raise AdapterFileError(f"no {WEIGHTS_NAME} in {str(directory)!r}: the PEFT adapter directory is incomplete.")
    data = read_bytes(path)
    read_header(path, data)
    return path, decode(path, data)


def _unnest(scope: Scope, by_path: dict[str, dict[str, str]], targets: list[str], weights: Path) -> dict[str, dict[str, str]]:
    """Tensors PEFT keeps under a parameter's owner (``<owner>[.base_layer]*``, see ``_nested``) by the parameter's
    path: the owner's targeted parameters, in its order, from the innermost wrapper out."""
    if not targets:
        return by_path
    if not (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)):
        raise PeftFormatError(f"{CONFIG_NAME}: target_parameters must be a list of parameter names, got {clip(repr(targets))}.")
    params = {**scope.parameters(), **{p: s.weight for p, s in scope.sites().items() if s.record.param}}
    hit = [p for p in params if any(p == t or p.endswith("." + t) for t in targets)]
    out = {}
    for prefix, found in by_path.items():
        owner = prefix
        while owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
        mine = [p for p in hit if p.rpartition(".")[0] == owner]
        if not mine:
            out[prefix] = found
            continue
        order = list(scope.model.get_submodule(owner)._parameters)
        mine.sort(key=lambda p: order.index(p.rpartition(".")[2]))
        depth = (len(prefix) - len(owner)) // len(".base_layer")
        if depth >= len(mine):
            raise BaseMismatchError(
                f"{weights}: {clip(prefix)} is nested {depth} wrappers deep, but this {scope.noun} has only {len(mine)} "
                f"target_parameters on {clip(owner)}; the adapter was saved for another base."
            )
        out[mine[len(mine) - 1 - depth]] = found
    return out


def import_peft(model: nn.Module, directory: str | os.PathLike, *, name: str = DEFAULT) -> nn.Module:
    """Add the PEFT adapter saved in ``directory`` to ``model`` (a fresh base, or one whose sites have no
    adapter ``name``) as adapter ``name``; returns ``model``."""
    check_name(name)
    directory = Path(directory)
    config = read_peft_config(directory)
    peft_type = config["peft_type"]
    weights, tensors = _read_weights(directory)
    known = _KEYS[peft_type]
    scope = scope_of(model)
    # PEFT trains whole every module whose name ends with an entry (outermost ones; no dot boundary)
    entries = config.get("modules_to_save") or []
    whole = [q for q in scope.candidates() if any(q.endswith(e) for e in entries)]
    whole = [q for q in whole if not any(q.startswith(o + ".") for o in whole)]
    values: dict[str, torch.Tensor] = {}
    keys: dict[str, str] = {}
    by_path: dict[str, dict[str, str]] = {}
    for key in sorted(tensors):
        short = key.removeprefix(PREFIX)
        if key.startswith(PREFIX) and any(short.startswith(q + ".") for q in whole):
            values[short], keys[short] = tensors[key], key
            continue
        suffix = next((s for s in known if short.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise PeftFormatError(
                f"{weights}: tensor {clip(key)!r} is not a {peft_type} adapter tensor of the form "
                f"'{PREFIX}<module>.<{'|'.join(known)}>', nor the state of a module its modules_to_save names "
                "(trainable tokens are not supported). Re-create the adapter without them, or merge it with PEFT."
            )
        if suffix == "lora_B.bias":
            raise PeftFormatError(f"{weights}: {clip(key)} is a LoRA bias (lora_bias=true), which import_peft does not support.")
        by_path.setdefault(short[: -len(suffix) - 1], {})[suffix] = key
    if not by_path:
        raise AdapterFileError(f"{weights} holds no adapter tensors.")
    by_path = _unnest(scope, by_path, config.get("target_parameters") or [], weights)

    check_targets(scope, dict.fromkeys(by_path), str(directory), dict.fromkeys(by_path, [name]))
    empty = [q for q in whole if not any(k.startswith(q + ".") for k in values)]
    if empty:  # an entry naming no module at all is PEFT's task default ("classifier" on a model with "score")
        raise PeftFormatError(
            f"{directory / CONFIG_NAME}: modules_to_save names {empty[0]}, but {weights} holds no state for it, so "
            "its trained values are not there. Re-save the adapter with PEFT, or drop that entry from the config."
        )
    unfrozen = dict.fromkeys(whole, name)
    trainable.check(scope, unfrozen, f"surgery.import_peft({directory})", dict.fromkeys(by_path, [name]))
    trainable.check_values(scope, unfrozen, values, str(weights), keys)
    plan, names = {}, {}
    for path, found in by_path.items():
        base = scope.base(path)
        if ("lora_embedding_A" in found or "lora_embedding_B" in found) != (base.layout == "embedding"):
            raise BaseMismatchError(
                f"{weights} holds {'an embedding' if base.layout != 'embedding' else 'a linear or conv'} LoRA for "
                f"{clip(path)}, which in this {scope.noun} is a {scope.class_name(path)}; the adapter was saved for "
                "another base. Load it onto the base it was trained on."
            )
        if base.layout == "conv":  # PEFT's conv kernels (r, in, *kernel) and (out, r, 1, ..): ours are flattened
            for suffix in ("lora_A.weight", "lora_B.weight"):
                if suffix in found and tensors[found[suffix]].dim() > 2:
                    tensors[found[suffix]] = tensors[found[suffix]].flatten(1)
        if base.experts:  # PEFT's (E * r, d_in) and (d_out, r * E): ours are (E, r, d_in) and (E, d_out, r)
            E = base.experts
            for suffix, shape in (("lora_A.weight", lambda t: t.reshape(E, -1, t.shape[-1])),
                                  ("lora_B.weight", lambda t: t.reshape(t.shape[0], -1, E).permute(2, 0, 1))):
                if suffix in found and tensors[found[suffix]].dim() == 2:
                    t = tensors[found[suffix]]
                    if t.shape[0 if suffix == "lora_A.weight" else 1] % E:
                        raise BaseMismatchError(
                            f"{weights}: {found[suffix]} has shape {tuple(t.shape)}, which does not split into the "
                            f"{E} experts of {clip(path)}; the adapter was saved for another base."
                        )
                    tensors[found[suffix]] = shape(t)
        saved = {suffix: tensors[key] for suffix, key in found.items()}
        try:  # the variant checks each value's type and range; say which file it came from
            plan[path], names[path] = _IMPORT[peft_type](config, path, saved, dims(base.weight, base.layout))
        except ConfigError as e:
            raise PeftFormatError(f"{directory / CONFIG_NAME}: {e}") from None
        missing = [n for n, s in names[path].items() if s not in found]
        if missing:
            raise AdapterFileError(f"{weights} lacks {path}.{names[path][missing[0]]}, which {plan[path].short()} needs.")
        unused = sorted(set(found) - set(names[path].values()))
        if unused:  # e.g. DoRA magnitudes with use_dora false: importing without them would be another adapter
            raise PeftFormatError(
                f"{weights} has {path}.{unused[0]}, which {plan[path].short()} (from {CONFIG_NAME}) does not use; "
                "the config and the tensors disagree (use_dora?). Fix the config or re-save the adapter with PEFT."
            )

    check_ranks(plan, {p: [tuple(tensors[k].shape) for k in found.values()] for p, found in by_path.items()},
                str(directory))

    def fill(path: str, site: SiteAPI) -> None:
        for ours, t in site.adapter_tensors().items():
            key = by_path[path].get(names[path].get(ours, ""))
            if key is None:
                raise AdapterFileError(f"{weights} has no tensor for {path}.{ours} ({site.variant.short()}).")
            fill_value(str(weights), key, tensors[key], t, site, squeeze=True)

    install(scope, {p: {name: v} for p, v in plan.items()}, loading=True, fill=fill)
    trainable.hold(scope, unfrozen, values)
    return model
