"""Named adapters: several at one site (`rewrite(name=)`), which of them run (`activate`), removing one
(`delete`), making one from others (`combine`), per-name strength, and names through save/load and PEFT's
format; in both scopes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import surgery
from adapters import DoRA, IA3, LoRA, PiSSA
from cases import CASES
from models import LLAMA, SCOPES, in_scope, rel_err
from surgery import errors as E
from test_errors import assert_unchanged, snapshot

X = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))


def toy(scope: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    return in_scope(scope, model, X)


def layer(scope: str) -> nn.Module:
    """One linear layer: its output is linear in each adapter's change, so changes add up at the output."""
    torch.manual_seed(0)
    return in_scope(scope, nn.Sequential(nn.Linear(16, 8)).eval(), X)


def move(model: nn.Module, name: str, seed: int, scale: float = 0.3) -> None:
    """Move adapter ``name``'s trainable tensors off their init at every site."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            if name in s.names:
                for t in s.adapter(name).adapter_tensors().values():
                    if isinstance(t, nn.Parameter):
                        t.add_(scale * torch.randn(t.shape, generator=g))


def two(scope: str, first=LoRA(r=4, alpha=8), second=LoRA(r=2, alpha=4), build=toy) -> tuple[nn.Module, torch.Tensor]:
    """A toy with adapters 'a' and 'b' at every layer, each moved off identity; and the base output."""
    model = build(scope)
    base = model(X)
    surgery.rewrite(model, first, "*", name="a")
    move(model, "a", 1)
    surgery.rewrite(model, second, "*", name="b")
    move(model, "b", 2)
    return model, base


def outputs_of(model: nn.Module, *names: str) -> torch.Tensor:
    surgery.activate(model, *names)
    return model(X)


# ----- names and several adapters at one site -----


@pytest.mark.parametrize("scope", SCOPES)
def test_names_are_listed_in_the_order_they_were_added(scope):
    model = toy(scope)
    surgery.rewrite(model, LoRA(r=2), "2", name="z")
    surgery.rewrite(model, IA3(), "*", name="m")
    surgery.rewrite(model, LoRA(r=2), "0", name="a")
    assert surgery.adapter_names(model) == ["z", "m", "a"]
    sites = surgery.sites(model)
    assert sites["0"].names == ["m", "a"] and sites["2"].names == ["z", "m"]
    assert sites["2"].adapter("z").variant == LoRA(r=2)
    assert {"2.adapters.z.lora_A", "2.adapters.m.ia3_l", "0.adapters.a.lora_B"} <= set(dict(model.named_parameters()))


@pytest.mark.parametrize("scope", SCOPES)
def test_a_second_adapter_starts_at_identity_on_a_trained_first(scope):
    model = toy(scope)
    surgery.rewrite(model, LoRA(r=4), "*", name="a")
    move(model, "a", 1)
    before = model(X)
    surgery.rewrite(model, DoRA(r=2), "*", name="b")
    assert torch.equal(model(X), before)


@pytest.mark.parametrize("scope", SCOPES)
def test_several_active_adapters_add_their_changes(scope):
    model, base = two(scope, first=DoRA(r=4), second=IA3(feedforward=()), build=layer)
    a, b, ab = outputs_of(model, "a"), outputs_of(model, "b"), outputs_of(model, "a", "b")
    assert rel_err(ab, base + (a - base) + (b - base)) < 1e-5
    assert rel_err(a, base) > 1e-2 and rel_err(b, base) > 1e-2


@pytest.mark.parametrize("scope", SCOPES)
def test_two_loras_on_one_layer_compute_y_plus_both_deltas(scope):
    model = layer(scope)
    base = model(X)
    surgery.rewrite(model, LoRA(r=4, alpha=8), "*", name="a")
    surgery.rewrite(model, LoRA(r=2, alpha=6), "*", name="b")
    move(model, "a", 1)
    move(model, "b", 2)
    site = surgery.sites(model)["0"]
    A, B = site.adapter("a").adapter_tensors(), site.adapter("b").adapter_tensors()
    want = base + 2.0 * X @ A["lora_A"].T @ A["lora_B"].T + 3.0 * X @ B["lora_A"].T @ B["lora_B"].T
    assert (model(X) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("case", [c for c in CASES if not isinstance(c.variant, PiSSA)], ids=str)
def test_every_variant_joins_a_trained_adapter_at_identity_and_merges(scope, case):
    """Each variant as the second adapter of a site: identity at init beside a moved LoRA, then the sum.
    (PiSSA replaces the base weight, so it is refused beside another adapter: ``pissa-beside`` below.)"""
    model = toy(scope)
    surgery.rewrite(model, LoRA(r=4), "*", name="a")
    move(model, "a", 1)
    before = model(X)
    calibration = [torch.randn(64, 16, generator=torch.Generator().manual_seed(2))] if case.calibration else None
    surgery.rewrite(model, case.variant, "*", calibration=calibration, name="b")
    assert rel_err(model(X), before) <= case.identity
    move(model, "b", 2, scale=0.1)
    moved = model(X)
    assert rel_err(moved, before) > 1e-4, "the second adapter's tensors must reach the output"
    surgery.merge(model)
    assert rel_err(model(X), moved) <= case.fold
    assert not surgery.sites(model)


@pytest.mark.parametrize("scope", SCOPES)
def test_merge_folds_the_active_adapters_at_their_strengths(scope):
    model, _ = two(scope)
    surgery.activate(model, "a", "b")
    surgery.set_scale(model, 0.5, name="b")
    out = model(X)
    surgery.merge(model)
    assert not surgery.sites(model)
    assert rel_err(model(X), out) < 1e-5


@pytest.mark.parametrize("scope", SCOPES)
def test_merge_leaves_out_inactive_adapters(scope):
    model, _ = two(scope)
    out = outputs_of(model, "b")
    surgery.merge(model)
    assert rel_err(model(X), out) < 1e-5


# ----- activate -----


@pytest.mark.parametrize("scope", SCOPES)
def test_activate_trains_the_active_and_freezes_the_others_with_the_same_tensors(scope):
    model, _ = two(scope)
    tensors = {n: dict(surgery.sites(model)["0"].adapter(n).adapter_tensors()) for n in ("a", "b")}
    surgery.activate(model, "b")
    site = surgery.sites(model)["0"]
    assert site.active == ("b",)
    for n in ("a", "b"):
        now = site.adapter(n).adapter_tensors()
        assert all(now[k] is t for k, t in tensors[n].items()), "activate must keep the tensor objects"
        assert all(t.requires_grad == (n == "b") for t in now.values() if isinstance(t, nn.Parameter))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    a_before = {k: t.detach().clone() for k, t in tensors["a"].items()}
    model(X).square().sum().backward()
    opt.step()
    assert all(torch.equal(tensors["a"][k], v) for k, v in a_before.items()), "an inactive adapter trained"
    assert not torch.equal(tensors["b"]["lora_B"], tensors["b"]["lora_B"].detach().clone().zero_())


@pytest.mark.parametrize("scope", SCOPES)
def test_activate_switches_back_exactly(scope):
    model, _ = two(scope)
    both = model(X)
    only_a = outputs_of(model, "a")
    assert torch.equal(outputs_of(model, "a", "b"), both)
    assert torch.equal(outputs_of(model, "a"), only_a)


@pytest.mark.parametrize("scope", SCOPES)
def test_disabled_is_the_base_bit_for_bit_with_several_adapters(scope):
    model, base = two(scope)
    out = model(X)
    with surgery.disabled(model):
        assert torch.equal(model(X), base)
    assert torch.equal(model(X), out)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_strength_per_name(scope):
    model, base = two(scope, build=layer)
    a, b = outputs_of(model, "a"), outputs_of(model, "b")
    surgery.activate(model, "a", "b")
    with surgery.scaled(model, 0.0, name="a"):
        assert rel_err(model(X), b) < 1e-6
    with surgery.scaled(model, 0.5, name="b"):
        assert rel_err(model(X), base + (a - base) + 0.5 * (b - base)) < 1e-5
    surgery.set_scale(model, 0.0)
    assert torch.equal(model(X), base)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_strength_set_while_inactive_holds_once_active(scope):
    model, base = two(scope, build=layer)
    b = outputs_of(model, "b")
    surgery.activate(model, "a")
    surgery.set_scale(model, 0.5, name="b")
    surgery.activate(model, "b")
    assert rel_err(model(X), base + 0.5 * (b - base)) < 1e-5


# ----- delete -----


@pytest.mark.parametrize("scope", SCOPES)
def test_delete_leaves_the_others_exact(scope):
    model, _ = two(scope)
    only_b = outputs_of(model, "b")
    surgery.activate(model, "a", "b")
    surgery.delete(model, "a")
    assert surgery.adapter_names(model) == ["b"]
    assert torch.equal(model(X), only_b)
    assert "0.adapters.b.lora_A" in dict(model.named_parameters())
    assert not any(".lora_A" == k[-7:] and "adapters" not in k for k in dict(model.named_parameters()))


@pytest.mark.parametrize("scope", SCOPES)
def test_deleting_the_last_adapter_gives_the_original_modules_back(scope):
    model = toy(scope)
    base = model(X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    surgery.rewrite(model, LoRA(r=2), "*", name="a")
    move(model, "a", 1)
    surgery.delete(model, "a")
    assert not surgery.sites(model)
    assert torch.equal(model(X), base)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == model.state_dict().keys()


# ----- refusals, each leaving the model as it was -----


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("call, error, words", [
    (lambda m: surgery.rewrite(m, LoRA(r=2), "*", name="a"), E.AlreadyRewrittenError, ("already has an adapter named 'a'",)),
    (lambda m: surgery.rewrite(m, LoRA(r=2), "*", name="a.b"), E.ConfigError, ("adapter name", "'a.b'")),
    (lambda m: surgery.rewrite(m, LoRA(r=2), "*", name=""), E.ConfigError, ("adapter name",)),
    (lambda m: surgery.rewrite(m, PiSSA(r=2), "*", name="p"), E.ConfigError, ("replaces the base weight", "only adapter")),
    (lambda m: surgery.rewrite(m, LoRA(r=2, dtype=torch.float64), "*", name="d"), E.ConfigError, ("one dtype", "float64")),
    (lambda m: surgery.activate(m, "nope"), E.ConfigError, ("no adapter named 'nope'", "['a', 'b']")),
    (lambda m: surgery.activate(m), E.ConfigError, ("at least one", "surgery.disabled")),
    (lambda m: surgery.delete(m, "nope"), E.ConfigError, ("no adapter named 'nope'",)),
    (lambda m: surgery.set_scale(m, 0.5, name="nope"), E.ConfigError, ("no adapter named 'nope'",)),
    (lambda m: surgery.combine(m, {"a": 1.0}, name="b"), E.ConfigError, ("exists",)),
    (lambda m: surgery.combine(m, {"a": float("nan")}, name="c"), E.ConfigError, ("finite",)),
    (lambda m: surgery.combine(m, {"a": 1.0}, name="c", how="cat"), E.ConfigError, ("'linear' or 'svd'",)),
    (lambda m: surgery.combine(m, {}, name="c"), E.ConfigError, ("non-empty",)),
], ids=["same-name", "dotted-name", "empty-name", "pissa-beside", "dtype-clash", "activate-unknown", "activate-none",
        "delete-unknown", "scale-unknown", "combine-existing", "combine-nan", "combine-how", "combine-empty"])
def test_bad_names_are_refused_and_leave_the_model_as_it_was(scope, call, error, words):
    model, _ = two(scope)
    snap = snapshot(model)
    out = model(X)
    with pytest.raises(error) as info:
        call(model)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert_unchanged(model, snap)
    assert torch.equal(model(X), out)


@pytest.mark.parametrize("scope", SCOPES)
def test_nothing_joins_a_pissa_site_and_pissa_stays_on(scope):
    model = toy(scope)
    surgery.rewrite(model, PiSSA(r=2), "*")
    snap = snapshot(model)
    with pytest.raises(E.ConfigError, match="replaces the base weight"):
        surgery.rewrite(model, LoRA(r=2), "*", name="b")
    assert_unchanged(model, snap)


# ----- combine -----


def delta_of(view, dtype=torch.float64) -> torch.Tensor:
    return view.fold(dtype, at=1.0)[0] - view.fold(dtype, at=0.0)[0]


@pytest.mark.parametrize("scope", SCOPES)
def test_combine_linear_is_the_weighted_sum_of_the_changes(scope):
    model, _ = two(scope, first=LoRA(r=4, alpha=8), second=DoRA(r=2), build=layer)
    surgery.combine(model, {"a": 0.7, "b": -0.3}, name="ab")
    for s in surgery.sites(model).values():
        want = 0.7 * delta_of(s.adapter("a")) - 0.3 * delta_of(s.adapter("b"))
        got = delta_of(s.adapter("ab"))
        assert rel_err(got, want) < 1e-5
    assert surgery.adapter_names(model) == ["a", "b", "ab"]
    out_ab = outputs_of(model, "ab")
    a, b, base = outputs_of(model, "a"), outputs_of(model, "b"), None
    with surgery.disabled(model):
        base = model(X)
    assert rel_err(out_ab, base + 0.7 * (a - base) - 0.3 * (b - base)) < 1e-4


@pytest.mark.parametrize("scope", SCOPES)
def test_combine_linear_of_loras_concatenates_exactly(scope):
    model, _ = two(scope)
    surgery.combine(model, {"a": 0.5, "b": 2.0}, name="ab")
    site = surgery.sites(model)["0"]
    assert site.adapter("ab").variant.r == 6
    want = 0.5 * delta_of(site.adapter("a")) + 2.0 * delta_of(site.adapter("b"))
    assert rel_err(delta_of(site.adapter("ab")), want) < 1e-6


@pytest.mark.parametrize("scope", SCOPES)
def test_combine_svd_is_within_the_truncation_error(scope):
    model, _ = two(scope)
    surgery.combine(model, {"a": 1.0, "b": 1.0}, name="svd", how="svd", r=3)
    for s in surgery.sites(model).values():
        want = delta_of(s.adapter("a")) + delta_of(s.adapter("b"))
        S = torch.linalg.svdvals(want)
        got = delta_of(s.adapter("svd"))
        assert s.adapter("svd").variant.r == 3
        # the best rank-3 approximation: its spectral error is the 4th singular value
        assert torch.linalg.matrix_norm(got - want, ord=2) <= S[3] * (1 + 1e-4) + 1e-6


# ----- files -----


@pytest.mark.parametrize("scope", SCOPES)
def test_save_and_load_keep_names_and_which_run(scope, tmp_path):
    model, _ = two(scope)
    surgery.activate(model, "b")
    out = model(X)
    surgery.save(model, tmp_path / "ab.safetensors")
    fresh = toy(scope)
    surgery.load(fresh, tmp_path / "ab.safetensors")
    assert surgery.adapter_names(fresh) == ["a", "b"]
    assert surgery.sites(fresh)["0"].active == ("b",)
    assert torch.equal(fresh(X), out)
    assert torch.equal(outputs_of(fresh, "a"), outputs_of(model, "a"))


@pytest.mark.parametrize("scope", SCOPES)
def test_one_adapter_saved_loads_under_another_name_beside_others(scope, tmp_path):
    model, _ = two(scope)
    only_b = outputs_of(model, "b")
    surgery.save(model, tmp_path / "b.safetensors", name="b")
    fresh = toy(scope)
    surgery.rewrite(fresh, IA3(), "*", name="x")
    surgery.load(fresh, tmp_path / "b.safetensors", name="renamed")
    assert surgery.adapter_names(fresh) == ["x", "renamed"]
    assert torch.equal(outputs_of(fresh, "renamed"), only_b)
    with pytest.raises(E.AlreadyRewrittenError, match="'renamed'"):
        surgery.load(fresh, tmp_path / "b.safetensors", name="renamed")
    surgery.save(model, tmp_path / "ab.safetensors")
    with pytest.raises(E.AdapterFileError, match="none named 'zzz'"):
        surgery.load(toy(scope), tmp_path / "ab.safetensors", name="zzz")


@pytest.mark.parametrize("scope", SCOPES)
def test_a_default_adapter_file_is_the_format_it_always_was(scope, tmp_path):
    """Files of one adapter named "default" keep the key and entry layout of format 1, so older files load."""
    from safetensors import safe_open

    model = toy(scope)
    surgery.rewrite(model, LoRA(r=2), "*")
    surgery.save(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    import json

    assert set(json.loads(meta["sites"])["0"]) == {"variant", "config", "base"}


def peft_outputs(base: nn.Module, directory, ids, adapter: str | None = None) -> torch.Tensor:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    if adapter is not None:
        pm.load_adapter(str(directory / adapter), adapter_name=adapter)
        pm.set_adapter(adapter)
    with torch.no_grad():
        return pm(**ids).logits


@pytest.mark.parametrize("scope", SCOPES)
def test_export_peft_lays_named_adapters_out_as_peft_does(scope, tmp_path):
    base = LLAMA.model()
    ids = LLAMA.inputs()
    model = in_scope(scope, copy.deepcopy(base), **ids)
    surgery.rewrite(model, LoRA(r=4, alpha=8), LLAMA.where)
    surgery.rewrite(model, LoRA(r=2, alpha=2), LLAMA.where, name="second")
    for n in ("default", "second"):
        g = torch.Generator().manual_seed(len(n))
        with torch.no_grad():
            for s in surgery.sites(model).values():
                s.adapter(n).adapter_tensors()["lora_B"].normal_(0, 0.1, generator=g)
    surgery.export_peft(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "second" / "adapter_config.json").is_file()
    for n in ("default", "second"):
        surgery.activate(model, n)
        ours = LLAMA.out(model, ids)
        theirs = peft_outputs(base, tmp_path, ids, None if n == "default" else n)
        assert rel_err(theirs, ours) < 1e-5, n
    fresh = in_scope(scope, copy.deepcopy(base), **ids)
    surgery.import_peft(fresh, tmp_path)
    surgery.import_peft(fresh, tmp_path / "second", name="second")
    assert surgery.adapter_names(fresh) == ["default", "second"]
    surgery.activate(fresh, "second")
    assert rel_err(LLAMA.out(fresh, ids), LLAMA.out(model, ids)) < 1e-6


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_adapter_tensors_are_contiguous(scope, case):
    """FSDP2's fully_shard refuses strided parameters (an SVD's factors, as PiSSA's A and B came out)."""
    model = toy(scope)
    calibration = [torch.randn(64, 16, generator=torch.Generator().manual_seed(2))] if case.calibration else None
    surgery.rewrite(model, case.variant, "*", calibration=calibration)
    strided = [f"{p}.{n}" for p, s in surgery.sites(model).items() for n, t in s.adapter_tensors().items()
               if not t.is_contiguous()]
    assert not strided, strided
