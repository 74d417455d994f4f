"""FSDP2 (`fully_shard`) and DDP on a rewritten model, two processes over gloo on CPU: `save` gathers the sharded
adapter (every rank calls it, rank 0 writes) into a file that loads on a bare base with the sharded model's
outputs; no rank keeps an unsharded copy of an adapted weight; the verbs that need whole weights refuse with
the project's error."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp2_save_gathers_and_whole_weight_verbs_refuse(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    results = sorted((json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["merge"] == r["export"] == r["disabled"] == r["rewrite_sharded"] == "ShardedModelError", r
        assert r["reload_max_diff"] <= 1e-6 and r["trained"], r  # the same file, whole, on every rank
        assert r["kept_whole_weights"] == 0, r  # no rank keeps an unsharded copy of an adapted weight
        assert r["pissa_shard"] == "ran", r
        # DDP: ranks trained on different batches and still hold one adapter, which the file reproduces
        assert r["ddp_spread"] == 0.0 and r["ddp_moved"] and r["ddp_reload_max_diff"] <= 1e-6, r
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "ddp.safetensors"]
