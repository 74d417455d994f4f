"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv 2106.09685).

    y = W x + b + s * B A drop(x),    s = alpha / r   (rslora: alpha / sqrt(r), arXiv 2312.03732)

    A: lora_A (r, d_in)   kaiming-uniform, a = sqrt(5)  ->  U(-1/sqrt(d_in), 1/sqrt(d_in))
    B: lora_B (d_out, r)  zeros

Identity at init: B = 0, so the adapter adds exactly 0.
Fold: W' = W + s B A; b' = b.
Requires: only the layer's shape (works on any Linear or GPT-2 Conv1D, and on nn.Embedding and
nn.Conv1d/2d/3d, as PEFT's LoRA does).

On an nn.Embedding (d_in = num_embeddings, d_out = embedding_dim) the tensors are PEFT's
lora_embedding_A (r, num_embeddings), zeros, and lora_embedding_B (embedding_dim, r), normal: the
other way round, as PEFT has it, so that a row lookup in A^T starts at 0 while B is random.
y = E[ids] + s * A^T[ids] B^T; no dropout (PEFT applies none there either).
On a conv (d_in = in * prod(kernel)) A is a conv of the layer's kernel, stride and padding into r
channels, B a 1x1 conv out of them, stored flattened as (r, d_in) and (d_out, r):
y = conv(x, W) + b + s * conv1x1(conv(drop(x), A), B); the fold is W + s B A reshaped to the kernel.
Defaults follow PEFT (``LoraConfig``: r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False);
dropout acts on the adapter branch only, as in PEFT and the paper.

PiSSA and EVA subclass this class: same tensors, forward and fold, another init.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgery.variant import (SiteInit, Variant, kaiming_uniform, lora_scaling, register, require_bool, require_dropout,
                             require_positive_rank, require_real)


@register
@dataclass(frozen=True)
class LoRA(Variant):
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False

    needs_weight = False
    layouts = ("linear", "conv1d", "embedding", "conv")

    def __post_init__(self):
        require_positive_rank(self, self.r)
        require_real(self, "alpha", self.alpha)
        require_dropout(self, self.dropout)
        require_bool(self, "rslora", self.rslora)

    @property
    def scale(self) -> float:
        return lora_scaling(self.r, self.alpha, self.rslora)

    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        if site.layout == "embedding":
            return {
                "lora_A": torch.zeros(self.r, site.d_in, dtype=site.dtype, device=site.device),  # (r, num_embeddings)
                "lora_B": torch.randn(site.d_out, self.r, dtype=site.dtype, device=site.device),  # (dim, r)
            }
        return {
            "lora_A": kaiming_uniform((self.r, site.d_in), site.d_in, site.dtype, site.device),  # (r, d_in)
            "lora_B": torch.zeros(site.d_out, self.r, dtype=site.dtype, device=site.device),  # (d_out, r)
        }

    def modules(self) -> dict[str, nn.Module]:
        return {"lora_dropout": nn.Dropout(self.dropout)} if self.dropout > 0 else {}

    def forward(self, x, y, weight, bias, t):
        lay, spec = t.site.layout, t.site.spec
        if lay == "embedding":
            after_A = F.embedding(x, t.lora_A.t(), spec.padding_idx, None, 2.0, spec.scale_grad_by_freq, spec.sparse)
            return y + (after_A @ t.lora_B.t()) * self.scale  # (..., dim), PEFT's order of ops
        h = t.lora_dropout(x) if self.dropout > 0 else x
        if lay == "conv":
            ones = (1,) * len(spec.kernel_size)
            A = t.lora_A.view(self.r, spec.in_channels, *spec.kernel_size)
            B = t.lora_B.view(spec.out_channels, self.r, *ones)
            return y + spec.conv(spec.conv(h, A, None, spec.stride, spec.padding), B) * self.scale
        # add's alpha scales inside the add kernel: one elementwise pass fewer than y + z * s
        return torch.add(y, F.linear(F.linear(h, t.lora_A), t.lora_B), alpha=self.scale)  # (..., d_out)

    def fold(self, weight, bias, t):
        return torch.addmm(weight, t.lora_B, t.lora_A, alpha=self.scale), bias  # one pass, one new buffer
