"""HRA equals PEFT's HRA (peft 0.21) on the Linear families; its own edge cases.

PEFT refuses GPT-2's Conv1D for HRA; the contract table (tests/cases.py) covers it for us.
"""

import copy

import pytest
import torch
from torch.fx.passes.shape_prop import ShapeProp

import surgery
from adapters import HRA
from models import BERT, LLAMA, QWEN3, rel_err
from peft_twin import copy_from_peft, peft_model, randomise_peft
from surgery.errors import ConfigError

LINEAR = [LLAMA, QWEN3, BERT]


def twins(family, r=4):
    from peft import HRAConfig

    base = family.model()
    ours = copy.deepcopy(base)
    surgery.rewrite(ours, HRA(r=r), family.where)
    targets = list(surgery.sites(ours))
    pm = peft_model(base, HRAConfig(r=r, target_modules=targets))
    randomise_peft(pm, scale=0.3)
    assert copy_from_peft(pm, ours) == len(targets)
    return base, ours, pm


@pytest.mark.parametrize("family", LINEAR, ids=lambda f: f.name)
def test_hra_matches_peft_forward_and_gradient(family):
    base, ours, pm = twins(family)
    x = family.inputs()
    theirs = family.out(pm, x)
    assert rel_err(theirs, family.out(base, x)) > 1e-3, "PEFT's adapter is still the identity"
    mine = family.out(ours, x)
    assert rel_err(mine, theirs) <= 1e-5

    proj = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(5))
    (theirs * proj).sum().backward()
    (mine * proj).sum().backward()
    path, site = next(iter(surgery.sites(ours).items()))
    peft_u = pm.base_model.model.get_submodule(path).hra_u["default"]
    assert rel_err(site.hra_u.grad, peft_u.grad) <= 1e-4


@pytest.mark.parametrize("family", LINEAR, ids=lambda f: f.name)
def test_hra_merge_matches_peft_merge(family):
    _, ours, pm = twins(family)
    paths = list(surgery.sites(ours))
    merged = pm.merge_and_unload()
    surgery.merge(ours)
    for p in paths:
        assert rel_err(ours.get_submodule(p).weight, merged.get_submodule(p).weight) <= 1e-5, p


def test_init_pairs_columns_and_starts_at_identity():
    layer = torch.nn.Linear(256, 64)
    x = torch.randn(4, 96, 256)
    ref = layer(x)
    m = surgery.rewrite(torch.nn.Sequential(copy.deepcopy(layer)), HRA(r=8), "0")
    u = surgery.sites(m)["0"].hra_u
    assert torch.equal(u[:, 0::2], u[:, 1::2]) and not torch.equal(u[:, 0], u[:, 2])
    assert u.abs().max() <= 0.5  # kaiming-uniform with fan_in r/2 = 4: U(-1/2, 1/2)
    assert rel_err(m(x), ref) <= 1e-6


@pytest.mark.parametrize("r", [1, 3, 7])
def test_odd_rank_is_refused(r):
    with pytest.raises(ConfigError, match=rf"r must be even, got r={r}.*HRA\(r={r + 1}\)"):
        HRA(r=r)


def test_forward_builds_no_dense_rotation():
    model = LLAMA.model()
    surgery.rewrite(model, HRA(r=4), "*.k_proj")
    site = next(iter(surgery.sites(model).values()))
    assert site.d_in > site.d_out  # so a d_in x d_in tensor would be the largest one around
    ShapeProp(site).propagate(torch.randn(1, site.d_in))
    sizes = {n.name: n.meta["tensor_meta"].shape.numel() for n in site.graph.nodes
             if n.op not in ("get_attr", "output") and "tensor_meta" in n.meta}  # not compute_dtype's dtype
    assert "linalg_solve_triangular" in site.code
    assert max(sizes.values()) < site.d_in * site.d_in, sizes
