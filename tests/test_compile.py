"""torch.compile(fullgraph=True) of an adapted model: no graph breaks, same outputs as eager."""

import pytest
import torch

import surgery
from adapters import LoRA
from models import GPT2, LLAMA, rel_err


@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=lambda f: f.name)
def test_compiled_adapted_model_matches_eager(family):
    torch._dynamo.reset()
    model = family.model()
    surgery.rewrite(model, LoRA(r=4, dropout=0.1), family.where)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_(0, 0.1)
    x = family.inputs()
    eager = family.out(model, x)
    # fullgraph=True turns any graph break into an error; aot_eager also traces the backward
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = family.out(compiled, x)
    assert rel_err(got, eager) <= 1e-5
    model.train()
    loss = family.out(compiled, x).square().mean()
    loss.backward()
    assert all(s.lora_A.grad is not None for s in surgery.sites(model).values())
