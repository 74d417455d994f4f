"""EVA: A spans the exact PCA of each site's unmasked calibration inputs, masked tokens are ignored,
rank redistribution matches an independent ranking, forward equals PEFT's LoRA, sites reading one input
share one statistic (only while they really do) with the A each would get alone, and its errors."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import surgery
from adapters import EVA
from models import GPT2, LLAMA, SCOPES, in_scope, rel_err
from peft_twin import copy_from_peft, peft_model, randomise_peft
from surgery.errors import CalibrationError, ConfigError


def padded_batches(family, n=3, batch=4, seq=8):
    """Right-padded batches: each row keeps a different number of real tokens."""
    out = []
    for s in range(n):
        b = family.inputs(batch=batch, seq=seq, seed=s)
        for i in range(batch):
            b["attention_mask"][i, seq - i - 1:] = 0 if i else 1
        out.append(b)
    return out


def site_inputs(family, model, paths, batches):
    """Every unmasked input row of each leaf, float64, gathered with our own hooks."""
    rows = {p: [] for p in paths}
    mask = [None]
    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, p=p: rows[p].append(a[0][mask[0]].double())) for p in paths]
    with torch.no_grad():
        for b in batches:
            mask[0] = b["attention_mask"].bool()
            model(**b)
    for h in hooks:
        h.remove()
    return {p: torch.cat(r).numpy() for p, r in rows.items()}


def principal_cosines(A, B):
    """Cosines of the principal angles between the row spaces of A and B (orthonormalised)."""
    qa, qb = np.linalg.qr(np.asarray(A, dtype=np.float64).T)[0], np.linalg.qr(np.asarray(B, dtype=np.float64).T)[0]
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def exact_pca(X):
    Xc = X - X.mean(0)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    return s**2 / (len(X) - 1), vt


@pytest.mark.parametrize("n", [20, 24, 40], ids=["rows kept", "as many as the width", "Gram"])
def test_a_statistic_decomposes_to_the_exact_pca(n):
    """A statistic keeps its rows while they are no more than their width (decomposed through their n x n matrix) and
    their Gram once they outnumber it (an eigendecomposition), crossing over between batches: either way the
    eigenvalues and leading eigenvectors are the exact PCA's."""
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(n, 24, generator=g) @ torch.diag(torch.linspace(3, 0.1, 24))).double() + 5
    eva = EVA(r=3)
    m = eva.observe(eva.observe(None, X[:12]), X[12:])
    assert (m.gram is None) == (n <= 24) and (m.rows_seen is None) == (n > 24)
    values, rows = m.principal(5)
    want_values, want_rows = exact_pca(X.numpy())
    assert np.allclose(values.numpy()[: n - 1], want_values[: n - 1], rtol=1e-9, atol=1e-9)
    assert principal_cosines(rows.numpy(), want_rows[:5]).min() >= 1 - 1e-9
    assert m.gram is None and m.rows_seen is None and m.total is None, "the statistic is freed"
    assert torch.equal(m.principal(3)[1], rows[:3]), "later calls return what the first kept"


def test_rows_spanning_fewer_directions_than_asked_still_give_orthonormal_components():
    """20 rows spanning 3 directions, 5 components asked: the 4th and 5th have no variance (the shortcut through
    the 20 x 20 matrix would divide by zero there), so they come from an SVD: orthonormal, the first 3 exact."""
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(20, 3, generator=g) @ torch.randn(3, 24, generator=g)).double() + 1
    m = EVA(r=3).observe(None, X)
    values, rows = m.principal(5)
    assert rows.shape == (5, 24) and torch.isfinite(rows).all()
    assert torch.allclose(rows @ rows.t(), torch.eye(5, dtype=torch.float64), atol=1e-10)
    want_values, want_rows = exact_pca(X.numpy())
    assert np.allclose(values.numpy()[:3], want_values[:3], rtol=1e-9)
    assert values[3:].abs().max() <= 1e-9 * values[0]
    assert principal_cosines(rows[:3].numpy(), want_rows[:3]).min() >= 1 - 1e-9


