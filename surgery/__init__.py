"""model-surgery: edit neural networks by tracing them.

    import surgery
    from adapters import LoRA

    surgery.rewrite(model, LoRA(r=8), where="*.{q_proj,v_proj}")
    print(surgery.summary(model))
    surgery.save(model, "lora.safetensors")
    surgery.merge(model)
"""

from . import errors
from .diff import Diff, diff
from .inspect import Plan, plan, sites, summary
from .io import load, save
from .peft_format import export_peft, import_peft
from .rewrite import merge, restore, rewrite
from .site import Site
from .trace import is_traced, trace

__all__ = ["trace", "is_traced", "rewrite", "plan", "sites", "summary", "merge", "restore", "save", "load", "export_peft", "import_peft", "diff", "Diff", "Site", "Plan", "errors"]
