"""The study file: a base recipe, the axes to vary, seeds, budget and metric, read and checked.

A study file is YAML (shipped ones in ``dgm_lightning/study_files``, ``studies/`` in a clone)::

    name: vae_digits_quick            # the Optuna study's name and the W&B group (default: the file's stem)
    recipe: vae_digits                # the base recipe: a shipped recipe's name or a path
    settings:                         # train.py flags set in every trial, on top of the recipe
      trainer.limit_train_batches: 4
    budget:                           # per trial: trainer.max_epochs, trainer.max_steps or trainer.max_time
      trainer.max_epochs: 3
    axes:
      model.objective: [elbo, iwae]   # a train.py flag and its values
      model.optimizer:                # labelled values of a flag (the labels name them in tables and plots)
        adam: {class_path: torch.optim.Adam}
      kl_schedule:                    # a named axis (no dot): each value is a set of train.py flags
        none: {trainer.callbacks: [...]}
      model.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a search range
    seeds: [0, 1]                     # each configuration runs once per seed
    metric: test/nll                  # a test/ metric (test of the best checkpoint) or a val/ one (its best epoch)
    direction: minimize
    validation: {monitor: val/elbo, mode: max}   # the curve recorded per epoch, and what the pruner reads
    pruning: {startup_trials: 4, warmup_epochs: 1}   # MedianPruner; omit (or false) for none
    trials: 20                        # search studies only: configurations to sample (TPE)

Only grid axes: Optuna's GridSampler runs every configuration x seed once. Any range: its TPE sampler draws
``trials`` configurations, each run once per seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dgm_lightning.recipes import recipe_path

STUDIES_DIR = Path(__file__).resolve().parent.parent / "study_files"
BUDGET_KEYS = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time")
KEYS = (
    "name", "description", "recipe", "settings", "budget", "axes", "seeds", "metric", "direction", "validation",
    "pruning", "trials",
)  # fmt: skip
SEED_FLAG = "seed_everything"
_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")  # ${NAME} or ${NAME:-default}


@dataclass(frozen=True)
class Axis:
    """One axis of a study: labelled choices (each a set of train.py flags) or a numeric range.

    Args:
        name: a train.py flag (dotted) or a name of its own (no dot) for a named axis.
        choices: label -> the flags that label sets (empty for a range).
        low: lower end of a range.
        high: upper end of a range.
        log: whether a range is sampled on a log scale.
        integer: whether a range holds integers.
    """

    name: str
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def flags(self, value: Any) -> dict[str, Any]:
        """The train.py flags of one value of this axis (a label, or a number of a range)."""
        return {self.name: value} if self.is_range else self.choices[str(value)]


@dataclass(frozen=True)
class Study:
    """A study file, checked. See the module's docstring for the format."""

    name: str
    recipe: str
    axes: list[Axis]
    metric: str
    direction: Literal["minimize", "maximize"]
    seeds: list[int] = field(default_factory=lambda: [0])
    settings: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    monitor: str | None = None
    monitor_mode: Literal["min", "max"] = "min"
    pruning: dict[str, int] | None = None
    trials: int | None = None
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def is_grid(self) -> bool:
        return not any(axis.is_range for axis in self.axes)

    @property
    def total_trials(self) -> int:
        """Trials the study runs in all: configurations x seeds."""
        if self.is_grid:
            return math.prod(len(axis.choices) for axis in self.axes) * len(self.seeds)
        return int(self.trials or 0) * len(self.seeds)

    @property
    def fingerprint(self) -> str:
        """A hash of what the trials run, so that a worker joining a study with another file is refused."""
        text = json.dumps({k: v for k, v in self.source.items() if k != "description"}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def grid(self) -> dict[str, list[Any]]:
        """The GridSampler's search space: each axis's labels, and the seeds."""
        space: dict[str, list[Any]] = {axis.name: list(axis.choices) for axis in self.axes}
        space["seed"] = list(self.seeds)
        return space

    def trial_flags(self, values: dict[str, Any], seed: int) -> dict[str, Any]:
        """The train.py flags of one trial, in order: settings, then the axes' values, then budget and seed."""
        flags = dict(self.settings)
        for axis in self.axes:
            flags.update(axis.flags(values[axis.name]))
        flags.update(self.budget)
        flags[SEED_FLAG] = seed
        return flags


def format_flag(value: Any) -> str:
    """A flag's value as train.py's parser reads it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def flag_args(flags: dict[str, Any]) -> list[str]:
    """``--key=value`` arguments of train.py for the flags."""
    return [f"--{key}={format_flag(value)}" for key, value in flags.items()]


def study_names() -> list[str]:
    """The names of the shipped studies, sorted."""
    return sorted(path.stem for path in STUDIES_DIR.glob("*.yaml"))


def study_path(name_or_path: str | Path) -> Path:
    """The file of a study: a path, or the name of a shipped study."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = STUDIES_DIR / (path.name if path.name.endswith(".yaml") else f"{path.name}.yaml")
    if shipped.is_file() and len(path.parts) == 1:
        return shipped
    raise FileNotFoundError(
        f"study {name_or_path}: no such file and no shipped study of that name; shipped studies: "
        f"{', '.join(study_names())}"
    )


def expand_environment(value: Any, where: str) -> Any:
    """``${NAME}`` in the strings of a study file -> the environment variable NAME (which must be set);
    ``${NAME:-default}`` -> NAME, or default when it is not set."""
    if isinstance(value, dict):
        return {key: expand_environment(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [expand_environment(item, where) for item in value]
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            if match.group(1) not in os.environ and match.group(2) is not None:
                return match.group(2)
            if match.group(1) not in os.environ:
                raise ValueError(
                    f"{where}: the study needs the environment variable {match.group(1)} (see the study file's "
                    f"comments for what it names); set it, e.g. {match.group(1)}=... python train.py study run ..."
                )
            return os.environ[match.group(1)]

        return _ENV.sub(replace, value)
    return value


def parse_axis(name: str, spec: Any, where: str) -> Axis:
    """One entry of ``axes``: a list of values, a mapping of labels, or a range (low/high)."""
    if name in (SEED_FLAG, "seed"):
        raise ValueError(f"{where}: seeds are not an axis; list them under `seeds:`")
    named = "." not in name
    if isinstance(spec, dict) and {"low", "high"} <= spec.keys():
        unknown = spec.keys() - {"low", "high", "log", "int"}
        if unknown or named:
            raise ValueError(f"{where}: a range is a train.py flag with low, high and optionally log, int")
        low, high = spec["low"], spec["high"]
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
            raise ValueError(f"{where}: a range needs numbers low < high, got {low!r} and {high!r}")
        if spec.get("log") and low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0, got {low}")
        return Axis(name, low=low, high=high, log=bool(spec.get("log")), integer=bool(spec.get("int")))
    if isinstance(spec, list):
        if not spec or not all(isinstance(v, (str, int, float, bool)) for v in spec):
            raise ValueError(
                f"{where}: list a flag's values as plain values (strings, numbers, booleans); give values such as "
                "lists or class_path mappings labels: {label: value, ...}"
            )
        labels = [str(value) for value in spec]
        if named:
            raise ValueError(f"{where}: a named axis (no dot) maps labels to sets of flags: {{label: {{flag: value}}}}")
        choices = {label: {name: value} for label, value in zip(labels, spec, strict=True)}
    elif isinstance(spec, dict) and spec:
        choices = {}
        for label, value in spec.items():
            if named and not (isinstance(value, dict) and all("." in str(key) for key in value)):
                raise ValueError(
                    f"{where}.{label}: each value of a named axis is a mapping of train.py flags (dotted names), "
                    f"got {value!r}"
                )
            choices[str(label)] = dict(value) if named else {name: value}
    else:
        raise ValueError(f"{where}: give a list of values, a mapping of labels to values, or a range {{low, high}}")
    if len(set(choices)) != len(choices):
        raise ValueError(f"{where}: two values have the same label")
    return Axis(name, choices=choices)


def load_study(name_or_path: str | Path, *, environment: bool = True) -> Study:
    """Read and check a study file (a path or a shipped study's name).

    Args:
        name_or_path: the file, or a shipped study's name.
        environment: replace ``${NAME}`` by the environment variable (trials need it; a report does not).
    """
    path = study_path(name_or_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    where = str(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a study file is a YAML mapping with recipe, axes, metric and direction")
    unknown = raw.keys() - set(KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a study file takes: {', '.join(KEYS)}")
    for key in ("recipe", "axes", "metric", "direction"):
        if key not in raw:
            raise ValueError(f"{where}: `{key}` is missing (see `python train.py study --help` for the format)")
    data = expand_environment(raw, where) if environment else raw
    recipe = str(data["recipe"])
    if not Path(recipe).is_file():
        recipe_path(recipe)  # a clear error for a name that is no recipe
    elif not Path(recipe).is_absolute():
        recipe = str(Path(recipe).resolve())
    if data["direction"] not in ("minimize", "maximize"):
        raise ValueError(f"{where}: direction is minimize or maximize, got {data['direction']!r}")
    metric = str(data["metric"])
    if not metric.startswith(("test/", "val/")):
        raise ValueError(f"{where}: metric must be a test/ or val/ metric the model logs, got {metric!r}")
    if not isinstance(data["axes"], dict) or not data["axes"]:
        raise ValueError(f"{where}: axes is a mapping of at least one train.py flag (or named axis) to its values")
    axes = [parse_axis(str(name), spec, f"{where}: axes.{name}") for name, spec in data["axes"].items()]
    seeds = data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) for s in seeds)
        or len(set(seeds)) < len(seeds)
    ):
        raise ValueError(f"{where}: seeds is a list of distinct integers, got {seeds!r}")
    budget = dict(data.get("budget") or {})
    if not budget or set(budget) - set(BUDGET_KEYS):
        raise ValueError(f"{where}: budget sets one or more of {', '.join(BUDGET_KEYS)}, got {budget!r}")
    settings = dict(data.get("settings") or {})
    clash = (set(settings) | set(budget)) & {SEED_FLAG}
    if clash:
        raise ValueError(f"{where}: the seed is set by `seeds:`, not by {sorted(clash)}")
    validation = data.get("validation") or {}
    if validation and (set(validation) - {"monitor", "mode"} or validation.get("mode", "min") not in ("min", "max")):
        raise ValueError(f"{where}: validation is {{monitor: val/<metric>, mode: min|max}}, got {validation!r}")
    if metric.startswith("val/") and not validation:
        validation = {"monitor": metric, "mode": "min" if data["direction"] == "minimize" else "max"}
    pruning = data.get("pruning")
    if pruning:
        if not validation:
            raise ValueError(f"{where}: pruning reads the validation metric: set validation: {{monitor, mode}}")
        pruning = {"startup_trials": 5, "warmup_epochs": 1, **(pruning if isinstance(pruning, dict) else {})}
        if set(pruning) - {"startup_trials", "warmup_epochs"}:
            raise ValueError(f"{where}: pruning takes startup_trials and warmup_epochs, got {sorted(pruning)}")
    study = Study(
        name=str(data.get("name") or path.stem),
        recipe=recipe,
        axes=axes,
        metric=metric,
        direction=data["direction"],
        seeds=seeds,
        settings=settings,
        budget=budget,
        monitor=validation.get("monitor"),
        monitor_mode=validation.get("mode", "min"),
        pruning=pruning or None,
        trials=data.get("trials"),
        description=str(data.get("description") or ""),
        source=raw,  # as written: workers on machines whose ${NAME} differ (a local path) share the study
    )
    if study.is_grid and study.trials is not None:
        raise ValueError(f"{where}: `trials` is for search studies (an axis with a range); a grid runs every point")
    if not study.is_grid and not (isinstance(study.trials, int) and study.trials > 0):
        raise ValueError(f"{where}: a study with a range axis samples configurations: set trials: N (N > 0)")
    return study


def describe_studies() -> str:
    """One line per shipped study: its name and its description's first line."""
    lines = []
    for name in study_names():
        raw = yaml.safe_load((STUDIES_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        summary = str(raw.get("description") or "").strip().splitlines()[:1]
        lines.append(f"{name:<28} {summary[0] if summary else ''}")
    return "\n".join(lines)
