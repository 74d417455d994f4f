"""PiSSA: principal singular values and vectors adaptation (Meng et al. 2024, arXiv 2404.02948).

A LoRA whose factors start as the top-r singular part of W, with the base holding the rest:

    W = U S V^T  (thin SVD, float32 or wider),   S'_r = S_r / s,   s = alpha / r  (rslora: alpha / sqrt(r))
    A0 = diag(sqrt(S'_r)) V_r^T   lora_A (r, d_in)
    B0 = U_r diag(sqrt(S'_r))     lora_B (d_out, r)
    W_res = W - s B0 A0           replaces the base weight
    y = W_res x + b + s * B A drop(x)

Identity at init: up to rounding W_res to the base dtype. Measured max |dy| / max |y| on the tiny
test models: at most 2.4e-7 in float32 and 5.2e-3 on a bfloat16 base (tests/test_pissa.py).
Fold: W' = W_res + s B A (LoRA's fold on the residual base). The engine keeps the original W whenever
``init`` calls ``replace_weight``, so ``surgery.restore`` gives it back bitwise, and ``surgery.disabled``
and a strength of 0 run exactly the base (W is not recomputed as W_res + s B0 A0, which would round). On a
CPU model (module scope) each kept W lives in an unlinked temporary file in ``tempfile.gettempdir()``,
mapped back (surgery/offload.py): it costs disk, not memory, until something reads it (a cast of the
model to another dtype or device makes an ordinary copy again). The residuals also wait in a file until
the rewrite commits, so applying holds about one weight's residual at a time. Point TMPDIR at a disk
with room for about twice the adapted weights (a tmpfs /tmp is memory again).
Graph scope keeps the eager model's own W, no copy; on a GPU, W stays a copy on the device.
Requires: the dense base weight; r <= min(d_in, d_out).

As PEFT's ``init_lora_weights="pissa"`` / ``"pissa_niter_N"`` (dividing S by s goes beyond the
paper's plain split, which assumes s = 1; it keeps s B0 A0 the principal part for any alpha).
Deviations from PEFT: ``niter`` runs ``torch.svd_lowrank`` (q = r, as PEFT) under a fixed seed in a
forked RNG, so it is reproducible, leaves the global RNG alone, and ``surgery.load`` on the original
base rebuilds the same residual (PEFT's randomised sketch does not). A float64 base is accepted
(PEFT raises). Loading always re-runs this init on the original base, then fills A and B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.variant import SiteInit, register, require_rank_fits
from .lora import LoRA
from surgery.errors import ConfigError

_SEED = 0  # fixed seed of the randomised SVD (niter), so init and load agree
_MAX_NITER = 1000  # far past convergence; a larger value (from a file, say) would only make load hang


@register
@dataclass(frozen=True)
class PiSSA(LoRA):
    niter: int | None = None  # None: exact SVD; N: torch.svd_lowrank with N subspace iterations

    identity_tol = 1e-5
    needs_weight = True
    base_bound = True
    # not LoRA's embedding and conv: the residual is a linear-layout SVD and nothing here reshapes it back
    layouts = ("linear", "conv1d")

    def __post_init__(self):
        super().__post_init__()
        if self.niter is not None and (not isinstance(self.niter, int) or isinstance(self.niter, bool)
                                       or not 0 <= self.niter <= _MAX_NITER):
            raise ConfigError(
                f"PiSSA: niter must be None (exact SVD) or an integer in [0, {_MAX_NITER}], got niter={self.niter!r}. "
                "Use e.g. PiSSA(r=8, niter=4) for a fast randomised SVD (a few iterations are enough)."
            )

    def check(self, site: SiteInit) -> None:
        require_rank_fits(self, site, self.r)

    def principal(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-r (U_r (d_out, r), S_r (r,), V_r^T (r, d_in)) of W."""
        if self.niter is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
            return U[:, : self.r], S[: self.r], Vh[: self.r]
        with torch.random.fork_rng():
            torch.manual_seed(_SEED)
            U, S, V = torch.svd_lowrank(W, q=self.r, niter=self.niter)  # (d_out, r), (r,), (d_in, r)
        return U, S, V.t()

    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        W = site.weight  # (d_out, d_in), float32 or wider even on half-precision bases
        U, S, Vh = self.principal(W)
        root = (S / self.scale).sqrt()  # (r,)
        A = root[:, None] * Vh  # (r, d_in)
        B = U * root[None, :]  # (d_out, r)
        site.replace_weight(W - self.scale * (B @ A))  # (d_out, d_in)
        return {"lora_A": A.to(site.dtype), "lora_B": B.to(site.dtype)}
