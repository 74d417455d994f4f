"""Files that would load into a silently wrong model are refused, in both scopes (issue: hostile files).

Each test builds a file that the previous engine loaded without a word (a torn read, integer or
non-finite tensors, a transposed PEFT tensor, magnitudes a config does not use, a string flag, a NaN
scale) and checks the error and that the model is unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
import surgery.io
from adapters import REGISTRY, DoRA, LoRA
from models import SCOPES, in_scope, rel_err
from surgery import errors as E

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def toy(scope: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).eval()
    return in_scope(scope, model, X)


def adapter_file(tmp_path, name: str, seed: int, variant=None):
    """An adapter saved from module scope with values set by ``seed``."""
    model = toy("module")
    surgery.rewrite(model, variant or LoRA(r=2), "*")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            for t in s.adapter_tensors().values():
                t.add_(torch.randn(t.shape, generator=g))
    path = tmp_path / name
    surgery.save(model, path)
    return path, model(X)


def unchanged(model: nn.Module):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def check():
        assert not surgery.sites(model)
        assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    return check


def refused(scope, call, error, words):
    """``call(model)`` on a fresh toy in ``scope`` raises ``error`` naming ``words``; the toy is unchanged."""
    model = toy(scope)
    check = unchanged(model)
    with pytest.raises(error) as info:
        call(model)
    assert all(w in str(info.value) for w in words), info.value
    check()


def edit_configs(path, config):
    """Re-save an adapter file with ``config`` merged into every site's variant config."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    sites = json.loads(metadata["sites"])
    for info in sites.values():
        info["config"].update(config)
    metadata["sites"] = json.dumps(sites)  # json writes NaN / Infinity, and reads them back
    save_file(load_file(str(path)), str(path), metadata=metadata)
    return path


