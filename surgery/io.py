"""save / load: adapter tensors only, in safetensors, with the variant configs in the metadata.

File layout: tensors keyed ``<module path>.<tensor name>`` (``model.layers.0.self_attn.k_proj.lora_A``);
metadata ``format = "model-surgery"``, ``version``, ``sites`` (JSON: path -> variant name, config and
the base layer's shape) and ``fingerprint`` (a hash of the base model's parameter names and
shapes); modules unfrozen with ``surgery.unfreeze`` add ``unfrozen`` (JSON: module path -> its adapter
name and class) and their state under ``<module path>.<tensor name>`` (``score.weight``). Nothing is ever unpickled: the header is parsed as JSON before safetensors reads a byte
of tensor data, and anything that is not safetensors is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
import secrets
import socket
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import nn

from . import quant, trainable
from .errors import AdapterFileError, BaseMismatchError, ConfigError, MetaDeviceError, OutputPathError, clip
from .hf import adapter_in
from .ops import (all_sites, check_name, check_ranks, check_targets, fill_value, install, require_finite,
                  unfrozen_state, warn_untracked)
from .scope import Scope, scope_of
from .site import SiteAPI, gathered, is_sharded
from .splice import DEFAULT, slot_prefix
from .variant import Variant, variant_from_config

FORMAT = "model-surgery"
VERSION = 3  # 2: several named adapters (entries keyed by tensor prefix, with path and adapter); 3: unfrozen modules
# (a file without them is still written as 2, which every reader of 2 loads whole)
_MAX_HEADER = 100 * 1024 * 1024


def fingerprint(scope: Scope) -> str:
    """Hash of the base model's state_dict names and shapes (adapter tensors excluded), as the base has them.

    Read from the modules' parameters and persistent buffers, not from ``state_dict()``: bitsandbytes' 4-bit
    layers unpack a repacked weight in place, lossily, when asked for their state."""
    adapter = {f"{p}.{n}" for p, s in scope.sites().items() for n in s.adapter_tensors()}
    bare = quant.bare_keys(scope.model)
    h = hashlib.sha256()
    for k, shape in sorted((bare(k), shape) for k, shape in _state_shapes(scope.model).items() if k not in adapter):
        h.update(f"{k}:{shape};".encode())
    return h.hexdigest()[:16]


def _state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of what ``model.state_dict()`` would hold, by key, without asking any module for its state."""
    out = {}
    for path, m in model.named_modules(remove_duplicate=False):
        pre = f"{path}." if path else ""
        for n, t in m._parameters.items():
            if t is not None:
                out[pre + n] = tuple(t.shape)
        for n, t in m._buffers.items():
            if t is not None and n not in m._non_persistent_buffers_set:
                out[pre + n] = tuple(t.shape)
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    atomic_write_all({path: write})


