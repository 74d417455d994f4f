"""Drawing a ``Diff``: SVG through Graphviz (pydot + the ``dot`` program) and one standalone HTML page.

Kept apart from ``surgery/compare.py`` so that computing a diff never needs Graphviz. Sites whose
changes have the same shape (every layer's k_proj) are drawn once, labelled with how many share
it; unchanged nodes more than ``context`` edges from any change are cut, and a dashed stub marks
each cut, so a 28-layer model's diff stays a handful of small clusters.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

from .compare import ADDED, CHANGED, REMOVED, Diff, Group, context, node_line, unified
from .errors import RenderError
from .modelmap import anchor
from .modelmap import svg as map_svg
from .weights import HEAD

# fill, border: green added, red removed, amber changed, grey context
COLOURS = {ADDED: ("#d4f5d0", "#2e7d32"), REMOVED: ("#fbd3d3", "#c62828"), CHANGED: ("#ffe4a8", "#d08700"),
           "same": ("#ffffff", "#9e9e9e")}
_MAX_LABEL = 64


def _require_dot():
    try:
        import pydot
    except ImportError:
        raise RenderError(
            "drawing a diff as SVG needs the pydot package, which is not installed. Install it with "
            "`pip install pydot` (or `pip install model-surgery[draw]`); str(diff) needs nothing."
        ) from None
    if shutil.which("dot") is None:
        raise RenderError(
            "drawing a diff as SVG needs Graphviz's `dot` program, which is not on PATH. Install Graphviz "
            "(Debian/Ubuntu: `apt-get install graphviz`, macOS: `brew install graphviz`, conda: "
            "`conda install graphviz`); str(diff) needs nothing."
        )
    return pydot


def _q(text: str) -> str:
    """A Graphviz double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _short(line: str) -> str:
    return line if len(line) <= _MAX_LABEL else line[: _MAX_LABEL - 3] + "..."


def compress(paths: list[str]) -> str:
    """``a.0.k, a.1.k, a.2.k`` -> ``a.{0..2}.k``; paths that differ otherwise are counted."""
    if len(paths) == 1:
        return paths[0]
    parts = [re.split(r"(\d+)", p) for p in paths]
    if len({len(p) for p in parts}) == 1:
        diffs = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(diffs) == 1 and diffs[0] % 2 == 1:  # exactly one number varies
            i = diffs[0]
            nums = sorted(int(p[i]) for p in parts)
            span = f"{nums[0]}..{nums[-1]}" if nums == list(range(nums[0], nums[-1] + 1)) else ",".join(map(str, nums))
            return "".join(parts[0][:i]) + "{" + span + "}" + "".join(parts[0][i + 1:])
    return f"{paths[0]} and {len(paths) - 1} more"


def _cluster(pydot, graph, index: int, g: Group, same: list[Group], hops: int) -> None:
    kinds = {c.name: c.kind for c in g.changes}
    shown = context(g.before_graph, g.after_graph, set(kinds), hops)
    changes = {c.name: c for c in g.changes}
    title = compress([g.path] + [s.path for s in same])
    sub = [f"{len(same) + 1} sites with the same changes"] if same else []
    if g.class_change:
        sub.append(f"{g.before_class or '(none)'} -> {g.after_class or '(none)'}")
    if g.variant:
        sub.append(g.variant)
    cluster = pydot.Cluster(f"c{index}", label=_q("\n".join([title, *sub])), style="rounded", color="#607d8b",
                            fontname="DejaVu Sans Mono", fontsize="11")
    graph.add_subgraph(cluster)
    if g.after_graph is None and g.before_graph is None:  # a class change with nothing to compare
        return
    nodes = {}
    for side, gr in (("after", g.after_graph), ("before", g.before_graph)):
        for n in gr.nodes:
            if n.name in shown and n.name not in nodes and (side == "after" or kinds.get(n.name) == REMOVED):
                nodes[n.name] = n
    ident = lambda name: f"n{index}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"
    stubs = 0
    for name, n in nodes.items():
        kind = kinds.get(name, "same")
        fill, border = COLOURS[kind]
        label = _short(node_line(n))
        if kind == CHANGED:
            label = _short(changes[name].after) + "\nwas: " + _short(changes[name].before)
        cluster.add_node(pydot.Node(ident(name), label=_q(label), shape="box", style='"rounded,filled"',
                                    fillcolor=fill, color=border, penwidth="1.6" if kind != "same" else "1",
                                    fontname="DejaVu Sans Mono", fontsize="10"))
        hidden = [m for m in n.all_input_nodes if m.name not in nodes]
        for m in n.all_input_nodes:
            if m.name in nodes:
                edge_kind = kind if kind != "same" else kinds.get(m.name, "same")
                colour = COLOURS[edge_kind][1] if edge_kind in (ADDED, REMOVED) else "#616161"
                graph.add_edge(pydot.Edge(ident(m.name), ident(name), color=colour,
                                          style="dashed" if edge_kind == REMOVED else "solid"))
        if hidden:  # context cut here: say how much, without drawing it
            stubs += 1
            stub = f"s{index}_{stubs}"
            cluster.add_node(pydot.Node(stub, label=_q(f"... {len(hidden)} input{'s' * (len(hidden) > 1)}"),
                                        shape="plaintext", fontname="DejaVu Sans Mono", fontsize="9",
                                        fontcolor="#757575"))
            graph.add_edge(pydot.Edge(stub, ident(name), style="dashed", color="#bdbdbd"))


