"""surgery.merge(model, progress=fn): fn wraps the (path, site) pairs being folded, in both scopes."""

from __future__ import annotations

import pytest

import surgery
from adapters import LoRA
from models import LLAMA, SCOPES, in_scope, randomise_adapters, rel_err
from surgery.site import SiteAPI


@pytest.mark.parametrize("scope", SCOPES)
def test_merge_calls_progress_with_every_path_and_site(scope):
    x = LLAMA.inputs()
    model = in_scope(scope, LLAMA.model(), **x)
    surgery.rewrite(model, LoRA(r=2), LLAMA.where)
    randomise_adapters(model)
    sites = {p: s.variant.short() for p, s in surgery.sites(model).items()}
    assert len(sites) == 6
    unmerged = LLAMA.out(model, x)

    calls, seen = [], []

    def progress(pairs):  # what tqdm does: iterate what it is given, yield each item on
        calls.append(pairs)
        for path, site in pairs:
            assert isinstance(site, SiteAPI) and site.path == path
            seen.append((path, site.variant.short()))
            yield path, site

    surgery.merge(model, progress=progress)
    assert len(calls) == 1, f"progress called {len(calls)} times"
    assert seen == list(sites.items()), "progress did not see every (path, site) pair, in order"
    assert not surgery.sites(model)
    assert rel_err(LLAMA.out(model, x), unmerged) <= 1e-5
