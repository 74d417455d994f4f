"""Draw what DoRA changes in a small Llama: text, SVG and HTML diffs, and a PNG for the README.

    python examples/diff_dora.py [OUT_DIR]      # default ./out

Builds a 2-layer Llama from a config (no download), splices DoRA(r=8) into every k_proj, and writes
OUT_DIR/diff.txt, map.svg (the whole model, layers drawn once with a count), diff.svg, diff.html and
diff.png (the last through Graphviz's `dot -Tpng`).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
from adapters import DoRA


def main(out: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    before = copy.deepcopy(model)  # diff compares two models, so keep the untouched one

    surgery.rewrite(model, DoRA(r=8), where="*.k_proj")
    print(surgery.summary(model))

    d = surgery.diff(before, model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diff.txt").write_text(str(d) + "\n", encoding="utf-8")
    d.map_svg(out / "map.svg")  # plain SVG: needs no Graphviz
    print(d)
    if shutil.which("dot") is None:
        print("Graphviz's `dot` is not installed (apt-get install graphviz): wrote the text diff only.")
        return
    svg = d.to_svg(out / "diff.svg")
    d.to_html(out / "diff.html")
    png = subprocess.run(["dot", "-Tpng", "-Gdpi=80"], input=svg_source(d), capture_output=True, check=True).stdout
    (out / "diff.png").write_bytes(png)
    print(f"wrote {out}/diff.txt, map.svg, diff.svg ({len(svg) // 1024} KB), diff.html, diff.png; "
          f"open {out / 'diff.html'} in a browser")


def svg_source(d) -> bytes:
    """The diff's Graphviz source, so `dot` can draw it in other formats too."""
    from surgery.render import to_dot

    return to_dot(d).to_string().encode("utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out"))
