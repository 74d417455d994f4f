"""IA3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, arXiv 2205.05638).

One learned vector per site rescales either the layer's output or, at feed-forward output
projections, its input:

    output side:  y = l * (W x + b)      l = ia3_l (d_out, 1), the bias is scaled too
    input side:   y = W (l * x) + b      l = ia3_l (1, d_in)

A site is input side when its path ends with one of ``feedforward`` (plain string suffixes,
PEFT's ``key.endswith(entry)``); every other site is output side. The paper's placement is
``where="*.{k_proj,v_proj,down_proj}"``; ``"*.{q_proj,v_proj}"`` is the common q/v deviation.
Because the test is a raw suffix, ``"output.dense"`` also makes BERT's ``attention.output.dense``
input side, exactly as in PEFT; pass ``feedforward=`` with longer suffixes to tell them apart.

Identity at init: l = 1, exactly.
Fold: output side W' = diag(l) W, b' = l * b; input side W' = W diag(l), b' = b.
Requires: only the layer's shape: the input side runs the base layer itself on l * x (``t.base``), so
both sides work on quantised bases.

On an nn.Conv1d/2d/3d l scales channels, in PEFT's shape (1, C, 1, ...): the output channels, or on the
input side the input channels, y = conv(l * x) + b, which equals a conv with each input channel's kernel
slice scaled (zero padding stays zero). The input side is computed as y + conv((l - 1) * x) without bias, one
conv more than PEFT, so that the base output y stays in the site's graph as the engine's strength blend
expects on a conv. PEFT 0.21 has IA3 on Conv2d and Conv3d only, so export_peft refuses it on an nn.Conv1d.
nn.Embedding is not adapted (PEFT 0.21's IA3 has no embedding layer).

Deviations from PEFT 0.21: none in values (parity is tested). ``feedforward`` replaces PEFT's
``feedforward_modules`` and takes suffixes only (PEFT's regex-string form is not offered), and it
need not be a subset of ``where``. There is no ``init_ia3_weights=False`` (random l) option.
The paper rescales keys, values and the feed-forward hidden activation; PEFT, and so we, move the
last one onto the input of the feed-forward output projection, which is the same operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.variant import SiteInit, Variant, register
from surgery.errors import ConfigError


@register
@dataclass(frozen=True)
class IA3(Variant):
    feedforward: tuple[str, ...] = ("down_proj", "fc2", "mlp.c_proj", "output.dense")

    needs_weight = False
    layouts = ("linear", "conv1d", "conv")

    def __post_init__(self):
        ff = self.feedforward
        if isinstance(ff, str) or not all(isinstance(s, str) and s for s in ff):
            raise ConfigError(
                f"IA3: feedforward must be a tuple of non-empty module path suffixes, got feedforward={ff!r}. "
                "Write e.g. IA3(feedforward=('down_proj',))."
            )
        object.__setattr__(self, "feedforward", tuple(ff))  # a list would make the config unhashable

    def input_side(self, path: str) -> bool:
        return any(path.endswith(s) for s in self.feedforward)

    def trace_key(self, site) -> bool:
        return self.input_side(site.path)  # all forward reads of the path: sites on one side share a trace

    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        inside = self.input_side(site.path)
        if site.layout == "conv":
            spec = site.spec
            shape = (1, spec.in_channels if inside else spec.out_channels, *(1,) * len(spec.kernel_size))
        else:
            shape = (1, site.d_in) if inside else (site.d_out, 1)
        return {"ia3_l": torch.ones(shape, dtype=site.dtype, device=site.device)}

    def forward(self, x, y, weight, bias, t):
        inside = self.input_side(t.site.path)  # a static string at trace time: one branch is traced
        if t.site.layout == "conv":
            spec = t.site.spec
            l = t.ia3_l.view(-1, *(1,) * len(spec.kernel_size))  # (C, 1, ...): batched or not
            if not inside:
                return y * l
            kernel = weight.view(spec.out_channels, spec.in_channels, *spec.kernel_size)
            return y + spec.conv(x * (l - 1), kernel, None, spec.stride, spec.padding)
        if inside:
            return t.base(x * t.ia3_l.flatten())  # (..., d_out): the base layer on the rescaled input
        return y * t.ia3_l.flatten()  # (..., d_out)

    def fold(self, weight, bias, t):
        l = t.ia3_l.flatten()
        if not self.input_side(t.site.path):
            return weight * l.unsqueeze(1), None if bias is None else bias * l  # (d_out, d_in) * (d_out, 1)
        if t.site.layout == "conv":  # weight (out, in * prod(kernel)): each input channel's columns are adjacent
            return (weight.unflatten(1, (l.numel(), -1)) * l.view(-1, 1)).flatten(1), bias
        return weight * l, bias  # (d_out, d_in) * (d_in,)
