"""Quantised linear layers: the ones a site wraps without tracing ("opaque" bases), and the ones it refuses.

A bitsandbytes ``Linear4bit`` (nf4, fp4) or ``Linear8bitLt`` is a linear map whose weight is stored in a
packed integer format. A site calls it as a submodule (``base_layer``, as PEFT names it) and never traces it;
a variant that needs W gets ``dequantized(layer)``, computed when asked (at init, at fold, or inside a DoRA
forward) and never kept. ``merge`` writes W' back through ``requantized`` (the same format and settings), or
as a plain ``nn.Linear`` when asked to dequantise.

Other quantisers (torchao's tensor subclasses, optimum-quanto, HQQ) are refused up front by ``foreign``: their
layers look like ``nn.Linear`` to a type check, but a site could neither read nor write their weights exactly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import UnsupportedModuleError

BASE = "base_layer"  # where a site keeps its opaque base, so its keys read <path>.base_layer.weight as in PEFT
CLASSES = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")  # the bitsandbytes layers ``kind`` knows, by name


def bare_keys(model: nn.Module) -> Callable[[str], str]:
    """A state_dict key of ``model`` as the base had it: an opaque base's ``<path>.base_layer.weight`` is the
    ``<path>.weight`` of the layer it was before it became a site's base."""
    moved = tuple(f"{p}.{BASE}." for p, m in model.named_modules() if getattr(getattr(m, "record", None), "quant", None))
    return lambda k: k.replace(f".{BASE}.", ".", 1) if moved and k.startswith(moved) else k


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:  # not installed: then no model holds its layers either
        return None
    return bnb


def kind(module: nn.Module) -> str | None:
    """'nf4' / 'fp4' for a bitsandbytes Linear4bit, 'int8' for a Linear8bitLt; None for anything else."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        return getattr(module.weight, "quant_type", None) or "nf4"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def logical_shape(w: torch.Tensor) -> tuple[int, int] | None:
    """(d_out, d_in) of a packed 4-bit weight, whose stored shape is (n, 1); None for any other tensor."""
    qs = getattr(w, "quant_state", None)
    return None if qs is None else tuple(qs.shape)


def numel(p: torch.Tensor) -> int:
    """How many weights a tensor holds: a packed 4-bit weight holds two per byte of its storage."""
    shape = logical_shape(p)
    return p.numel() if shape is None else shape[0] * shape[1]


def foreign(module: nn.Module) -> str | None:
    """A description of a quantised layer no site can wrap (not bitsandbytes 4/8-bit), else None."""
    if kind(module) is not None:
        return None
    origin = type(module).__module__.split(".")[0]
    if origin in ("optimum", "hqq", "torchao", "bitsandbytes", "auto_gptq", "gptqmodel", "awq", "compressed_tensors"):
        return f"a {type(module).__name__} from {origin}"
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor):
        data = w.data if isinstance(w, nn.Parameter) else w
        if type(data) is not torch.Tensor and type(data).__name__ != "DTensor":
            return f"a {type(module).__name__} layer whose weight is a {type(data).__name__} (a quantised tensor subclass)"
    return None


def refuse_foreign(path: str, module: nn.Module) -> None:
    what = foreign(module)
    if what is not None:
        raise UnsupportedModuleError(
            f"cannot adapt {path}: it is {what}. A site must read the base weight exactly (for init and identity) "
            "and write the merged one back in the same format, which model-surgery does for bitsandbytes 4-bit "
            "(nf4, fp4) and 8-bit layers only; any other quantised layer could train but would merge silently "
            "re-quantised or not at all. Load the base with BitsAndBytesConfig (load_in_4bit or load_in_8bit), or "
            f"dequantise {path} to a float nn.Linear first."
        )


def repacked(module: nn.Module) -> bool:
    """True for a 4-bit layer whose weight bitsandbytes repacked into its CPU bf16 layout (an eval-mode forward
    on a CPU with AVX512-BF16 does that): its statistics were rounded to bf16, and reading it back is lossy."""
    qs = getattr(module.weight, "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


def refuse_repacked(path: str, module: nn.Module) -> None:
    if repacked(module):
        raise UnsupportedModuleError(
            f"cannot adapt {path}: this Linear4bit was repacked by bitsandbytes for its CPU bf16 kernel (an eval-mode "
            "forward without gradients on a CPU with AVX512-BF16 does that), which rounded its block statistics to "
            "bf16: its weight can no longer be read back as it was quantised, so neither an identity check nor a "
            "merge would be exact (PEFT's merge of such a layer is 80% off). Load the base again and rewrite it "
            "before running it in eval mode, or set layer.support_avx512bf16_for_cpu = False on every Linear4bit "
            "right after loading."
        )


def hold_packing(module: nn.Module) -> bool | None:
    """Stop bitsandbytes from repacking a 4-bit layer while it is a site's base; returns the setting to give back."""
    if not hasattr(module, "support_avx512bf16_for_cpu"):
        return None
    was = module.support_avx512bf16_for_cpu
    module.support_avx512bf16_for_cpu = False
    return was


