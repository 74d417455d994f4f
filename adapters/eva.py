"""EVA: explained variance adaptation (Paischer et al. 2024, arXiv 2409.07871).

A LoRA whose A starts as the top principal directions of the layer's own inputs:

    C = Cov(x) over the calibration tokens of the site (mean-centred; attention-masked positions dropped)
    A0 = top-r eigenvectors of C, as rows    lora_A (r, d_in), orthonormal rows
    B0 = 0                                   lora_B (d_out, r)
    y = W x + b + s * B A drop(x),           s = alpha / r

Rank redistribution (rho >= 1): each site offers its top round(rho * r) components; the explained
variance ratios (eigenvalue / trace C) of all sites are ranked together and the best sum(r) kept, so
site i gets r_i in [0, round(rho * r)] and alpha_i = alpha * r_i / r (keeps alpha / r, also under
rslora, as PEFT); a site with r_i = 0 is left out. rho = 1 keeps r everywhere.

Identity at init: B = 0, so the adapter adds exactly 0.
Fold: W' = W + s B A (LoRA's).
Requires: calibration batches, ``surgery.rewrite(model, EVA(r=8), where, calibration=batches)``;
more than r_i unmasked tokens per site (mean-centring uses one degree of freedom); r <= d_in.

Statistics stream: per site a token count, a sum (d_in) and a Gram matrix X^T X (d_in, d_in), in
float64, so memory is 8 d_in^2 bytes per site whatever the number of batches, and the PCA is exact
(an eigendecomposition of the centred covariance). Deviations from PEFT: PEFT runs an approximate
IncrementalPCA (randomised, cycled until the components' cosines reach tau) and shares one PCA
between sites with identical inputs; ours is exact in one pass, so there is no tau, and shared
inputs give equal PCAs by construction. No label mask (only the attention mask drops tokens), no
whitening. Loading needs no data: init returns placeholders that the file overwrites.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from surgery.variant import SiteInit, register
from .lora import LoRA
from surgery.errors import CalibrationError, ConfigError


@dataclass
class Moments:
    """Streaming first and second moments of one site's input rows."""

    n: int
    total: torch.Tensor  # (d_in,) float64
    gram: torch.Tensor  # (d_in, d_in) float64

    @functools.cached_property
    def pca(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (d_in,) descending and eigenvectors as rows (d_in, d_in) of the covariance."""
        mean = self.total / self.n  # (d_in,)
        cov = (self.gram - self.n * torch.outer(mean, mean)) / max(self.n - 1, 1)  # (d_in, d_in)
        vals, vecs = torch.linalg.eigh(cov)  # ascending
        return vals.flip(0).clamp_min(0), vecs.flip(1).t()


@register
@dataclass(frozen=True)
class EVA(LoRA):
    rho: float = 2.0

    needs_calibration = True
    base_bound = True
    # not LoRA's embedding and conv: calibration collects input rows of width d_in, which token ids and images are not
    layouts = ("linear", "conv1d")

    def __post_init__(self):
        super().__post_init__()
        if not self.rho >= 1.0:
            raise ConfigError(f"EVA: rho must be >= 1 (1: no rank redistribution), got rho={self.rho!r}. PEFT's default is 2.")

    def check(self, site: SiteInit) -> None:
        if self.r > site.d_in:
            raise ConfigError(
                f"EVA: r={self.r} is larger than the input size d_in={site.d_in} at {site.path}; its inputs have "
                f"only {site.d_in} principal directions. Use r <= {site.d_in}, or leave {site.path} out of `where`."
            )

    def observe(self, state: Moments | None, rows: torch.Tensor) -> Moments:
        x = rows.double()  # (N, d_in)
        if state is None:
            return Moments(x.shape[0], x.sum(0), x.t() @ x)
        state.total += x.sum(0)
        state.gram += x.t() @ x  # (d_in, d_in)
        state.n += x.shape[0]
        return state

    @staticmethod
    def require_tokens(path: str, m: Moments | None, r: int) -> None:
        if m is None or m.n <= r:
            raise CalibrationError(
                f"EVA(r={r}) at {path} saw {0 if m is None else m.n} calibration tokens; a mean-centred PCA of "
                f"rank {r} needs at least {r + 1}. Pass more or longer batches, or lower r."
            )

    def configure(self, states: dict[str, Moments]) -> dict[str, "EVA"]:
        if self.rho == 1.0:
            return {p: self for p in states}
        ratios = []  # (explained variance ratio, path)
        for p, m in states.items():
            self.require_tokens(p, m, self.r)
            vals = m.pca[0]
            offer = min(round(self.rho * self.r), m.n - 1)  # beyond n - 1 the covariance has no variance left
            ratios += [(v, p) for v in (vals[:offer] / vals.sum().clamp_min(1e-30)).tolist()]
        ratios.sort(key=lambda vp: -vp[0])  # stable: ties keep site order
        ranks = {p: 0 for p in states}
        for _, p in ratios[: self.r * len(states)]:
            ranks[p] += 1
        return {p: dataclasses.replace(self, r=k, alpha=self.alpha * k / self.r) for p, k in ranks.items() if k > 0}

    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        B = torch.zeros(site.d_out, self.r, dtype=site.dtype, device=site.device)  # (d_out, r)
        if site.loading:
            return {"lora_A": torch.zeros(self.r, site.d_in, dtype=site.dtype, device=site.device), "lora_B": B}
        self.require_tokens(site.path, site.calibration, self.r)
        A = site.calibration.pca[1][: self.r]  # (r, d_in)
        return {"lora_A": A.to(site.dtype, copy=True).contiguous(), "lora_B": B}