@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=lambda f: f.name)
def test_A_spans_the_exact_pca_of_unmasked_inputs(family):
    base = family.model()
    batches = padded_batches(family)
    model = surgery.rewrite(copy.deepcopy(base), EVA(r=4, rho=1.0), family.where, calibration=batches)
    X = site_inputs(family, base, list(surgery.sites(model)), batches)
    for path, site in surgery.sites(model).items():
        A = site.lora_A.detach()
        assert torch.allclose(A @ A.t(), torch.eye(4), atol=1e-5), "rows of A should be orthonormal"
        assert not site.lora_B.any()
        cos = principal_cosines(A.numpy(), exact_pca(X[path])[1][:4])
        assert cos.min() >= 1 - 1e-5, f"{path}: principal cosines {cos}"


def test_masked_tokens_are_excluded():
    family = LLAMA
    base = family.model()
    batches = padded_batches(family)
    changed = copy.deepcopy(batches)
    for b in changed:
        pad = b["attention_mask"] == 0
        b["input_ids"][pad] = (b["input_ids"][pad] + 17) % family.vocab

    def A_of(bs):
        m = surgery.rewrite(copy.deepcopy(base), EVA(r=4, rho=1.0), family.where, calibration=bs)
        return {p: s.lora_A.detach() for p, s in surgery.sites(m).items()}

    ref, same = A_of(batches), A_of(changed)
    for p in ref:
        assert principal_cosines(ref[p], same[p]).min() >= 1 - 1e-6, f"masked tokens changed A at {p}"
    unmasked = [dict(b, attention_mask=torch.ones_like(b["attention_mask"])) for b in changed]
    moved = A_of(unmasked)
    assert min(principal_cosines(ref[p], moved[p]).min() for p in ref) < 0.99, "control: the padded rows matter"


def test_rank_redistribution_matches_an_independent_ranking(tmp_path):
    family = LLAMA
    base = family.model()
    batches = padded_batches(family)
    r, rho = 8, 2.0  # on this model, ranks come out unequal
    model = surgery.rewrite(copy.deepcopy(base), EVA(r=r, alpha=8, rho=rho), family.where, calibration=batches)
    paths = [p for p, _ in base.named_modules() if p.endswith(("k_proj", "v_proj", "down_proj"))]
    X = site_inputs(family, base, paths, batches)
    pool = []
    for p in paths:
        var, _ = exact_pca(X[p])
        pool += [(v, p) for v in (var / var.sum())[: round(rho * r)]]
    pool.sort(key=lambda vp: -vp[0])
    want = {p: 0 for p in paths}
    for _, p in pool[: r * len(paths)]:
        want[p] += 1
    got = {p: s.variant.r for p, s in surgery.sites(model).items()}
    assert got == {p: k for p, k in want.items() if k > 0}
    assert len(set(got.values())) > 1, "expected unequal ranks on this model"
    for s in surgery.sites(model).values():
        assert s.variant.alpha == pytest.approx(8 * s.variant.r / r)
        assert s.lora_A.shape == (s.variant.r, s.d_in)

    with torch.no_grad():
        for s in surgery.sites(model).values():
            s.lora_B.normal_()
    x = family.inputs()
    surgery.save(model, tmp_path / "e.safetensors")
    loaded = surgery.load(family.model(), tmp_path / "e.safetensors")  # no calibration needed
    assert rel_err(family.out(loaded, x), family.out(model, x)) <= 1e-6


@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=lambda f: f.name)
def test_forward_matches_peft_lora(family):
    from peft import LoraConfig

    base = family.model()
    ours = surgery.rewrite(copy.deepcopy(base), EVA(r=4, alpha=12, rho=1.0), family.where,
                           calibration=padded_batches(family))
    targets = list(surgery.sites(ours))
    pm = peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules=targets))
    randomise_peft(pm)
    assert copy_from_peft(pm, ours) == 2 * len(targets)
    pm.eval()
    x = family.inputs()
    theirs = family.out(pm, x)
    assert rel_err(theirs, family.out(base, x)) > 1e-3
    assert rel_err(family.out(ours, x), theirs) <= 1e-5


def test_calibration_errors():
    family = LLAMA
    with pytest.raises(CalibrationError, match="needs calibration data"):
        surgery.rewrite(family.model(), EVA(r=4), family.where)
    few = [family.inputs(batch=1, seq=4)]
    model = family.model()
    with pytest.raises(CalibrationError, match=r"saw 4 calibration tokens; .* needs at least 5"):
        surgery.rewrite(model, EVA(r=4, rho=1.0), family.where, calibration=few)
    with pytest.raises(CalibrationError, match=r"saw 4 calibration tokens"):
        surgery.rewrite(model, EVA(r=4), family.where, calibration=few)
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear, "a failed rewrite changed the model"
    with pytest.raises(ConfigError, match=r"r=40 is larger than the input size d_in=32"):
        surgery.rewrite(model, EVA(r=40, rho=1.0), "*.k_proj", calibration=padded_batches(family, seq=16))
    with pytest.raises(ConfigError, match="rho must be >= 1"):
        EVA(r=4, rho=0.5)


