"""Whole-model capture: ``trace(model, *args, **kwargs)`` -> one ``torch.fx.GraphModule``.

Two routes, tried in this order:

- ``fx``: ``torch.fx`` symbolic tracing, with every adaptable leaf (nn.Linear, GPT-2 Conv1D) kept
  as a ``call_module`` node. Works on plain PyTorch models without data-dependent control flow.
  The result is accepted only if it reproduces the eager output on the example inputs.
- ``export``: ``torch.export.export(strict=False)`` with the batch dimension (and, for Hugging Face
  models, the sequence dimension) dynamic, then ``.module()``. Hugging Face models need this:
  transformers 5 has no fx tracer and its forward branches on data. ``use_cache=False`` and every
  other non-tensor keyword are bound into the forward rather than made graph inputs, so the
  GraphModule is called with the tensor inputs only, by the same names as the example.

Either way the GraphModule shares its parameters with ``model`` (no copy), every node maps back to
a module path (``module_path``), and ``gm.meta["surgery"]`` records the route, which is how the
rest of the engine knows it holds a traced graph (``is_traced``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from . import quant
from .errors import TraceError
from .site import adaptable

_EMPTY_STACK = "_empty_nn_module_stack"  # export's marker for nodes outside any module


class _LeafTracer(fx.Tracer):
    """fx tracer that stops at adaptable leaves, so each stays one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return adaptable(m) or super().is_leaf_module(m, qualname)


def is_traced(model: Any) -> bool:
    """True for a GraphModule made by ``surgery.trace`` (graph scope), False for any other module."""
    return isinstance(model, fx.GraphModule) and "surgery" in getattr(model, "meta", {})


def route(gm: fx.GraphModule) -> str:
    """'fx' or 'export': how ``gm`` was captured."""
    return gm.meta["surgery"]["route"]


def module_path(node: fx.Node) -> str:
    """The dotted path of the module a node belongs to ('' for the root)."""
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path.startswith(_EMPTY_STACK) else path


def trace(model: nn.Module, *args: Any, **kwargs: Any) -> fx.GraphModule:
    """Capture ``model`` as one GraphModule; ``args``/``kwargs`` are example inputs (batch of 2 or more)."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"surgery.trace needs a torch.nn.Module; got {type(model).__name__}.")
    quantised = next(((p, m) for p, m in model.named_modules() if quant.kind(m) or quant.foreign(m)), None)
    if quantised is not None:
        p, m = quantised
        raise TraceError(
            f"surgery.trace cannot capture a quantised model: {p} is a {type(m).__name__}, whose packed weight and "
            "kernels neither torch.fx nor torch.export can trace. Adapt the model itself instead (module scope: "
            "surgery.rewrite(model, ...)), where a bitsandbytes layer is called whole inside its site."
        )
    try:
        gm = _trace_fx(model, args, kwargs)
        fx_error = None
    except Exception as e:  # noqa: BLE001 - any fx failure means: try export
        gm, fx_error = None, e
    if gm is None:
        gm = _trace_export(model, args, kwargs, fx_error)
    return gm


def _same(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    return all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        for x, y in zip(la, lb)
    )


def _trace_fx(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    if hasattr(model, "config"):  # transformers models: data-dependent control flow, go straight to export
        raise TraceError("Hugging Face models are captured with torch.export")
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        want = model(*args, **kwargs)
        torch.manual_seed(0)
        got = gm(*args, **kwargs)
    if not _same(got, want):  # a trace that baked in a branch taken by the example, say
        raise TraceError("the fx graph does not reproduce the eager output on the example inputs")
    gm.meta["surgery"] = _meta("fx", model)
    return gm


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "can_generate")


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, fx_error: Exception | None) -> fx.GraphModule:
    hf = _is_hf(model)
    params = inspect.signature(model.forward).parameters
    bound = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    if hf and "use_cache" in params and "use_cache" not in kwargs:
        bound["use_cache"] = False  # no KV cache object in the graph, and one output structure
    inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}

    def dyn(t: Any):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        spec = {0: torch.export.Dim.AUTO}
        if hf and t.dim() >= 2:
            spec[1] = torch.export.Dim.AUTO  # (batch, seq, ...) for ids, masks and embeddings
        return spec

    names = inspect.signature(model.forward).bind_partial(*args, **inputs).arguments
    shapes = {k: (tuple(dyn(a) for a in v) if isinstance(v, tuple) else dyn(v)) for k, v in names.items()}
    had = model.__dict__.get("forward")
    if bound:
        model.forward = functools.partial(model.forward, **bound)
    try:
        ep = torch.export.export(model, tuple(args), inputs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001 - turned into one error that says what to try
        where = _failing_frame(e)
        raise TraceError(
            f"cannot trace {type(model).__name__} as one graph. torch.fx failed "
            f"({type(fx_error).__name__}: {str(fx_error).splitlines()[0] if fx_error else '-'}), and "
            f"torch.export failed{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Try: pass example inputs exactly as you call the model (keywords such as input_ids=...), with a "
            "batch of 2 or more; mark the failing submodule's data-dependent code with torch._check; or use "
            "module scope instead (surgery.rewrite(model, ...) on the eager model needs no trace)."
        ) from e
    finally:
        if bound:
            if had is None:
                del model.forward
            else:
                model.forward = had
    gm = ep.module()
    gm.meta["surgery"] = _meta("export", model)
    return gm


def _meta(route_: str, model: nn.Module) -> dict[str, Any]:
    """What graph scope keeps on the GraphModule: the route, its sites, and the modules the user had
    at each path (under export the GraphModule's own modules are plain containers of parameters), so
    that `where` sees the same modules, and both scopes agree on what is adaptable."""
    return {"route": route_, "sites": {}, "flags": None, "modules": dict(model.named_modules())}


def _failing_frame(e: BaseException) -> str:
    """' in <file>:<line> (<function>)' of the innermost frame outside torch, if any."""
    tb, last = e.__traceback__, None
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if "/torch/" not in fname and not fname.endswith("surgery/capture.py"):
            last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    code = last.tb_frame.f_code
    return f" in {code.co_filename}:{last.tb_lineno} ({code.co_name})"
