"""A whole model as a map a person can read: its module tree, repeated blocks drawn once with a count.

``rows(diff)`` walks the module tree of the diff's after-side model (``Diff.modules``) and folds runs of
numbered siblings that look the same (same classes below them, same variants at the same places, the
same weights changed) into one row, ``layers.{0..27} x28``; each row carries the variant of a site there
and the largest relative weight change of a tensor directly under it. ``svg(diff)`` draws the rows as a
plain SVG (no Graphviz): one line each, so its height grows with the depth and the variety of the model,
not its length: ``height(n_rows)`` is the bound, and a site's row links to its section of the HTML page.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field

ROW = 20  # px per row
WIDTH = 980  # px
TOP = 44  # px above the first row (title, column heads)


@dataclass
class Row:
    depth: int
    label: str  # the path part, e.g. 'layers.{0..27}'
    cls: str
    count: int = 1  # blocks this row stands for
    variant: str | None = None
    change: float | None = None  # largest relative change of a tensor directly under this module
    anchor: str | None = None  # the path of the first site this row stands for (HTML section)


@dataclass
class _Node:
    name: str
    path: str
    cls: str
    children: dict[str, "_Node"] = field(default_factory=dict)


def _tree(modules: list[tuple[str, str]]) -> _Node:
    root = _Node("", "", next((c for p, c in modules if p == ""), "Module"))
    for path, cls in modules:
        if not path:
            continue
        node = root
        parts = path.split(".")
        for i, part in enumerate(parts):
            sub = ".".join(parts[: i + 1])
            node = node.children.setdefault(part, _Node(part, sub, cls if i == len(parts) - 1 else "Module"))
        node.cls = cls
    return root


def _facts(diff) -> tuple[dict[str, str], dict[str, float]]:
    variants = {p: g.variant for p, g in diff.groups.items() if g.variant}
    change: dict[str, float] = {}
    for w in diff.weights:
        owner = w.path.rpartition(".")[0]
        value = w.rel if w.rel == w.rel else math.inf  # a tensor on one side only counts as the largest change
        change[owner] = max(change.get(owner, 0.0), value)
    return variants, change


def _signature(node: _Node, variants: dict[str, str], change: dict[str, float]) -> tuple:
    """Equal for blocks that would draw the same rows (numbers in names aside)."""
    return (node.cls, variants.get(node.path), node.path in change,
            tuple((n if not n.isdigit() else "#", _signature(c, variants, change)) for n, c in node.children.items()))


def _runs(children: list[_Node], variants, change) -> list[tuple[list[_Node], str]]:
    """Consecutive numbered children with equal signatures, as (members, label)."""
    out: list[tuple[list[_Node], tuple | None]] = []  # (members, signature of the run; None: not numbered)
    for c in children:
        sig = _signature(c, variants, change) if c.name.isdigit() else None
        last = out[-1][0][-1] if out else None
        if sig is not None and last is not None and out[-1][1] == sig and int(last.name) + 1 == int(c.name):
            out[-1][0].append(c)
        else:
            out.append(([c], sig))
    return [(m, m[0].name if len(m) == 1 else f"{{{m[0].name}..{m[-1].name}}}") for m, _ in out]


def _from_tensors(diff) -> list[tuple[str, str]]:
    """Module paths from tensor names, for two checkpoints (no classes known)."""
    paths = {""}
    for w in diff.weights:
        parts = w.path.split(".")[:-1]
        paths.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return [(p, "") for p in sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in p.split(".")])]


def rows(diff) -> list[Row]:
    variants, change = _facts(diff)
    out: list[Row] = []

    def walk(node: _Node, depth: int, label: str, members: list[_Node]) -> None:
        sites = [m.path for m in members if m.path in variants]
        worst = max((change.get(m.path, 0.0) for m in members), default=0.0)
        out.append(Row(depth, label, node.cls, len(members), variants.get(node.path),
                       worst if any(m.path in change for m in members) else None, sites[0] if sites else None))
        for group, sub_label in _runs(list(node.children.values()), variants, change):
            walk(group[0], depth + 1, sub_label, group)

    root = _tree(diff.modules or _from_tensors(diff))
    walk(root, 0, "(model)", [root])
    return out


def height(n_rows: int) -> int:
    return TOP + ROW * n_rows + 12


def _bar(change: float) -> int:
    """Width in px of a relative weight change, on a log scale: 1e-6 or less -> 2, 1 or more (or a tensor on
    one side only) -> 110."""
    if change <= 0:
        return 0
    if math.isinf(change):
        return 110
    return int(round(2 + 108 * min(1.0, max(0.0, (math.log10(change) + 6) / 6))))


def svg(diff, *, title: str | None = None) -> str:
    """The map as standalone SVG text."""
    rs = rows(diff)
    h = height(len(rs))
    esc = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" '
           'font-family="DejaVu Sans Mono, monospace" font-size="12">',
           f'<rect width="{WIDTH}" height="{h}" fill="white"/>',
           f'<text x="10" y="20" font-family="DejaVu Sans, sans-serif" font-size="13" font-weight="bold">'
           f'{esc(title or "model map")}</text>',
           '<text x="10" y="36" fill="#616161">module</text><text x="600" y="36" fill="#616161">variant</text>'
           '<text x="720" y="36" fill="#616161">largest weight change</text>']
    for i, r in enumerate(rs):
        y = TOP + ROW * i
        if r.variant:
            out.append(f'<rect x="0" y="{y}" width="{WIDTH}" height="{ROW}" fill="#e8f5e9"/>')
        x = 10 + 18 * r.depth
        name = esc(r.label) + (f' <tspan fill="#1565c0">x{r.count}</tspan>' if r.count > 1 else "")
        line = f'<text x="{x}" y="{y + 14}">{name} <tspan fill="#757575">{esc(r.cls)}</tspan></text>'
        if r.anchor:
            line = f'<a href="#{esc(anchor(r.anchor))}">{line}</a>'
        out.append(line)
        if r.variant:
            out.append(f'<text x="600" y="{y + 14}" fill="#2e7d32">{esc(r.variant)}</text>')
        if r.change is not None:
            w = _bar(r.change)
            shown = "new tensors" if math.isinf(r.change) else f"{r.change:.2g}"
            out.append(f'<rect x="720" y="{y + 5}" width="{w}" height="10" fill="#ef6c00"/>'
                       f'<text x="{726 + w}" y="{y + 14}" fill="#bf360c">{shown}</text>')
    out.append("</svg>")
    return "\n".join(out)


def anchor(path: str) -> str:
    """The id of a site's section of the HTML page (``render.to_html``), which map rows link to."""
    return "site-" + re.sub(r"[^0-9A-Za-z_.-]", "_", path)
