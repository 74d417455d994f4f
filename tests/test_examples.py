"""The examples run and do what they say (the quickstart is `./dev demo`, run by .ci/run)."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dpo_example_learns_against_a_reference_from_the_same_model():
    # the example asserts at every step that the reference from surgery.disabled is the base, bit for bit
    result = load("dpo_without_a_second_model").main(steps=12)
    assert result["last_loss"] < 0.8 * result["first_loss"]
    assert result["margin"] > result["base_margin"] + 0.5


def test_qlora_example_trains_reloads_and_merges_a_4bit_base():
    result = load("qlora").main(steps=20)
    assert result["last_loss"] < result["first_loss"]
    assert result["reload_diff"] == 0.0  # the file onto a freshly quantised base gives the trained model back
    assert result["dequantized_rel"] < 1e-5  # float layers hold W' exactly
    assert 1e-4 < result["requantised_rel"] < 0.5  # re-quantised as nf4: near, not equal, and said so
