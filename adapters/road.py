"""RoAd: 2D rotary adaptation (Liao et al. 2024, arXiv 2409.00119).

    y = R (W x + b),    R block-diagonal in 2x2 rotation-scalings of output pairs (i, j):

        y_i = c_i h_i - s_i h_j,    y_j = c_j h_j + s_j h_i,    c = alpha cos(theta), s = alpha sin(theta)

The output is cut into groups of g = group_size; inside a group, element p pairs with p + g/2
(PEFT's pairing, not adjacent elements, so the forward is two half-group views and no gather).

    road_1: road_theta, road_alpha (d_out/2,)  one (theta, alpha) per pair, shared by i and j
    road_2: road_theta, road_alpha (d_out,)    one per element
    road_4: road_theta, road_alpha (2 d_out,)  per group (2, g): slot 0 makes c, slot 1 makes s

Identity at init: theta = 0, alpha = 1, so c = 1, s = 0.
Note (as in PEFT): under road_4 the theta slot that feeds cos starts at a stationary point
(d cos/d theta = 0 at 0), so gradient training never moves it; only its alpha scales c.
Fold: W' = R W, b' = R b (the bias is rotated too); R is applied elementwise, never built dense.
Requires: only the layer's shape; group_size even and dividing d_out.
Defaults follow PEFT (``RoadConfig``: variant="road_1", group_size=64). Deviations from PEFT 0.21:
GPT-2's Conv1D is supported (PEFT raises). The paper pairs adjacent elements; PEFT and we pair
p with p + g/2, which is the same method up to a fixed permutation of the output units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgery.variant import SiteInit, Variant, register
from surgery.errors import ConfigError

_SIZES = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # tensor length per output unit


@register
@dataclass(frozen=True)
class ROAD(Variant):
    variant: str = "road_1"
    group_size: int = 64

    needs_weight = False

    def __post_init__(self):
        if self.variant not in _SIZES:
            raise ConfigError(f"ROAD: variant must be one of {sorted(_SIZES)}, got variant={self.variant!r}.")
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 2:
            raise ConfigError(
                f"ROAD: group_size must be a positive even integer (it pairs element p with p + g/2), got "
                f"group_size={g!r}. Use e.g. ROAD(group_size=64), or a smaller even divisor of d_out."
            )

    def check(self, site: SiteInit) -> None:
        if site.d_out % self.group_size:
            even = [d for d in range(2, site.d_out + 1, 2) if site.d_out % d == 0]
            fix = (f"use a group_size that divides {site.d_out}, e.g. "
                   f"ROAD(group_size={max((d for d in even if d < self.group_size), default=even[0])})"
                   if even else f"leave {site.path} out of `where` (an odd d_out has no pairs)")
            raise ConfigError(
                f"ROAD: group_size must divide the output size, but group_size={self.group_size} does not divide "
                f"d_out={site.d_out} at {site.path}; {fix}."
            )

    def init(self, site: SiteInit) -> dict[str, torch.Tensor]:
        n = int(site.d_out * _SIZES[self.variant])
        return {
            "road_theta": torch.zeros(n, dtype=site.dtype, device=site.device),  # (n,)
            "road_alpha": torch.ones(n, dtype=site.dtype, device=site.device),  # (n,)
        }

    def _coefficients(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """c and the signed s, each (d_out / g, 2, g/2): the two halves of every group."""
        g, theta, alpha = self.group_size, t.road_theta, t.road_alpha
        if self.variant == "road_4":
            theta, alpha = theta.unflatten(0, (-1, 2, g)), alpha.unflatten(0, (-1, 2, g))  # (G, 2, g)
            c = (alpha[:, 0] * theta[:, 0].cos()).unflatten(-1, (2, g // 2))  # (G, 2, g/2)
            s = (alpha[:, 1] * theta[:, 1].sin()).unflatten(-1, (2, g // 2))  # (G, 2, g/2)
        else:
            c, s = alpha * theta.cos(), alpha * theta.sin()
            halves = (-1, 1, g // 2) if self.variant == "road_1" else (-1, 2, g // 2)  # road_1: shared by i, j
            c, s = c.unflatten(0, halves), s.unflatten(0, halves)  # (G, 1 or 2, g/2)
            c, s = c.expand(-1, 2, -1), s.expand(-1, 2, -1)  # (G, 2, g/2)
        return c, torch.cat((-s[:, :1], s[:, 1:]), dim=1)  # the first half takes -s h_j

    def _rotate(self, h: torch.Tensor, t) -> torch.Tensor:
        c, s = self._coefficients(t)  # (G, 2, g/2)
        hg = h.unflatten(-1, (t.site.d_out // self.group_size, 2, self.group_size // 2))  # (..., G, 2, g/2)
        return (hg * c + hg.flip(-2) * s).flatten(-3)  # (..., d_out)

    def forward(self, x, y, weight, bias, t):
        return self._rotate(y, t)  # (..., d_out)

    def fold(self, weight, bias, t):
        w = self._rotate(weight.mT, t).mT  # (d_out, d_in)
        return w, None if bias is None else self._rotate(bias, t)