def _legend(pydot, graph) -> None:
    legend = pydot.Cluster("legend", label='"legend"', style="rounded", color="#cfd8dc",
                           fontname="DejaVu Sans", fontsize="10")
    for kind in (ADDED, REMOVED, CHANGED, "same"):
        fill, border = COLOURS[kind]
        legend.add_node(pydot.Node(f"legend_{kind}", label=_q(kind if kind != "same" else "unchanged"), shape="box",
                                   style='"rounded,filled"', fillcolor=fill, color=border,
                                   fontname="DejaVu Sans", fontsize="9"))
    graph.add_subgraph(legend)


WEIGHT_ROWS = 40  # rows of the weight table drawn in a picture (the text and the page list every one)


def _weights(pydot, graph, rows) -> None:
    """The weight changes as a table node (Graphviz HTML-like label)."""
    cell = '<TD ALIGN="LEFT">{}</TD>'
    lines = ["<TR>" + "".join(cell.format(f"<B>{html.escape(h)}</B>") for h in HEAD) + "</TR>"]
    lines += ["<TR>" + "".join(cell.format(html.escape(c)) for c in w.row()) + "</TR>" for w in rows[:WEIGHT_ROWS]]
    if len(rows) > WEIGHT_ROWS:
        lines.append(f'<TR><TD COLSPAN="{len(HEAD)}" ALIGN="LEFT">... {len(rows) - WEIGHT_ROWS} more</TD></TR>')
    table = f'<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3">{"".join(lines)}</TABLE>'
    cluster = pydot.Cluster("weights", label='"weights"', style="rounded", color="#cfd8dc",
                            fontname="DejaVu Sans", fontsize="10")
    cluster.add_node(pydot.Node("weights_table", label=f"<{table}>", shape="plaintext",
                                fontname="DejaVu Sans Mono", fontsize="9"))
    graph.add_subgraph(cluster)


def to_dot(diff: Diff, context: int = 2):
    """The pydot graph of a diff (one cluster per distinct kind of change)."""
    pydot = _require_dot()
    graph = pydot.Dot("surgery_diff", graph_type="digraph", rankdir="TB", compound="true", nodesep="0.25",
                      ranksep="0.3", fontname="DejaVu Sans", bgcolor="white",
                      label=_q(str(diff).splitlines()[0]), labelloc="t", fontsize="12")
    _legend(pydot, graph)
    for i, (g, same) in enumerate(diff.folded()):
        _cluster(pydot, graph, i, g, same, context)
    if diff.weights:
        _weights(pydot, graph, diff.weights)
    return graph


def to_svg(diff: Diff, path=None, *, context: int = 2) -> str:
    """Draw ``diff``; write it to ``path`` if given; return the SVG text."""
    svg = to_dot(diff, context).create_svg().decode("utf-8")
    if path is not None:
        Path(path).write_text(svg, encoding="utf-8")
    return svg