def atomic_write_all(writes: dict[str | os.PathLike, Callable[[str], Any]]) -> None:
    """Write each file to a temporary file beside it, then rename them all over their targets.

    A failure while writing any of them leaves every target as it was, so files that belong together
    (PEFT's config and tensors) are never left half old, half new by an error.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in writes.items():
            path = Path(path)
            if _is(path, Path.is_symlink):  # write the file the link points to, and keep the link
                path = path.resolve()
            if _is(path, Path.is_file) and not path.stat().st_mode & 0o222:
                raise OutputPathError(
                    f"cannot write {path}: the file is read-only (mode {oct(path.stat().st_mode & 0o777)}), which "
                    "usually means it is meant to be kept. Remove it or make it writable (chmod u+w) first."
                )
            if _is(path, Path.is_dir):
                raise OutputPathError(f"cannot write {path}: it is a directory. Name a file, e.g. {path / 'adapter.safetensors'}.")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _sweep(path.parent)
                # short, so that a target whose name is near the file system's limit still gets a temporary
                tmp = str(path.parent / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.tmp")
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except OSError as e:
                raise OutputPathError(
                    f"cannot write {path}: {e.strerror or e} (at {e.filename or path.parent}). Check that the folder "
                    "exists or can be made, is a folder, and is writable."
                ) from None
            staged.append((tmp, path))
            # writers such as safetensors' save_file leave 0o600 files: keep the old file's mode, else the umask's
            mode = (path if _is(path, Path.is_file) else Path(tmp)).stat().st_mode & 0o777
            write(tmp)
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:  # on disk before the rename, so a crash leaves old or new, never half
                os.fsync(f.fileno())
        for tmp, path in staged:
            try:
                os.replace(tmp, path)
            except OSError as e:  # e.g. a name longer than the file system allows
                raise OutputPathError(f"cannot write {path}: {e.strerror or e}. Choose a shorter or other name.") from None
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


# a temporary file is named for the host and process writing it, so that the next save into the same
# folder can remove those whose writer was killed (never one another host or a live process is writing)
_TMP_PREFIX = f".surgery-{hashlib.sha256(socket.gethostname().encode()).hexdigest()[:4]}-"


def _sweep(folder: Path) -> None:
    """Remove the temporary files that killed saves on this host left in ``folder``."""
    try:
        leftovers = [p for p in folder.iterdir() if p.name.startswith(_TMP_PREFIX) and p.name.endswith(".tmp")]
    except OSError:
        return
    for p in leftovers:
        pid = p.name[len(_TMP_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                p.unlink()
            except OSError:
                pass  # another save swept it first, or the folder is not ours to clean


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no process has): leave its file alone
    return True


def _is(path: Path, test: Callable[[Path], bool]) -> bool:
    try:
        return test(path)
    except OSError:  # a name too long for the file system: the write below says so, with our error
        return False


_SAMPLE = 64  # values of each adapted base weight kept in the file to recognise the base it was made on


def weight_sample(w: torch.Tensor | nn.Module) -> list[float] | None:
    """``_SAMPLE`` values of a weight (nn.Linear layout) at fixed evenly spaced positions, as floats; a
    quantised layer gives its dequantised weight's values there.

    Cheap whatever the size (a hash of a 7B model's weights would take tens of seconds), and enough to
    tell another base, or this base with an adapter already merged into it, from the one saved on.
    """
    layer = isinstance(w, nn.Module)
    if (w.weight if layer else w).device.type == "meta":
        return None
    shape = (w.out_features, w.in_features) if layer else w.shape
    n = math.prod(shape)
    idx = torch.linspace(0, n - 1, min(_SAMPLE, n)).round().long()
    if layer:
        return quant.dequantized_at(w, idx.to(w.weight.device)).cpu().tolist()
    # indexed where it lies: a transposed view (Conv1D) reshaped to one row would be copied whole
    idx = idx.to(w.device)
    at = (idx // shape[1], idx % shape[1]) if len(shape) == 2 else torch.unravel_index(idx, shape)
    return w.detach()[at].float().cpu().tolist()


def encode_sample(values: list[float] | None) -> str | None:
    """A weight sample as the file stores it: base64 of little-endian float32 (344 characters for 64 values,
    where JSON's decimal floats took about 1,400: most of a small adapter file's metadata)."""
    return None if values is None else base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def decode_sample(saved: Any, path, site: str) -> list[float] | None:
    """The sample of a file's entry: a list of floats (format 1), base64 float32 (format 2), or None."""
    if saved is None:
        return None
    if isinstance(saved, list) and all(type(v) in (int, float) for v in saved) and len(saved) <= _SAMPLE:
        return [float(v) for v in saved]
    if isinstance(saved, str) and len(saved) <= 4 * _SAMPLE * 2:
        try:
            raw = base64.b64decode(saved, validate=True)
        except ValueError:
            raw = b"?"
        if len(raw) % 4 == 0:
            return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    raise AdapterFileError(
        f"{path}: the base-weight sample of {clip(site)} is malformed (expected up to {_SAMPLE} float32 values); the "
        "file is corrupt. Re-save the adapter with surgery.save."
    )


def _same_sample(saved: list[float], now: list[float], saved_dtype: str, now_dtype: torch.dtype) -> bool:
    """Equal values, compared in the coarser of the two dtypes (a float32 file on a bfloat16 base)."""
    if len(saved) != len(now):
        return False
    coarse = [d for d in (getattr(torch, saved_dtype, None), now_dtype)
              if isinstance(d, torch.dtype) and d.is_floating_point and torch.finfo(d).bits < 32]
    if not coarse:  # both float32 values as Python floats: equal lists, without building tensors per site
        return saved == now
    dt = max(coarse, key=lambda d: torch.finfo(d).eps)
    a, b = torch.tensor(saved, dtype=torch.float32).to(dt), torch.tensor(now, dtype=torch.float32).to(dt)
    return torch.equal(a, b)


def check_base_sample(scope: Scope, entries: dict[str, dict[str, Any]], plan: dict[str, Variant], path) -> None:
    """Each adapted weight must be the one the file was saved on: an error for variants whose tensors were
    computed from it (``Variant.base_bound``), a warning for the rest. ``entries`` and ``plan`` by module path."""
    for p, info in entries.items():
        saved = decode_sample(info.get("base", {}).get("sample"), path, p)
        base = scope.base(p)
        now = weight_sample(base.module if base.quant else base.dense())
        stored = torch.float32 if base.quant else base.weight.dtype  # a quantised weight is sampled dequantised
        if saved is None or now is None or _same_sample(saved, now, info["base"].get("dtype", ""), stored):
            continue
        saved_class = info["base"].get("class", "")
        if saved_class != base.base_class and (base.quant or saved_class in quant.CLASSES):
            what = (f"{path} was saved on a {saved_class} at {p} and this base has a {base.base_class} there: the "
                    "weights differ by the quantisation (moving an adapter between a quantised base and its float "
                    "model)")
        else:
            what = (f"{path} was saved on another base: the weight of {p} differs from the one {plan[p].short()} "
                    "was made on (another checkpoint, or this adapter already merged into it?)")
        if plan[p].base_bound:
            raise BaseMismatchError(
                f"{what}. {plan[p].name}'s tensors were computed from that weight, so the result would be wrong. "
                "Load it onto the base it was trained on, or pass check_base=False if you know better."
            )
        warnings.warn(f"{what}; {plan[p].name} only adds to the base, so loading goes on.", stacklevel=3)


def entry_prefix(path: str, name: str) -> str:
    """Where an adapter's tensors sit in a file: under their state_dict names (``<path>.lora_A``, or
    ``<path>.adapters.<name>.lora_A`` for an adapter not named "default")."""
    return path + ("." + slot_prefix(name)[:-1] if name != DEFAULT else "")


def file_entries(sites: dict[str, SiteAPI], name: str | None = None) -> dict[str, SiteAPI]:
    """Each adapter (or only adapter ``name``) of ``sites`` by the prefix of its tensors in a file."""
    return {entry_prefix(p, n): s.adapter(n) for p, s in sites.items() for n in s.names if name in (None, n)}


def save(model: nn.Module, path: str | os.PathLike, *, name: str | None = None) -> None:
    """Write the adapters (or only adapter ``name``): tensors, configs and base fingerprint, to a safetensors
    file, atomically. Each adapter is written as trained (strength 1), with whether it was active."""
    scope = scope_of(model)
    sites = all_sites(scope)
    views = file_entries(sites, name)
    if not views:
        raise ConfigError(
            f"cannot save adapter {name!r}: this {scope.noun} has no adapter of that name; its adapters are "
            f"{sorted({n for s in sites.values() for n in s.names})}. Pass one of those, or name=None for all."
        )
    # a model sharded by FSDP2: every rank calls save and gathers each tensor (a collective); rank 0 writes
    sharded = any(is_sharded(s.base_weight) for s in sites.values())
    whole = {k: {n: gathered(t) for n, t in v.adapter_tensors().items()} for k, v in views.items()}
    require_finite(scope, views, "save", whole)
    tensors, meta = {}, {}
    samples: dict[str, Any] = {}
    for k, v in views.items():
        for tname, t in whole[k].items():
            if t.device.type == "meta":
                raise MetaDeviceError(
                    f"cannot save {k}.{tname}: it is on the meta device (shapes only, no values). Move the model "
                    "to a real device with real weights (model.to_empty(device='cpu'), then load a checkpoint) "
                    "and rewrite it there."
                )
            tensors[f"{k}.{tname}"] = t.detach().to("cpu").contiguous()
        if v.path not in samples:
            w = v.base_module if v.record.quant and not v.replaced_base else gathered(v.original_weight)
            samples[v.path] = encode_sample(weight_sample(w))
        meta[k] = {
            "variant": v.variant.name,
            "config": v.variant.to_config(),
            "base": {"class": v.base_class, "layout": v.layout, "d_in": v.d_in, "d_out": v.d_out,
                     "dtype": str(v.base_dtype).removeprefix("torch."), "sample": samples[v.path]},
            **({} if v.name == DEFAULT else {"path": v.path, "adapter": v.name}),
            **({} if v.name in v.site.active else {"active": False}),
        }
    held = {p: r for p, r in scope.get_unfrozen().items() if name in (None, r.name)}
    tensors.update(unfrozen_state(scope, name, "save"))
    warn_untracked(scope, "surgery.save")
    metadata = {"format": FORMAT, "version": str(VERSION if held else 2), "sites": json.dumps(meta),
                "fingerprint": fingerprint(scope)}
    if held:
        metadata["unfrozen"] = json.dumps({p: {"adapter": r.name, "class": scope.class_name(p)}
                                           for p, r in held.items()})
    if not sharded or torch.distributed.get_rank() == 0:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if sharded:
        torch.distributed.barrier()  # no rank goes on (to load the file, say) before it is there


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file, read once: a load that reads a path several times can mix two versions of it."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter file at {str(path)!r}: check the path (surgery.save writes one).")
    return path.read_bytes()


