"""Looking at a model before and after surgery: plan(), sites(), summary()."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from . import quant
from .ops import matches
from .scope import scope_of
from .site import SiteAPI
from .splice import DEFAULT
from .where import Matches, Where


@dataclass
class Plan:
    """What `where` would select, without changing anything (``surgery.plan(model, where)``)."""

    matches: Matches

    @property
    def paths(self) -> list[str]:
        return self.matches.paths

    def count(self) -> int:
        return len(self.paths)

    def assert_count(self, n: int) -> "Plan":
        if self.count() != n:
            raise AssertionError(f"`where` selects {self.count()} modules, expected {n}:\n{self}")
        return self

    def per_layer(self) -> dict[str, int]:
        """Matched modules per layer (the first numbered component of each path)."""
        counts: Counter[str] = Counter()
        for p in self.paths:
            m = re.search(r"^(.*?\.\d+)(?:\.|$)", p)
            counts[m.group(1) if m else "(no layer)"] += 1
        return dict(counts)

    def __str__(self) -> str:
        lines = []
        for pat, hits in self.matches.hits.items():
            skipped = self.matches.skipped.get(pat, [])
            extra = f", skips {len(skipped)} non-adaptable" if skipped else ""
            lines.append(f"{pat!s}: {len(hits)} module{'s' * (len(hits) != 1)}{extra}")
            lines += [f"  {p}" for p in hits]
        lines.append("per layer: " + ", ".join(f"{k}: {v}" for k, v in self.per_layer().items()))
        lines.append(f"total: {self.count()}")
        return "\n".join(lines)

    __repr__ = __str__


def plan(model: nn.Module, where: Where) -> Plan:
    """Dry run: which adaptable paths each pattern hits (patterns that hit nothing show 0)."""
    return Plan(matches(scope_of(model), where, strict=False))


def sites(model: nn.Module) -> dict[str, SiteAPI]:
    """Every site of the model by module path, in model order (module scope: ``Site`` modules;
    graph scope: ``GraphSite`` views); both have the same interface (``surgery/site.py``)."""
    return scope_of(model).sites()


def summary(model: nn.Module) -> str:
    """A table of sites: path, variant, in/out, trainable parameters, dtype; totals and % of the model. With
    named adapters, a row per adapter and site, with its name (and "off" when it does not run)."""
    rows = []
    found = sites(model)
    named = any(s.names != [DEFAULT] for s in found.values())
    for path, s in found.items():
        for n in s.names:
            a = s.adapter(n)
            dt = sorted({str(t.dtype).removeprefix("torch.") for t in a.adapter_tensors().values()})
            who = (f"{n}{'' if n in s.active else ' (off)'}",) if named else ()
            rows.append((path, *who, a.variant.short(), str(s.d_in), str(s.d_out), f"{a.trainable_count():,}",
                         ",".join(dt)))
    head = ("path", *(("adapter",) if named else ()), "variant", "in", "out", "trainable", "dtype")
    if not rows:
        return "no sites: the model has not been rewritten"
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    right = {i + named for i in (2, 3, 4)}
    fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(quant.numel(p) for p in model.parameters())
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    lines.append(f"{len(found)} sites; trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")
    return "\n".join(lines)
