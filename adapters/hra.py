"""HRA: Householder reflection adaptation (Yuan et al. 2024, arXiv 2405.17484).

    y = W R x + b,    R = H_1 H_2 ... H_r,    H_i = I - 2 u_i u_i^T / ||u_i||^2

    U: hra_u (d_in, r), columns u_i. Init: kaiming-uniform (a = sqrt(5)) on r/2 columns, whose
       fan_in is r/2, so U(-sqrt(2/r), sqrt(2/r)); each column is then duplicated (u_2k = u_2k+1).

The product is never built as a dense d_in x d_in matrix. Its compact WY form (Joffrain et al.,
"Accumulating Householder transformations, revisited", 2006) is

    R = I - U S^-1 U^T,    S = triu(U^T U) with its diagonal halved    (r x r, upper triangular)

which holds for unnormalised u_i, so R x = x - K (U^T x) with K = U S^-1 (d_in, r): two thin
matmuls per token, and the base layer itself on R x (``t.base``, so a quantised base works too).

Identity at init: paired columns give paired equal reflections, H H = I, so R = I. An odd r
cannot pair up; it is refused (PEFT warns and starts far from the identity).
Fold: W' = W R = W - (W K) U^T; b' = b (exact: R is orthogonal).
Requires: only the layer's shape (the base layer runs on R x; the fold reads W).
Deviations from PEFT 0.21: PEFT's ``apply_GS`` (Gram-Schmidt, R = I - 2 Q Q^T) is left out: it is
never the identity at init. Odd r is a ConfigError instead of a warning. GPT-2's Conv1D is
supported (PEFT raises). No orthogonality regulariser, as in PEFT (the paper has one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.variant import SiteInit, Variant, at_least_float32, kaiming_uniform, register, require_positive_rank
from surgery.errors import ConfigError


def _wy_factor(u: torch.Tensor) -> torch.Tensor:
    """K = U S^-1 with S = triu(U^T U), diagonal halved, so that H_1 ... H_r = I - K U^T."""
    g = u.mT @ u  # (r, r)
    s = torch.triu(g) - 0.5 * torch.diag_embed(torch.diagonal(g))  # (r, r)
    # the solve has no half-precision CPU kernel: run it in float32 for a model cast to bf16 / fp16 after the rewrite
    k = torch.linalg.solve_triangular(at_least_float32(s), at_least_float32(u), upper=True, left=False)
    return k.to(u.dtype)  # (d_in, r): K S = U


@register
@dataclass(frozen=True)
class HRA(Variant):
    r: int = 8

    needs_weight = False

    def __post_init__(self):
        require_positive_rank(self, self.r)
        if self.r % 2:
            raise ConfigError(
                f"HRA: r must be even, got r={self.r}. HRA starts as the identity by pairing equal "
                f"reflections, which an odd r cannot do. Use HRA(r={self.r + 1}) or HRA(r={self.r - 1 or 2})."
            )

    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        half = kaiming_uniform((site.d_in, self.r // 2), self.r // 2, site.dtype, site.device)  # (d_in, r/2)
        return {"hra_u": half.repeat_interleave(2, dim=1)}  # (d_in, r)

    def forward(self, x, y, weight, bias, t):
        u = t.hra_u  # (d_in, r)
        k = _wy_factor(u)  # (d_in, r)
        rx = x - (x @ u) @ k.mT  # (..., d_in)
        return t.base(rx)  # (..., d_out): the base layer on R x

    def fold(self, weight, bias, t):
        u = t.hra_u
        return weight - (weight @ _wy_factor(u)) @ u.mT, bias  # (d_out, d_in)
