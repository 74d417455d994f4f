import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def traced_bases():
    """family -> (eager base, its surgery.trace), exported once per session; tests deepcopy, never mutate."""
    import surgery

    cache = {}

    def get(family):
        if family.name not in cache:
            model = family.model()
            cache[family.name] = (model, surgery.trace(model, **family.inputs()))
        return cache[family.name]

    return get
