"""Hugging Face saving and resuming for a transformers model with live sites.

While a model has sites, its ``save_pretrained`` (which Trainer, SFTTrainer and the other TRL
trainers call for every checkpoint) writes ``config.json`` and the adapter as ``surgery.save``
writes it, and no base weights: the checkpoint is the adapter's size, and ``from_pretrained`` of
it fails loudly (no weights file) instead of returning the base model without its adapter (or,
for PiSSA, the residual model). ``surgery.load`` reads such a directory; ``resumable(trainer)``
lets ``trainer.train(resume_from_checkpoint=...)`` read it too, and ``resumable(accelerator)`` makes
``Accelerator.save_state`` / ``load_state`` write and read the adapter instead of the whole model.
``merge`` and ``restore`` give the model its own ``save_pretrained`` back. ``reference(model)`` is a
``ref_model`` for TRL's ``DPOTrainer``: the same model under ``surgery.disabled``, not a copy.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterFileError, ConfigError, NotRewrittenError

ADAPTER_FILE = "model-surgery-adapter.safetensors"  # in a save_pretrained / Trainer checkpoint directory


def is_pretrained(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a model of that class means transformers is loaded
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def attach(model: nn.Module) -> None:
    """Give ``model`` (when a transformers model) the adapter-writing ``save_pretrained``."""
    if is_pretrained(model) and "save_pretrained" not in model.__dict__:
        model.__dict__["save_pretrained"] = _SavePretrained(model)


def detach(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), _SavePretrained):
        del model.__dict__["save_pretrained"]


class _SavePretrained:
    """``save_pretrained`` bound to a model that holds it in its own ``__dict__``: it holds the model weakly, as a
    bound method there would make a reference cycle, and ``del model`` would then leave the whole model in
    memory until Python's cyclic collector ran (in a loop of rewrites, many models at once). A copy of the
    model (copy.deepcopy, pickle) gets one bound to the copy."""

    __slots__ = ("_model",)

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return save_pretrained(self._model(), *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "_SavePretrained":
        return _SavePretrained(copy.deepcopy(self._model(), memo))

    def __reduce__(self):
        return _SavePretrained, (self._model(),)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args: Any, is_main_process: bool = True,
                    **kwargs: Any) -> None:
    """``model.save_pretrained`` while the model has sites: ``config.json`` (and ``generation_config.json``)
    plus the adapter file; ``state_dict`` and the other arguments of transformers' version are not used."""
    from .io import save

    if not is_main_process:
        return
    directory = Path(save_directory)
    save(model, directory / ADAPTER_FILE)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)


def adapter_in(path: str | os.PathLike) -> Path:
    """``path`` itself, or the adapter file inside a directory written by ``save_pretrained`` / a Trainer."""
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() and (path / ADAPTER_FILE).is_file() else path


def resumable(trainer: Any) -> Any:
    """Let ``trainer.train(resume_from_checkpoint=...)`` load the adapter from a checkpoint written while
    the model had sites (the trainer's own loader looks for base weights there and finds none).

    The model may be the fresh base or one rewritten the same way; either way it ends with the
    checkpoint's sites and tensors. Checkpoints without an adapter file load as before. Returns ``trainer``.

    An ``accelerate.Accelerator`` may be passed instead: its ``save_state`` then writes each rewritten
    model as its adapter file and its ``load_state`` reads it back (see ``_accelerator_hooks``).
    """
    accelerate = sys.modules.get("accelerate")
    if accelerate is not None and isinstance(trainer, accelerate.Accelerator):
        return _accelerator_hooks(trainer)
    if not callable(getattr(trainer, "_load_from_checkpoint", None)):
        raise ConfigError(
            f"surgery.resumable takes a transformers Trainer (TRL's trainers included) or an accelerate.Accelerator, "
            f"got {type(trainer).__name__}. Pass the trainer before calling train(resume_from_checkpoint=...)."
        )
    from .io import load
    from .ops import restore
    from .scope import scope_of

    original = trainer._load_from_checkpoint

    def load_from_checkpoint(resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint) / ADAPTER_FILE
        if not path.is_file():
            return original(resume_from_checkpoint, model)
        target = model if model is not None else trainer.model
        if scope_of(target).sites():
            restore(target)
        load(target, path)

    trainer._load_from_checkpoint = load_from_checkpoint
    return trainer


def _state_file(index: int) -> str:
    # accelerate names the i-th prepared model's weights model.safetensors, model_1.safetensors, ...; so do we
    return ADAPTER_FILE if index == 0 else ADAPTER_FILE.replace(".safetensors", f"_{index}.safetensors")


