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

Statistics stream: per distinct input a token count, a sum (d_in) and, in float64, the rows themselves
while there are at most d_in of them, then a Gram matrix X^T X (d_in, d_in) in their place: calibration holds
at most 8 d_in^2 bytes per distinct input whatever the number of batches. Sites that read the same tensor
share one statistic (q, k and v of an attention, gate and up of an MLP: one each), verified batch by batch by
surgery/calibrate.py; the shared statistic is the one each site would have built alone, so A is the same.
configure then decomposes the statistics one at a time, exactly: n kept rows through the n x n matrix of
the centred rows (n^2 d_in work, where an eigendecomposition of the d_in x d_in covariance is d_in^3: a few
hundred tokens on a 3072-wide input took seconds a site that way; see _dual_pca), a Gram by an
eigendecomposition of the centred covariance.
It keeps the eigenvalues and the top round(rho * r) eigenvectors and frees the rest: the peak is the
statistics of all distinct inputs plus one decomposition, and what stays until init is
8 (round(rho * r) + 1) d_in bytes per input.
Deviations from PEFT: PEFT runs an approximate IncrementalPCA (randomised, cycled until the components'
cosines reach tau) and decides which sites share a PCA from hashes of their first batch only; ours is
exact in one pass, so there is no tau. No label mask (only the attention mask drops tokens), no
whitening. Loading needs no data: init returns placeholders that the file overwrites.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from surgery.variant import SiteInit, register
from .lora import LoRA
from surgery.errors import CalibrationError, ConfigError


@dataclass(eq=False)
class Moments:
    """Streaming moments of one input's rows (shared by the sites that read it): the rows themselves while
    there are at most d_in of them, then their Gram; after ``principal``, the covariance's eigenvalues and
    leading eigenvectors in their place."""

    n: int
    total: torch.Tensor | None  # (d_in,) float64, until principal
    rows_seen: torch.Tensor | None  # (n, d_in) float64 while n <= d_in, until principal
    gram: torch.Tensor | None = None  # (d_in, d_in) float64 once n > d_in, until principal
    values: torch.Tensor | None = None  # (min(n, d_in),) descending, from principal on
    rows: torch.Tensor | None = None  # (k, d_in) the top k eigenvectors as rows, from principal on

    def add(self, x: torch.Tensor) -> None:
        self.total += x.sum(0)
        self.n += x.shape[0]
        if self.gram is None and self.n <= x.shape[1]:
            self.rows_seen = torch.cat([self.rows_seen, x])
            return
        if self.gram is None:  # more rows than their width: the Gram is now the smaller
            self.gram, self.rows_seen = self.rows_seen.t() @ self.rows_seen, None
        self.gram += x.t() @ x  # (d_in, d_in)

    def principal(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues descending and the top k eigenvectors as rows (<= k, d_in) of the covariance. The first
        call decomposes it and frees the statistic; later calls return what it kept, for any k up to the first."""
        if self.rows is None:
            mean = self.total / self.n  # (d_in,)
            dof = max(self.n - 1, 1)
            if self.gram is None:
                centred = self.rows_seen - mean  # Xc (n, d_in)
                self.total = self.rows_seen = None
                self.values, self.rows = _dual_pca(centred, min(k, self.n - 1))
                self.values /= dof
            else:
                cov = self.gram  # the Gram is not needed again: centre and scale it in place
                cov -= self.n * torch.outer(mean, mean)
                cov /= dof
                self.total = self.gram = None
                vals, vecs = torch.linalg.eigh(cov)  # ascending
                del cov
                self.values = vals.flip(0).clamp_min(0)
                self.rows = vecs[:, -k:].flip(1).t()  # flip copies, so the full eigenvectors are freed here
        return self.values, self.rows[:k]


def _dual_pca(centred: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The squared singular values (descending) of Xc (n, d_in) and its top k right singular vectors as rows:
    the eigenvectors of C = Xc^T Xc / dof. With n <= d_in they come from the n x n matrix Xc Xc^T, whose
    eigenpairs (s^2, u) give v = Xc^T u / s (n^2 d_in work: 0.08 s at n = 512, d_in = 3072, where an SVD of
    Xc took 0.54 s and an eigendecomposition of C 5.9 s). A direction the rows barely span (s near 0, where
    that division loses its accuracy) is taken from an SVD of Xc instead."""
    lam, u = torch.linalg.eigh(centred @ centred.t())  # ascending
    lam, u = lam.flip(0).clamp_min(0), u[:, lam.shape[0] - k:].flip(1)
    if k and lam[k - 1] > lam[0] * centred.shape[0] * torch.finfo(lam.dtype).eps * 1e3:
        return lam, (centred.t() @ u / lam[:k].sqrt()).t().contiguous()
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)  # descending
    return sv.square(), vh[:k].clone()  # clone: the full vh is freed here


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
            state = Moments(0, x.new_zeros(x.shape[1]), x.new_empty(0, x.shape[1]))
        state.add(x)
        return state

    @staticmethod
    def require_tokens(path: str, m: Moments | None, r: int) -> None:
        if m is None or m.n <= r:
            raise CalibrationError(
                f"EVA(r={r}) at {path} saw {0 if m is None else m.n} calibration tokens; a mean-centred PCA of "
                f"rank {r} needs at least {r + 1}. Pass more or longer batches, or lower r."
            )

    def configure(self, states: dict[str, Moments]) -> dict[str, "EVA"]:
        keep = round(self.rho * self.r)  # the most components a site can get: all init will read
        for p, m in states.items():  # one statistic at a time, so one full eigendecomposition is alive at once
            self.require_tokens(p, m, self.r)
            m.principal(keep)
        if self.rho == 1.0:
            return {p: self for p in states}
        ratios = []  # (explained variance ratio, path)
        for p, m in states.items():
            vals = m.values
            offer = min(keep, m.n - 1)  # beyond n - 1 the covariance has no variance left
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
        A = site.calibration.principal(self.r)[1]  # (r, d_in)
        return {"lora_A": A.to(site.dtype, copy=True).contiguous(), "lora_B": B}
