"""One trial of a study: an ordinary train.py job (fit, then test of the best checkpoint), which records its
validation curve, reports it to the study's pruner and writes its result for the worker.

The worker runs it as ``python -m dgm_lightning.studies.trial SPEC.json`` (its own process, so a crash or a
Trainer with several devices stays inside it), or calls ``run_trial`` in-process. The spec holds the train.py
arguments, the metric, the validation monitor and, for pruning, the study's storage and the trial's id.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, Timer
from typing_extensions import override


class StudyReporter(Callback):
    """Record every validation epoch's ``val/`` metrics; report the monitored one to an Optuna trial and stop the
    Trainer when its pruner says so.

    Written here rather than taking optuna-integration's ``PyTorchLightningPruningCallback`` (which runs with
    Lightning 2.6): that one reports the monitor as it is, so the monitor must point the study's way (a study of
    ``test/nll``, minimized, could not prune on ``val/elbo``, maximized, the one metric every VAE objective logs
    on the same scale); it prunes by raising from inside a hook, so the Trainer tears down as after a crash (no
    last checkpoint, a W&B run marked failed); and it reads the private ``trainer._accelerator_connector``.
    Here the value is turned to the study's direction, and pruning stops the Trainer (``should_stop``) as early
    stopping does, agreed across DDP ranks by a broadcast.

    Args:
        monitor: the validation metric to report (``val/elbo``), or None to report nothing.
        sign: 1 when the monitor points the study's way, -1 when it points the other way.
        trial: the Optuna trial to report to, or None (record only).
    """

    def __init__(self, monitor: str | None, sign: float = 1.0, trial: Any = None) -> None:
        self.monitor = monitor
        self.sign = sign
        self.trial = trial
        self.curves: dict[str, list[list[float]]] = {}
        self.pruned_at: int | None = None

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val/") and value.numel() == 1:
                self.curves.setdefault(name, []).append([epoch, float(value)])
        if self.trial is None or self.monitor is None or self.monitor not in trainer.callback_metrics:
            return
        prune = False
        if trainer.is_global_zero:
            value = self.sign * float(trainer.callback_metrics[self.monitor])
            # a diverged value is the worst there is: the median pruner prunes it
            self.trial.report(value if math.isfinite(value) else math.inf, step=epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune):
            self.pruned_at = epoch
            trainer.should_stop = True


def describe(error: BaseException) -> str:
    """A crash's reason in one line: the exception, or the first cause a parser lists ("Errors: - ..."); the
    whole traceback is in the trial's output."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [  # a cause that ends with a colon goes on on the next line
        line[2:] + (f" {following}" if line.endswith(":") else "")
        for line, following in zip(lines, [*lines[1:], ""], strict=True)
        if line.startswith("- ") and not line.startswith("- Expected a")
    ]
    head = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return (head + (f" ({causes[0]})" if causes else ""))[:1000]


def stopped_by_time(trainer: L.Trainer) -> bool:
    """Whether fit stopped because ``trainer.max_time`` ran out (its Timer callback has no time left)."""
    remaining = [c.time_remaining("train") for c in trainer.callbacks if isinstance(c, Timer)]
    return any(left is not None and left <= 0 for left in remaining)


def best_of(curve: list[list[float]], direction: str) -> float:
    """The best value of a validation curve in the study's direction (NaN if it has none finite)."""
    values = [value for _, value in curve if math.isfinite(value)]
    if not values:
        return math.nan
    return min(values) if direction == "minimize" else max(values)


def open_trial(spec: dict[str, Any]) -> Any:
    """The Optuna trial of the spec, from the study's storage (None when the study does not prune)."""
    if not spec.get("storage") or spec.get("trial_id") is None:
        return None
    import optuna

    from dgm_lightning.studies.engine import make_pruner, open_storage

    study = optuna.load_study(
        study_name=spec["study_name"], storage=open_storage(spec["storage"]), pruner=make_pruner(spec["pruning"])
    )
    return optuna.trial.Trial(study, spec["trial_id"])


