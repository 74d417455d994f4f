"""AntiPaSTO's own edge cases: each rotate_basis against the author's explicit-weight formula, exact
identity, orthogonal Cayley blocks, reversal at alpha = -1, gradients at init, and config errors."""

import copy

import pytest
import torch

import surgery
from adapters import AntiPaSTO
from adapters.antipasto import cayley_blocks
from models import GPT2, rel_err
from surgery.errors import BaseMismatchError, ConfigError

BASES = ["V", "U", "none"]


def linear(d_in=12, d_out=10, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_out))


def randomise(site, seed=3, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in ("antipasto_delta", "antipasto_rot"):
            if hasattr(site, n):
                getattr(site, n).add_(scale * torch.randn(getattr(site, n).shape, generator=g))


def blockdiag(R):
    return torch.block_diag(*R)


@pytest.mark.parametrize("basis", BASES)
def test_matches_explicit_svd_weight(basis):
    """The author's form: W_adapted = U_rot diag(S + c d) V_rot^T + W_res, built as one dense weight."""
    base = linear()
    model = surgery.rewrite(copy.deepcopy(base), AntiPaSTO(r=4, rotate_basis=basis, block_size=2, alpha=0.7), "0")
    site = surgery.sites(model)["0"]
    randomise(site)
    W = base[0].weight.detach()
    U, S, V = site.antipasto_U.detach(), site.antipasto_S, site.antipasto_V.detach().t()  # SVD signs as stored
    assert rel_err(S, torch.linalg.svdvals(W)[:4]) <= 1e-6
    assert rel_err(U.t() @ W @ V, torch.diag(S)) <= 1e-5, "stored U, V are not W's top singular pairs"
    W_res = W - U @ torch.diag(S) @ V.t()
    R = blockdiag(cayley_blocks(site.antipasto_rot.detach(), 2, 2, 0.7)) if basis != "none" else torch.eye(4)
    U_rot, V_rot = (U @ R, V) if basis == "U" else (U, V @ R)
    W_adapted = U_rot @ torch.diag(S + 0.7 * site.antipasto_delta.detach()) @ V_rot.t() + W_res
    x = torch.randn(5, 12)
    want = x @ W_adapted.t() + base[0].bias.detach()
    got = model(x)
    assert rel_err(got, base(x)) > 1e-3, "the randomised adapter changed nothing"
    assert rel_err(got, want) <= 1e-5
    W_fold, _ = site.fold()
    assert rel_err(W_fold, W_adapted) <= 1e-5


@pytest.mark.parametrize("basis", BASES)
def test_identity_is_exact_and_every_tensor_gets_a_gradient_on_step_one(basis):
    family = GPT2  # Conv1D layout
    base = family.model()
    x = family.inputs()
    model = surgery.rewrite(copy.deepcopy(base), AntiPaSTO(r=4, rotate_basis=basis), family.where)
    out = family.out(model, x)
    assert torch.equal(out, family.out(base, x)), "the delta form should add exactly zero at init"
    out.pow(2).sum().backward()
    for path, site in surgery.sites(model).items():
        names = {n for n, p in site.named_parameters() if p.requires_grad}
        assert names == ({"antipasto_delta"} | ({"antipasto_rot"} if basis != "none" else set()))
        for n in names:
            assert getattr(site, n).grad.abs().sum() > 0, f"{path}.{n} has no gradient at init"
        assert {"antipasto_U", "antipasto_S", "antipasto_V"} <= {n for n, _ in site.named_buffers()}


def test_cayley_blocks_are_rotations_and_alpha_reverses():
    rot = torch.randn(3, 6, dtype=torch.float64)  # 3 blocks of 4x4
    R = cayley_blocks(rot, 3, 4, 1.0)
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(R, eye, atol=1e-3)
    assert torch.allclose(cayley_blocks(rot, 3, 4, -1.0), R.transpose(-1, -2), atol=1e-12), "R(-c) = R(c)^T"
    assert torch.equal(cayley_blocks(torch.zeros(3, 6), 3, 4, 1.0), torch.eye(4).expand(3, 4, 4))


def test_alpha_zero_is_the_base_and_minus_one_reverses_the_singular_value_delta():
    base = linear()
    x = torch.randn(5, 12)
    outs = {}
    for c in (1.0, -1.0, 0.0):
        model = surgery.rewrite(copy.deepcopy(base), AntiPaSTO(r=4, rotate_basis="none", alpha=c), "0")
        randomise(surgery.sites(model)["0"])
        outs[c] = model(x)
    y = base(x)
    assert rel_err(outs[0.0], y) <= 1e-6
    assert rel_err(outs[1.0] - y, -(outs[-1.0] - y)) <= 1e-5


def test_save_load_rebuilds_the_frozen_basis_from_the_file(tmp_path):
    model = surgery.rewrite(linear(), AntiPaSTO(r=4, rotate_basis="U", block_size=2), "0")
    randomise(surgery.sites(model)["0"])
    x = torch.randn(5, 12)
    surgery.save(model, tmp_path / "a.safetensors")
    other_base = linear(seed=1)  # same shapes, other weights: U, S, V must come from the file
    loaded = surgery.load(linear(), tmp_path / "a.safetensors")
    assert rel_err(loaded(x), model(x)) <= 1e-6
    with pytest.raises(BaseMismatchError, match="saved on another base"):  # U, S, V were computed from W
        surgery.load(other_base, tmp_path / "a.safetensors")
    on_other = surgery.load(other_base, tmp_path / "a.safetensors", check_base=False)
    site = surgery.sites(on_other)["0"]
    assert torch.equal(site.antipasto_U, surgery.sites(model)["0"].antipasto_U)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=4, block_size=3), "block_size must be a positive divisor of r=4"),
    (dict(r=4, block_size=1), "block_size=1"),
    (dict(r=1), "block_size=1"),
    (dict(r=4, rotate_basis="W"), "rotate_basis"),
    (dict(r=0), "r must be a positive integer"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AntiPaSTO(**kwargs)


def test_rank_must_fit_the_weight():
    model = linear(12, 3)
    with pytest.raises(ConfigError, match=r"r=4 is larger than min\(d_in, d_out\)=3"):
        surgery.rewrite(model, AntiPaSTO(r=4), "0")
    assert isinstance(model[0], torch.nn.Linear)