def retensor(path, **tensors):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    data = load_file(str(path))
    data.update(tensors)
    save_file(data, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("scope", SCOPES)
def test_load_reads_the_file_once_so_a_concurrent_save_cannot_tear_it(scope, tmp_path, monkeypatch):
    """A save of another adapter lands between load's reading of the metadata and of the tensors:
    the load must still give one version, whole (it used to mix A's config with B's tensors)."""
    a, want = adapter_file(tmp_path, "a.safetensors", seed=1)
    b, _ = adapter_file(tmp_path, "b.safetensors", seed=2, variant=LoRA(r=2, alpha=3.0))
    real = surgery.io.read_metadata

    def then_replace(path, data=None, header=None):
        meta = real(path, data, header)
        a.write_bytes(b.read_bytes())  # what an atomic save of version B does to the path
        return meta

    monkeypatch.setattr(surgery.io, "read_metadata", then_replace)
    model = toy(scope)
    surgery.load(model, a)
    assert rel_err(model(X), want) <= 1e-6
    assert {s.variant for s in surgery.sites(model).values()} == {LoRA(r=2)}


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(
    "value, error, words",
    [
        (torch.ones(6, 2, dtype=torch.int32), E.AdapterFileError, ("int32", "floating point")),
        (torch.full((6, 2), float("nan")), E.NonFiniteError, ("NaN or Inf",)),
        (torch.full((6, 2), float("inf")), E.NonFiniteError, ("NaN or Inf",)),
    ],
    ids=["int32", "nan", "inf"],
)
def test_integer_or_non_finite_tensors_in_a_file_are_refused(scope, value, error, words, tmp_path):
    path, _ = adapter_file(tmp_path, "a.safetensors", seed=1)
    retensor(path, **{"2.lora_B": value})
    refused(scope, lambda m: surgery.load(m, path), error, ("2.lora_B", *words))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("verb", ["save", "export_peft"])
def test_a_non_finite_adapter_is_not_written(scope, verb, tmp_path):
    model = toy(scope)
    surgery.rewrite(model, LoRA(r=2), "*")
    with torch.no_grad():
        surgery.sites(model)["2"].adapter_tensors()["lora_B"][0, 0] = float("nan")
    target = tmp_path / ("a.safetensors" if verb == "save" else "peft")
    with pytest.raises(E.NonFiniteError, match=r"cannot (save|export) 2: NaN or Inf in lora_B"):
        getattr(surgery, verb)(model, target)
    assert not target.exists()


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(
    "config, words",
    [
        ({"alpha": float("nan")}, ("alpha must be a finite number", "nan")),
        ({"alpha": float("inf")}, ("alpha must be a finite number",)),
        ({"rslora": "false"}, ("rslora must be True or False", "'false'")),
    ],
    ids=["alpha-nan", "alpha-inf", "rslora-string"],
)
def test_a_config_that_would_compute_garbage_is_refused(scope, config, words, tmp_path):
    path = edit_configs(adapter_file(tmp_path, "a.safetensors", seed=1)[0], config)
    refused(scope, lambda m: surgery.load(m, path), E.ConfigError, words)


def peft_dir(tmp_path, variant=None):
    model = toy("module")
    surgery.rewrite(model, variant or LoRA(r=2), "*")
    with torch.no_grad():
        for s in surgery.sites(model).values():
            for t in s.adapter_tensors().values():
                t.add_(0.1)
    directory = tmp_path / "peft"
    surgery.export_peft(model, directory)
    return directory


def edit_peft(directory, config=None, tensors=None, drop=()):
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(config or {})
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    data = load_file(str(directory / "adapter_model.safetensors"))
    data.update(tensors or {})
    for k in drop:
        data.pop(k)
    save_file(data, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("scope", SCOPES)
def test_a_transposed_peft_tensor_is_refused_not_reshaped(scope, tmp_path):
    d = peft_dir(tmp_path)
    key = "base_model.model.0.lora_B.weight"
    B = load_file(str(d / "adapter_model.safetensors"))[key]  # (8, 2)
    edit_peft(d, tensors={key: B.t().contiguous()})
    model = toy(scope)
    check = unchanged(model)
    with pytest.raises(E.BaseMismatchError, match=r"lora_B.weight has shape \(2, 8\).*expects \(8, 2\)"):
        surgery.import_peft(model, d)
    check()


@pytest.mark.parametrize("scope", SCOPES)
def test_dora_magnitudes_with_use_dora_false_are_refused(scope, tmp_path):
    d = edit_peft(peft_dir(tmp_path, DoRA(r=2)), config={"use_dora": False})
    model = toy(scope)
    check = unchanged(model)
    with pytest.raises(E.PeftFormatError, match="lora_magnitude_vector.*does not use.*use_dora"):
        surgery.import_peft(model, d)
    check()


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(
    "config, words",
    [
        ({"lora_alpha": float("nan")}, ("adapter_config.json", "alpha must be a finite number")),
        ({"use_rslora": "false"}, ("adapter_config.json", "rslora must be True or False")),
        ({"lora_alpha": "abc"}, ("adapter_config.json", "alpha must be a finite number", "'abc'")),
        ({"r": "2"}, ("adapter_config.json", "r must be a positive integer")),
    ],
    ids=["alpha-nan", "rslora-string", "alpha-string", "r-string"],
)
def test_peft_config_values_of_the_wrong_type_are_refused(scope, config, words, tmp_path):
    d = edit_peft(peft_dir(tmp_path), config=config)
    refused(scope, lambda m: surgery.import_peft(m, d), E.SurgeryError, words)


# ----- silent wrong results that are not about files -----


def test_load_onto_a_meta_base_is_refused_instead_of_dropping_the_values(tmp_path):
    path, _ = adapter_file(tmp_path, "a.safetensors", seed=1)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
    with pytest.raises(E.MetaDeviceError, match="meta device.*to_empty"):
        surgery.load(model, path)
    assert not surgery.sites(model)


def test_rewrite_on_meta_then_materialise_then_merge_leaves_real_weights():
    """to_empty + load_state_dict replace the site's Parameters; merge must fold those, not the leaf's
    stale meta originals."""
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).eval()
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).eval()
    surgery.rewrite(model, LoRA(r=2), "*")
    model.to_empty(device="cpu")
    state = dict(real.state_dict())
    for p, s in surgery.sites(model).items():
        state[f"{p}.lora_A"] = torch.randn(s.adapter_tensors()["lora_A"].shape)
        state[f"{p}.lora_B"] = torch.randn(s.adapter_tensors()["lora_B"].shape)
    model.load_state_dict(state)
    want = model(X)
    surgery.merge(model)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert rel_err(model(X), want) <= 1e-5


