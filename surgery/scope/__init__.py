"""Scopes: module scope (``module.py``) and graph scope (``graph.py``) over one protocol (``base.py``).

``scope_of`` is the one place that decides which one a model gets.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import WhereTypeError
from ..capture import is_traced
from .base import Base, Emit, Scope, Staged, Txn
from .graph import GraphScope
from .module import ModuleScope

__all__ = ["scope_of", "Scope", "ModuleScope", "GraphScope", "Base", "Staged", "Txn", "Emit"]


def scope_of(model: Any) -> Scope:
    """The scope of ``model``: graph scope for a GraphModule from ``surgery.trace``, else module scope."""
    if not isinstance(model, nn.Module):
        raise WhereTypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    return GraphScope(model) if is_traced(model) else ModuleScope(model)
