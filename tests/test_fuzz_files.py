"""Fuzzing what a file can say: safetensors headers, our metadata, PEFT configs, fed to `load`,
`import_peft` and `surgery inspect`. Only the project's errors may come out, each within a time bound,
and a model that was not loaded stays as it was."""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from adapters import LoRA
from surgery.cli import main
from surgery.errors import SurgeryError

SECONDS = 5.0  # per hostile input; every one of them is refused in milliseconds when all is well
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "BOOL", "F64", "X9", ""])


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).eval()


def valid_file(folder: Path) -> Path:
    model = toy()
    surgery.rewrite(model, LoRA(r=2), "*")
    path = folder / "a.safetensors"
    surgery.save(model, path)
    return path


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()}


def only_our_errors(call) -> None:
    start = time.perf_counter()
    try:
        call()
    except SurgeryError:
        pass
    assert time.perf_counter() - start < SECONDS


def refused_or_loaded(load, path) -> None:
    model = toy()
    before = state(model)
    loaded = [False]

    def call():
        load(model, path)
        loaded[0] = True

    only_our_errors(call)
    if not loaded[0]:
        now = state(model)
        assert now[0].keys() == before[0].keys() and all(torch.equal(now[0][k], before[0][k]) for k in now[0])
        assert now[1] == before[1] and not surgery.sites(model)


def inspect_exits_cleanly(path) -> None:
    start = time.perf_counter()
    assert main(["inspect", str(path)]) in (0, 2)
    assert time.perf_counter() - start < SECONDS


ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": DTYPES | JSON, "shape": st.lists(st.integers(-2, 10**9), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-5, 10**6), max_size=3) | JSON,
})


@SETTINGS
@given(tensors=st.dictionaries(st.text(max_size=10), ENTRY, max_size=3),
       metadata=st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=20) | JSON, max_size=4),
       tail=st.binary(max_size=64))
def test_hostile_safetensors_headers(tensors, metadata, tail):
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + tail)
        refused_or_loaded(surgery.load, path)
        inspect_exits_cleanly(path)


@SETTINGS
@given(sites=JSON, version=st.text(max_size=6) | st.integers().map(str), config=st.dictionaries(
    st.sampled_from(["r", "alpha", "dropout", "rslora", "dtype", "niter", "x"]), JSON, max_size=4))
def test_hostile_model_surgery_metadata(sites, version, config):
    with tempfile.TemporaryDirectory() as d:
        path = valid_file(Path(d))
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(path))
        real = json.loads(meta["sites"])
        for info in real.values():  # hostile values inside a well-formed entry
            info["config"].update(config)
        for candidate in (sites, real):
            meta.update(sites=json.dumps(candidate), version=version)
            save_file(tensors, str(path), metadata=meta)
            refused_or_loaded(surgery.load, path)
            inspect_exits_cleanly(path)


PEFT_KEYS = st.sampled_from(["peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern",
                             "alpha_pattern", "target_modules", "init_lora_weights", "bias", "layers_to_transform",
                             "feedforward_modules", "variant", "group_size", "x"])


@SETTINGS
@given(edits=st.dictionaries(PEFT_KEYS, JSON | st.sampled_from(["LORA", "IA3", "HRA", "DELORA", "ROAD"]), max_size=5),
       whole=st.none() | JSON)
def test_hostile_peft_configs(edits, whole):
    with tempfile.TemporaryDirectory() as d:
        model = toy()
        surgery.rewrite(model, LoRA(r=2), "*")
        directory = Path(d) / "peft"
        surgery.export_peft(model, directory)
        config = json.loads((directory / "adapter_config.json").read_text())
        config.update(edits)
        (directory / "adapter_config.json").write_text(json.dumps(config if whole is None else whole))
        refused_or_loaded(surgery.import_peft, directory)


def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path):
    directory = tmp_path / "peft"
    model = toy()
    surgery.rewrite(model, LoRA(r=2), "*")
    surgery.export_peft(model, directory)
    (directory / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused_or_loaded(surgery.import_peft, directory)