@pytest.mark.parametrize("where", ["a", "*"])
def test_a_module_registered_at_two_paths_is_refused(where):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a  # the same module object at a second path

        def forward(self, x):
            return self.b(self.a(x))

    model = Twice()
    with pytest.raises(E.UnsupportedModuleError, match="a is the same module object as b"):
        surgery.rewrite(model, LoRA(r=2), where)
    assert not surgery.sites(model) and type(model.a) is nn.Linear and model.a is model.b


@pytest.mark.parametrize(
    "pattern, words",
    [
        ({"(": 4}, ("rank_pattern key '('", "not a valid regex")),
        ({r"((a|a)+)+\4b": 4}, ("rank_pattern key", "took over", "backtracks")),
        (["0"], ("rank_pattern must map",)),
    ],
    ids=["bad-regex", "backtracking", "a-list"],
)
def test_hostile_rank_pattern_keys_are_refused_quickly(pattern, words, tmp_path):
    """Keys are regexes read from a file: one that does not compile, or that backtracks for ever on a
    long path, is our error within the time bound (Python's re would run the last one for hours)."""
    def base():
        torch.manual_seed(0)
        return nn.ModuleDict({"a" * 30: nn.Linear(8, 8)})

    model = base()
    surgery.rewrite(model, LoRA(r=2), "*")
    d = tmp_path / "peft"
    surgery.export_peft(model, d)
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": pattern}))
    fresh = base()
    with pytest.raises(E.PeftFormatError) as info:
        surgery.import_peft(fresh, d)
    assert all(w in str(info.value) for w in words), info.value
    assert not surgery.sites(fresh)


