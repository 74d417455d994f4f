"""surgery.diff: what it finds (module and graph scope), its text, SVG and HTML forms."""

from __future__ import annotations

import copy
import shutil
import struct
import subprocess
import zlib

import pytest
import torch
import torch.fx as fx
from torch import nn

import surgery
from adapters import LoRA
from models import LLAMA
from surgery.errors import DiffInputError, RenderError

K0, K1 = "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"


@pytest.fixture(scope="module")
def pair():
    before = LLAMA.model()
    after = copy.deepcopy(before)
    surgery.rewrite(after, LoRA(r=4), "*.k_proj")
    return before, after


def spliced(site) -> set[str]:
    return {n.name for n in site.graph.nodes if "surgery" in n.meta}


def test_module_scope_finds_exactly_the_spliced_nodes(pair):
    before, after = pair
    d = surgery.diff(before, after)
    sites = surgery.sites(after)
    assert d.sites == [K0, K1]
    assert d.classes == {K0: ("Linear", "Site"), K1: ("Linear", "Site")}
    for path, site in sites.items():
        assert {c.name for c in d.added if c.group == path} == spliced(site)
    assert d.removed == []
    # the only changed node per site is the output, which now returns the adapter's sum
    assert [(c.group, c.op, c.reason) for c in d.changed] == [(K0, "output", "arguments"), (K1, "output", "arguments")]
    assert d.changed[0].before == "return linear" and d.changed[0].after != d.changed[0].before


def test_text_groups_by_site_and_folds_identical_sites(pair):
    text = str(surgery.diff(*pair))
    assert text.splitlines()[0].startswith("surgery diff (module scope): 2 sites, +")
    assert f"@@ {K0}  Linear -> Site  LoRA(r=4)" in text
    assert "+ lora_a = self.lora_A" in text and "- return linear" in text
    assert f"@@ {K1}" in text and f"same changes as {K0}" in text
    assert text.count("+ lora_a = self.lora_A") == 1  # layer 1 is folded, not repeated


def test_no_changes_is_empty_and_says_so(pair):
    _, after = pair
    d = surgery.diff(after, copy.deepcopy(after))
    assert not d and d.added == d.removed == d.changed == []
    assert "no changes" in str(d)


def test_weight_changes_are_changed_nodes(pair):
    before, after = pair
    after = copy.deepcopy(after)
    with torch.no_grad():
        surgery.sites(after)[K1].weight.add_(1.0)
    d = surgery.diff(before, after)
    weights = [c for c in d.changed if c.reason == "weights"]
    assert [(c.group, c.name) for c in weights] == [(K1, "weight")]


def test_merge_direction_removes_the_adapter(pair):
    _, after = pair
    rewritten = copy.deepcopy(after)
    with torch.no_grad():
        for s in surgery.sites(rewritten).values():
            s.lora_B.normal_()
    merged = surgery.merge(copy.deepcopy(rewritten))
    d = surgery.diff(rewritten, merged)
    assert d.classes == {K0: ("Site", "Linear"), K1: ("Site", "Linear")}
    assert {c.name for c in d.removed if c.group == K0} == spliced(surgery.sites(rewritten)[K0])
    assert d.added == []
    assert {(c.group, c.name, c.reason) for c in d.changed} >= {(K0, "weight", "weights"), (K1, "weight", "weights")}


def mlp(depth: int = 1) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    return nn.Sequential(*layers)


def splice_scale(gm: fx.GraphModule, target: str, site: str) -> fx.GraphModule:
    """Hand-made graph-scope surgery: y -> y * 2 after call_module ``target``, and drop the last relu."""
    g = gm.graph
    y = next(n for n in g.nodes if n.op == "call_module" and n.target == target)
    with g.inserting_after(y):
        new = g.call_function(torch.mul, (y, 2.0))
    new.meta["surgery"] = {"site": site, "variant": "Scale()"}
    y.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    gm.recompile()
    return gm


def test_graph_scope_provenance_and_structure():
    before = fx.symbolic_trace(mlp(3))
    after = splice_scale(copy.deepcopy(before), "2", "2")
    last = [n for n in after.graph.nodes if n.op == "call_module"][-1]  # the final relu
    out = next(n for n in after.graph.nodes if n.op == "output")
    out.args = (last.args[0],)
    after.graph.erase_node(last)
    after.recompile()
    d = surgery.diff(before, after)
    assert d.scope == "graph"
    assert [(c.group, c.name) for c in d.added] == [("2", "mul")]
    assert [c.name for c in d.removed] == [last.name]
    changed = {c.name: c for c in d.changed}
    assert changed["_3"].group == "2"  # the consumer of the site's output is shown with the site
    assert changed["_3"].before == "_3 = self.3(_2)" and changed["_3"].after == "_3 = self.3(mul)"
    assert "output" in changed


