"""surgery.trace: whole-model capture by torch.fx (plain modules) or torch.export (HF models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from models import GPT2, LLAMA, QWEN3, rel_err
from surgery.errors import TraceError
from surgery.capture import module_path, route

HF = [LLAMA, QWEN3, GPT2]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class ShapeBranch(nn.Module):
    """Branches on a shape: fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return self.proj(x) if x.shape[0] > 1 else x


class DataBranch(nn.Module):
    """Branches on a value: neither fx nor torch.export can capture it as one graph."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return self.proj(x) if x.sum() > 0 else -x


@pytest.fixture(scope="module")
def hf_traced(traced_bases):
    return {fam.name: traced_bases(fam) for fam in HF}


@pytest.mark.parametrize("family", HF, ids=lambda f: f.name)
@pytest.mark.parametrize("batch,seq", [(2, 6), (3, 11)])
def test_export_route_matches_eager_at_other_shapes(family, batch, seq, hf_traced):
    model, gm = hf_traced[family.name]
    assert isinstance(gm, torch.fx.GraphModule) and route(gm) == "export" and surgery.is_traced(gm)
    x = family.inputs(batch=batch, seq=seq, seed=batch + seq)
    with torch.no_grad():
        err = rel_err(family.out(gm, x), family.out(model, x))
    assert err <= 1e-6, f"{family.name} ({batch}x{seq}): traced vs eager {err:.3g}"


@pytest.mark.parametrize("family", HF, ids=lambda f: f.name)
def test_export_route_keeps_module_paths_and_shares_parameters(family, hf_traced):
    model, gm = hf_traced[family.name]
    assert "forward" not in model.__dict__, "trace left its bound forward on the model"
    eager = surgery.plan(model, family.where).paths
    assert surgery.plan(gm, family.where).paths == eager
    paths = {module_path(n) for n in gm.graph.nodes}
    assert set(eager) <= paths
    params = dict(model.named_parameters())
    for p in eager:
        assert gm.get_parameter(f"{p}.weight") is params[f"{p}.weight"]


@pytest.mark.parametrize("make,shape", [(MLP, (8,)), (CNN, (3, 6, 6))], ids=["mlp", "cnn"])
def test_fx_route_keeps_leaves_as_call_module(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    gm = surgery.trace(model, torch.randn(2, *shape))
    assert route(gm) == "fx"
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for batch in (2, 5):
        x = torch.randn(batch, *shape)
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_falls_back_to_export_when_fx_cannot_trace():
    torch.manual_seed(0)
    model = ShapeBranch()
    gm = surgery.trace(model, torch.randn(3, 6))
    assert route(gm) == "export"
    x = torch.randn(4, 6)
    torch.testing.assert_close(gm(x), model(x))
    assert surgery.plan(gm, "proj").paths == ["proj"]


def test_untraceable_model_raises_trace_error_naming_the_code():
    with pytest.raises(TraceError) as e:
        surgery.trace(DataBranch(), torch.randn(3, 6))
    msg = str(e.value)
    assert "DataBranch" in msg and "test_trace.py" in msg and "module scope" in msg