def release_packing(module: nn.Module, was: bool | None) -> None:
    if was is not None:
        module.support_avx512bf16_for_cpu = was


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the layer computes in (its bias's, else its 4-bit compute dtype, else float32)."""
    b = getattr(module, "bias", None)
    if b is not None and b.is_floating_point():
        return b.dtype
    return getattr(module, "compute_dtype", None) or torch.float32


def stored_as_floats(w: torch.Tensor) -> bool:
    """A weight held as floats: an 8-bit layer built with has_fp16_weights=True. A packed 4-bit weight may be
    stored in a float dtype too (quant_storage=torch.bfloat16, as FSDP-QLoRA loads it), bytes and all."""
    return w.is_floating_point() and getattr(w, "quant_state", None) is None


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """An 8-bit layer's row scales (d_out,): W = int8 rows times these."""
    scb = getattr(module.weight, "SCB", None)
    return (module.state.SCB if scb is None else scb).float() / 127


def dequantized(module: nn.Module) -> torch.Tensor:
    """W of a bitsandbytes layer as a float32 (d_out, d_in) tensor, made now (never cached)."""
    w = module.weight
    if stored_as_floats(w):
        return w.detach().float()
    if kind(module) == "int8":
        return w.data.float() * _int8_scales(module).unsqueeze(1)
    from bitsandbytes.functional import dequantize_4bit
    return dequantize_4bit(w.data, w.quant_state).float().reshape(module.out_features, module.in_features)


def dequantized_at(module: nn.Module, index: torch.Tensor) -> torch.Tensor:
    """``dequantized(module).reshape(-1)[index]``, bit for bit, decoding only the 4-bit blocks that hold ``index``
    (a whole weight is 8x its packed size in float32: the save and load base checks read 64 entries a site)."""
    w = module.weight
    if stored_as_floats(w):
        return w.detach().reshape(-1)[index].float()
    if kind(module) == "int8":
        rows = index // module.in_features
        return w.data[rows, index % module.in_features].float() * _int8_scales(module)[rows]
    from bitsandbytes.functional import QuantState, dequantize_4bit, dequantize_blockwise
    qs = w.quant_state
    bs = qs.blocksize
    if qs.shape[-1] % bs:  # blocks that straddle rows, which bnb's CPU kernel does not decode as flat blocks
        return dequantized(module).reshape(-1)[index]
    blocks, which = torch.unique(index // bs, return_inverse=True)
    absmax = qs.absmax
    if qs.nested:  # the statistics are quantised too: decoded as dequantize_4bit decodes them
        absmax = dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
    part = QuantState(absmax=absmax[blocks].float(), shape=(len(blocks), bs), dtype=qs.dtype, blocksize=bs,
                      quant_type=qs.quant_type, code=qs.code)
    # packed (n, 1) as bnb keeps it: a (1, n) input would come back transposed
    packed = w.data.view(torch.uint8).reshape(-1, bs // 2)[blocks].reshape(-1, 1)
    return dequantize_4bit(packed, part).float()[which, index % bs]


def requantized(module: nn.Module, W: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """A new layer of the class and settings of ``module`` holding W (d_out, d_in) and b, quantised as it is."""
    bnb = _bnb()
    device = module.weight.device
    W = W.detach().to("cpu", torch.float32).contiguous()
    if kind(module) == "int8":
        fp16 = bool(module.state.has_fp16_weights)
        new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=b is not None,
                                  has_fp16_weights=fp16, threshold=module.state.threshold, device="meta")
        new.weight = bnb.nn.Int8Params(W.to(module.weight.dtype) if fp16 else W, requires_grad=False,
                                       has_fp16_weights=fp16)
    else:
        w = module.weight
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=b is not None,
                                compute_dtype=module.compute_dtype, compress_statistics=w.compress_statistics,
                                quant_type=w.quant_type, quant_storage=w.quant_storage, device="meta")
        new.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type=w.quant_type, blocksize=w.blocksize,
                                       compress_statistics=w.compress_statistics, quant_storage=w.quant_storage)
    if b is not None:
        new.bias = nn.Parameter(b.detach().to("cpu", module.bias.dtype), requires_grad=False)
    new.train(module.training)
    return new.to(device)  # the move to a device is what quantises a bitsandbytes weight


def merged(module: nn.Module, W: torch.Tensor, b: torch.Tensor | None, dequantize: bool) -> tuple[nn.Module, float]:
    """The layer that replaces ``module`` at a merge: W' re-quantised in its format, or (``dequantize``) a float
    nn.Linear in its compute dtype; and the relative error max|W'_stored - W'| / max|W'| of what it holds."""
    if dequantize:
        dt = compute_dtype(module)
        new = nn.Linear(module.in_features, module.out_features, bias=b is not None, device=W.device, dtype=dt)
        with torch.no_grad():
            new.weight.copy_(W)
            if b is not None:
                new.bias.copy_(b)
        new.requires_grad_(False)
        new.train(module.training)
        held = new.weight.float()
    else:
        new = requantized(module, W, b)
        held = dequantized(new).to(W.device)
    W = W.float()
    return new, ((held - W).abs().max() / W.abs().max().clamp_min(1e-30)).item()