def test_graph_scope_svg_keeps_only_context_around_the_change():
    before = fx.symbolic_trace(mlp(15))  # 30 modules in a chain
    after = splice_scale(copy.deepcopy(before), "14", "14")
    d = surgery.diff(before, after)
    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed (apt-get install graphviz)")
    svg = d.to_svg(context=2)
    assert "self.14(_13)" in svg and "mul = mul(_14, 2)" in svg and "self.16(_15)" in svg
    assert "self.12(" not in svg and "self.0(" not in svg  # far from the change: cut
    assert "... 1 input" in svg  # and the cut is marked
    wider = d.to_svg(context=4)
    assert "self.12(_11)" in wider


def test_graph_scope_with_surgery_trace():
    if not hasattr(surgery, "trace"):
        pytest.skip("surgery.trace (graph scope) is not in this version")
    model = mlp(2)
    gm = surgery.trace(model, torch.randn(2, 8))
    before = copy.deepcopy(gm)
    surgery.rewrite(gm, LoRA(r=2), "2")
    d = surgery.diff(before, gm)
    assert d.sites == ["2"] and d.groups["2"].variant == "LoRA(r=2)"
    assert {c.name for c in d.added} == {n.name for n in gm.graph.nodes if "surgery" in n.meta}
    assert any(c.after and "lora_A" in c.after for c in d.added)


def test_mixed_inputs_are_refused(pair):
    before, _ = pair
    with pytest.raises(DiffInputError, match="compare like with like"):
        surgery.diff(fx.symbolic_trace(mlp()), before)
    with pytest.raises(DiffInputError, match="got str"):
        surgery.diff(before, "model")


def test_28_layers_draw_as_one_cluster():
    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed (apt-get install graphviz)")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    before = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=28,
                                          num_attention_heads=2, num_key_value_heads=1))
    after = copy.deepcopy(before)
    surgery.rewrite(after, LoRA(r=2), "*.k_proj")
    d = surgery.diff(before, after)
    assert len(d.sites) == 28 and len(d.folded()) == 1
    svg = d.to_svg()
    assert svg.count("lora_a = self.lora_A") == 1
    assert "model.layers.{0..27}.self_attn.k_proj" in svg and "28 sites with the same changes" in svg
    assert str(d).count("same changes as") == 27


def test_svg_colours_and_file(pair, tmp_path):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed (apt-get install graphviz)")
    from surgery.render import COLOURS

    d = surgery.diff(*pair)
    out = tmp_path / "d.svg"
    svg = d.to_svg(out)
    assert out.read_text() == svg and "<svg" in svg
    assert COLOURS["added"][0] in svg and COLOURS["changed"][0] in svg


def test_svg_without_dot_says_what_to_install(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no `dot` anywhere
    d = surgery.diff(*pair)
    with pytest.raises(RenderError, match="apt-get install graphviz"):
        d.to_svg(tmp_path / "d.svg")
    assert not (tmp_path / "d.svg").exists()
    page = d.to_html()  # the page still works, with the reason in place of the picture
    assert "no picture" in page and K0 in page


def png_pixels_vary(data: bytes) -> bool:
    """True if a PNG has more than a handful of distinct byte values in its (filtered) pixel data."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    return len(set(zlib.decompress(idat))) > 32


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_renders_in_a_browser(pair, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); cannot check the page renders")
    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed (apt-get install graphviz)")
    page = tmp_path / "diff.html"
    text = surgery.diff(*pair).to_html(page)
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # standalone
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.is_file() and png_pixels_vary(shot.read_bytes())
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert "<svg" in dom and K0 in dom and K1 in dom
    assert "lora_a = self.lora_A" in dom  # the code, side by side
    # the model map: layers drawn once with a count, each site row a link to its section on the same page
    assert 'class="map"' in dom and "{0..1}" in dom and f'href="#site-{K0}"' in dom and f'id="site-{K0}"' in dom
    assert 'class="sites weights"' in dom and f"{K0}.lora_A" in dom  # the weight table (the adapter's new tensors)


def test_hand_written_expected_diff_node_by_node():
    """A one-layer case whose diff is written out by hand, in the style of fx's rewriter tests."""
    before = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False))
    after = copy.deepcopy(before)
    surgery.rewrite(after, LoRA(r=2, alpha=8), "0")
    after[0].graph.lint()
    d = surgery.diff(before, after)
    expected_added = [  # (name, op, line): LoRA's branch, scale 8 / 2 = 4 folded into the add
        ("lora_a", "get_attr", "+ lora_a = self.lora_A"),
        ("linear_1", "call_function", "+ linear_1 = linear(input_1, lora_a)"),
        ("lora_b", "get_attr", "+ lora_b = self.lora_B"),
        ("linear_2", "call_function", "+ linear_2 = linear(linear_1, lora_b)"),
        ("add", "call_function", "+ add = add(linear, linear_2, alpha=4)"),
    ]
    assert [(c.name, c.op, str(c)) for c in d.added] == expected_added
    assert all(c.group == "0" for c in d.added)
    assert d.removed == []
    assert [(c.name, c.op, c.before, c.after, c.reason) for c in d.changed] == [
        ("output", "output", "return linear", "return add", "arguments")
    ]
    assert d.classes == {"0": ("Linear", "Site")}


