"""nnsight interop: a rewritten model traces under nnsight.NNsight like any other module.

A site's adapted output is read through the usual ``.output``; the base op *inside* the site is
read through nnsight's ``.source`` view, which works because a Site is a GraphModule whose forward
is real Python source (``site.code``). Values are compared to ones computed directly from the
site's own tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import surgery
from adapters import LoRA
from models import LLAMA

nnsight = pytest.importorskip("nnsight", reason="nnsight is an optional extra (pip install model-surgery[nnsight])")

PATH = "model.layers.0.self_attn.k_proj"


@pytest.fixture(scope="module")
def adapted():
    torch.manual_seed(0)
    model = LLAMA.model()
    surgery.rewrite(model, LoRA(r=4, alpha=8), "*.k_proj")
    with torch.no_grad():  # B starts at zero; make the adapter visible in the output
        for s in surgery.sites(model).values():
            s.lora_B.normal_(std=0.5)
    return model


def base_op_name(site_envoy) -> str:
    # nnsight names operations after the call in the source (torch._C._nn.linear -> torch__C__nn_linear_0);
    # the base op comes first in a site's code (the variant's ops are spliced after it)
    names = [op.name for op in site_envoy.source if op.name.startswith("torch__C__nn_linear")]
    assert names, f"no linear operation in the site's source view:\n{site_envoy.source}"
    return names[0]


def test_trace_reads_site_output_and_base_op(adapted):
    site = surgery.sites(adapted)[PATH]
    inputs = LLAMA.inputs()
    expected_logits = LLAMA.out(adapted, inputs)
    wrapped = nnsight.NNsight(adapted)
    op = base_op_name(wrapped.model.layers[0].self_attn.k_proj)
    with wrapped.trace(**inputs):
        env = wrapped.model.layers[0].self_attn.k_proj
        x = env.input.save()
        base = getattr(env.source, op).output.save()
        y = env.output.save()
        logits = wrapped.output.logits.save()
    torch.testing.assert_close(logits, expected_logits)  # tracing changed nothing
    w = site.weight.detach()
    torch.testing.assert_close(base, F.linear(x, w))  # the base op inside the site
    delta = F.linear(F.linear(x, site.lora_A), site.lora_B) * site.variant.scale
    torch.testing.assert_close(y, F.linear(x, w) + delta)  # the adapted output
    assert (y - base).abs().max() > 1e-3  # the two reads are different values


def test_intervene_on_base_op_inside_site(adapted):
    """Zeroing the base op through .source leaves exactly the adapter's term as the site's output."""
    site = surgery.sites(adapted)[PATH]
    wrapped = nnsight.NNsight(adapted)
    op = base_op_name(wrapped.model.layers[0].self_attn.k_proj)
    with wrapped.trace(**LLAMA.inputs()):
        env = wrapped.model.layers[0].self_attn.k_proj
        x = env.input.save()
        inner = getattr(env.source, op)
        inner.output = torch.zeros_like(inner.output)
        y = env.output.save()
    delta = F.linear(F.linear(x, site.lora_A), site.lora_B) * site.variant.scale
    torch.testing.assert_close(y, delta)
