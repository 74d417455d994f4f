"""Hugging Face saving and resuming for a transformers model with live sites.

While a model has sites, its ``save_pretrained`` (which Trainer, SFTTrainer and the other TRL
trainers call for every checkpoint) writes ``config.json`` and the adapter as ``surgery.save``
writes it, and no base weights: the checkpoint is the adapter's size, and ``from_pretrained`` of
it fails loudly (no weights file) instead of returning the base model without its adapter (or,
for PiSSA, the residual model). ``surgery.load`` reads such a directory; ``resumable(trainer)``
lets ``trainer.train(resume_from_checkpoint=...)`` read it too. ``merge`` and ``restore`` give the
model its own ``save_pretrained`` back.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

from torch import nn

ADAPTER_FILE = "model-surgery-adapter.safetensors"  # in a save_pretrained / Trainer checkpoint directory


def is_pretrained(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a model of that class means transformers is loaded
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def attach(model: nn.Module) -> None:
    """Give ``model`` (when a transformers model) the adapter-writing ``save_pretrained``."""
    if is_pretrained(model) and "save_pretrained" not in model.__dict__:
        # a bound method in the instance dict: copy.deepcopy(model) rebinds it to the copy
        model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)


def detach(model: nn.Module) -> None:
    method = model.__dict__.get("save_pretrained")
    if isinstance(method, types.MethodType) and method.__func__ is save_pretrained:
        del model.__dict__["save_pretrained"]


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
    """
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