def _accelerator_hooks(accelerator: Any) -> Any:
    """Register ``save_state`` / ``load_state`` pre-hooks on ``accelerator``: a prepared model with sites is
    written by ``surgery.save`` (``model-surgery-adapter.safetensors``, ``..._1`` for the second model, ...)
    and taken out of accelerate's list, so no base weights are written; ``load_state`` reads that file back.

    Loading copies the tensors into the sites already there, so an optimizer prepared on them stays
    attached to the very parameters it steps (a model rewritten the same way is required then; a model
    without sites is rewritten from the file, as ``surgery.load`` does). Models without sites, and
    optimizer, scheduler and RNG states, are left to accelerate.
    """
    from .inspect import sites

    if getattr(accelerator, "_surgery_hooks", False):
        return accelerator  # a second pair of hooks would drop a second, wrong entry from accelerate's lists
    accelerator._surgery_hooks = True

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        rewritten = [i for i, m in enumerate(models) if sites(m)]
        if not rewritten:
            return
        if len(weights) != len(models):
            # FSDP, DeepSpeed and Megatron-LM: accelerate has already written these models itself
            raise ConfigError(
                f"accelerate's {accelerator.distributed_type} save_state writes the models itself, before this hook "
                "runs, so surgery.resumable(accelerator) cannot make it write only the adapter. Call "
                "surgery.save(model, path) on every rank instead (rank 0 writes)."
            )
        local = accelerator.project_configuration.save_on_each_node
        writer = accelerator.is_local_main_process if local else accelerator.is_main_process
        from .io import save

        for i in rewritten:
            # a model sharded by FSDP2 gathers its adapter in save, a collective every rank must enter
            sharded = any(type(s.base_weight).__name__ == "DTensor" for s in sites(models[i]).values())
            if writer or sharded:
                save(models[i], Path(output_dir) / _state_file(i))
        for i in reversed(rewritten):
            del weights[i]  # accelerate names the files by position, so the load hook drops the same entries

    def load_hook(models: list, input_dir: str) -> None:
        found = [i for i in range(len(models)) if (Path(input_dir) / _state_file(i)).is_file()]
        for i in found:
            _load_in_place(models[i], Path(input_dir) / _state_file(i))
        for i in reversed(found):
            del models[i]

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return accelerator


def _load_in_place(model: nn.Module, path: Path) -> None:
    from .inspect import sites
    from .io import decode, file_entries, load, read_bytes, read_header, read_metadata

    live = sites(model)
    if not live:
        load(model, path)
        return
    data = read_bytes(path)
    header = read_header(path, data)
    saved = read_metadata(path, header=header)["sites"]
    here = file_entries(live)
    if saved.keys() != here.keys():
        extra, missing = sorted(saved.keys() - here.keys()), sorted(here.keys() - saved.keys())
        raise ConfigError(
            f"{path} holds the adapters of other sites than this model has (in the file only: {extra[:3]}; in the "
            f"model only: {missing[:3]}). Rewrite the base as it was rewritten when the state was saved, or load "
            "onto a model without sites."
        )
    for k, view in here.items():
        config = json.loads(json.dumps(view.variant.to_config()))  # as the file stores it (tuples become lists)
        if saved[k].get("variant") != view.variant.name or saved[k].get("config") != config:
            raise ConfigError(
                f"{k} is {view.variant.short()} here but {saved[k].get('variant')} {saved[k].get('config')} in "
                f"{path}. Rewrite the base with the variant the state was saved with, or load onto a model "
                "without sites."
            )
    tensors = decode(path, data)
    with torch.no_grad():
        for k, view in here.items():
            for name, t in view.adapter_tensors().items():
                key = f"{k}.{name}"
                if key not in tensors or tensors[key].shape != t.shape:
                    raise AdapterFileError(
                        f"{path}: tensor {key!r} is missing or has another shape than the model's {tuple(t.shape)}."
                    )
                t.copy_(tensors[key])


class Reference(nn.Module):
    """The base model as TRL's ``DPOTrainer(ref_model=...)`` calls it: ``model`` itself under ``surgery.disabled``.

    It holds the model outside its own submodules, so it has no parameters to copy, move, prepare or
    save; calling it runs the policy's modules with every adapter switched off (bit for bit the base).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["policy"] = model  # not a submodule: TRL and accelerate must see nothing to copy or save
        if getattr(model, "config", None) is not None:
            self.config = model.config  # TRL's fused log-prob head reads the reference's config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # __call__, not forward: TRL replaces a reference's forward with its fused log-prob head, which the
        # policy already has, so the call goes to the policy as a whole
        from .control import disabled

        with torch.no_grad(), disabled(self.policy):
            return self.policy(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # TRL keys its cache of precomputed reference log-probs by a hash of the reference's state_dict: the base's
        from .control import disabled

        with disabled(self.policy):
            return self.policy.state_dict(*args, **kwargs)


def reference(model: nn.Module) -> Reference:
    """A ``ref_model`` for TRL's ``DPOTrainer`` (and trainers that call a ``ref_model`` alike) that is ``model``
    under ``surgery.disabled``: no second copy, and the reference is the base model bit for bit."""
    from .inspect import sites

    live = sites(model)
    if not live:
        raise NotRewrittenError(
            "surgery.hf.reference(model) needs a rewritten model: without sites the reference would be the "
            "policy itself. Call surgery.rewrite(model, variant, where) first."
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    if head is not None and names.get(id(head)) in live:
        raise ConfigError(
            f"{names[id(head)]} is the output head and has an adapter, but TRL computes log-probs from its "
            "weight directly, so the adapter would be ignored. Leave the output head out of `where`."
        )
    return Reference(model)