def test_a_failed_export_leaves_the_old_peft_pair_whole(tmp_path, monkeypatch):
    """export_peft used to replace the tensors, then fail on the config, leaving new tensors beside the
    old config, which imported as a mix of the two; now both are staged before either is replaced."""
    import surgery.peft_format as pf

    first = peft_dir(tmp_path)  # r=2 LoRA, alpha 8, every tensor moved by 0.1
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    model = toy("module")
    surgery.rewrite(model, LoRA(r=2, alpha=3.0), "*")
    real_write_text = pf.Path.write_text

    def fail_on_config(self, *a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(pf.Path, "write_text", fail_on_config)
    with pytest.raises(OSError, match="disk full"):
        surgery.export_peft(model, first)
    monkeypatch.setattr(pf.Path, "write_text", real_write_text)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before, "a file of the old pair was replaced"


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("config, error, words", [
    ({"r": 10**7}, E.AdapterFileError, ("r=10000000", "do not belong together")),
    ({"niter": 10**9}, E.ConfigError, ("niter must be None", "[0, 1000]")),
], ids=["huge-rank", "huge-niter"])
def test_a_config_asking_for_unbounded_work_is_refused_before_any_is_done(scope, config, error, words, tmp_path):
    path = edit_configs(adapter_file(tmp_path, "a.safetensors", seed=1, variant=REGISTRY["PiSSA"](r=2, niter=2))[0],
                        config)
    refused(scope, lambda m: surgery.load(m, path), error, words)


@pytest.mark.parametrize("target", ["a-directory", "under-a-file", "too-long-name"])
def test_a_save_that_cannot_be_written_names_the_users_path(target, tmp_path):
    model = toy("module")
    surgery.rewrite(model, LoRA(r=2), "*")
    if target == "a-directory":
        path = tmp_path
    elif target == "under-a-file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "a.safetensors"
    else:
        path = tmp_path / ("a" * 300 + ".safetensors")
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(E.OutputPathError) as info:
        surgery.save(model, path)
    assert str(path)[:100] in str(info.value) and ".tmp" not in str(info.value), info.value
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing, "a temporary file was left behind"


# ----- the base a file was saved on -----


def _base_cases():
    return [("LoRA", LoRA(r=2), "warn"), ("DoRA", DoRA(r=2), "refuse"), ("PiSSA", REGISTRY["PiSSA"](r=2), "refuse")]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("name, variant, policy", _base_cases(), ids=[c[0] for c in _base_cases()])
@pytest.mark.parametrize("other", ["another-seed", "merged-into"])
def test_a_file_on_a_base_with_the_same_shapes_but_other_weights(scope, name, variant, policy, other, tmp_path):
    """It used to load silently (outputs off by 1.3 relative): now DoRA and PiSSA, whose tensors were computed
    from the base weight, refuse; LoRA, which only adds, warns; check_base=False loads it as before."""
    path, want = adapter_file(tmp_path, "a.safetensors", seed=1, variant=variant)
    if other == "another-seed":
        model = toy(scope, seed=5)
    else:  # the same adapter already merged into the base
        merged = toy("module")
        surgery.load(merged, path)
        surgery.merge(merged)
        model = in_scope(scope, merged, X)
    check = unchanged(model)
    if policy == "refuse":
        with pytest.raises(E.BaseMismatchError, match=rf"saved on another base.*{name}'s tensors were computed"):
            surgery.load(model, path)
        check()
    else:
        with pytest.warns(UserWarning, match="saved on another base.*only adds to the base"):
            surgery.load(model, path)
        surgery.restore(model)
    surgery.load(model, path, check_base=False)
    assert surgery.sites(model)


def resample(path, edit):
    """Re-save an adapter file with ``edit(sample)`` as every site's base-weight sample."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    sites = json.loads(metadata["sites"])
    for info in sites.values():
        info["base"]["sample"] = edit(info["base"]["sample"])
    metadata["sites"] = json.dumps(sites)
    save_file(load_file(str(path)), str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("scope", SCOPES)
def test_a_format_1_sample_of_decimal_floats_still_tells_another_base(scope, tmp_path):
    """Files now keep the sample as base64 float32 (a quarter of the size); older files wrote decimal floats."""
    path, want = adapter_file(tmp_path, "a.safetensors", seed=1, variant=DoRA(r=2))
    resample(path, lambda s: surgery.io.decode_sample(s, path, "0"))
    assert isinstance(json.loads(safe_open(str(path), framework="pt").metadata()["sites"])["0"]["base"]["sample"], list)
    model = toy(scope)
    surgery.load(model, path)
    assert rel_err(model(X), want) <= 1e-6
    refused_model = toy(scope, seed=5)
    check = unchanged(refused_model)
    with pytest.raises(E.BaseMismatchError, match="saved on another base"):
        surgery.load(refused_model, path)
    check()


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("bad", ["not base64!", "AAA", ["x"], {"a": 1}, "A" * 4000], ids=["chars", "length", "strings", "dict", "long"])
def test_a_malformed_base_sample_is_refused(scope, bad, tmp_path):
    path, _ = adapter_file(tmp_path, "a.safetensors", seed=1)
    resample(path, lambda s: bad)
    refused(scope, lambda m: surgery.load(m, path), E.AdapterFileError, ("base-weight sample", "malformed"))


@pytest.mark.parametrize("scope", SCOPES)
def test_the_right_base_in_another_dtype_loads_without_a_word(scope, tmp_path):
    import warnings

    path, _ = adapter_file(tmp_path, "a.safetensors", seed=1, variant=DoRA(r=2))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).eval().to(torch.bfloat16)
    model = in_scope(scope, model, X.to(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        surgery.load(model, path)
    assert len(surgery.sites(model)) == 2


# ----- real causes named, not "a bug in the variant" -----


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("batch, words", [
    (torch.full((4, 8), float("nan")), ("NaN or Inf inputs at 0", "batch 1")),
    (torch.randn(4, 5), ("failed on calibration batch 1", "right shape")),
], ids=["nan-batch", "wrong-width"])
def test_bad_calibration_batches_are_named(scope, batch, words):
    refused(scope, lambda m: surgery.rewrite(m, REGISTRY["EVA"](r=2), "*", calibration=[batch]), E.CalibrationError, words)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_nan_base_weight_is_named_as_such(scope):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)).eval()
    model = in_scope(scope, eager, X)
    with torch.no_grad():
        eager[2].weight[0, 0] = float("nan")  # shared with the trace
    with pytest.raises(E.NonFiniteError, match="base weight or bias of 2 holds NaN"):
        surgery.rewrite(model, LoRA(r=2), "*")
    assert not surgery.sites(model)


def test_merge_with_warnings_as_errors_changes_nothing():
    """Merging a tied lm_head warns; with warnings raised as errors the merge must not be half done."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    surgery.rewrite(model, LoRA(r=2), ["lm_head", "*.k_proj"])
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.adapter_tensors()["lora_B"].add_(0.1)
    check_state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="untied"):
            surgery.merge(model)
    assert len(surgery.sites(model)) == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in check_state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.lm_head.base.weight is model.model.embed_tokens.weight


