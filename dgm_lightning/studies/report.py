"""A study's report, read from its Optuna storage: ranked tables (markdown, CSV), plots (PNG) and the best
configuration as a runnable recipe."""

from __future__ import annotations

import csv
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from dgm_lightning.studies.engine import counted_trials
from dgm_lightning.studies.study import Study


@dataclass
class Configuration:
    """One configuration (a value per axis) and its trials over the seeds."""

    values: dict[str, Any]
    trials: list[FrozenTrial] = field(default_factory=list)

    def complete(self) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state == TrialState.COMPLETE and t.value is not None]

    def scores(self) -> list[float]:
        return [float(t.value) for t in self.complete()]

    @property
    def mean(self) -> float:
        scores = self.scores()
        return statistics.fmean(scores) if scores else math.nan

    @property
    def std(self) -> float:
        """The sample standard deviation over the seeds (NaN for fewer than two)."""
        scores = self.scores()
        return statistics.stdev(scores) if len(scores) > 1 else math.nan

    def count(self, state: TrialState) -> int:
        return sum(t.state == state for t in self.trials)

    @property
    def wall_time(self) -> float:
        """Mean seconds per trial that ran (complete, pruned or failed)."""
        times = [t.user_attrs["wall_time"] for t in self.trials if t.user_attrs.get("wall_time") is not None]
        return statistics.fmean(times) if times else math.nan


def configurations(study: Study, trials: list[FrozenTrial]) -> list[Configuration]:
    """The study's configurations with their counted trials, ranked: best mean first, those with no complete
    trial last."""
    groups: dict[tuple[Any, ...], Configuration] = {}
    for trial in counted_trials(trials):
        if not all(axis.name in trial.params for axis in study.axes):
            continue  # failed before its values were drawn
        values = {axis.name: trial.params[axis.name] for axis in study.axes}
        groups.setdefault(tuple(values.values()), Configuration(values)).trials.append(trial)
    sign = 1.0 if study.direction == "minimize" else -1.0

    def order(config: Configuration) -> tuple[Any, ...]:  # ties (no score): the study file's order
        place = tuple(
            list(axis.choices).index(config.values[axis.name]) if not axis.is_range else config.values[axis.name]
            for axis in study.axes
        )
        return (not config.scores(), sign * config.mean if config.scores() else 0.0, place)

    return sorted(groups.values(), key=order)


