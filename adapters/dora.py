"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

The adapted weight is split into a direction, W + s B A, and a learned magnitude per output unit:

    W' = diag(m / n) (W + s B A),    n = ||W + s B A||_row  (detached, paper §4.3)
    y  = (m / n) * (W x + s B A x) + b                       eval, or dropout p = 0
    y  = W x + b + (m / n - 1) * (W d) + (m / n) * s B A d    training with p > 0, d = drop(x)

    A: lora_A (r, d_in) and B: lora_B (d_out, r), initialised as in LoRA; s as in LoRA
    m: lora_magnitude_vector (d_out) = ||W||_row, the row norms of W + s B A with B = 0

Identity at init: B = 0 and m = n exactly (both are the same sum of squares), so m / n = 1.
Fold: W' = diag(m / n) (W + s B A); b' = b (the bias is never rescaled).
Requires: the dense base weight (n depends on W).

On an nn.Embedding and an nn.Conv1d/2d/3d, as PEFT's DoRA does, W is the layer's weight as a linear map (see
LoRA): (dim, num_embeddings) for an embedding, so n is the norm of each embedding dimension over the
vocabulary, and the kernel flattened to (out, in * prod(kernel)) for a conv, so n is the norm over all but the
output channel. A, B and the branch s B A x are LoRA's on that layer; the formulas above hold with W x the
layer's own op (a lookup, a conv). An embedding has no bias and takes no dropout (PEFT applies none), so
y = (m / n) * (E[ids] + s A^T[ids] B^T). A conv's m is stored in PEFT's shape (1, out, 1, ...).

n is never built from the d_out x d_in matrix W + s B A. Writing bs_i for row i of s B,
    n_i^2 = ||w_i||^2 + bs_i . (2 (W A^T)_i + bs_i (A A^T))
costs one (d_out, r) product with W and reads W once more for ||w_i||^2.
The p > 0 formula holds in eval too (drop(x) = x there), so with p > 0 we always apply it: in
eval that is one matmul more than PEFT, which reuses its base output. With p = 0, W x = y - b.

Deviations from PEFT 0.21 (same values within float rounding; parity is tested):
- PEFT forms s B A explicitly (through an identity matrix) on every forward; we use the identity above.
- On a half-precision base PEFT computes m at init in the base dtype; we compute it in float32.
Deviation from the paper: dropout follows PEFT (the paper has none inside the magnitude term).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from surgery.variant import SiteInit, register
from .lora import LoRA


@register
@dataclass(frozen=True)
class DoRA(LoRA):
    needs_weight = True
    base_bound = True
    layouts = ("linear", "conv1d", "embedding", "conv")

    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        tensors = super().init(site)
        m = site.weight.pow(2).sum(1).sqrt()  # (d_out,): the same sum forward takes, so m / n = 1
        if site.layout == "conv":
            m = m.view(1, -1, *(1,) * len(site.spec.kernel_size))  # PEFT's (1, out, 1, ...)
        tensors["lora_magnitude_vector"] = m.to(dtype=site.dtype, device=site.device)
        return tensors

    def scaled(self, B):
        return B if self.scale == 1 else B * self.scale  # (d_out, r); no "* 1" node in the site's code

    def row_norm(self, weight, A, B):
        """||W + s B A||_row without forming the matrix; no gradient flows through it."""
        W, At, Bs = weight.detach(), A.detach().t(), self.scaled(B.detach())  # (d_out, d_in), (d_in, r), (d_out, r)
        n2 = W.pow(2).sum(1) + (Bs * (2 * (W @ At) + Bs @ (At.t() @ At))).sum(1)  # (d_out,)
        return n2.clamp_min(0).sqrt()  # rounding may push a vanishing row's n2 below 0

    def lora(self, h, t):
        """s B A h, applied as the layer applies W: a lookup of A^T's rows, a conv of A's kernel, or a matmul."""
        lay, spec = t.site.layout, t.site.spec
        if lay == "embedding":
            after_A = F.embedding(h, t.lora_A.t(), spec.padding_idx, None, 2.0, spec.scale_grad_by_freq, spec.sparse)
            return after_A @ self.scaled(t.lora_B).t()  # (..., dim)
        if lay == "conv":
            ones = (1,) * len(spec.kernel_size)
            A = t.lora_A.view(self.r, spec.in_channels, *spec.kernel_size)
            B = self.scaled(t.lora_B).view(spec.out_channels, self.r, *ones)
            return spec.conv(spec.conv(h, A, None, spec.stride, spec.padding), B)  # (N, out, ...)
        return F.linear(F.linear(h, t.lora_A), self.scaled(t.lora_B))  # (..., d_out)

    def forward(self, x, y, weight, bias, t):
        lay, spec = t.site.layout, t.site.spec
        m = t.lora_magnitude_vector.flatten() if lay == "conv" else t.lora_magnitude_vector
        g = m / self.row_norm(weight, t.lora_A, t.lora_B)  # (d_out,)
        if lay == "conv":  # over the channel dimension, batched or not: (out, 1, ...)
            ones = (1,) * len(spec.kernel_size)
            g = g.view(-1, *ones)
            bias = None if bias is None else bias.view(-1, *ones)
        if self.dropout > 0 and lay != "embedding":
            d = t.lora_dropout(x)
            if lay == "conv":
                base = spec.conv(d, weight.view(spec.out_channels, spec.in_channels, *spec.kernel_size), None,
                                 spec.stride, spec.padding)
            else:
                base = F.linear(d, weight)  # (..., d_out)
            return y + (g - 1) * base + g * self.lora(d, t)
        lora = self.lora(x, t)
        if bias is None:
            return (y + lora) * g
        return torch.addcmul(bias, y - bias + lora, g)  # b + g * (W x + s B A x)

    def fold(self, weight, bias, t):
        V = torch.addmm(weight, t.lora_B, t.lora_A, alpha=self.scale)  # (d_out, d_in)
        return (t.lora_magnitude_vector.flatten() / V.norm(dim=1)).unsqueeze(1) * V, bias