def read_header(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """Parse and validate a safetensors header without touching tensor data: from the file (reading
    only its header) or from the file's bytes, already read."""
    path = Path(path)
    if data is None and not path.is_file():
        raise AdapterFileError(f"no adapter file at {str(path)!r}: check the path (surgery.save writes one).")
    size = path.stat().st_size if data is None else len(data)
    with open(path, "rb") if data is None else BytesIO(data) as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path} is {size} bytes long: too short to be a safetensors file (truncated?).")
        (n,) = struct.unpack("<Q", head)
        valid = 0 < n <= min(_MAX_HEADER, size - 8)
        # sniff for pickles only when the length is impossible: a real header of 128 + 256 k bytes
        # also starts with 0x80
        if not valid and (head[:1] == b"\x80" or head[:2] == b"PK"):
            raise AdapterFileError(
                f"{path} looks like a pickle or a torch.save archive, not safetensors. model-surgery never "
                "unpickles files (that can run arbitrary code); re-save the adapter with surgery.save."
            )
        if not valid:
            raise AdapterFileError(
                f"{path} is not a valid safetensors file: its header claims {n} bytes but the file has {size} "
                "(truncated or not safetensors). Re-save the adapter with surgery.save."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise AdapterFileError(f"{path}: the safetensors header is not valid JSON ({e}); the file is corrupt.") from None
    if not isinstance(header, dict) or not all(
        k == "__metadata__" or (isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
                                and len(v["data_offsets"]) == 2 and all(type(o) is int for o in v["data_offsets"])
                                and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
                                and all(type(d) is int and d >= 0 for d in v["shape"]))
        for k, v in header.items()
    ):
        raise AdapterFileError(
            f"{path}: the safetensors header is not a map of tensor name -> {{dtype, shape, data_offsets}}; "
            "the file is corrupt or not safetensors. Re-save the adapter with surgery.save."
        )
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise AdapterFileError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes but the file has {size}. Re-save the adapter."
        )
    return header


