"""Switching adapters off (`surgery.disabled`) and setting their strength at run time (`surgery.scaled`,
`surgery.set_scale`), for every variant of the contract table, in both scopes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import surgery
from adapters import REGISTRY, LoRA
from cases import CASES
from models import LLAMA, SCOPES, in_scope, rel_err
from surgery import errors as E

X = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))


def toy(scope: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    return in_scope(scope, model, X)


def adapted(scope: str, case, seed: int = 1) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A toy rewritten with ``case`` and its trainable tensors moved away from identity, with the outputs
    of the base before the rewrite and of the adapter after the move."""
    model = toy(scope)
    base = model(X)
    calibration = [torch.randn(64, 16, generator=torch.Generator().manual_seed(2))] if case.calibration else None
    surgery.rewrite(model, case.variant, "*", calibration=calibration)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            for t in s.adapter_tensors().values():
                if t.requires_grad:
                    t.add_(0.3 * torch.randn(t.shape, generator=g))
    out = model(X)
    assert not torch.allclose(out, base, atol=1e-3), "the moved adapter must change the output"
    return model, base, out


class CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def ops_in(model: nn.Module) -> int:
    with CountOps() as count:
        model(X)
    return count.calls


# ----- disabled -----


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_disabled_runs_the_base_model_bit_for_bit(scope, case):
    model, base, out = adapted(scope, case)
    plain_ops = ops_in(toy(scope))
    with surgery.disabled(model):
        assert torch.equal(model(X), base)
        assert ops_in(model) == plain_ops, "an adapter op ran inside surgery.disabled"
    assert torch.equal(model(X), out), "the adapter did not come back after the block"


@pytest.mark.parametrize("scope", SCOPES)
def test_disabled_puts_the_adapter_back_after_an_exception_and_nests(scope):
    model, base, out = adapted(scope, CASES[0])
    with pytest.raises(KeyError):
        with surgery.disabled(model):
            with surgery.disabled(model):
                assert torch.equal(model(X), base)
            assert torch.equal(model(X), base)
            raise KeyError("inside")
    assert torch.equal(model(X), out)
    assert len(surgery.sites(model)) == 2


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("verb", ["rewrite", "merge", "save", "sites", "set_scale"])
def test_verbs_inside_disabled_are_refused(scope, verb, tmp_path):
    model, _, out = adapted(scope, CASES[0])
    calls = {
        "rewrite": lambda: surgery.rewrite(model, LoRA(r=2), "*"),
        "merge": lambda: surgery.merge(model),
        "save": lambda: surgery.save(model, tmp_path / "a.safetensors"),
        "sites": lambda: surgery.sites(model),
        "set_scale": lambda: surgery.set_scale(model, 0.5),
    }
    with surgery.disabled(model):
        with pytest.raises(E.AdaptersDisabledError) as info:
            calls[verb]()
        assert "after the `with` block" in str(info.value)
    assert torch.equal(model(X), out) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("scope", SCOPES)
def test_disabled_on_a_real_transformer_gives_its_reference_logits(scope):
    """What DPO needs: the reference model's logits from the model being trained, without a second copy."""
    model = LLAMA.model()
    ids = LLAMA.inputs()
    model = in_scope(scope, model, **ids)
    reference = LLAMA.out(model, ids)
    surgery.rewrite(model, LoRA(r=4), LLAMA.where)
    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_(0, 0.1)
    policy = LLAMA.out(model, ids)
    with torch.no_grad(), surgery.disabled(model):
        assert torch.equal(LLAMA.out(model, ids), reference)
    assert torch.equal(LLAMA.out(model, ids), policy)


# ----- scaled / set_scale -----


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_strength_zero_is_the_base_and_one_the_adapter_bit_for_bit(scope, case):
    model, base, out = adapted(scope, case)
    with surgery.scaled(model, 0.0):
        assert torch.equal(model(X), base)
    with surgery.scaled(model, 1.0):
        assert torch.equal(model(X), out)
    with surgery.scaled(model, 0.5):
        half = model(X)
    assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, out, atol=1e-4)
    assert torch.equal(model(X), out), "the old strength did not come back after the block"
    assert all(s.scale == 1.0 for s in surgery.sites(model).values())


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("c", [0.5, -1.0, 2.0])
def test_lora_at_strength_c_adds_c_times_its_delta(scope, c):
    """One LoRA site, so the blend is exactly y + c * (B A x) s."""
    torch.manual_seed(0)
    model = in_scope(scope, nn.Sequential(nn.Linear(16, 8)).eval(), X)
    base = model(X)
    surgery.rewrite(model, LoRA(r=4, alpha=8), "*")
    site = surgery.sites(model)["0"]
    with torch.no_grad():
        site.lora_B.normal_(0, 0.3)
    delta = (X @ site.lora_A.T @ site.lora_B.T) * LoRA(r=4, alpha=8).scale
    surgery.set_scale(model, c)
    assert (model(X) - (base + c * delta)).abs().max() <= 1e-6
    assert site.scale == c


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_merge_folds_the_adapter_at_its_strength(scope, case):
    model, _, _ = adapted(scope, case)
    surgery.set_scale(model, 0.5)
    running = model(X)
    surgery.merge(model)
    assert not surgery.sites(model)
    assert rel_err(model(X), running) <= case.fold


