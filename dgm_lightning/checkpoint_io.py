"""Checkpoints written atomically on local disks: a temporary file beside the target, then a rename."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


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