ALL7 = "*.{q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}"


def spy(monkeypatch):
    """Count EVA.observe calls and record the states calibration hands to EVA.configure (both still run)."""
    seen = {"observe": 0, "states": {}}
    observe, configure = EVA.observe, EVA.configure

    def counting(self, state, rows):
        seen["observe"] += 1
        return observe(self, state, rows)

    def recording(self, states):
        seen["states"].update(states)
        return configure(self, states)

    monkeypatch.setattr(EVA, "observe", counting)
    monkeypatch.setattr(EVA, "configure", recording)
    return seen


@pytest.mark.parametrize("scope", SCOPES)
def test_sites_reading_one_input_share_one_statistic(scope, monkeypatch):
    family = LLAMA
    seen = spy(monkeypatch)
    batches = padded_batches(family)
    model = in_scope(scope, family.model(), **family.inputs())
    surgery.rewrite(model, EVA(r=4, rho=1.0), ALL7, calibration=batches)
    states = seen["states"]
    assert len(states) == 14
    for layer in range(2):
        at = {p.rsplit(".", 1)[1]: id(m) for p, m in states.items() if f"layers.{layer}." in p}
        assert at["q_proj"] == at["k_proj"] == at["v_proj"], "q, k, v read one input"
        assert at["gate_proj"] == at["up_proj"], "gate and up read one input"
        assert len(set(at.values())) == 4, at
    assert len({id(m) for m in states.values()}) == 8
    assert seen["observe"] == 8 * len(batches), "one observe per distinct input and batch"


@pytest.mark.parametrize("scope", SCOPES)
def test_shared_statistic_gives_the_A_each_site_gets_alone(scope):
    family = LLAMA
    batches = padded_batches(family)
    together = surgery.rewrite(in_scope(scope, family.model(), **family.inputs()), EVA(r=4, rho=1.0), ALL7,
                               calibration=batches)
    sites = surgery.sites(together)
    assert len(sites) == 14
    for path, site in sites.items():
        alone = surgery.rewrite(in_scope(scope, family.model(), **family.inputs()), EVA(r=4, rho=1.0), path,
                                calibration=batches)
        assert list(surgery.sites(alone)) == [path]
        assert torch.equal(site.lora_A, surgery.sites(alone)[path].lora_A), f"{path}: shared A differs from alone"


class Fork(nn.Module):
    """a, b and c read one tensor h, except that b reads h + 1 in batches of odd length, and c reads h only
    after an in-place write: the same object, other values."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(x)
        out = self.a(h) + self.b(h + 1 if len(x) % 2 else h)
        h.mul_(3)
        return out + self.c(h)


def test_sharing_is_proven_in_every_batch(monkeypatch):
    """Module scope only: a traced graph cannot read h + 1 in some batches and h in others."""
    g = torch.Generator().manual_seed(0)
    even, odd, again = (torch.randn(n, 8, generator=g) for n in (16, 17, 18))
    seen = spy(monkeypatch)

    def A(where, batches):
        return {p: s.lora_A for p, s in surgery.sites(
            surgery.rewrite(Fork(), EVA(r=2, rho=1.0), where, calibration=batches)).items()}

    shared = A("{a,b,c}", [even])
    s = seen["states"]
    assert s["a"] is s["b"], "a and b were handed one tensor"
    assert s["c"] is not s["a"], "c's input was written in place after a read it"
    for batches in ([even, odd, again], [odd, even]):
        seen["states"].clear()
        split = A("{a,b,c}", batches)
        assert len({id(m) for m in seen["states"].values()}) == 3, "b read another tensor in one batch"
        for p in "abc":
            assert torch.equal(split[p], A(p, batches)[p]), f"{p}: A differs from {p} calibrated alone"
        assert not torch.equal(split["a"], split["b"]), "control: b's other input changes its A"
    assert torch.equal(shared["a"], shared["b"])