@pytest.mark.parametrize("scope", SCOPES)
def test_antipasto_strength_is_its_steering_coefficient(scope):
    """c = -1 on AntiPaSTO(alpha=1) is AntiPaSTO(alpha=-1) with the same tensors; one step can use +1 and -1,
    and its gradient is the sum of the two."""
    case = next(c for c in CASES if c.id == "antipasto")
    model, base, _ = adapted(scope, case)
    other = toy(scope)
    surgery.rewrite(other, REGISTRY["AntiPaSTO"](r=4, rotate_basis="V", block_size=2, alpha=-1.0), "*")
    mine, theirs = surgery.sites(model), surgery.sites(other)
    with torch.no_grad():
        for p in mine:
            for n, t in mine[p].adapter_tensors().items():
                theirs[p].adapter_tensors()[n].copy_(t)
    with surgery.scaled(model, -1.0):
        assert (model(X) - other(X)).abs().max() <= 1e-6
    with surgery.scaled(model, 0.0):
        assert torch.equal(model(X), base)

    def grads(*cs):
        for s in mine.values():
            for t in s.adapter_tensors().values():
                t.grad = None
        loss = 0
        for c in cs:
            with surgery.scaled(model, c):
                loss = loss + c * model(X).square().mean()
        loss.backward()
        return [t.grad.clone() for s in mine.values() for t in s.adapter_tensors().values() if t.requires_grad]

    both, plus, minus = grads(1.0, -1.0), grads(1.0), grads(-1.0)
    assert all(g.abs().sum() > 0 for g in both)
    assert all(torch.allclose(b, p + m, atol=1e-6) for b, p, m in zip(both, plus, minus))


@pytest.mark.parametrize("scope", SCOPES)
def test_a_new_strength_does_not_recompile(scope):
    case = CASES[0]
    model, base, out = adapted(scope, case)
    surgery.set_scale(model, 1.0)  # the first call adds the blend: compile after it
    compilations = []

    def backend(gm, example_inputs):
        compilations.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    assert torch.equal(compiled(X), out)
    for c in (0.0, 0.25, -1.0, 1.0):
        surgery.set_scale(model, c)
        got = compiled(X)
        with surgery.scaled(model, c):
            assert torch.equal(got, model(X))
    assert torch.equal(compiled(X), out)
    surgery.set_scale(model, 0.0)
    assert torch.equal(compiled(X), base)
    assert len(compilations) == 1, f"{len(compilations)} compilations"


@pytest.mark.parametrize("scope", SCOPES)
def test_the_strength_is_not_saved_with_the_adapter(scope, tmp_path):
    model, _, out = adapted(scope, CASES[0])
    surgery.set_scale(model, 0.25)
    surgery.save(model, tmp_path / "a.safetensors")
    fresh = toy(scope)
    surgery.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(X), out)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("c, words", [
    (float("nan"), ("finite number", "c=nan")),
    (float("inf"), ("finite number",)),
    ("0.5", ("finite number", "'0.5'")),
    (True, ("finite number", "c=True")),
])
def test_a_bad_strength_is_refused_and_changes_nothing(scope, c, words):
    model, _, out = adapted(scope, CASES[0])
    code = {p: s.code for p, s in surgery.sites(model).items()}
    with pytest.raises(E.ConfigError) as info:
        surgery.set_scale(model, c)
    assert all(w in str(info.value) for w in words), info.value
    assert torch.equal(model(X), out)
    assert {p: s.code for p, s in surgery.sites(model).items()} == code, "the blend went in before the check"


@pytest.mark.parametrize("scope", SCOPES)
def test_an_unknown_adapter_name_and_a_model_without_adapters_are_refused(scope):
    model, _, _ = adapted(scope, CASES[0])
    with pytest.raises(E.ConfigError, match="no adapter named 'dpo'.*'default'"):
        surgery.set_scale(model, 0.5, name="dpo")
    with pytest.raises(E.NotRewrittenError):
        with surgery.disabled(toy(scope)):
            pass
    with pytest.raises(E.NotRewrittenError):
        surgery.set_scale(toy(scope), 0.5)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_model_compiled_before_its_first_scale_sees_it(scope):
    """The first set_scale adds the blend (new code inside the model); compiled code from before must not
    go on without it."""
    model, base, out = adapted(scope, CASES[0])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(compiled(X), out)
    with surgery.disabled(model):
        assert torch.equal(compiled(X), base)
    surgery.set_scale(model, 0.0)
    assert torch.equal(compiled(X), base)
    surgery.set_scale(model, 1.0)
    assert torch.equal(compiled(X), out)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("case_id", ["lora", "antipasto"])
def test_files_hold_the_adapter_as_trained_whatever_the_strength(scope, case_id, tmp_path):
    from safetensors.torch import load_file

    model, _, _ = adapted(scope, next(c for c in CASES if c.id == case_id))
    surgery.export_peft(model, tmp_path / "at1")
    surgery.save(model, tmp_path / "at1.safetensors")
    surgery.set_scale(model, -0.5)
    surgery.export_peft(model, tmp_path / "scaled")
    surgery.save(model, tmp_path / "scaled.safetensors")
    for a, b in [(tmp_path / "at1" / "adapter_model.safetensors", tmp_path / "scaled" / "adapter_model.safetensors"),
                 (tmp_path / "at1.safetensors", tmp_path / "scaled.safetensors")]:
        x, y = load_file(str(a)), load_file(str(b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