def run_trial(spec: dict[str, Any], trial: Any = None) -> dict[str, Any]:
    """Run one trial's train.py job: fit, then test the best checkpoint when the metric is a test metric.

    Args:
        spec: ``args`` (train.py options), ``metric``, ``direction``, ``monitor``, ``sign``; for pruning in a
            process of its own also ``storage``, ``study_name``, ``trial_id`` and ``pruning``.
        trial: the Optuna trial to report to (in-process), or None to open it from the spec's storage.

    Returns:
        status (complete, pruned or failed), reason, metrics, curves, run_dir, config (the run's config.yaml),
        wall_time (seconds).
    """
    from callbacks import run_dir
    from dgm_lightning.cli import DGMCLI, announce_offline_wandb, declare_best_summaries

    start = time.time()
    result: dict[str, Any] = {"status": "failed", "reason": None, "metrics": {}, "curves": {}, "run_dir": None}
    result["config"] = None
    reporter = StudyReporter(spec.get("monitor"), spec.get("sign", 1.0), None)
    trainer = None
    try:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                cli = DGMCLI(args=list(spec["args"]), run=False)
        except SystemExit as exit:  # the parser refused a flag: this trial's failure, not the worker's end
            sys.stderr.write(errors.getvalue())
            message = errors.getvalue()
            message = message[message.find("error:") :] if "error:" in message else message
            raise ValueError(f"train.py refused the trial's flags\n{message}") from exit
        sys.stderr.write(errors.getvalue())
        trainer = cli.trainer
        if spec.get("pruning"):
            reporter.trial = trial if trial is not None else open_trial(spec)
        trainer.callbacks.append(reporter)
        declare_best_summaries(trainer)
        trainer.fit(cli.model, datamodule=cli.datamodule)
        folder = run_dir(trainer)
        result["run_dir"] = str(folder.resolve())
        if (folder / "config.yaml").is_file():
            result["config"] = (folder / "config.yaml").read_text(encoding="utf-8")
        if reporter.pruned_at is not None:
            result.update(status="pruned", reason=f"pruned after epoch {reporter.pruned_at}")
        else:
            if spec["metric"].startswith("val/") and stopped_by_time(trainer):
                # the time budget ran out between validations: validate the final weights, so that the trial has
                # its metric even when it did not reach a first validation (reported to no pruner: fit is over)
                reporter.trial = None
                trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
            if spec["metric"].startswith("test/"):
                trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            if spec["metric"].startswith("val/"):
                metrics[spec["metric"]] = best_of(reporter.curves.get(spec["metric"], []), spec["direction"])
            result["metrics"] = metrics
            value = metrics.get(spec["metric"])
            if value is None:
                logged = ", ".join(sorted(metrics)) or "none"
                result["reason"] = f"the run logged no {spec['metric']} (it logged: {logged})"
            elif not math.isfinite(value):
                result["reason"] = f"diverged: {spec['metric']} is {value}"
            else:
                result["status"] = "complete"
        announce_offline_wandb(trainer)
    except Exception as error:  # a trial's crash is its result: the study records it and goes on
        traceback.print_exc()
        result["reason"] = describe(error)
    finally:
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()
    result["curves"] = reporter.curves
    result["wall_time"] = time.time() - start
    result["global_zero"] = trainer is None or trainer.is_global_zero
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m dgm_lightning.studies.trial SPEC.json``: run the spec's trial and write its result file."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m dgm_lightning.studies.trial SPEC.json (the study worker writes it)")
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = run_trial(spec)
    if result.pop("global_zero"):  # under DDP every rank runs this; rank 0 speaks for the trial
        path = Path(spec["result"])
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(result, indent=1), encoding="utf-8")
        os.replace(partial, path)  # the worker never reads half a file


if __name__ == "__main__":
    main()
