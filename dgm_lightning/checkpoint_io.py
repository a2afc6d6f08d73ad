"""Checkpoint files: read with a clear error when they are not checkpoints, written atomically on local disks (a
temporary file beside the target, then a rename)."""

from __future__ import annotations

import os
import pickle
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


def check_checkpoint_file(path: str | Path, *, weights_only: bool | None = None) -> dict:
    """Refuse a file that is not a readable checkpoint with a ValueError that says why; return the checkpoint (its
    tensors memory-mapped, not read).

    torch's own error for such a file ends in the advice to load it with ``weights_only=False``, which would run
    whatever code the file holds; this one names the reason without that advice.

    Args:
        path: the file.
        weights_only: as ``torch.load`` (None: torch's default, True).
    """
    # a zip archive (every torch.save since PyTorch 1.6) is opened by mmap: only its index is read, not the weights
    zipped = zipfile.is_zipfile(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=zipped, weights_only=weights_only)
    except Exception as error:  # anything torch or pickle raise for a foreign or cut file
        raise ValueError(
            f"{path} is not a readable checkpoint ({_unreadable_reason(error, zipped)}); it may be truncated (a run "
            "killed while saving it) or not a file that a Trainer saved; use another one, such as a run's "
            "checkpoints/last.ckpt"
        ) from None  # not chained: torch's message would repeat the weights_only=False advice
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} is a PyTorch file but not a checkpoint of a dgm-lightning model (it has no state_dict); give a "
            ".ckpt file that a Trainer saved"
        )
    return checkpoint


def _unreadable_reason(error: Exception, zipped: bool) -> str:
    """The first sentence of why torch.load failed, without its advice to load with weights_only=False."""
    text = str(error)
    marker = "WeightsUnpickler error: "
    if marker + "Unsupported global" in text:  # the file needs code to load: a class or function of some module
        return "it refers to code, which loading would run: " + text.split(marker, 1)[1].split(". ")[0]
    if not zipped and isinstance(error, (KeyError, EOFError, pickle.UnpicklingError)):
        return "neither a zip archive, as torch.save writes, nor an older PyTorch file"
    return text.strip().split("\n")[0].split(". ")[0] or type(error).__name__


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves leave either the whole new file or none, whatever goes wrong while writing.

    Lightning's own save writes into a temporary file in ``$TMPDIR`` and moves it into place afterwards; when
    ``$TMPDIR`` is on another filesystem, the move is a copy, and a full disk cuts that copy short, leaving a
    partial ``epoch=...ckpt`` beside the checkpoint folder's intact ``last.ckpt``. Here the temporary file lies in
    the target's own folder, so the final step is a rename, which is atomic; on any error it is removed. Remote
    filesystems (``s3://`` ...) keep Lightning's own code. The command line uses it by default; in a script of
    your own: ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r}); "
                "write a CheckpointIO of your own to use them"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # a hidden name that `--ckpt_path last` and ModelCheckpoint's own file listing never take for a checkpoint;
        # mode 0o666 less the umask, as for any new file (tempfile.mkstemp would make it readable by its owner only)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # on disk before the rename makes it the checkpoint
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
