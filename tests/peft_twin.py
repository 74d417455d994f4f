"""Build PEFT's model beside ours on the same base and copy PEFT's tensors into our sites.

PEFT keeps an adapter-name level in its live keys (``...k_proj.lora_A.default.weight``); our sites
hold the same tensors without it (``...k_proj.lora_A``). Parity tests randomise PEFT's adapter,
copy it across by name, and compare outputs.
"""

from __future__ import annotations

import copy

import torch

import surgery
from models import rel_err


def peft_key_to_ours(key: str, ours: set[str]) -> str | None:
    k = key.removeprefix("base_model.model.").replace(".default", "")
    if k in ours:
        return k
    if k.endswith(".weight") and k[: -len(".weight")] in ours:
        return k[: -len(".weight")]
    return None


def peft_model(base: torch.nn.Module, config):
    from peft import get_peft_model

    return get_peft_model(copy.deepcopy(base), config)


def randomise_peft(pm, scale: float = 0.1, seed: int = 11) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p))


def copy_from_peft(pm, ours: torch.nn.Module) -> int:
    """Copy every adapter tensor of PEFT model ``pm`` into our rewritten model; returns the count."""
    want = {f"{p}.{n}" for p, s in surgery.sites(ours).items() for n in s.adapter_tensors()}
    sd = ours.state_dict(keep_vars=True)
    copied = set()
    for k, v in pm.state_dict().items():
        name = peft_key_to_ours(k, want)
        if name is None:
            continue
        with torch.no_grad():
            sd[name].copy_(v.reshape(sd[name].shape))
        copied.add(name)
    missing = want - copied
    assert not missing, f"PEFT has no tensor for {sorted(missing)[:3]}"
    return len(copied)


def assert_same_outputs(family, base, ours, pm, tol: float = 1e-5) -> float:
    """Both models in eval mode give the same outputs, and PEFT's adapter is not the identity."""
    pm.eval()
    ours.eval()
    x = family.inputs()
    theirs = family.out(pm, x)
    assert rel_err(theirs, family.out(base, x)) > 1e-3, "PEFT's adapter is still the identity"
    err = rel_err(family.out(ours, x), theirs)
    assert err <= tol, f"ours vs PEFT: {err:.3g} > {tol:g}"
    return err
