"""Scopes: module scope (``module.py``) and graph scope (``graph.py``) over one protocol (``base.py``).

``scope_of`` is the one place that decides which one a model gets.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import AdaptersDisabledError, WhereTypeError
from ..capture import is_traced
from .base import Base, Emit, Scope, Staged, Txn, Unfrozen
from .graph import GraphScope
from .module import ModuleScope

DISABLED = "_surgery_disabled"  # set on a model while `surgery.disabled(model)` is open

__all__ = ["scope_of", "unwrap", "DISABLED", "Scope", "ModuleScope", "GraphScope", "Base", "Staged", "Txn", "Emit", "Unfrozen"]


def unwrap(model: Any) -> Any:
    """The model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, so that
    every verb acts on, and every file names, the user's own model (no ``module.`` / ``_orig_mod.`` prefixes)."""
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def scope_of(model: Any) -> Scope:
    """The scope of ``model`` (unwrapped): graph scope for a GraphModule from ``surgery.trace``, else module scope."""
    if not isinstance(model, nn.Module):
        raise WhereTypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    model = unwrap(model)
    if model.__dict__.get(DISABLED):
        raise AdaptersDisabledError(
            "this model is inside `with surgery.disabled(model):`, where it runs without its adapters and its "
            "sites are out of it; rewrite, merge, save and the other verbs would see a model without them. "
            "Call them after the `with` block."
        )
    return GraphScope(model) if is_traced(model) else ModuleScope(model)
