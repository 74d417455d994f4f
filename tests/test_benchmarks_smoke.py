"""The benchmark scripts run end to end (--quick) and print a row per variant. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name: str, tmp_path, *extra: str) -> tuple[str, dict]:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--quick", "--out", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, f"{name}.py --quick failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout, json.loads(out.read_text())


def table_rows(stdout: str) -> dict[str, list[str]]:
    """First-column value -> cells, over every Markdown table row printed."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells)
    return rows


def specs():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import common

    return common.available()


def expected_variants() -> list[str]:
    return [s.name for s in specs()]


def test_speed_quick_has_a_row_per_variant(tmp_path):
    stdout, data = run_script("speed", tmp_path)
    rows = table_rows(stdout)
    names = expected_variants()
    assert names, "no variant is registered"
    for name in names:
        assert name in rows, f"speed table has no row for {name}:\n{stdout}"
    assert [r["variant"] for r in data["train_step"]] == names + ["LoRA on 4-bit"]  # QLoRA: bitsandbytes bases
    for r in data["train_step"][:-1]:
        assert r["merged_plain"], f"{r['variant']}: merge left a site behind"
    assert data["train_step"][-1]["ratio"] > 0 and data["train_step"][-1]["trainable_ours"] == data["train_step"][-1][
        "trainable_peft"]
    assert data["compile"] and all("error" not in r for r in data["compile"]), data["compile"]


def test_quality_quick_has_a_row_per_variant(tmp_path):
    stdout, data = run_script("quality", tmp_path, "--cache", str(tmp_path / "cache"))
    rows = table_rows(stdout)
    names = expected_variants()
    for name in names:
        assert name in rows, f"quality table has no row for {name}:\n{stdout}"
    by_name = {r["variant"]: r for r in data["rows"]}
    for spec in specs():
        r = by_name[spec.name]
        assert 0.0 <= r["ours_acc"] <= 1.0 and r["ours_params"] > 0
        assert ("peft_acc" in r) == (spec.peft is not None), f"{spec.name}: PEFT column present iff it has a peer"


def test_scale_quick_has_every_cost_per_variant(tmp_path):
    stdout, data = run_script("scale", tmp_path, "--variants", "lora,ia3,eva,lora-4bit", "--growth", "1,2")
    rows = table_rows(stdout)
    assert {"LoRA", "IA3", "EVA", "LoRA 4-bit"} <= set(rows), stdout
    assert [r["variant"] for r in data["table"]] == ["LoRA", "EVA", "IA3", "LoRA 4-bit"]
    for r in data["table"]:
        for cost in ("apply", "step", "save", "load", "merge"):
            median = float(r[cost].split()[0])
            assert median > 0, (r["variant"], cost, r[cost])
        for peak in ("apply_mem", "step_mem", "merge_mem"):
            assert len(r[peak].split(" / ")) == 2, (r["variant"], peak, r[peak])
    assert [(g["variant"], g["sites"]) for g in data["growth"]] == [(v, n) for v in ("LoRA", "EVA", "IA3")
                                                                     for n in (7, 14)]


def test_scale_runs_only_the_4bit_row_when_only_that_is_asked(tmp_path):
    _, data = run_script("scale", tmp_path, "--variants", "lora-4bit")
    assert [r["variant"] for r in data["table"]] == ["LoRA 4-bit"]


def test_scale_quick_in_graph_scope(tmp_path):
    stdout, data = run_script("scale", tmp_path, "--variants", "lora", "--scope", "graph", "--growth", "1")
    assert data["scope"] == "graph" and [r["variant"] for r in data["table"]] == ["LoRA"]
    assert "surgery.trace of" in stdout
    assert float(data["table"][0]["merge"].split()[0]) > 0 and data["growth"][0]["sites"] == 7


def test_fsdp_memory_quick_has_both_sides_on_every_rank(tmp_path):
    stdout, data = run_script("fsdp_memory", tmp_path)  # starts torchrun --nproc_per_node=2 (gloo) itself
    rows = table_rows(stdout)
    for metric in ("parameter bytes held (MiB)", "retained full-weight bytes after step",
                   "RSS after step, above start (MiB)", "training step, median (ms)"):
        assert metric in rows and len(rows[metric]) == 4, f"no row {metric!r}:\n{stdout}"
    assert {"0", "1"} <= set(rows), f"summary has no row per rank:\n{stdout}"
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    for r in data["ranks"]:
        for side in ("ours", "peft"):
            for key in ("params", "rss_after_step", "peak_step", "retained_after_shard", "retained_after_step"):
                assert key in r[side], (r["rank"], side, key)
    assert data["timing"]["ours_s"] and data["timing"]["peft_s"]