def read_metadata(path: str | os.PathLike, data: bytes | None = None,
                  header: dict[str, Any] | None = None) -> dict[str, Any]:
    """Our metadata from an adapter file (or its bytes, or its header already parsed): format, version,
    sites (parsed), fingerprint."""
    meta = (read_header(path, data) if header is None else header).get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "sites" not in meta:
        raise AdapterFileError(
            f"{path} is a safetensors file but not a model-surgery adapter (no '{FORMAT}' metadata). "
            "For a PEFT adapter directory use surgery.import_peft(model, directory)."
        )
    try:
        version = int(meta.get("version", "0"))
        sites = json.loads(meta["sites"])
    except (TypeError, ValueError, RecursionError) as e:
        raise AdapterFileError(f"{path}: unreadable model-surgery metadata ({e}).") from None
    if not isinstance(sites, dict) or not sites:
        raise AdapterFileError(
            f"{path}: its model-surgery metadata lists no sites (got {str(sites)[:60]!r}); an adapter file maps "
            "module paths to variants. Re-save the adapter with surgery.save."
        )
    for p, info in sites.items():
        problem = _site_entry_problem(info)
        if problem:
            raise AdapterFileError(
                f"{path}: malformed model-surgery metadata for site {clip(p)!r}: {problem}. Each site needs "
                "{'variant': name, 'config': {...}, 'base': {'d_in': int, 'd_out': int, ...}}; re-save the "
                "adapter with surgery.save."
            )
    unfrozen: Any = {}
    if "unfrozen" in meta:
        try:
            unfrozen = json.loads(meta["unfrozen"])
        except (TypeError, ValueError, RecursionError) as e:
            raise AdapterFileError(f"{path}: unreadable model-surgery metadata 'unfrozen' ({e}).") from None
        if not isinstance(unfrozen, dict) or not all(
                isinstance(p, str) and isinstance(v, dict) and isinstance(v.get("adapter"), str)
                for p, v in unfrozen.items()):
            raise AdapterFileError(
                f"{path}: malformed model-surgery metadata 'unfrozen' (got {clip(str(unfrozen))!r}); it maps module "
                "paths to {'adapter': name, ...}. Re-save the adapter with surgery.save."
            )
    if version > VERSION:
        warnings.warn(
            f"{path} was written by a newer model-surgery (format version {version}, this one reads {VERSION}); "
            "unknown fields are ignored.",
            stacklevel=3,
        )
    return {"version": version, "sites": sites, "fingerprint": meta.get("fingerprint"),
            "unfrozen": {p: v["adapter"] for p, v in unfrozen.items()}}


