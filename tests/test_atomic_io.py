"""Files: writes that cannot half-happen, reads that never execute anything, newer files.

- ``save`` (and ``export_peft``) write a temporary file beside the target and rename it; a failure
  half way through the write leaves the previous file byte for byte and no temporary file behind.
- ``load`` reads safetensors only: a pickle posing as an adapter is refused without being
  unpickled (its payload would create a marker file; the marker never appears).
- A file from a newer model-surgery loads with a warning when it only adds config fields; a
  variant this version does not know is refused (tests/test_errors.py).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch

import surgery
import surgery.io
from adapters import LoRA
from surgery import errors as E
from test_errors import adapted, assert_unchanged, edit_sites, rewrite_file, snapshot, toy

ROOT = Path(__file__).resolve().parents[1]


# ----- atomic writes -----


def half_writer(real):
    """A writer that writes the first half of what ``real`` would, then fails (a full disk, a kill)."""

    def write(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device (simulated)")

    return write


def writers():
    out = [pytest.param("save", surgery.io, lambda m, d: surgery.save(m, d / "a.safetensors"), "a.safetensors", id="save")]
    if hasattr(surgery, "export_peft"):
        import surgery.peft_format as pf

        out.append(pytest.param("export_peft", pf, lambda m, d: surgery.export_peft(m, d), "adapter_model.safetensors",
                                id="export_peft"))
    return out


@pytest.mark.parametrize("name, module, write, filename", writers())
def test_a_failed_write_keeps_the_previous_file(name, module, write, filename, tmp_path, monkeypatch):
    write(adapted(seed=0), tmp_path)
    before = (tmp_path / filename).read_bytes()
    listing = sorted(os.listdir(tmp_path))

    changed = adapted(seed=1)
    with torch.no_grad():
        for s in surgery.sites(changed).values():
            s.lora_B.fill_(0.5)  # so that a completed write would differ from the previous file
    monkeypatch.setattr(module, "save_file", half_writer(module.save_file))
    with pytest.raises(OSError, match="simulated"):
        write(changed, tmp_path)
    assert (tmp_path / filename).read_bytes() == before, f"{name} left a half-written {filename}"
    assert sorted(os.listdir(tmp_path)) == listing, "a temporary file was left behind"

    monkeypatch.undo()
    write(changed, tmp_path)
    assert (tmp_path / filename).read_bytes() != before, "the writer did not write at all"
    assert sorted(os.listdir(tmp_path)) == listing


def test_an_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(tensors, path, *a, **k):
        Path(path).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(surgery.io, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        surgery.save(adapted(), tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == []


def test_saved_files_follow_the_umask(tmp_path):
    mask = os.umask(0o022)
    try:
        surgery.save(adapted(), tmp_path / "a.safetensors")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644


# ----- nothing is ever executed -----


class _Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_posing_as_an_adapter_is_not_unpickled(protocol, tmp_path):
    evil = tmp_path / "evil.safetensors"
    marker = tmp_path / "pwned"
    evil.write_bytes(pickle.dumps({"lora_A": _Payload(marker)}, protocol=protocol))
    model = toy()
    snap = snapshot(model)
    with pytest.raises(E.AdapterFileError) as info:
        surgery.load(model, evil)
    assert "safetensors" in str(info.value)
    assert not marker.exists(), "the pickle was unpickled"
    assert_unchanged(model, snap)
    # the payload is live: unpickling it does create the marker, so its absence above means something
    pickle.loads(evil.read_bytes())
    assert marker.exists()


def test_a_torch_save_archive_is_refused(tmp_path):
    path = tmp_path / "adapter.safetensors"
    torch.save({"lora_A": torch.zeros(2, 8)}, path)
    with pytest.raises(E.AdapterFileError, match="never unpickles"):
        surgery.load(toy(), path)


def _sources():
    return sorted(p for d in ("surgery", "adapters") for p in (ROOT / d).rglob("*.py"))


def test_no_unpickling_in_the_source_tree():
    files = _sources()
    assert len(files) >= 8
    bad = []
    for path in files:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if not re.search(r"weights_only\s*=\s*True", m.group(0)):
                bad.append(f"{path.relative_to(ROOT)}: {m.group(0)[:60]}")
        bad += [f"{path.relative_to(ROOT)}: {w}" for w in re.findall(r"\b(?:c?pickle|dill|joblib)\.loads?\(", text)]
    assert not bad, f"code that can unpickle: {bad}"


def test_the_source_scan_finds_what_it_looks_for(tmp_path):
    sample = "x = torch.load(path)\ny = torch.load(path, weights_only=True)\nz = pickle.loads(b)\n"
    loads = re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", sample)
    assert [s for s in loads if "weights_only=True" not in s] == ["torch.load(path)"]
    assert re.findall(r"\b(?:c?pickle|dill|joblib)\.loads?\(", sample) == ["pickle.loads("]


# ----- files from a newer model-surgery -----


def test_future_version_with_unknown_fields_loads_with_warnings(tmp_path):
    model = adapted()
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_()
    path = tmp_path / "a.safetensors"
    surgery.save(model, path)
    rewrite_file(path, meta={"version": "99"})
    edit_sites(path, lambda s: {k: {**v, "config": {**v["config"], "shiny_new_knob": 3}} for k, v in s.items()})
    fresh = toy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        surgery.load(fresh, path)
    text = " ".join(str(w.message) for w in caught)
    assert "format version 99" in text and "shiny_new_knob" in text
    x = torch.randn(4, 8)
    assert torch.equal(fresh(x), model(x))


def test_unknown_variant_in_a_future_file_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    surgery.save(adapted(), path)
    rewrite_file(path, meta={"version": "99"})
    edit_sites(path, lambda s: {k: {**v, "variant": "QuantumLoRA"} for k, v in s.items()})
    fresh = toy()
    snap = snapshot(fresh)
    with pytest.warns(UserWarning, match="newer model-surgery"), pytest.raises(E.UnknownVariantError, match="QuantumLoRA"):
        surgery.load(fresh, path)
    assert_unchanged(fresh, snap)


def test_a_rewritten_file_keeps_loading(tmp_path):
    """The helpers above re-save real files: check that an unedited re-save still loads (no false alarms)."""
    model = adapted(v=LoRA(r=3))
    path = tmp_path / "a.safetensors"
    surgery.save(model, path)
    rewrite_file(path)
    fresh = surgery.load(toy(), path)
    assert list(surgery.sites(fresh)) == list(surgery.sites(model))


def test_a_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A safetensors header of 256 k + 128 bytes makes the file start with byte 0x80, like a pickle."""
    model = adapted()
    path = tmp_path / "a.safetensors"
    surgery.save(model, path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    padded = n + (128 - n) % 256  # JSON allows trailing spaces, and safetensors pads its header with them
    path.write_bytes(padded.to_bytes(8, "little") + data[8 : 8 + n] + b" " * (padded - n) + data[8 + n :])
    assert path.read_bytes()[:1] == b"\x80"
    fresh = surgery.load(toy(), path)
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))
