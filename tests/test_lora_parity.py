"""LoRA equals PEFT's LoRA (peft 0.21) on the tiny families, including GPT-2's Conv1D."""

import copy

import pytest

import surgery
from adapters import LoRA
from models import TINY
from peft_twin import assert_same_outputs, copy_from_peft, peft_model, randomise_peft


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("family", TINY, ids=lambda f: f.name)
def test_lora_matches_peft(family, rslora):
    from peft import LoraConfig

    base = family.model()
    ours = copy.deepcopy(base)
    surgery.rewrite(ours, LoRA(r=4, alpha=12, rslora=rslora), family.where)
    targets = list(surgery.sites(ours))
    pm = peft_model(base, LoraConfig(r=4, lora_alpha=12, use_rslora=rslora, target_modules=targets))
    randomise_peft(pm)
    assert copy_from_peft(pm, ours) == 2 * len(targets)
    assert_same_outputs(family, base, ours, pm)
