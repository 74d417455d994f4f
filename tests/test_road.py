"""ROAD equals PEFT's RoAd (peft 0.21) for all three variants on the Linear families; its own edge cases.

PEFT refuses GPT-2's Conv1D for RoAd; the contract table (tests/cases.py) covers it for us.
"""

import copy

import pytest
import torch
from torch.fx.passes.shape_prop import ShapeProp

import surgery
from adapters import ROAD
from models import BERT, LLAMA, QWEN3, rel_err
from peft_twin import copy_from_peft, peft_model, randomise_peft
from surgery.errors import ConfigError

LINEAR = [LLAMA, QWEN3, BERT]
VARIANTS = ["road_1", "road_2", "road_4"]


def twins(family, variant):
    from peft import RoadConfig

    base = family.model()
    ours = copy.deepcopy(base)
    surgery.rewrite(ours, ROAD(variant=variant, group_size=8), family.where)
    targets = list(surgery.sites(ours))
    pm = peft_model(base, RoadConfig(variant=variant, group_size=8, target_modules=targets))
    randomise_peft(pm, scale=0.5)
    assert copy_from_peft(pm, ours) == 2 * len(targets)
    return base, ours, pm


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", LINEAR, ids=lambda f: f.name)
def test_road_matches_peft_forward_and_merge(family, variant):
    base, ours, pm = twins(family, variant)
    x = family.inputs()
    theirs = family.out(pm, x)
    assert rel_err(theirs, family.out(base, x)) > 1e-3, "PEFT's adapter is still the identity"
    assert rel_err(family.out(ours, x), theirs) <= 1e-5

    paths = list(surgery.sites(ours))
    merged = pm.merge_and_unload()
    surgery.merge(ours)
    for p in paths:
        mine, peft = ours.get_submodule(p), merged.get_submodule(p)
        assert rel_err(mine.weight, peft.weight) <= 1e-5, p
        if peft.bias is not None:
            assert rel_err(mine.bias, peft.bias) <= 1e-5, p


@pytest.mark.parametrize("variant,size", [("road_1", 8), ("road_2", 16), ("road_4", 32)])
def test_tensor_sizes_and_init(variant, size):
    model = surgery.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 16)), ROAD(variant=variant, group_size=8), "0")
    t = surgery.sites(model)["0"].adapter_tensors()
    assert t["road_theta"].shape == t["road_alpha"].shape == (size,)
    assert torch.equal(t["road_theta"], torch.zeros(size)) and torch.equal(t["road_alpha"], torch.ones(size))


def test_pairs_p_with_p_plus_half_group_and_rotates_the_bias():
    lin = torch.nn.Linear(3, 8)
    model = surgery.rewrite(torch.nn.Sequential(copy.deepcopy(lin)), ROAD(variant="road_1", group_size=4), "0")
    site = surgery.sites(model)["0"]
    with torch.no_grad():
        site.road_theta.copy_(torch.tensor([torch.pi / 2, 0.0, 0.0, 0.0]))  # rotate pair (0, 2) by 90 degrees
    x = torch.randn(5, 3)
    h, y = lin(x), model(x)
    assert torch.allclose(y[:, 0], -h[:, 2]) and torch.allclose(y[:, 2], h[:, 0], atol=1e-6)
    assert torch.equal(y[:, [1, 3, 4, 5, 6, 7]], h[:, [1, 3, 4, 5, 6, 7]])


@pytest.mark.parametrize("g", [7, 0, -2, 3.0])
def test_group_size_must_be_positive_and_even(g):
    with pytest.raises(ConfigError, match=rf"positive even integer.*group_size={g!r}"):
        ROAD(group_size=g)


def test_group_size_must_divide_d_out_and_nothing_changes():
    model = LLAMA.model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"group_size=64 does not divide d_out=16 at model\.layers\.0\.self_attn\."
                                          r"k_proj.*ROAD\(group_size=16\)"):
        surgery.rewrite(model, ROAD(), "*.k_proj")
    assert not surgery.sites(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_forward_builds_no_dense_rotation():
    model = surgery.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 64)), ROAD(variant="road_4", group_size=8), "0")
    site = surgery.sites(model)["0"]
    ShapeProp(site).propagate(torch.randn(1, 4))
    sizes = [n.meta["tensor_meta"].shape.numel() for n in site.graph.nodes  # tensors only: not compute_dtype's dtype
             if n.op not in ("get_attr", "output") and "tensor_meta" in n.meta]
    assert max(sizes) <= 2 * site.d_out
