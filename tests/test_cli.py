"""The `surgery` command, end to end in a subprocess, plus the variant-spec parser in process."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import surgery
from adapters import LoRA
from models import LLAMA
from surgery.cli import main, parse_variant
from surgery.errors import VariantSpecError

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-m", "surgery.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd or ROOT, env=env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    LLAMA.model().save_pretrained(path)
    return path


def test_help_lists_subcommands():
    res = run("--help")
    assert res.returncode == 0
    assert "inspect" in res.stdout and "diff" in res.stdout


def test_inspect_lists_sites_configs_and_counts(tmp_path, capsys):
    model = LLAMA.model()
    surgery.rewrite(model, LoRA(r=4, alpha=16), "*.{k_proj,v_proj}")
    path = tmp_path / "a.safetensors"
    surgery.save(model, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    sites = surgery.sites(model)
    for p, s in sites.items():
        line = next(line for line in out.splitlines() if line.startswith(p + " "))
        assert "LoRA(r=4, alpha=16)" in line and line.rstrip().endswith(f"{s.trainable_count():,}")
    total = sum(s.trainable_count() for s in sites.values())
    assert f"{len(sites)} sites, {total:,} adapter parameters" in out


def test_inspect_refuses_a_pickle(tmp_path, capsys):
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps({"x": 1}))
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgery inspect: error:") and "pickle" in err


def test_diff_end_to_end(model_dir, tmp_path):
    outs = [tmp_path / f"out.{ext}" for ext in ("txt", "svg", "html")]
    if shutil.which("dot") is None:
        outs = outs[:1]  # no Graphviz: only the text form can be checked here
    res = run("diff", str(model_dir), "--variant", "LoRA(r=2, alpha=4)", "--where", "*.k_proj",
              "-o", *map(str, outs))
    assert res.returncode == 0, res.stderr
    text = outs[0].read_text()
    assert text.startswith("surgery diff (module scope): 2 sites")
    assert "@@ model.layers.0.self_attn.k_proj  Linear -> Site  LoRA(r=2, alpha=4)" in text
    for out in outs[1:]:
        body = out.read_text()
        assert "<svg" in body and "model.layers.{0..1}.self_attn.k_proj" in body


def test_diff_errors_are_one_line(model_dir, tmp_path, capsys):
    assert main(["diff", str(model_dir), "--variant", "LoRA(r=2)", "--where", "*.k_proj", "-o", "x.pdf"]) == 2
    assert "-o diff.html" in capsys.readouterr().err
    assert main(["diff", str(tmp_path), "--variant", "LoRA(r=2)", "--where", "*.k_proj"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["diff", str(model_dir), "--variant", "LoRA(r=2)", "--where", "*.nothing_here"]) == 2
    assert "nothing_here" in capsys.readouterr().err
    assert main(["diff", str(model_dir), "--variant", "HRA(r=1000000000)", "--where", "*.k_proj"]) == 2
    assert "r <= " in capsys.readouterr().err


def test_parse_variant():
    assert parse_variant("LoRA(r=8, alpha=16.0, dropout=0.1)") == LoRA(r=8, alpha=16.0, dropout=0.1)
    assert parse_variant(" LoRA ") == LoRA()
    with pytest.raises(VariantSpecError, match="not of the form"):
        parse_variant("__import__('os').system('true')")
    with pytest.raises(VariantSpecError, match="unknown variant 'print'"):
        parse_variant("print(r=1)")
    with pytest.raises(VariantSpecError, match="not a literal"):
        parse_variant("LoRA(r=len('abc'))")
    with pytest.raises(VariantSpecError, match="name each one"):
        parse_variant("LoRA(8)")
    with pytest.raises(VariantSpecError, match="field names"):
        parse_variant("LoRA(rank=8)")
    with pytest.raises(VariantSpecError, match="cannot parse"):
        parse_variant("LoRA(r=")
