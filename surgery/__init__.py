"""model-surgery: edit neural networks by tracing them.

    import surgery
    from adapters import LoRA

    surgery.rewrite(model, LoRA(r=8), where="*.{q_proj,v_proj}")
    print(surgery.summary(model))
    surgery.save(model, "lora.safetensors")
    surgery.merge(model)

The public names load their modules on first use, so ``import adapters`` (which needs only
``surgery.variant`` and ``surgery.errors``) does not load the engine.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from . import errors

_PUBLIC = {  # name -> module that defines it
    "trace": "capture", "is_traced": "capture",
    "rewrite": "ops", "merge": "ops", "restore": "ops",
    "plan": "inspect", "sites": "inspect", "summary": "inspect", "Plan": "inspect",
    "save": "io", "load": "io",
    "export_peft": "peft_format", "import_peft": "peft_format",
    "diff": "compare", "Diff": "compare",
    "Site": "site", "SiteAPI": "site",
    "disabled": "control", "scaled": "control", "set_scale": "control",
    "adapter_names": "control", "activate": "control", "delete": "control", "combine": "control",
    "unfreeze": "trainable",
    "resumable": "hf",
}
__all__ = [*_PUBLIC, "errors"]

if TYPE_CHECKING:
    from .capture import is_traced, trace
    from .compare import Diff, diff
    from .control import activate, adapter_names, combine, delete, disabled, scaled, set_scale
    from .hf import resumable
    from .inspect import Plan, plan, sites, summary
    from .io import load, save
    from .ops import merge, restore, rewrite
    from .peft_format import export_peft, import_peft
    from .site import Site, SiteAPI
    from .trainable import unfreeze


class _Surgery(types.ModuleType):
    """This package's module type: each public name is a property that imports its module on first use.

    Properties, not a module-level ``__getattr__``: libraries that mount attributes on ``object``
    (nnsight mounts ``save``) would otherwise shadow ``surgery.save`` before ``__getattr__`` is asked.
    """


def _public(name: str, module: str) -> property:
    return property(lambda self: getattr(importlib.import_module(f"{__name__}.{module}"), name))


for _name, _module in _PUBLIC.items():
    setattr(_Surgery, _name, _public(_name, _module))
sys.modules[__name__].__class__ = _Surgery


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
