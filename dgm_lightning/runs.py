"""Run folders and jobs: where a run's files go, and which earlier runs ``--ckpt_path last`` and ``best`` continue.

A *job* is what a run trains: its ``model`` (optimizers included), ``data``, ``seed_everything`` and
``trainer.callbacks`` settings, as resolved from the recipe and flags before any checkpoint is read. Everything
else (the other Trainer settings such as ``max_epochs``, ``devices``, ``precision``, the logger, the output root)
only says how long, where and on what it runs, and may change between a run and its resumption. Each run writes
its job's settings to ``job.yaml`` in its folder; ``last`` and ``best`` consider only the runs whose ``job.yaml``
equals the new run's, so two jobs sharing an output root never resume each other.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info

JOB_FILE = "job.yaml"
# the subcommand's top-level settings that make up a job, and trainer.callbacks (schedules are part of the job)
JOB_KEYS = ("seed_everything", "model", "data")


def job_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that make up a job, from a subcommand's resolved config as plain data (a dumped config)."""
    job = {key: config.get(key) for key in JOB_KEYS}
    job["trainer.callbacks"] = (config.get("trainer") or {}).get("callbacks")
    return job


def new_run_id() -> str:
    """A run id for runs without a logger: date and time for reading, random digits so that runs started in the
    same second, on one machine or several sharing a folder, never share a folder."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def write_job(folder: Path, job: dict[str, Any]) -> None:
    """Record the run's job beside its checkpoints, for a later ``--ckpt_path last`` or ``best``."""
    header = "# The settings that make runs one job: --ckpt_path last/best resume only runs whose job.yaml is equal\n"
    (folder / JOB_FILE).write_text(header + yaml.safe_dump(job, sort_keys=True), encoding="utf-8")


def differences(ours: Any, theirs: Any, prefix: str = "") -> list[str]:
    """The dotted names of the settings in which two jobs differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = []
        for key in sorted(ours.keys() | theirs.keys(), key=str):
            found += differences(ours.get(key), theirs.get(key), f"{prefix}{key}.")
        return found
    return [] if ours == theirs else [prefix.rstrip(".")]


def read_job(checkpoint: Path) -> dict[str, Any] | None:
    """The job of the run a checkpoint belongs to (its folder or the run folder above), None if unrecorded."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / JOB_FILE).is_file():
            return yaml.safe_load((folder / JOB_FILE).read_text(encoding="utf-8"))
    return None


def job_last_checkpoints(job: dict[str, Any], roots: list[Path]) -> tuple[list[Path], list[tuple[Path, list[str]]]]:
    """The ``last.ckpt`` of every run of this job under the roots, oldest first, and those of other jobs (or of
    no recorded job) with the settings in which they differ, newest first."""
    found = {path.resolve() for root in roots if root.is_dir() for path in root.rglob("last.ckpt")}
    ours, others = [], []
    for path in sorted(found, key=lambda p: p.stat().st_mtime):
        theirs = read_job(path)
        if theirs == job:
            ours.append(path)
        else:
            others.insert(0, (path, [f"no {JOB_FILE}"] if theirs is None else differences(job, theirs)))
    return ours, others


def describe_roots(roots: list[Path]) -> str:
    return " or ".join(str(root) for root in roots)


def resolve_last(job: dict[str, Any], roots: list[Path]) -> str | None:
    """``--ckpt_path last``: the newest ``last.ckpt`` of this job's runs under the roots; None (start afresh, what a
    re-queued job wants the first time) when there is none."""
    ours, others = job_last_checkpoints(job, roots)
    if ours:
        rank_zero_info(f"--ckpt_path last: resuming this job's newest run, from {ours[-1]}")
        return str(ours[-1])
    note = ""
    if others:
        path, differ = others[0]
        note = (
            f"; {len(others)} last.ckpt there belong to other jobs, the newest, {path}, differing in "
            f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}: give its path to resume it anyway"
        )
    where = describe_roots(roots)
    rank_zero_info(f"--ckpt_path last: no earlier run of this job under {where}, so training starts afresh{note}")
    return None


def monitored(job: dict[str, Any]) -> tuple[str, str] | None:
    """(monitor, mode) of the job's first ModelCheckpoint that monitors a metric, as Lightning's ``best`` takes."""
    for callback in job.get("trainer.callbacks") or []:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            settings = callback.get("init_args") or {}
            if settings.get("monitor"):
                return settings["monitor"], settings.get("mode") or "min"
    return None


def resolve_best(job: dict[str, Any], roots: list[Path]) -> str:
    """``--ckpt_path best``: the best checkpoint, by the job's ModelCheckpoint monitor and mode, of all this job's
    runs under the roots (a resumed run ranks only its own epochs, so every run of the job is compared)."""
    watch = monitored(job)
    if watch is None:
        raise ValueError(
            "--ckpt_path best: this job's ModelCheckpoint monitors no metric (no trainer.callbacks ModelCheckpoint "
            "with monitor set), so no checkpoint is the best: give --ckpt_path last or a .ckpt file, or configure "
            "a ModelCheckpoint with monitor and mode"
        )
    monitor, mode = watch
    scored = []
    for last in job_last_checkpoints(job, roots)[0]:
        state = torch.load(last, map_location="cpu", mmap=True, weights_only=True)
        for key, callback in state.get("callbacks", {}).items():
            if not key.startswith("ModelCheckpoint") or callback.get("monitor") != monitor:
                continue
            score, best = callback.get("best_model_score"), callback.get("best_model_path")
            # the file beside this last.ckpt: the recorded path may be relative to another working directory
            path = last.parent / Path(best or "").name
            if score is not None and best and path.is_file():
                scored.append((float(score), path))
    if not scored:
        raise FileNotFoundError(
            f"--ckpt_path best: no run of this job under {describe_roots(roots)} holds a best checkpoint by "
            f"{monitor}; train one first, or give --ckpt_path last or a .ckpt file"
        )
    score, path = (max if mode == "max" else min)(scored, key=lambda item: item[0])
    rank_zero_info(f"--ckpt_path best: {path} ({monitor} {score:.6g}, the {mode} over this job's runs)")
    return str(path)
