"""The diff sees weights: every tensor whose values differ, by how much, and the rank of the change, in both
scopes and between two checkpoint directories (`surgery diff A B`)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from adapters import LoRA, PiSSA
from models import LLAMA, SCOPES, in_scope
from surgery.cli import main

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def toy(scope):
    torch.manual_seed(0)
    return in_scope(scope, nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).eval(), X)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_merged_lora_shows_its_rank_at_each_merged_weight(scope):
    model = toy(scope)
    before = copy.deepcopy(model)
    surgery.rewrite(model, LoRA(r=2), "*")
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_()
    live = surgery.diff(before, model).weights
    assert {(w.path, w.kind) for w in live} == {(f"{p}.{t}", "only after") for p in ("0", "2") for t in ("lora_A", "lora_B")}
    surgery.merge(model)
    d = surgery.diff(before, model)
    assert [(w.path, w.kind, w.shape, w.rank) for w in d.weights] == [
        ("0.weight", "changed", (8, 8), 2), ("2.weight", "changed", (6, 8), 2)]
    assert all(w.rel > 0 and w.max_abs > 0 for w in d.weights)
    assert d and "@@ weights: 2 tensors differ" in str(d) and "0.weight" in d.to_html()


@pytest.mark.parametrize("scope", SCOPES)
def test_pissa_shows_the_residual_it_writes_into_the_base(scope):
    model = toy(scope)
    before = copy.deepcopy(model)
    surgery.rewrite(model, PiSSA(r=2), "0")
    (w,) = [w for w in surgery.diff(before, model).weights if w.kind == "changed"]
    assert w.path == "0.weight" and w.rank == 2  # W_res = W - (its top-2 SVD part)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_training_step_and_a_load_show_what_they_moved(scope, tmp_path):
    model = toy(scope)
    surgery.rewrite(model, LoRA(r=2), "*")
    snap = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X).pow(2).mean().backward()
    opt.step()
    moved = surgery.diff(snap, model).weights
    # the first step moves B only: A's gradient is B^T (...), zero while B = 0
    assert [(w.path, w.kind, w.rank) for w in moved] == [("0.lora_B", "changed", 2), ("2.lora_B", "changed", 2)]
    surgery.save(model, tmp_path / "a.safetensors")
    fresh = toy(scope)
    base = copy.deepcopy(fresh)
    surgery.load(fresh, tmp_path / "a.safetensors")
    loaded = surgery.diff(base, fresh).weights
    assert {(w.path, w.kind) for w in loaded} == {(f"{p}.{t}", "only after") for p in ("0", "2") for t in ("lora_A", "lora_B")}
    assert not surgery.diff(model, fresh).weights, "the loaded adapter is the trained one, bit for bit"


def test_hand_written_weight_table():
    before = nn.Sequential(nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        before[0].weight.fill_(1.0)
    after = copy.deepcopy(before)
    with torch.no_grad():
        after[0].weight[0, :2] += torch.tensor([1.0, 2.0])  # a rank-1 change, |change|_F = sqrt(5), |W|_F = sqrt(12)
    lines = str(surgery.diff(before, after)).splitlines()
    assert lines[-3:] == [
        "@@ weights: 1 tensor differ",
        "tensor    change   shape  rel. change  max |change|  rank",
        "0.weight  changed  3x4    0.645        2             1",
    ]


def test_the_cli_compares_two_checkpoints_tensor_by_tensor(tmp_path, capsys):
    model = LLAMA.model()
    model.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "same")
    surgery.rewrite(model, LoRA(r=2), "*.q_proj")
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_()
    surgery.merge(model)
    model.save_pretrained(tmp_path / "merged")
    assert main(["diff", str(tmp_path / "base"), str(tmp_path / "same")]) == 0
    assert "0 tensors differ" in capsys.readouterr().out
    assert main(["diff", str(tmp_path / "base"), str(tmp_path / "merged")]) == 1
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("model.layers.")]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        (f"model.layers.{i}.self_attn.q_proj.weight", "changed", "2") for i in range(2)]
    extra = tmp_path / "extra"
    extra.mkdir()
    tensors = load_file(str(tmp_path / "base" / "model.safetensors"))
    save_file({**tensors, "spare.weight": torch.zeros(2, 2)}, str(extra / "model.safetensors"))
    assert main(["diff", str(tmp_path / "base"), str(extra), "-o", str(tmp_path / "d.html")]) == 1
    assert "spare.weight" in (tmp_path / "d.html").read_text() and "only after" in (tmp_path / "d.html").read_text()
    assert main(["diff", str(tmp_path / "base"), str(tmp_path / "nothing")]) == 2
    assert "no .safetensors files" in capsys.readouterr().err


def test_the_picture_shows_the_weight_table(tmp_path):
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed (apt-get install graphviz)")
    before = nn.Sequential(nn.Linear(4, 3))
    after = copy.deepcopy(before)
    with torch.no_grad():
        after[0].weight.add_(1.0)
    svg = surgery.diff(before, after).to_svg(tmp_path / "d.svg")
    assert "0.weight" in svg and "rel. change" in svg and "0.bias" not in svg
