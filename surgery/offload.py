"""Weights held in unlinked temporary files instead of anonymous memory.

A variant that replaces the base weight (PiSSA's residual) leaves the engine keeping the original for restore,
``disabled``, a strength of 0, ``export_peft`` and the save fingerprint, bit for bit, so it cannot be recomputed
from the residual. Kept in memory, those originals would grow a CPU model by the size of every adapted weight.
``keep`` writes one to a file in ``tempfile.gettempdir()``, maps the file back privately (``torch.from_file``) and
unlinks it at once: the result is an ordinary tensor (``model.to``, deepcopy and pickle work on it) whose pages
are read from the page cache only when something reads them, the kernel may drop them again, and nothing is left
on disk when the process ends. ``Spill`` holds the residuals a rewrite stages before it commits any site (all or
nothing), in one unlinked file per call, each read back whole when it is needed, one at a time.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

import torch

from .errors import ConfigError


def _bytes(t: torch.Tensor):
    """A contiguous tensor's memory as a writable uint8 buffer (numpy has no bfloat16, so every dtype goes as bytes)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write(f: BinaryIO, t: torch.Tensor) -> None:
    """Append contiguous ``t``'s bytes to ``f`` (written, not mapped: no page of it enters this process)."""
    f.write(_bytes(t))
    f.flush()  # a full disk shows now, not at the first read


def _no_room(what: str, nbytes: int, err: OSError) -> ConfigError:
    size = f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"
    return ConfigError(
        f"cannot keep {what} ({size}) out of memory: writing it to a temporary file in "
        f"{tempfile.gettempdir()} failed ({err.strerror or err}). A variant that replaces base weights keeps each "
        "original in such a file while the model has its sites, and stages each new weight there until the rewrite "
        "commits: about twice the size of the adapted weights in all. Free space there, or point TMPDIR at a disk "
        "with room before starting Python (or set tempfile.tempdir); the model was left unchanged."
    )


def keep(t: torch.Tensor, what: str) -> torch.Tensor:
    """A copy of ``t`` that holds no anonymous memory: on the CPU, a private mapping of an unlinked temporary file.
    Elsewhere a plain copy on ``t``'s device, where the forward reads it (a gated site's base at strength 0)."""
    t = t.detach()
    if t.device.type != "cpu":
        return t.clone()
    fd, path = tempfile.mkstemp(prefix="surgery-kept-")
    try:
        try:
            with open(fd, "wb") as f:
                _write(f, t.contiguous())
        except OSError as err:
            raise _no_room(what, t.nbytes, err) from err
        return torch.from_file(path, shared=False, size=t.numel(), dtype=t.dtype).view(t.shape)
    finally:
        os.unlink(path)


@dataclass(frozen=True)
class Spilled:
    """One tensor written to a ``Spill``."""

    file: BinaryIO
    offset: int
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def load(self) -> torch.Tensor:
        """The tensor, read back into fresh memory on its device."""
        out = torch.empty(self.shape, dtype=self.dtype)
        buf = _bytes(out)
        self.file.seek(self.offset)
        if self.file.readinto(buf) != len(buf):
            raise OSError(f"the temporary file holding a staged {tuple(self.shape)} weight came back short")
        return out.to(self.device)


class Spill:
    """Tensors appended to one unlinked temporary file (opened at the first): what one call stages."""

    def __init__(self):
        self._file: BinaryIO | None = None
        self._end = 0

    def put(self, t: torch.Tensor, what: str) -> Spilled:
        host = t.detach().to("cpu").contiguous()
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="surgery-staged-")  # never named on disk, or unlinked
            self._file.seek(self._end)
            _write(self._file, host)
        except OSError as err:
            raise _no_room(what, host.nbytes, err) from err
        out = Spilled(self._file, self._end, host.shape, host.dtype, t.device)
        self._end += host.nbytes
        return out

    def close(self) -> None:
        """Give the file's space back (the call is over, committed or not)."""
        if self._file is not None:
            self._file.close()
            self._file = None
