"""PiSSA: init equals PEFT's ``init_lora_weights="pissa"`` (A0, B0, residual W), outputs equal PEFT's
after the same adapter values, identity error on float32 and bf16 bases, reproducible ``niter``; the originals
the residuals replace stay out of memory and come back bit for bit."""

import copy
import errno
import os

import pytest
import torch

import surgery
from adapters import PiSSA
from models import GPT2, LLAMA, SCOPES, TINY, in_scope, randomise_adapters, rel_err
from peft_twin import assert_same_outputs, copy_from_peft, peft_model, randomise_peft
from surgery.errors import ConfigError
from surgery.offload import Spilled
from test_errors import assert_unchanged, snapshot


def peft_layer(pm, path):
    return pm.base_model.model.get_submodule(path)


@pytest.mark.parametrize("family,rslora", [(f, False) for f in TINY] + [(LLAMA, True)],
                         ids=[f.name for f in TINY] + ["llama-rslora"])
def test_pissa_matches_peft(family, rslora):
    from peft import LoraConfig

    base = family.model()
    ours = copy.deepcopy(base)
    surgery.rewrite(ours, PiSSA(r=4, alpha=12, rslora=rslora), family.where)  # s != 1: S is divided by s
    sites = surgery.sites(ours)
    pm = peft_model(base, LoraConfig(r=4, lora_alpha=12, use_rslora=rslora, init_lora_weights="pissa",
                                     target_modules=list(sites)))
    for path, site in sites.items():
        layer = peft_layer(pm, path)
        assert rel_err(site.lora_A, layer.lora_A["default"].weight) <= 1e-6
        assert rel_err(site.lora_B, layer.lora_B["default"].weight) <= 1e-6
        assert rel_err(site.weight, layer.base_layer.weight) <= 1e-6, f"residual weight differs at {path}"
        assert rel_err(site.weight, base.get_submodule(path).weight) > 1e-3, f"base weight not replaced at {path}"

    randomise_peft(pm)
    assert copy_from_peft(pm, ours) == 2 * len(sites)
    assert_same_outputs(family, base, ours, pm)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("family", TINY, ids=lambda f: f.name)
def test_identity_error_by_dtype(family, dtype, tol):
    """The numbers quoted in adapters/pissa.py: only the rounding of W_res to the base dtype remains."""
    base = family.model(dtype=dtype)
    x = family.inputs()
    model = surgery.rewrite(copy.deepcopy(base), PiSSA(r=4, alpha=8), family.where)
    err = rel_err(family.out(model, x), family.out(base, x))
    assert 0 < err <= tol, f"identity error {err:.3g} on a {dtype} base"
    site = next(iter(surgery.sites(model).values()))
    assert site.lora_A.dtype == torch.float32


def test_niter_is_seeded_reproducible_and_loads(tmp_path):
    family = LLAMA
    W = torch.randn(12, 10)
    rng = torch.get_rng_state()
    first = PiSSA(r=4, niter=2).principal(W)
    assert torch.equal(torch.get_rng_state(), rng), "niter must not consume the global RNG"
    torch.rand(5)
    assert all(torch.equal(u, v) for u, v in zip(first, PiSSA(r=4, niter=2).principal(W)))

    a = surgery.rewrite(family.model(), PiSSA(r=4, niter=2), family.where)
    torch.manual_seed(123)  # a different global state must not change the result
    b = surgery.rewrite(family.model(), PiSSA(r=4, niter=2), family.where)
    for (p, sa), sb in zip(surgery.sites(a).items(), surgery.sites(b).values()):
        assert torch.equal(sa.lora_A, sb.lora_A) and torch.equal(sa.weight, sb.weight), p
    exact = surgery.rewrite(family.model(), PiSSA(r=4), family.where)
    site = next(iter(surgery.sites(exact)))
    assert not torch.equal(surgery.sites(a)[site].lora_B, surgery.sites(exact)[site].lora_B), "niter ignored"

    with torch.no_grad():
        for s in surgery.sites(a).values():
            s.lora_A.add_(0.1 * torch.randn_like(s.lora_A))
    x = family.inputs()
    want = family.out(a, x)
    surgery.save(a, tmp_path / "p.safetensors")
    fresh = surgery.load(family.model(), tmp_path / "p.safetensors")
    assert rel_err(family.out(fresh, x), want) <= 1e-6


