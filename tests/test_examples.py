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
