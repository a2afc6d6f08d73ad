"""A study worker: Optuna asks for a trial, the trial runs as an ordinary train.py job, Optuna is told its result.

Every worker of a study runs the same loop against one storage: the embedded default, a SQLite file in the
study's output folder (no server), or any RDB URL (``postgresql://...``) that workers on many machines share.
Optuna's GridSampler gives the first trials the grid points by trial number, which the storage hands out once,
so two workers never run one point; a later trial draws a point that no trial holds, and one that finds its
point held by another (two workers drew at once, or all points are taken) is recorded as a duplicate and not
run. Each worker beats a heartbeat into the storage: a worker
killed mid-trial leaves its trial RUNNING, and the next worker to start a trial marks it failed and queues it
again (Optuna's RetryHeartbeatStaleTrialCallback); an interrupted worker (Ctrl-C, SIGTERM) queues its trial
itself. A trial that crashes or diverges is recorded FAIL with its reason, and the study goes on.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

try:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    STALE_CALLBACK = "heartbeat_stale_trial_callback"
except ImportError:  # Optuna before 4.9 named them so
    from optuna.storages import RetryFailedTrialCallback as RetryHeartbeatStaleTrialCallback

    STALE_CALLBACK = "failed_trial_callback"

from dgm_lightning.compat import optuna_trial_id
from dgm_lightning.studies.study import Study, flag_args
from dgm_lightning.studies.trial import run_trial

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # the tree a trial's process must import too
DRAW_WAIT = 2.0  # seconds a trial that drew its grid point waits for a competitor created just before it
HEARTBEAT = 60  # seconds between a worker's heartbeats; a trial is stale after two missed (Optuna's grace)


class TrialFailed(Exception):
    """A trial that crashed, diverged or logged no metric: Optuna records it FAIL and the study goes on."""


class Duplicate(Exception):
    """A trial given a grid point that another trial holds: recorded and not run."""


def default_output(study: Study) -> Path:
    return Path("runs") / "studies" / study.name


def default_storage(output: Path) -> str:
    return f"sqlite:///{(output / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int | None = None) -> RDBStorage:
    """Optuna's RDB storage of ``url``, with heartbeats every ``heartbeat`` seconds (None: none, as for a trial's
    own process, whose worker beats for it)."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = {STALE_CALLBACK: RetryHeartbeatStaleTrialCallback(max_retry=3)} if heartbeat else {}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats and their retry are "experimental" since Optuna 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, **retry)
        except sqlalchemy.exc.SQLAlchemyError:
            # workers starting together on a new database both create its tables; the loser finds them made
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def make_pruner(pruning: dict[str, int] | None) -> optuna.pruners.BasePruner:
    """The median pruner of a study's ``pruning`` settings (no pruning when None)."""
    if not pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=pruning["startup_trials"], n_warmup_steps=pruning["warmup_epochs"]
    )


def make_sampler(study: Study) -> optuna.samplers.BaseSampler:
    # seed 0 in every worker, as Optuna advises for distributed grids (only the order of a re-run would differ)
    return optuna.samplers.GridSampler(study.grid(), seed=0) if study.is_grid else optuna.samplers.TPESampler()


def open_study(study: Study, storage: str, heartbeat: int | None = HEARTBEAT) -> optuna.Study:
    """Create the study in the storage, or join it; refuse a storage whose study of that name runs another file."""
    handle = optuna.create_study(
        study_name=study.name,
        storage=open_storage(storage, heartbeat),
        sampler=make_sampler(study),
        pruner=make_pruner(study.pruning),
        direction=study.direction,
        load_if_exists=True,
    )
    recorded = handle.user_attrs.get("fingerprint")
    if recorded is None:
        handle.set_user_attr("fingerprint", study.fingerprint)
        handle.set_user_attr("definition", json.loads(json.dumps(study.source, default=str)))
        handle.set_user_attr("total_trials", study.total_trials)
    elif recorded != study.fingerprint:
        raise ValueError(
            f"the storage's study {study.name!r} was started from another study file (its axes, settings, seeds or "
            "metric differ): give the same file to every worker, or give this one another name (name: ...)"
        )
    return handle


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count in progress and reports: not duplicates, nor trials queued again (a dead worker's,
    an interrupted one's), whose retry counts instead."""
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if not t.user_attrs.get("duplicate") and t.number not in retried]


def remaining(study: Study, handle: optuna.Study) -> bool:
    """Whether the study still has a trial for a worker: a queued one, or a grid point / sample not yet started."""
    trials = handle.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    if study.is_grid:
        taken = {t.system_attrs.get("grid_id") for t in trials}
        return not set(range(study.total_trials)) <= taken
    sampled = [t for t in trials if "configuration_of" not in t.user_attrs and "failed_trial" not in t.system_attrs]
    return len(sampled) < int(study.trials or 0)


