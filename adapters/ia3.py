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
        shape = (1, site.d_in) if self.input_side(site.path) else (site.d_out, 1)
        return {"ia3_l": torch.ones(shape, dtype=site.dtype, device=site.device)}

    def forward(self, x, y, weight, bias, t):
        if self.input_side(t.site.path):  # a static string at trace time: one branch is traced
            return t.base(x * t.ia3_l.flatten())  # (..., d_out): the base layer on the rescaled input
        return y * t.ia3_l.flatten()  # (..., d_out)

    def fold(self, weight, bias, t):
        if self.input_side(t.site.path):
            return weight * t.ia3_l, bias  # (d_out, d_in) * (1, d_in)
        return weight * t.ia3_l, None if bias is None else bias * t.ia3_l.flatten()  # (d_out, d_in) * (d_out, 1)
