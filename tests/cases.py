"""The one table of variant cases that drives every contract test (tests/test_contract.py).

Adding a variant: add one row here. Tolerances are relative (max |diff| / max |reference|):
``identity`` at init in float32, ``fold`` merged vs unmerged in float32 after the adapter tensors
are randomised, ``bf16_fold`` the same on a bfloat16 base (measured, then bounded with margin).
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters import LoRA
from adapters import DeLoRA, DoRA, IA3
from adapters import AntiPaSTO, EVA, PiSSA
from adapters import HRA, ROAD
from surgery.variant import Variant


@dataclass(frozen=True)
class Case:
    id: str
    variant: Variant
    identity: float = 1e-6
    fold: float = 1e-5
    bf16_fold: float = 3e-2
    calibration: bool = False  # pass calibration batches to rewrite (EVA)

    def __str__(self) -> str:
        return self.id


CASES = [
    Case("lora", LoRA(r=4, alpha=8)),
    Case("lora-rslora-dropout", LoRA(r=4, alpha=8, dropout=0.1, rslora=True)),
    Case("dora", DoRA(r=4, alpha=8)),
    Case("ia3", IA3()),  # paper placement: every family's `where` has its feed-forward output projection
    Case("ia3-output-side", IA3(feedforward=())),  # the q/v placement's side: output side at every site
    Case("delora", DeLoRA(r=4)),
    Case("hra", HRA(r=4)),
    Case("road", ROAD(variant="road_4", group_size=8)),  # the tiny families have d_out 16, 32, 96
    Case("pissa", PiSSA(r=4, alpha=8), identity=1e-5),
    Case("eva", EVA(r=4, alpha=8), calibration=True),
    Case("antipasto", AntiPaSTO(r=4, rotate_basis="V", block_size=2)),
]