def test_a_save_writes_through_a_symlink_and_refuses_a_read_only_file(tmp_path):
    model = toy("module")
    surgery.rewrite(model, LoRA(r=2), "*")
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    surgery.save(model, link)
    assert link.is_symlink() and real.read_bytes() != b"old"
    assert surgery.sites(surgery.load(toy("module"), link))
    real.chmod(0o444)
    before = real.read_bytes()
    with pytest.raises(E.OutputPathError, match="read-only"):
        surgery.save(model, real)
    assert real.read_bytes() == before


def test_the_next_save_removes_what_a_killed_save_left_and_nothing_else(tmp_path):
    """A save killed mid-write (SIGKILL: no cleanup code runs) leaves its full-size temporary file; the next
    save into that folder removes it, and leaves alone a temporary file that a live process is writing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, surgery.io\n"
        "def slow(tmp):\n"
        "    open(tmp, 'wb').write(b'x' * 4096)\n"
        "    time.sleep(60)\n"
        f"surgery.io.atomic_write({str(tmp_path / 'a.safetensors')!r}, slow)\n"
    )])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".surgery-*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    (killed,) = tmp_path.glob(".surgery-*.tmp")
    live = tmp_path / killed.name.replace(f"-{child.pid}-", f"-{os.getpid()}-")
    live.write_bytes(b"y")

    model = toy("module")
    surgery.rewrite(model, LoRA(r=2), "*")
    surgery.save(model, tmp_path / "b.safetensors")
    assert not killed.exists(), "the killed save's temporary file is still there"
    assert live.exists(), "a live process's temporary file was removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "b.safetensors"])


def _renamed_site(tensors: dict, old: str, new: str) -> dict:
    return {(new + k[len(old):] if k.startswith(old + ".") else k): v for k, v in tensors.items()}


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("fmt", ["ours", "peft"])
def test_a_ten_megabyte_site_path_is_not_echoed_whole(scope, fmt, tmp_path, capsys):
    """A file can name a site with a path of any length; a message repeats at most a short prefix of it."""
    from surgery.cli import main
    from surgery.peft_format import PREFIX

    long = "x" * 10_000_000
    if fmt == "ours":
        path, _ = adapter_file(tmp_path, "a.safetensors", seed=1)
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata())
        sites = json.loads(metadata["sites"])
        sites[long] = sites.pop("0")
        metadata["sites"] = json.dumps(sites)
        save_file(_renamed_site(load_file(str(path)), "0", long), str(path), metadata=metadata)
        call = lambda m: surgery.load(m, path)  # noqa: E731
        assert main(["inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert "10,000,000 characters" in out and len(out) < 2000, out[:300]
    else:
        directory = peft_dir(tmp_path)
        weights = directory / "adapter_model.safetensors"
        save_file(_renamed_site(load_file(str(weights)), PREFIX + "0", PREFIX + long), str(weights))
        call = lambda m: surgery.import_peft(m, directory)  # noqa: E731
    refused(scope, call, E.BaseMismatchError, ("xxxxxxxx", "10,000,000 characters"))
    with pytest.raises(E.BaseMismatchError) as info:
        call(toy(scope))
    assert len(str(info.value)) < 1000, len(str(info.value))