def _site_entry_problem(info: Any) -> str | None:
    if not isinstance(info, dict):
        return f"expected a dict, got {type(info).__name__}"
    if not isinstance(info.get("variant"), str):
        return f"'variant' must be a class name, got {info.get('variant')!r}"
    config, base = info.get("config", {}), info.get("base", {})
    if not isinstance(config, dict) or not isinstance(base, dict):
        return "'config' and 'base' must be dicts"
    if not isinstance(info.get("path", ""), str) or not isinstance(info.get("adapter", ""), str):
        return "'path' and 'adapter' must be strings"
    dtype = config.get("dtype")
    if dtype is not None and not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
        return f"config dtype {dtype!r} is not a torch dtype name such as 'float32'"
    return None


def load(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True, name: str | None = None) -> nn.Module:
    """Add the adapters recorded in ``path`` to ``model`` (a fresh base, or one whose sites lack those names)
    and fill in the saved tensors; returns ``model``. Adapters keep their saved names and active state;
    ``name`` renames the adapter of a single-adapter file, or picks one adapter of a file holding several.

    Every target is checked against the model first; each site is then built and filled from the file
    before any of them goes in, so a bad file leaves the model as it was. ``check_base``: compare a
    sample of each adapted weight with the one saved in the file, and refuse another base for variants
    computed from it (PiSSA, DoRA, DeLoRA, EVA, AntiPaSTO; a warning for the others).
    """
    path = adapter_in(path)
    data = read_bytes(path)
    header = read_header(path, data)
    meta = read_metadata(path, header=header)
    entries = {k: (info.get("path", k), info.get("adapter", DEFAULT), info) for k, info in meta["sites"].items()}
    for k, (p, n, _) in entries.items():
        if entry_prefix(p, n) != k:  # the key is where the tensors are: it must say the same as path and adapter
            raise AdapterFileError(
                f"{path}: the entry {clip(k)!r} gives path {clip(p)!r} and adapter {clip(n)!r}, whose tensors would be "
                f"under {clip(entry_prefix(p, n))!r}; the file is corrupt. Re-save the adapter with surgery.save."
            )
    saved_names = list(dict.fromkeys(n for _, n, _ in entries.values()))
    unfrozen = meta["unfrozen"]
    stray = next((p for p, n in unfrozen.items() if n not in saved_names), None)
    if stray is not None:
        raise AdapterFileError(
            f"{path}: the unfrozen module {clip(stray)} belongs to adapter {clip(repr(unfrozen[stray]))}, which the file "
            f"does not hold (it holds {saved_names}); the file is corrupt. Re-save the adapter with surgery.save."
        )
    rename = {n: n for n in saved_names}
    if name is not None:
        check_name(name)
        if len(saved_names) == 1:
            rename = {saved_names[0]: name}
        elif name in saved_names:
            entries = {k: e for k, e in entries.items() if e[1] == name}
            unfrozen = {p: n for p, n in unfrozen.items() if n == name}
        else:
            raise AdapterFileError(
                f"{path} holds the adapters {saved_names}, none named {name!r}. Pass one of those, or name=None "
                "to load them all."
            )
    for n in rename.values():
        try:
            check_name(n)
        except ConfigError:
            raise AdapterFileError(f"{path}: adapter name {clip(repr(n))} is not a valid name; the file is corrupt.") from None
    plan: dict[str, dict[str, Variant]] = {}
    prefix: dict[tuple[str, str], str] = {}
    by_prefix: dict[str, Variant] = {}
    for k, (p, n, info) in entries.items():
        v = variant_from_config(info["variant"], info.get("config", {}))
        if n in plan.get(p, {}):
            raise AdapterFileError(f"{path} lists adapter {n!r} at {clip(p)} twice; the file is corrupt.")
        plan.setdefault(p, {})[rename[n]] = v
        prefix[(p, rename[n])] = k
        by_prefix[k] = v
    scope = scope_of(model)
    targets, bases = {}, {}
    for k, (p, n, info) in entries.items():
        base = info.get("base", {})
        want = (base.get("d_in"), base.get("d_out"))
        targets[p] = want if None not in want else None
        bases.setdefault(p, (info, by_prefix[k]))
    check_targets(scope, targets, str(path), {p: list(named) for p, named in plan.items()})
    for p, (info, _) in bases.items():
        saved, now = info.get("base", {}).get("layout"), scope.base(p).layout
        if saved is not None and saved != now:  # same shape, other axes: the tensors would act on the wrong sides
            raise BaseMismatchError(
                f"{path} was saved on {clip(p)} stored in layout {saved!r}, but in this {scope.noun} it is stored in "
                f"layout {now!r} (experts whose module says is_transposed are stored (E, d_in, d_out): 'conv1d'), so "
                "its adapter tensors would act on the other sides of the map. Load it onto the base it was saved on "
                "(a file saved on transposed experts by a model-surgery that did not read is_transposed holds an "
                "adapter of the transposed map: merge it with that version, or train it again)."
            )
    shapes: dict[str, list[tuple]] = {}
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v.get("shape"), list):
            shapes.setdefault(k.rpartition(".")[0], []).append(tuple(v["shape"]))
    check_ranks(by_prefix, shapes, str(path))
    if check_base:
        bound = {p: next((v for v in plan[p].values() if v.base_bound), next(iter(plan[p].values()))) for p in plan}
        check_base_sample(scope, {p: info for p, (info, _) in bases.items()}, bound, path)
    if meta["fingerprint"] and meta["fingerprint"] != fingerprint(scope):
        warnings.warn(
            f"{path}: the base model differs from the one the adapter was saved on (other parameters or "
            "shapes outside the adapted layers); the adapted layers match, so loading goes on.",
            stacklevel=2,
        )
    tensors = decode(path, data)
    unfrozen = {p: rename[n] for p, n in unfrozen.items()}
    cands = scope.candidates()
    for p in unfrozen:
        if p not in cands:
            raise BaseMismatchError(
                f"{path} was saved for another base: it holds the unfrozen module {clip(p)}, which this {scope.noun} "
                "does not have. Load it onto the base it was trained on."
            )
    trainable.check(scope, unfrozen, f"surgery.load({path})", {p: list(named) for p, named in plan.items()})
    trainable.check_values(scope, unfrozen, tensors, str(path))

    def fill(p: str, view: SiteAPI) -> None:
        for tname, t in view.adapter_tensors().items():
            key = f"{prefix[(p, view.name)]}.{tname}"
            if key not in tensors:
                raise AdapterFileError(f"{path} lacks tensor {key!r} that {view.variant.short()} needs; the file is incomplete.")
            fill_value(str(path), key, tensors[key], t, view)

    inactive = frozenset((p, rename[n]) for p, n, info in entries.values() if info.get("active") is False)
    install(scope, plan, loading=True, fill=fill, inactive=inactive)
    trainable.hold(scope, unfrozen, tensors)
    return model


def decode(path: str | os.PathLike, data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file already read (and its header checked), with safetensors' own checks."""
    try:
        return safetensors_load(data)
    except Exception as e:  # noqa: BLE001 - whatever safetensors finds wrong, the file is not usable
        raise AdapterFileError(f"{path}: safetensors cannot read this file ({e}); re-save the adapter.") from None