def test_merge_then_restore_on_conv1d():
    family = GPT2
    base = family.model()
    model = surgery.rewrite(copy.deepcopy(base), PiSSA(r=4, alpha=8), family.where)
    surgery.restore(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_rank_must_fit_the_weight():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    with pytest.raises(ConfigError, match=r"r=8 is larger than min\(d_in, d_out\)=5"):
        surgery.rewrite(model, PiSSA(r=8), "0")
    assert isinstance(model[0], torch.nn.Linear), "a failed rewrite must leave the model unchanged"


def test_bad_niter():
    with pytest.raises(ConfigError, match="niter"):
        PiSSA(r=4, niter=-1)


def mapping_of(t: torch.Tensor) -> str:
    """The pathname of the mapping that holds ``t``'s memory, from /proc/self/maps ("" for anonymous memory)."""
    addr = t.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        lo, hi = (int(a, 16) for a in fields[0].split("-"))
        if lo <= addr < hi:
            return fields[5].strip() if len(fields) == 6 else ""
    raise AssertionError(f"no mapping holds address {addr:#x}")


def kept_out_of_memory(model, eager, scope: str) -> None:
    """Module scope: each kept original is a private mapping of an unlinked temporary file. Graph scope: it is
    the eager model's own tensor (the record's original module holds that anyway), not a copy."""
    sites = surgery.sites(model)
    assert sites and all(s.replaced_base for s in sites.values())
    for path, site in sites.items():
        kept = site.kept_weight
        if scope == "module":
            where = mapping_of(kept)
            assert "surgery-kept-" in where and where.endswith("(deleted)"), f"{path}'s original is in {where!r}"
        else:
            assert kept.data_ptr() == eager.get_submodule(path).weight.data_ptr(), f"{path}'s original was copied"


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=lambda f: f.name)
@pytest.mark.parametrize("scope", SCOPES)
def test_kept_originals_stay_out_of_memory_and_come_back_exactly(scope, family, dtype):
    eager = family.model(dtype=dtype)
    x = family.inputs()
    want = family.out(eager, x)
    model = in_scope(scope, eager, **x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fds = set(os.listdir("/proc/self/fd"))
    surgery.rewrite(model, PiSSA(r=4, alpha=8), family.where)
    assert set(os.listdir("/proc/self/fd")) <= fds, "the staged residuals' file outlived the rewrite"
    randomise_adapters(model)
    kept_out_of_memory(model, eager, scope)
    assert not torch.equal(family.out(model, x), want), "the adapter changes nothing: the checks below prove nothing"

    with surgery.disabled(model):
        assert torch.equal(family.out(model, x), want)
    surgery.set_scale(model, 0.0)
    assert torch.equal(family.out(model, x), want)
    surgery.set_scale(model, 1.0)

    model.to("cpu").to(dtype)  # a no-op cast keeps the files
    kept_out_of_memory(model, eager, scope)
    copied = copy.deepcopy(model)
    surgery.restore(copied)
    assert all(torch.equal(v, before[k]) for k, v in copied.state_dict().items())

    model.to(torch.float64)
    surgery.restore(model)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v.double()) if v.is_floating_point() else torch.equal(after[k], v)
               for k, v in before.items())


@pytest.mark.parametrize("scope", SCOPES)
def test_a_read_failing_mid_commit_leaves_the_model_unchanged(scope, monkeypatch):
    """The residuals wait in a file until commit; a read that fails there, after two sites took theirs, puts
    the originals back."""
    family = LLAMA
    model = in_scope(scope, family.model(), **family.inputs())
    snap = snapshot(model)
    real, calls = Spilled.load, []

    def load(self):
        calls.append(self)
        if len(calls) == 9:  # the six sites' identity probes, then the third commit
            raise OSError(errno.EIO, "Input/output error")
        return real(self)

    monkeypatch.setattr(Spilled, "load", load)
    with pytest.raises(OSError, match="Input/output error"):
        surgery.rewrite(model, PiSSA(r=4), family.where)
    assert len(calls) == 9 and len({id(c) for c in calls}) == 6, "not the commit's read: the test proves nothing"
    assert_unchanged(model, snap)
