"""AntiPaSTO: anti-parallel subspace training for ordered steering (Clark 2026, arXiv 2601.07473).

Steer a layer inside the space of its own top-r SVD, W = U S V^T + W_res: learn deltas to the
singular values and a rotation of one singular basis, scaled by a steering coefficient c
(the paper's alpha: +1 steers, -1 reverses, 0 is the base model). Written here as a delta on
the untouched base, with z = V^T x (r):

    rotate_basis="V":    y = W x + b + U [ (S + c d) * (R^T z) - S * z ]      (V -> V R)
    rotate_basis="U":    y = W x + b + U [ R ((S + c d) * z)   - S * z ]      (U -> U R)
    rotate_basis="none": y = W x + b + U [ c d * z ]
    R = blockdiag_k cayley(c Q_k),  cayley(Q) = (I - Q/2)^-1 (I + Q/2),  Q_k skew (b, b)

    antipasto_U (d_out, r), antipasto_S (r), antipasto_V (r, d_in): frozen top-r SVD of W (float32)
    antipasto_delta (r): trainable singular-value deltas d, zeros
    antipasto_rot (r/b, b(b-1)/2): trainable upper triangles of the skew blocks Q_k, zeros

Identity at init: d = 0 and Q = 0, so R = I and the bracket is S*z - S*z = 0 exactly.
Fold: W' = W + U K^T V^T with K (r, r) the bracket applied to the rows of I_r; b' = b. Exact.
Requires: the dense base weight; r <= min(d_in, d_out); block_size divides r.

Facts from the author's code (github.com/wassname/AntiPaSTO); the paper text was not reachable.
Deviations: the author splits W into U S V^T + W_res and recomputes both; the delta form above
leaves W untouched, so identity is exact and nothing needs restoring. The author starts d and Q
at small random values to break the +1/-1 symmetry of the steering loss; we start at zero (exact
identity; every tensor still gets a gradient on the first step, since dR/dQ at Q = 0 is Q).
Block-diagonal rotations (the author's config names OFT-style blocks; its code uses one r x r block,
our default), no soft clamp of the rotation angle, no data-aware choice of singular directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from surgery.variant import (SiteInit, Variant, at_least_float32, register, require_positive_rank, require_rank_fits,
                             require_real)
from surgery.errors import ConfigError


def cayley_blocks(rot: torch.Tensor, n: int, b: int, c: torch.Tensor | float) -> torch.Tensor:
    """(n, b(b-1)/2) upper-triangle entries -> (n, b, b) orthogonal Cayley blocks of c * skew."""
    upper = rot.new_ones(b, b).triu(1).bool().expand(n, b, b)  # (n, b, b); built from rot so fx traces it
    Q = rot.new_zeros(n, b, b).masked_scatter(upper, rot) * (c / 2)  # (n, b, b), strict upper triangle
    Q = Q - Q.transpose(-1, -2)  # skew
    eye = torch.diag_embed(rot.new_ones(n, b))  # (n, b, b)
    # no half-precision CPU kernel for the solve: float32 for a model cast to bf16 / fp16 after the rewrite
    return torch.linalg.solve(at_least_float32(eye - Q), at_least_float32(eye + Q)).to(rot.dtype)  # (n, b, b)


@register
@dataclass(frozen=True)
class AntiPaSTO(Variant):
    r: int = 8
    rotate_basis: Literal["V", "U", "none"] = "V"
    block_size: int | None = None  # rotation block size b; None: one r x r block
    alpha: float = 1.0  # steering coefficient c

    frozen = ("antipasto_U", "antipasto_S", "antipasto_V")
    base_bound = True
    steered = True  # the runtime strength (surgery.scaled) multiplies the steering coefficient alpha

    def __post_init__(self):
        require_positive_rank(self, self.r)
        require_real(self, "alpha", self.alpha)
        if self.rotate_basis not in ("V", "U", "none"):
            raise ConfigError(f"AntiPaSTO: rotate_basis must be 'V', 'U' or 'none', got {self.rotate_basis!r}.")
        b = self.block
        if not isinstance(b, int) or isinstance(b, bool) or b < 1 or self.r % b:
            raise ConfigError(
                f"AntiPaSTO: block_size must be a positive divisor of r={self.r}, got block_size={self.block_size!r}. "
                f"Use e.g. AntiPaSTO(r={self.r}, block_size={self.r}) (one block) or leave it None."
            )
        if b == 1 and self.rotate_basis != "none":
            raise ConfigError(
                "AntiPaSTO: block_size=1 makes every rotation block 1x1, which is always the identity, so the "
                "rotation could never train. Use block_size >= 2, or rotate_basis='none'."
            )

    @property
    def block(self) -> int:
        return self.r if self.block_size is None else self.block_size

    def check(self, site: SiteInit) -> None:
        require_rank_fits(self, site, self.r)

    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        r, b, dt, dev = self.r, self.block, site.dtype, site.device
        if site.loading:  # every tensor, the frozen SVD included, comes from the file
            U, S, Vh = torch.zeros(site.d_out, r), torch.zeros(r), torch.zeros(r, site.d_in)
        else:
            U, S, Vh = torch.linalg.svd(site.weight, full_matrices=False)  # float32 or wider
        out = {
            "antipasto_U": U[:, :r].to(dt, copy=True).contiguous(),  # (d_out, r)
            "antipasto_S": S[:r].to(dt, copy=True),  # (r,)
            "antipasto_V": Vh[:r].to(dt, copy=True).contiguous(),  # (r, d_in)
            "antipasto_delta": torch.zeros(r, dtype=dt, device=dev),  # (r,)
        }
        if self.rotate_basis != "none":
            out["antipasto_rot"] = torch.zeros(r // b, b * (b - 1) // 2, dtype=dt, device=dev)  # (r/b, b(b-1)/2)
        return {k: v.to(dev) for k, v in out.items()}

    def bracket(self, z, t):
        """The change inside the singular space: (..., r) -> (..., r); zero at init."""
        c, S = self.alpha * t.surgery_scale, t.antipasto_S  # c: a 0-d tensor, so a new strength retraces nothing
        scaled = S + c * t.antipasto_delta  # (r,)
        if self.rotate_basis == "none":
            return z * (c * t.antipasto_delta)  # (..., r)
        b = self.block
        n = self.r // b
        R = cayley_blocks(t.antipasto_rot, n, b, c)  # (n, b, b)
        if self.rotate_basis == "V":  # z^T (V R) = (R^T z)^T: rotate the inputs' coordinates, then scale
            rz = torch.einsum("...ni,nij->...nj", z.unflatten(-1, (n, b)), R).flatten(-2)  # (..., r)
            return rz * scaled - z * S  # (..., r)
        rs = torch.einsum("...ni,nji->...nj", (z * scaled).unflatten(-1, (n, b)), R).flatten(-2)  # (..., r)
        return rs - z * S  # (..., r)

    def forward(self, x, y, weight, bias, t):
        z = F.linear(x, t.antipasto_V)  # (..., r)
        return y + F.linear(self.bracket(z, t), t.antipasto_U)  # (..., d_out)

    def fold(self, weight, bias, t):
        K = self.bracket(torch.eye(self.r, dtype=weight.dtype, device=weight.device), t)  # (r, r): row i = bracket(e_i)
        return weight + t.antipasto_U @ K.t() @ t.antipasto_V, bias  # (d_out, d_in)