def die_with_parent() -> None:
    """In a trial's process: be killed when the worker dies (Linux), so that no orphan trial runs on."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_in_subprocess(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run a trial as ``python -m dgm_lightning.studies.trial``, its output in ``trial.log``; its result."""
    (folder / "spec.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
    result_path = Path(spec["result"])
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "dgm_lightning.studies.trial", str(folder / "spec.json")]
    with open(folder / "trial.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
        try:
            code = process.wait()
        except BaseException:  # interrupted: the trial's process goes too, and the trial is queued again
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    tail = (folder / "trial.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
    reason = f"the trial's process exited with code {code} and no result; its log ends: " + " | ".join(tail)
    return {"status": "failed", "reason": reason[:2000], "metrics": {}, "curves": {}, "wall_time": None}


class Objective:
    """Optuna's objective for one study: the trial's values, its train.py job, its result.

    Args:
        study: the study file.
        handle: the Optuna study.
        output: the folder of this worker's trial folders (``trials/<number>``).
        storage: the storage URL (a trial's own process reports to it for pruning).
        in_process: run trials in this process (faster to start; a crash or DDP is not isolated).
    """

    def __init__(self, study: Study, handle: optuna.Study, output: Path, storage: str, in_process: bool) -> None:
        self.study, self.handle, self.output, self.storage, self.in_process = study, handle, output, storage, in_process

    def values(self, trial: optuna.Trial) -> tuple[dict[str, Any], int]:
        """The trial's axis values and seed, from the sampler (a grid point, or a sample and its seed copies)."""
        values: dict[str, Any] = {}
        for axis in self.study.axes:
            if not axis.is_range:
                values[axis.name] = trial.suggest_categorical(axis.name, list(axis.choices))
            elif axis.integer:
                values[axis.name] = trial.suggest_int(axis.name, int(axis.low), int(axis.high), log=axis.log)
            else:
                values[axis.name] = trial.suggest_float(axis.name, axis.low, axis.high, log=axis.log)
        if self.study.is_grid:
            return values, trial.suggest_categorical("seed", self.study.seeds)
        if "seed" in trial.user_attrs:  # a copy for another seed, or a retry
            return values, int(trial.user_attrs["seed"])
        for seed in self.study.seeds[1:]:  # queued now, so that other workers run them meanwhile
            self.handle.enqueue_trial(values, user_attrs={"seed": seed, "configuration_of": trial.number})
        return values, self.study.seeds[0]

    def spec(self, trial: optuna.Trial, values: dict[str, Any], seed: int, folder: Path) -> dict[str, Any]:
        flags = self.study.trial_flags(values, seed)
        flags.setdefault("trainer.default_root_dir", str(folder))
        if "trainer.logger" not in flags:  # W&B (the recipes' logger): grouped by study, axis values in config
            config = {"study": self.study.name, **values, "seed": seed, "trial": trial.number}
            flags |= {
                "trainer.logger.group": self.study.name,
                "trainer.logger.tags": [f"study:{self.study.name}"],
                "trainer.logger.config": config,
            }
        return {
            "args": ["--config", self.study.recipe, *flag_args(flags)],
            "metric": self.study.metric,
            "direction": self.study.direction,
            "monitor": self.study.monitor,
            "sign": 1.0 if (self.study.monitor_mode == "min") == (self.study.direction == "minimize") else -1.0,
            "storage": self.storage,
            "study_name": self.study.name,
            "trial_id": optuna_trial_id(trial),  # the id a trial's own process reports to (not the number)
            "pruning": self.study.pruning,
            "result": str(folder / "result.json"),
        }

    def frozen(self, trial: optuna.Trial) -> FrozenTrial:
        """The trial as the storage holds it (its system attributes: the grid point, a retry's origin)."""
        (frozen,) = [t for t in self.handle.get_trials(deepcopy=False) if t.number == trial.number]
        return frozen

    def held_elsewhere(self, trial: optuna.Trial) -> bool:
        """Whether another trial holds this trial's grid point: one given it by number or a retry, or another
        trial that drew it as this one did, with a smaller number."""
        trials = counted_trials(self.handle.get_trials(deepcopy=False))
        (mine,) = [t for t in trials if t.number == trial.number]
        return any(
            t.system_attrs.get("grid_id") == mine.system_attrs.get("grid_id")
            and (t.number < trial.number or t.number < self.study.total_trials or "failed_trial" in t.system_attrs)
            for t in trials
            if t.number != trial.number
        )

    def __call__(self, trial: optuna.Trial) -> float:
        # GridSampler gives trial n < N grid point n; a later trial (when a retry took a number) draws one of the
        # points no trial holds, and two workers may draw the same. Such a trial waits for trials created just
        # before it to write their points, then gives way to any other holder: a point runs once
        drawn = self.study.is_grid and trial.number >= self.study.total_trials
        if drawn and "failed_trial" not in self.frozen(trial).system_attrs:
            time.sleep(DRAW_WAIT)
            if self.held_elsewhere(trial):
                trial.set_user_attr("duplicate", True)
                raise Duplicate(f"trial {trial.number}: its grid point is another trial's; not run")
        values, seed = self.values(trial)
        folder = (self.output / "trials" / f"{trial.number:05d}").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        spec = self.spec(trial, values, seed, folder)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("folder", str(folder))
        trial.set_user_attr("command", " ".join(["python train.py", *spec["args"]]))
        start = time.time()
        try:
            result = run_trial(spec, trial) if self.in_process else run_in_subprocess(spec, folder)
        except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C in a fit into SystemExit(1)
            trial.set_user_attr("interrupted", True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                RetryHeartbeatStaleTrialCallback()(self.handle, self.frozen(trial))
            raise KeyboardInterrupt from None  # Optuna records the trial FAIL (its retry is queued) and stops
        curves = result.get("curves") or {}
        # wall_time: what the trial cost, its process's start included; job_time: the train.py job's own
        result.update(job_time=result.get("wall_time"), wall_time=time.time() - start)
        for key in ("status", "reason", "metrics", "wall_time", "job_time", "run_dir", "config"):
            trial.set_user_attr(key, result.get(key))
        trial.set_user_attr("curve", curves.get(self.study.monitor or "", []))
        if result["status"] == "pruned":
            raise optuna.TrialPruned(result["reason"])
        if result["status"] != "complete":
            raise TrialFailed(result["reason"])
        return float(result["metrics"][self.study.metric])


def progress(study: Study, out: Callable[[str], None] = print) -> Callable[[optuna.Study, FrozenTrial], None]:
    """A study callback that prints each finished trial, trials done / total and the best so far."""

    def report(handle: optuna.Study, trial: FrozenTrial) -> None:
        trials = [t for t in counted_trials(handle.get_trials(deepcopy=False)) if t.state.is_finished()]
        if trial.number not in {t.number for t in trials}:
            return
        failed = sum(t.state == TrialState.FAIL for t in trials)
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        values = {k: v for k, v in trial.params.items() if k != "seed"}
        seed = trial.user_attrs.get("seed")
        if trial.state == TrialState.COMPLETE:
            outcome = f"{study.metric} {trial.value:.5g}"
        else:  # (a pruned trial's value is Optuna's copy of its last validation value, not the metric)
            reason = trial.user_attrs.get("reason")
            outcome = trial.state.name + (f" ({reason[:200]})" if reason else "")
        line = f"[study {study.name}] trial {trial.number} {values} seed {seed}: {outcome}"
        line += f" | {len(trials)}/{study.total_trials} done, {failed} failed, {pruned} pruned"
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        if complete:
            best = (min if study.direction == "minimize" else max)(complete, key=lambda t: t.value)
            line += f" | best so far {best.value:.5g} (trial {best.number})"
        out(line)

    return report


def run_worker(
    study: Study,
    *,
    storage: str | None = None,
    output: Path | None = None,
    n_trials: int | None = None,
    in_process: bool = False,
    heartbeat: int = HEARTBEAT,
) -> optuna.Study:
    """Start or join the study and run its trials until none is left (or ``n_trials`` of them ran here).

    Args:
        study: the study file.
        storage: an Optuna RDB URL shared by the workers; default a SQLite file in ``output``.
        output: the folder of this worker's trials (default ``runs/studies/<name>``).
        n_trials: stop after this many trials of this worker (a SLURM job's share); default: until done.
        in_process: run each trial in this process instead of its own.
        heartbeat: seconds between heartbeats; a worker silent for twice that is taken for dead.
    """
    output = output or default_output(study)
    output.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(output)
    handle = open_study(study, storage, heartbeat)
    objective = Objective(study, handle, output, storage, in_process)
    callback = progress(study)
    print(f"[study {study.name}] {study.total_trials} trials in all; storage {storage}; trials in {output}", flush=True)
    # SIGTERM (a scheduler's preemption, `kill`) ends the worker as Ctrl-C does: its trial is queued again
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    ran = 0
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's line is ours (progress), not Optuna's too
    try:
        while n_trials is None or ran < n_trials:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                fail_stale_trials(handle)  # a dead worker's trial, queued again before this worker looks for work
            if not remaining(study, handle):
                break
            handle.optimize(objective, n_trials=1, catch=(TrialFailed, Duplicate), callbacks=[callback])
            ran += 1
    except KeyboardInterrupt:
        print(f"[study {study.name}] interrupted; the same command resumes it", flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        optuna.logging.set_verbosity(verbosity)
    left = [t for t in handle.get_trials(deepcopy=False) if not t.state.is_finished()]
    done = not left and not remaining(study, handle)
    state = "finished" if done else f"not finished ({len(left)} trials running or queued)"
    print(f"[study {study.name}] this worker ran {ran} trials; study {state}", flush=True)
    return handle