_CSS = """
body { font: 14px/1.4 'DejaVu Sans', sans-serif; margin: 24px; color: #212121; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; font-family: 'DejaVu Sans Mono', monospace; }
.picture svg { max-width: 100%; height: auto; border: 1px solid #eceff1; }
table { border-collapse: collapse; margin: 8px 0; }
table.sites td, table.sites th { border: 1px solid #cfd8dc; padding: 3px 8px; text-align: left; }
table.sites td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.code { width: 100%; table-layout: fixed; font: 12px/1.35 'DejaVu Sans Mono', monospace; }
table.code td { vertical-align: top; padding: 0 6px; white-space: pre-wrap; word-break: break-all; }
table.code th { text-align: left; background: #eceff1; padding: 3px 6px; }
tr.replace td.l, tr.delete td.l { background: #fbd3d3; } tr.replace td.r, tr.insert td.r { background: #d4f5d0; }
tr.skip td { color: #9e9e9e; text-align: center; }
.same { color: #616161; }
"""


def _code_rows(g: Group, full: bool) -> str:
    rows = unified(g.before_code, g.after_code, n=10**6 if full else 3)
    if not rows:
        rows = [("equal", line, line) for line in g.after_code.splitlines()]
    out = []
    for tag, left, right in rows:
        out.append(f'<tr class="{tag}"><td class="l">{html.escape(left)}</td><td class="r">{html.escape(right)}</td></tr>')
    return "\n".join(out)


def to_html(diff: Diff, path=None, *, context: int = 2) -> str:
    """A standalone page (no network, no external files); write it to ``path`` if given; return it."""
    try:
        svg = to_svg(diff, context=context)
        svg = svg[svg.index("<svg"):]  # inline SVG needs no XML prolog or doctype
        picture = f'<div class="picture">{svg}</div>'
    except RenderError as e:
        picture = f'<p class="picture">(no picture: {html.escape(str(e))})</p>'
    head = str(diff).splitlines()[0]
    whole = f'<h2>model map</h2>\n<div class="map">{map_svg(diff, title=head)}</div>'
    rows = []
    for g in diff.groups.values():
        cls = f"{g.before_class or '(none)'} &rarr; {g.after_class or '(none)'}" if g.class_change else html.escape(g.after_class or "")
        rows.append(
            f'<tr><td><a href="#{anchor(g.path)}">{html.escape(g.path)}</a></td><td>{cls}</td>'
            f"<td>{html.escape(g.variant or '')}</td><td class=\"n\">+{g.count(ADDED)}</td>"
            f'<td class="n">-{g.count(REMOVED)}</td><td class="n">~{g.count(CHANGED)}</td></tr>'
        )
    weights = ""
    if diff.weights:
        head_cells = "".join(f"<th>{html.escape(h)}</th>" for h in HEAD)
        body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in w.row()) + "</tr>" for w in diff.weights)
        weights = f'<h2>weights</h2>\n<table class="sites weights"><tr>{head_cells}</tr>\n{body}\n</table>'
    sections = []
    for g, same in diff.folded():
        anchors = "".join(f'<a id="{anchor(s.path)}"></a>' for s in same)
        also = (f'<p class="same">The same changes at {len(same)} more site{"s" * (len(same) > 1)}: '
                f'{html.escape(", ".join(s.path for s in same))}</p>') if same else ""
        if not (g.before_code or g.after_code):
            body = "<p class=\"same\">(no code to compare)</p>"
        else:
            body = (f'<table class="code"><tr><th>before</th><th>after</th></tr>'
                    f"{_code_rows(g, diff.scope == 'module')}</table>")
        sections.append(f'<section class="site"><h2 id="{anchor(g.path)}">{html.escape(g.path)}</h2>{anchors}{also}{body}</section>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>surgery diff</title><style>{_CSS}</style></head>
<body>
<h1>surgery diff</h1>
<p>{html.escape(head)}</p>
{whole}
<h2>nodes</h2>
{picture}
<h2>sites</h2>
<table class="sites"><tr><th>path</th><th>class</th><th>variant</th><th>added</th><th>removed</th><th>changed</th></tr>
{chr(10).join(rows)}
</table>
{weights}
{chr(10).join(sections)}
</body></html>
"""
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
