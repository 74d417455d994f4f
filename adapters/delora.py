"""DeLoRA: decoupled low-rank adaptation (Bini et al. 2025, arXiv 2503.18225), in PEFT's formulation.

Each rank-one term of the update is normalised, so lambda alone bounds the update's size:

    y  = W x + b + B diag(xi) A (w * drop(x))
    xi_i = (lambda / r) / (max(||a_i||, 1e-4) * max(||b_i||, 1e-4))   a_i row i of A, b_i column i of B

    A: delora_A (r, d_in)       kaiming-uniform, a = sqrt(5)  ->  U(-1/sqrt(d_in), 1/sqrt(d_in))
    B: delora_B (d_out, r)      zeros
    lambda: delora_lambda (1,)  = lambda0
    w: delora_w_norm (d_in)     column norms of W at init; a frozen buffer, saved with the adapter

Identity at init: B = 0, so the update is exactly 0.
Fold: W' = W + B diag(xi) A diag(w); b' = b.
Requires: the dense base weight (for w), on Linear or GPT-2 Conv1D.
Gradients: at init only B has one (A's and lambda's pass through B = 0); from the second step on
all three do. lambda0 = 0 would make xi = 0 and every gradient zero forever, so it is refused.

Deviations from the paper: the paper scales the update by a norm of the pretrained weight; PEFT,
and so we, use the per-input-column norm vector w, kept from init (a reloaded adapter keeps its
saved w even on another base). ``dropout`` is PEFT's ``module_dropout``, an element-wise dropout on
the adapter branch's input. Deviation from PEFT 0.21: PEFT refuses GPT-2's Conv1D; we accept it,
since the variant always sees W in (d_out, d_in) layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgery.variant import SiteInit, Variant, kaiming_uniform, register, require_dropout, require_positive_rank
from surgery.errors import ConfigError


@register
@dataclass(frozen=True)
class DeLoRA(Variant):
    r: int = 8
    lambda0: float = 15.0
    dropout: float = 0.0

    frozen = ("delora_w_norm",)
    base_bound = True

    def __post_init__(self):
        require_positive_rank(self, self.r)
        require_dropout(self, self.dropout)
        if not (isinstance(self.lambda0, (int, float)) and math.isfinite(self.lambda0) and self.lambda0 != 0):
            raise ConfigError(
                f"DeLoRA: lambda0 must be a finite nonzero number, got lambda0={self.lambda0!r}; with lambda = 0 "
                "the update and every adapter gradient are zero, so nothing would ever train. "
                "Use PEFT's default, DeLoRA(r=8, lambda0=15.0)."
            )

    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        kw = dict(dtype=site.dtype, device=site.device)
        return {
            "delora_A": kaiming_uniform((self.r, site.d_in), site.d_in, site.dtype, site.device),  # (r, d_in)
            "delora_B": torch.zeros(site.d_out, self.r, **kw),  # (d_out, r)
            "delora_lambda": torch.full((1,), float(self.lambda0), **kw),  # (1,)
            "delora_w_norm": site.weight.norm(dim=0).to(**kw),  # (d_in,)
        }

    def modules(self) -> dict[str, nn.Module]:
        return {"delora_dropout": nn.Dropout(self.dropout)} if self.dropout > 0 else {}

    def xi(self, t):
        a = t.delora_A.norm(dim=1).clamp_min(1e-4)  # (r,)
        b = t.delora_B.norm(dim=0).clamp_min(1e-4)  # (r,)
        return (t.delora_lambda / self.r) / (a * b)  # (r,)

    def forward(self, x, y, weight, bias, t):
        h = t.delora_dropout(x) if self.dropout > 0 else x
        u = F.linear(h * t.delora_w_norm, t.delora_A)  # (..., r)
        return y + F.linear(u * self.xi(t), t.delora_B)  # (..., d_out)

    def fold(self, weight, bias, t):
        return weight + (t.delora_B * self.xi(t)) @ (t.delora_A * t.delora_w_norm), bias  # (d_out, d_in)
