"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import re
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parent.parent

# Appended to a script that a test runs in a subprocess: which files the project's packages came from.
PRINT_IMPORTS = """
import sys as _sys

for _name in ("dgm_lightning", "datamodules", "callbacks"):
    if _name in _sys.modules:
        print(f"imported {_name} from {_sys.modules[_name].__file__}", flush=True)
"""


def tree_under_test_env(**variables: str) -> dict[str, str]:
    """os.environ (plus variables) with the tree under test first on PYTHONPATH: a subprocess must import the
    packages of this checkout (or of a copy of it under test), not whichever dgm_lightning is installed."""
    paths = [str(REPO), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
    return {**os.environ, **variables, "PYTHONPATH": os.pathsep.join(paths)}


def assert_imported_the_tree_under_test(output: str, packages=("dgm_lightning",)) -> None:
    """The PRINT_IMPORTS lines in a subprocess's output name files of this tree for each of the packages."""
    found = re.findall(r"^imported (\w+) from (.+)$", output, re.M)
    assert {name for name, _ in found} >= set(packages), f"no import report for {packages} in: {output[-2000:]}"
    elsewhere = [(name, path) for name, path in found if not Path(path).resolve().is_relative_to(REPO)]
    assert not elsewhere, f"the subprocess imported {elsewhere}, not the tree under test at {REPO}"


def images(n: int = 16, shape=(1, 8, 8), seed: int = 0) -> torch.Tensor:
    """Synthetic images in [0, 1]."""
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def trainer(**kwargs) -> L.Trainer:
    """A quiet CPU trainer for tests."""
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def wandb_records(run_dir) -> list:
    """The protobuf records of an offline W&B run (its ``run-*.wandb`` file).

    Read by hand: recent wandb releases no longer ship a Python reader. The file is a 7-byte header
    then a LevelDB-style log: 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type),
    where type 1 is a whole record and 2/3/4 are the first/middle/last pieces of one.
    """
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk that wandb's process is still writing: the records so far
            break
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def wandb_history_keys(run_dir) -> set[str]:
    """Every metric key logged to the offline W&B run."""
    keys = set()
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys


def write_idx_files(folder, *, n_train: int = 24, n_test: int = 8, gz: bool = True, size: int = 28) -> None:
    """The four MNIST-format files (IDX, as distributed) with random images and labels 0-9."""
    import gzip
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        for kind, tensor in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(d.to_bytes(4, "big") for d in tensor.shape)
            data = header + tensor.numpy().tobytes()
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)


def write_image(image: torch.Tensor, path) -> None:
    """Save a uint8 (C, H, W) tensor as an image file; the format follows the suffix (PNG, JPEG, ...)."""
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def read_image(path) -> torch.Tensor:
    """An image file as a uint8 (C, H, W) tensor."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.array(image)
    return torch.from_numpy(array).unsqueeze(0) if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1)


def write_cifar(folder, n_per_batch: int = 6) -> None:
    """The python-version CIFAR-10 batches: pickled dicts with bytes keys, rows of 3072 uint8 (R, G, B planes)."""
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = torch.randint(0, 256, (n_per_batch, 3072), dtype=torch.uint8, generator=generator).numpy()
        batch = {b"batch_label": name.encode(), b"labels": [i % 10 for i in range(n_per_batch)], b"data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def stand_in_flags(recipe: Path, folder: Path) -> list[str]:
    """The flags that let a recipe run on stand-ins: tiny copies of its dataset's files, and for a VQ-VAE prior's
    recipe (which needs a trained VQ-VAE) a checkpoint of its first stage's recipe, trained for one step."""
    from dgm_lightning.cli import DGMCLI

    text = recipe.read_text()
    flags: list[str] = []
    if "data_dir:" in text:
        if "CIFAR10DataModule" in text:
            write_cifar(folder / "data")
        else:
            write_idx_files(folder / "data")  # tiny stand-ins for the dataset's original files
        flags += ["--data.data_dir", str(folder / "data")]
    if recipe.stem.startswith("vqvae_prior_"):
        first_stage = recipe.with_name(recipe.name.replace("vqvae_prior_", "vqvae_"))
        cli = DGMCLI(args=["--config", str(first_stage), "--trainer.logger", "false", *flags], run=False)
        run = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        run.fit(cli.model, datamodule=cli.datamodule)
        run.save_checkpoint(folder / "vqvae.ckpt")
        flags += ["--model.vqvae_checkpoint", str(folder / "vqvae.ckpt")]
    return flags