def fmt(value: float, digits: int = 4) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def markdown_table(study: Study, ranked: list[Configuration]) -> str:
    """The ranked configurations as a markdown table."""
    names = [axis.name for axis in study.axes]
    head = ["rank", *names, f"{study.metric} (mean ± std)", "seeds", "failed", "pruned", "wall time / trial (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, config in enumerate(ranked, 1):
        score = f"{fmt(config.mean)} ± {fmt(config.std, 2)}" if config.scores() else "–"
        row = [str(rank), *(str(fmt_value(config.values[n])) for n in names), score, str(len(config.scores()))]
        row += [str(config.count(TrialState.FAIL)), str(config.count(TrialState.PRUNED)), fmt(config.wall_time, 3)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def fmt_value(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def write_csv(path: Path, study: Study, ranked: list[Configuration]) -> None:
    names = [axis.name for axis in study.axes]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["rank", *names, "mean", "std", "seeds", "failed", "pruned", "wall_time_s"])
        for rank, c in enumerate(ranked, 1):
            writer.writerow(
                [rank, *(c.values[n] for n in names), c.mean, c.std, len(c.scores()), c.count(TrialState.FAIL)]
                + [c.count(TrialState.PRUNED), c.wall_time]
            )


def write_trials_csv(path: Path, study: Study, trials: list[FrozenTrial]) -> None:
    names = [axis.name for axis in study.axes]
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["trial", "state", *names, "seed", study.metric, "wall_time_s", "reason", "run_dir"])
        for t in counted_trials(trials):
            attrs = t.user_attrs
            writer.writerow(
                [t.number, t.state.name, *(t.params.get(n) for n in names), attrs.get("seed"), t.value]
                + [attrs.get("wall_time"), attrs.get("reason") or "", attrs.get("run_dir") or ""]
            )


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_axes(folder: Path, study: Study, trials: list[FrozenTrial]) -> list[Path]:
    """One PNG per axis: the metric per value (mean ± std over every complete trial with it) or, for a range,
    each trial's metric against its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in counted_trials(trials) if t.state == TrialState.COMPLETE and t.value is not None]
    paths = []
    for axis in study.axes:
        figure, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(axis.choices) + 2), 3.2), layout="constrained")
        if axis.is_range:
            ax.scatter([t.params[axis.name] for t in complete], [t.value for t in complete], s=14)
            if axis.log:
                ax.set_xscale("log")
        else:
            labels = list(axis.choices)
            scores = [[t.value for t in complete if t.params.get(axis.name) == label] for label in labels]
            means = [statistics.fmean(s) if s else math.nan for s in scores]
            stds = [statistics.stdev(s) if len(s) > 1 else 0.0 for s in scores]
            ax.errorbar(range(len(labels)), means, yerr=stds, fmt="o", capsize=4)
            ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(axis.name)
        ax.set_ylabel(f"{study.metric} ({'lower' if study.direction == 'minimize' else 'higher'} is better)")
        ax.set_title(f"{study.name}: {study.metric} by {axis.name} (mean ± std)", fontsize=9)
        path = folder / f"axis_{slug(axis.name)}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def plot_curves(folder: Path, study: Study, ranked: list[Configuration]) -> Path | None:
    """Validation curves (the study's monitor per epoch) of the best and the worst configuration: each seed
    thin, their mean bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [c for c in ranked if c.scores()]
    if not study.monitor or not scored:
        return None
    figure, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    picks = [("best", scored[0], "tab:green")] + ([("worst", scored[-1], "tab:red")] if len(scored) > 1 else [])
    for kind, config, color in picks:
        curves = [t.user_attrs.get("curve") or [] for t in config.complete()]
        for curve in curves:
            ax.plot([e for e, _ in curve], [v for _, v in curve], color=color, alpha=0.3, lw=0.8)
        epochs = sorted({e for curve in curves for e, _ in curve})
        mean = [statistics.fmean([v for curve in curves for e2, v in curve if e2 == e]) for e in epochs]
        label = ", ".join(str(fmt_value(v)) for v in config.values.values())
        ax.plot(epochs, mean, color=color, lw=2, label=f"{kind}: {label}")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(study.monitor)
    ax.legend(fontsize=7)
    ax.set_title(f"{study.name}: validation curves of the best and worst configuration", fontsize=9)
    path = folder / "curves.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def best_recipe(study: Study, config: Configuration) -> str | None:
    """The best configuration's run config (its first seed's), as a recipe: the study's W&B grouping and output
    folder taken out, a header saying what it scored."""
    trial = min(config.complete(), key=lambda t: t.user_attrs.get("seed", 0))
    text = trial.user_attrs.get("config")
    if not text:
        return None
    recipe = yaml.safe_load(text)
    trainer = recipe.get("trainer") or {}
    if trainer.get("default_root_dir"):
        trainer["default_root_dir"] = "runs"
    logger = trainer.get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        for key in ("group", "tags", "config"):
            logger["init_args"][key] = None
    values = ", ".join(f"{k}={fmt_value(v)}" for k, v in config.values.items())
    header = [
        f"# The best configuration of study {study.name} by {study.metric} ({study.direction}): {values}",
        f"# {study.metric} {fmt(config.mean)} ± {fmt(config.std, 2)} over {len(config.scores())} seeds "
        f"(trial {trial.number}, seed {trial.user_attrs.get('seed')}).",
        "# Run it: python train.py fit --config best.yaml (or without `fit`: fit, then test the best checkpoint)",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False)


def precision_note(trials: list[FrozenTrial]) -> list[str]:
    """Report lines naming the precisions the trials trained in, where they differ: ``--trainer.precision auto``
    (the default) resolves by each trial's model and machine, which a comparison should know."""
    by_precision: dict[str, list[int]] = {}
    for trial in trials:
        config = yaml.safe_load(trial.user_attrs.get("config") or "{}") or {}
        precision = (config.get("trainer") or {}).get("precision")
        if precision is not None:
            by_precision.setdefault(str(precision), []).append(trial.number)
    if len(by_precision) < 2:
        return []
    listed = "; ".join(f"{p} (trials {', '.join(map(str, numbers))})" for p, numbers in sorted(by_precision.items()))
    return [
        "",
        f"The trials trained in different precisions: {listed}. The default precision (auto) depends on the "
        "model and the machine; to compare at one precision, set trainer.precision in the study's settings.",
    ]


def write_report(study: Study, handle: optuna.Study, folder: Path) -> str:
    """Write ``table.md``, ``table.csv``, ``trials.csv``, the plots and ``best.yaml`` into ``folder``; the
    markdown report."""
    folder.mkdir(parents=True, exist_ok=True)
    trials = handle.get_trials(deepcopy=False)
    ranked = configurations(study, trials)
    counted = counted_trials(trials)
    states = {state: sum(t.state == state for t in counted) for state in TrialState}
    finished = states[TrialState.COMPLETE] + states[TrialState.FAIL] + states[TrialState.PRUNED]
    budget = ", ".join(f"{k}={v}" for k, v in study.budget.items())
    lines = [f"# Study {study.name}: {study.metric} ({study.direction})", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        f"{finished}/{study.total_trials} trials finished: {states[TrialState.COMPLETE]} complete, "
        f"{states[TrialState.FAIL]} failed, {states[TrialState.PRUNED]} pruned, "
        f"{states[TrialState.RUNNING] + states[TrialState.WAITING]} running or queued. "
        f"Recipe {Path(study.recipe).stem}, budget {budget}, seeds {study.seeds}; "
        "mean ± sample standard deviation over the seeds.",
        "",
        markdown_table(study, ranked),
    ]
    failed = [t for t in counted if t.state == TrialState.FAIL]
    if failed:
        lines += ["", "Failed trials:", ""]
        lines += [f"- trial {t.number} ({t.params}): {t.user_attrs.get('reason') or 'not recorded'}" for t in failed]
    lines += precision_note(counted)
    write_csv(folder / "table.csv", study, ranked)
    write_trials_csv(folder / "trials.csv", study, trials)
    plots = plot_axes(folder, study, trials)
    curves = plot_curves(folder, study, ranked)
    plots += [curves] if curves else []
    if ranked and ranked[0].scores():
        recipe = best_recipe(study, ranked[0])
        if recipe:
            (folder / "best.yaml").write_text(recipe, encoding="utf-8")
            lines += ["", f"Best configuration as a recipe: {folder / 'best.yaml'}"]
    lines += ["", "Plots: " + ", ".join(p.name for p in plots)]
    text = "\n".join(lines) + "\n"
    (folder / "table.md").write_text(text, encoding="utf-8")
    return text
