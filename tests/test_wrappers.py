"""Every verb acts on the model inside a `torch.compile` or DDP wrapper: a file saved through a wrapper has
the bare model's keys and loads on a bare base."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

import surgery
from adapters import LoRA
from cases import CASES
from test_control import X, adapted, toy


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "compile":
        return torch.compile(model, backend="eager")
    return nn.parallel.DistributedDataParallel(model)


@pytest.mark.parametrize("kind", ["compile", "ddp"])
def test_verbs_see_through_the_wrapper(kind, tmp_path, request):
    if kind == "ddp":
        request.getfixturevalue("one_process_group")
    model, base, out = adapted("module", CASES[0])
    wrapped = wrap(kind, model)
    assert torch.equal(wrapped(X), out)
    surgery.save(wrapped, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert all(k.startswith(("0.", "2.")) for k in f.keys()), list(f.keys())
    bare = toy("module")
    surgery.load(bare, tmp_path / "a.safetensors")
    assert torch.equal(bare(X), out)
    assert list(surgery.sites(wrapped)) == ["0", "2"]
    with surgery.disabled(wrapped):
        assert torch.equal(wrapped(X), base)
    surgery.set_scale(wrapped, 0.0)
    assert torch.equal(wrapped(X), base)
    surgery.set_scale(wrapped, 1.0)
    surgery.merge(wrapped)
    assert not surgery.sites(model) and type(model[0]) is nn.Linear
    assert (model(X) - out).abs().max() <= 1e-5  # merge is for shipping: DDP must be rebuilt around new modules


def test_rewrite_through_a_compile_wrapper():
    model = toy("module")
    compiled = torch.compile(model, backend="eager")
    surgery.rewrite(compiled, LoRA(r=2), "*")
    assert list(surgery.sites(model)) == ["0", "2"]
    assert torch.equal(compiled(X), model(X))