# ----- the model map -----


def llama28():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=28,
                                        num_attention_heads=2, num_key_value_heads=1))


def svg_size(svg: str) -> tuple[int, int]:
    import re

    head = svg[: svg.index(">")]
    return int(re.search(r'width="(\d+)"', head).group(1)), int(re.search(r'height="(\d+)"', head).group(1))


@pytest.mark.parametrize("scope", ["module", "graph"])
def test_a_28_layer_map_draws_each_block_once_within_its_bound(scope):
    from surgery.modelmap import WIDTH, height, rows

    before = llama28()
    ids = torch.randint(0, 32, (2, 5))
    if scope == "graph":
        before = surgery.trace(before, input_ids=ids)
    after = copy.deepcopy(before)
    surgery.rewrite(after, LoRA(r=2), "*.{q_proj,v_proj}")
    with torch.no_grad():
        for s in surgery.sites(after).values():
            s.lora_B.normal_()
    merged = surgery.merge(copy.deepcopy(after))
    for d in (surgery.diff(before, after), surgery.diff(before, merged)):
        rs = rows(d)
        by_label = {r.label: r for r in rs}
        assert by_label["{0..27}"].count == 28 and by_label["{0..27}"].cls == "LlamaDecoderLayer"
        assert [r.label for r in rs if r.label.isdigit()] == [], "no layer drawn on its own"
        marked = {r.label for r in rs if r.change is not None}
        assert marked == {"q_proj", "v_proj"}, marked
        assert len(rs) == 20  # the model's distinct modules, whatever its length
        w, h = svg_size(d.map_svg())
        assert (w, h) == (WIDTH, height(len(rs))) and h <= 600
    sites = {r.label: r for r in rows(surgery.diff(before, after)) if r.variant}
    assert set(sites) == {"q_proj", "v_proj"} and sites["q_proj"].variant == "LoRA(r=2)"
    assert sites["q_proj"].anchor == "model.layers.0.self_attn.q_proj"
    merged_rows = rows(surgery.diff(before, merged))
    assert not any(r.variant for r in merged_rows), "merged: no sites left, only weight changes"
    assert all(0 < r.change < float("inf") for r in merged_rows if r.change is not None)


def test_a_layer_that_differs_gets_its_own_row():
    from surgery.modelmap import rows

    before = llama28()
    after = copy.deepcopy(before)
    surgery.rewrite(after, LoRA(r=2), "model.layers.3.self_attn.k_proj")
    labels = [r.label for r in rows(surgery.diff(before, after))]
    assert labels.count("{0..2}") == 1 and labels.count("3") == 1 and labels.count("{4..27}") == 1


def test_map_of_two_checkpoints_from_tensor_names(tmp_path):
    from surgery.modelmap import rows
    from surgery.weights import changes

    a = {"model.layers.0.q.weight": torch.ones(2, 2), "model.layers.1.q.weight": torch.ones(2, 2)}
    b = {"model.layers.0.q.weight": torch.ones(2, 2) * 2, "model.layers.1.q.weight": torch.ones(2, 2) * 2}
    d = surgery.Diff("checkpoint", {}, changes({k: (lambda v=v: v) for k, v in a.items()},
                                               {k: (lambda v=v: v) for k, v in b.items()}))
    labels = [(r.depth, r.label, r.count) for r in rows(d)]
    assert labels == [(0, "(model)", 1), (1, "model", 1), (2, "layers", 1), (3, "{0..1}", 2), (4, "q", 1)]
