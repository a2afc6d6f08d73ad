"""Strategy studies (dgm_lightning.studies): a tiny grid end to end (a failing trial among it), a search, the
report's numbers, pruning, the study files and their W&B sweeps; the helpers the worker tests share."""

from __future__ import annotations

import math
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

optuna = pytest.importorskip("optuna", reason="studies need Optuna: pip install -e '.[study]'")

from optuna.distributions import CategoricalDistribution  # noqa: E402
from optuna.trial import TrialState, create_trial  # noqa: E402

from dgm_lightning.cli import DGMCLI, main  # noqa: E402
from dgm_lightning.recipes import expand_recipe_names  # noqa: E402
from dgm_lightning.studies.engine import run_worker  # noqa: E402
from dgm_lightning.studies.report import configurations, markdown_table, write_report  # noqa: E402
from dgm_lightning.studies.study import STUDIES_DIR, load_study, study_names  # noqa: E402
from dgm_lightning.studies.sweep import sweep_config, sweep_yaml  # noqa: E402
from dgm_lightning.studies.trial import StudyReporter  # noqa: E402
from tests.helpers import REPO, tree_under_test_env, wandb_records  # noqa: E402

# a trial in seconds: 2 epochs of 2 batches of the digits, a small IWAE test
TINY = {
    "trainer.limit_train_batches": 2,
    "trainer.limit_val_batches": 1,
    "trainer.limit_test_batches": 1,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "trainer.callbacks": [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/elbo", "mode": "max"},
        }
    ],
    "model.iwae_samples": 4,
}


def write_study(folder: Path, axes: dict, *, seeds=(0, 1), settings: dict | None = None, **extra) -> Path:
    """A study file on the digits VAE with tiny trials."""
    study = {
        "name": extra.pop("name", "tiny"),
        "recipe": "vae_digits",
        "settings": {**TINY, **(settings or {})},
        "budget": {"trainer.max_epochs": 2},
        "axes": axes,
        "seeds": list(seeds),
        "metric": "test/nll",
        "direction": "minimize",
        "validation": {"monitor": "val/elbo", "mode": "max"},
        **extra,
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def storage_trials(output: Path) -> list[tuple[int, str, str | None]]:
    """(number, state, worker) of every trial in a study's SQLite storage, read with sqlite3 alone (none while
    the worker has not yet created it)."""
    if not (output / "study.db").is_file():
        return []
    try:
        with sqlite3.connect(output / "study.db") as db:
            rows = db.execute("SELECT trial_id, number, state FROM trials ORDER BY number").fetchall()
            workers = dict(db.execute("SELECT trial_id, value_json FROM trial_user_attributes WHERE key = 'worker'"))
    except sqlite3.OperationalError:  # its tables are being created
        return []
    return [(number, state, workers.get(trial_id)) for trial_id, number, state in rows]


def test_a_tiny_grid_runs_end_to_end_records_a_failing_trial_and_reports(tmp_path, capsys):
    # "broken": the model refuses the iwae objective with one sample; "mistyped": train.py's parser refuses the
    # flag (it exits, which must not end the worker). Their trials fail, with the reason, and the study goes on
    axes = {
        "objective": {
            "elbo": {"model.objective": "elbo"},
            "broken": {"model.objective": "iwae"},
            "mistyped": {"model.objectiv": "elbo"},
        }
    }
    study = load_study(write_study(tmp_path, axes))
    handle = run_worker(study, output=tmp_path / "out", in_process=True)
    printed = capsys.readouterr().out
    assert "6/6 done, 4 failed" in printed and "best so far" in printed

    trials = handle.get_trials()
    assert sorted((t.params["objective"], t.params["seed"]) for t in trials) == [
        ("broken", 0), ("broken", 1), ("elbo", 0), ("elbo", 1), ("mistyped", 0), ("mistyped", 1),
    ]  # fmt: skip
    reasons = {
        "broken": "training_samples=1 is the ELBO",
        "mistyped": "train.py refused the trial's flags (Problem with given class_path 'dgm_lightning.VAE': "
        "Option 'objectiv' is not accepted)",
    }
    for t in trials:
        if t.params["objective"] != "elbo":
            assert t.state == TrialState.FAIL and reasons[t.params["objective"]] in t.user_attrs["reason"]
        else:
            assert t.state == TrialState.COMPLETE and 10 < t.value < 60  # nats per 8x8 digit, barely trained
            assert t.value == t.user_attrs["metrics"]["test/nll"] and t.user_attrs["wall_time"] > 0
            assert [epoch for epoch, _ in t.user_attrs["curve"]] == [0, 1]  # val/elbo per epoch
    # W&B: each trial a run of its own, grouped by the study, its axis values in the config
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    run_dir = Path(complete[0].user_attrs["run_dir"])
    (wandb_run,) = (run_dir.parent.parent / "wandb").glob(f"offline-run-*-{run_dir.name}")
    records = wandb_records(wandb_run)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: item.value_json for item in run.config.update}
    assert run.run_group == "tiny" and config["objective"] == '"elbo"' and config["study"] == '"tiny"'

    report = write_report(study, handle, tmp_path / "report")
    values = [t.value for t in complete]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    assert f"| 1 | elbo | {mean:.4g} ± {std:.2g} | 2 | 0 | 0 |" in report
    assert "| 2 | broken | – | 0 | 2 | 0 |" in report and "training_samples=1" in report
    assert "| 3 | mistyped | – | 0 | 2 | 0 |" in report  # (unscored: in the study file's order)
    for name in ("table.md", "table.csv", "trials.csv", "axis_objective.png", "curves.png"):
        assert (tmp_path / "report" / name).stat().st_size > 100, name
    assert (tmp_path / "report" / "axis_objective.png").read_bytes()[:4] == b"\x89PNG"
    # the best configuration is a recipe that train.py runs as it is
    best = tmp_path / "report" / "best.yaml"
    assert yaml.safe_load(best.read_text())["model"]["init_args"]["objective"] == "elbo"
    cli = main(["fit", "--config", str(best), "--trainer.logger", "false", "--trainer.default_root_dir", "again"])
    assert cli.trainer.current_epoch == 2 and list(Path("again").rglob("*.ckpt"))


@pytest.mark.slow  # about 10 s
def test_the_median_pruner_stops_trials_worse_than_the_others_and_the_report_counts_them(tmp_path, capsys):
    # SGD at a learning rate of 1e-6 or 1e-7 learns nothing: its val/elbo is below the median of any two finished
    # trials that include an Adam one. Two configurations that learn nothing, and two start-up trials, so that no
    # Adam trial meets a median of Adam trials alone (with 2 Adam trials of 3, it once fell below the other's)
    axes = {
        "model.optimizer": {
            "adam": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            "stuck": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0e-6}},
            "stuck_too": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0e-7}},
        }
    }
    pruning = {"startup_trials": 2, "warmup_epochs": 0}
    path = write_study(tmp_path, axes, seeds=[0, 1], settings={"trainer.logger": False}, pruning=pruning)
    study = load_study(path)
    handle = run_worker(study, output=tmp_path / "out", in_process=True)
    states = {(t.params["model.optimizer"], t.params["seed"]): t.state for t in handle.get_trials()}
    assert all(states[("adam", seed)] == TrialState.COMPLETE for seed in (0, 1)), states
    pruned = [t for t in handle.get_trials() if t.state == TrialState.PRUNED]
    assert pruned and all(t.params["model.optimizer"].startswith("stuck") for t in pruned), states
    assert all(t.user_attrs["reason"].startswith("pruned after epoch") for t in pruned)
    assert all(len(t.user_attrs["curve"]) == int(t.user_attrs["reason"][-1]) + 1 for t in pruned)
    assert capsys.readouterr().out.count(": PRUNED (pruned after epoch") == len(pruned)  # the progress lines
    report = write_report(study, handle, tmp_path / "report")
    for label in ("stuck", "stuck_too"):
        (row,) = [line for line in report.splitlines() if f" | {label} | " in line]
        done = sum(1 for seed in (0, 1) if states[(label, seed)] == TrialState.COMPLETE)
        assert row.split(" | ")[3:6] == [str(done), "0", str(2 - done)], row  # seeds, failed, pruned


def test_a_search_study_samples_configurations_with_tpe_and_runs_each_once_per_seed(tmp_path):
    axes = {"model.optimizer.init_args.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}
    settings = {"trainer.logger": False, "model.optimizer": {"class_path": "torch.optim.Adam"}}
    study = load_study(write_study(tmp_path, axes, seeds=[0, 1], settings=settings, trials=2))
    assert not study.is_grid and study.total_trials == 4
    handle = run_worker(study, output=tmp_path / "out", in_process=True)
    assert isinstance(handle.sampler, optuna.samplers.TPESampler)
    trials = handle.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    by_lr: dict[float, list[int]] = {}
    for t in trials:
        assert 1.0e-4 <= t.params["model.optimizer.init_args.lr"] <= 1.0e-2
        by_lr.setdefault(t.params["model.optimizer.init_args.lr"], []).append(t.user_attrs["seed"])
        assert f"--model.optimizer.init_args.lr={t.params['model.optimizer.init_args.lr']}" in t.user_attrs["command"]
    assert sorted(sorted(seeds) for seeds in by_lr.values()) == [[0, 1], [0, 1]]  # two samples, two seeds each
    ranked = configurations(study, trials)
    assert len(ranked) == 2 and all(len(c.scores()) == 2 for c in ranked)
    write_report(study, handle, tmp_path / "report")
    assert (tmp_path / "report" / "axis_model.optimizer.init_args.lr.png").is_file()


def test_a_wall_time_budget_gives_a_validation_metric_even_before_the_first_validation(tmp_path):
    # validation every 1000 epochs: within 2 s of training there is none, so the final weights are validated
    axes = {"objective": {"elbo": {"model.objective": "elbo"}}}
    settings = {"trainer.logger": False, "trainer.check_val_every_n_epoch": 1000, "trainer.limit_train_batches": None}
    path = write_study(tmp_path, axes, seeds=[0], settings=settings, metric="val/elbo", direction="maximize")
    raw = yaml.safe_load(path.read_text())
    raw["budget"] = {"trainer.max_time": "00:00:00:02", "trainer.max_epochs": -1}
    path.write_text(yaml.safe_dump(raw))
    handle = run_worker(load_study(path), output=tmp_path / "out", in_process=True)
    (trial,) = handle.get_trials()
    assert trial.state == TrialState.COMPLETE and -60 < trial.value < -10, trial.user_attrs.get("reason")
    assert trial.value == trial.user_attrs["metrics"]["val/elbo"] and len(trial.user_attrs["curve"]) == 1


def test_the_report_means_and_standard_deviations_agree_with_a_hand_computation():
    study = load_study(STUDIES_DIR / "vae_digits_quick.yaml")
    handle = optuna.create_study(direction="minimize")
    space = {name: CategoricalDistribution(values) for name, values in study.grid().items()}
    space["seed"] = CategoricalDistribution([0, 1, 2])

    def add(objective: str, seed: int, value: float | None, **attrs) -> None:
        params = {"objective": objective, "kl_schedule": "none", "model.optimizer": "adam", "seed": seed}
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        user_attrs = {"seed": seed, "wall_time": 2.0, **attrs.pop("user_attrs", {})}
        handle.add_trial(create_trial(state=state, value=value, params=params, distributions=space,
                                      user_attrs=user_attrs, **attrs))  # fmt: skip

    add("elbo", 0, 1.0)
    add("elbo", 1, 2.0)
    add("elbo", 2, 4.0)
    add("iwae", 0, 0.5)
    add("iwae", 1, None, user_attrs={"reason": "diverged"})
    add("iwae", 2, None)  # a dead worker's trial, run again as the next one: only the retry counts
    add("iwae", 2, 0.7, system_attrs={"failed_trial": 5, "retry_history": [5]})
    ranked = configurations(study, handle.get_trials())
    assert [c.values["objective"] for c in ranked] == ["iwae", "elbo"]
    # by hand: iwae 0.5 and 0.7, mean 0.6, std sqrt(2 * 0.1**2 / 1); elbo 1, 2, 4, mean 7/3, std sqrt(7/3)
    assert math.isclose(ranked[0].mean, 0.6) and math.isclose(ranked[0].std, math.sqrt(0.02))
    assert math.isclose(ranked[1].mean, 7 / 3) and math.isclose(ranked[1].std, math.sqrt(7 / 3))
    assert ranked[0].count(TrialState.FAIL) == 1 and ranked[1].count(TrialState.FAIL) == 0
    table = markdown_table(study, ranked)
    assert "| 1 | iwae | none | adam | 0.6 ± 0.14 | 2 | 1 | 0 | 2 |" in table
    assert "| 2 | elbo | none | adam | 2.333 ± 1.5 | 3 | 0 | 0 | 2 |" in table


def test_the_report_says_when_trials_trained_in_different_precisions(tmp_path):
    """precision auto resolves by the trial's model and machine: workers with and without AMX, or a conv and an MLP
    configuration, train in different precisions, which the report names (and says nothing when all agree)."""
    study = load_study(STUDIES_DIR / "vae_digits_quick.yaml")
    space = {name: CategoricalDistribution(values) for name, values in study.grid().items()}
    space["seed"] = CategoricalDistribution([0, 1])
    params = {"objective": "elbo", "kl_schedule": "none", "model.optimizer": "adam"}

    def report(*precisions: str) -> str:
        handle = optuna.create_study(direction="minimize")
        for seed, precision in enumerate(precisions):
            config = yaml.safe_dump({"trainer": {"precision": precision}})
            handle.add_trial(create_trial(value=1.0 + seed, params={**params, "seed": seed}, distributions=space,
                                          user_attrs={"seed": seed, "wall_time": 1.0, "config": config}))  # fmt: skip
        return write_report(study, handle, tmp_path / "_".join(precisions))

    assert "different precisions: 32-true (trials 1); bf16-mixed (trials 0)" in report("bf16-mixed", "32-true")
    assert "precision" not in report("32-true", "32-true")


def test_the_reporter_turns_the_monitor_to_the_studys_direction_and_stops_a_pruned_trial():
    handle = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(1, n_warmup_steps=0))
    handle.add_trial(create_trial(value=1.0, intermediate_values={0: 3.0, 1: 1.0}))
    trial = handle.ask()
    # the monitor is val/elbo (higher is better) in a study that minimizes: reported negated
    reporter = StudyReporter("val/elbo", sign=-1.0, trial=trial)
    broadcast = []
    trainer = SimpleNamespace(
        sanity_checking=True, current_epoch=0, is_global_zero=True, should_stop=False, callback_metrics={},
        strategy=SimpleNamespace(broadcast=lambda x: broadcast.append(x) or x),
    )  # fmt: skip
    import torch

    trainer.callback_metrics = {"val/elbo": torch.tensor(-2.0), "val/kl": torch.tensor(3.0)}
    reporter.on_validation_end(trainer, None)  # the sanity check: nothing reported
    trainer.sanity_checking = False
    reporter.on_validation_end(trainer, None)
    assert handle.trials[1].intermediate_values == {0: 2.0} and not trainer.should_stop  # better than 3
    trainer.current_epoch, trainer.callback_metrics["val/elbo"] = 1, torch.tensor(-5.0)
    reporter.on_validation_end(trainer, None)  # its best, 2, is worse than the other trial's 1 at epoch 1
    assert trainer.should_stop and reporter.pruned_at == 1 and broadcast == [False, True]
    assert reporter.curves == {"val/elbo": [[0, -2.0], [1, -5.0]], "val/kl": [[0, 3.0], [1, 3.0]]}


def run_two_workers(path: Path, output: Path, storage: str | None = None) -> tuple[optuna.Study, list[str]]:
    """Two workers of a study at once, two trials each: one in a process of its own, one in this process."""
    command = [sys.executable, str(REPO / "train.py"), "study", "run", str(path), "--output", str(output / "a")]
    command += ["--in-process", "--n-trials", "2", *(["--storage", storage] if storage else [])]
    other = subprocess.Popen(
        command, env=tree_under_test_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    storage = storage or f"sqlite:///{output / 'a' / 'study.db'}"
    deadline = time.time() + 120
    while not any(state == "RUNNING" for _, state, _ in storage_trials(output / "a")) and time.time() < deadline:
        if storage.startswith("postgresql"):
            break
        time.sleep(0.2)  # the other worker has made the study and started a trial
    handle = run_worker(load_study(path), storage=storage, output=output / "b", n_trials=2, in_process=True)
    printed = other.communicate(timeout=240)[0]
    assert other.returncode == 0, printed[-3000:]
    return handle, [t.user_attrs["worker"] for t in handle.get_trials() if t.state == TrialState.COMPLETE]


def test_study_files_refuse_what_they_cannot_run_with_a_clear_error(tmp_path, capsys):
    def error(**changes) -> str:
        raw = yaml.safe_load((STUDIES_DIR / "vae_digits_quick.yaml").read_text())
        raw.update(changes)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            load_study(path)
        return str(info.value)

    assert "unknown keys ['axis']" in error(axis={})
    assert "no recipe of that name" in error(recipe="vae_digts")
    assert "seeds are not an axis" in error(axes={"seed_everything": [0, 1]})
    assert "give values such as lists or class_path mappings labels" in error(axes={"model.optimizer": [{"a": 1}]})
    assert "mapping of train.py flags" in error(axes={"kl": {"none": 1}})
    assert "set trials: N" in error(axes={"model.optimizer.init_args.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    assert "distinct integers" in error(seeds=[0, 0])
    assert "budget sets one or more of" in error(budget={"trainer.max_epoch": 2})
    assert "metric must be a test/ or val/" in error(metric="nll")
    assert "environment variable DGM_TEST_UNSET" in error(recipe="${DGM_TEST_UNSET}")
    with pytest.raises(FileNotFoundError, match="shipped studies: .*vae_digits_quick"):
        load_study("vae_digts_quick")
    # every shipped study loads, and says its CPU budget
    assert {"vae_fashion_mnist", "vae_digits_quick", "gan_fashion_mnist", "flow_digits"} <= set(study_names())
    for name in study_names():
        study = load_study(name)
        assert "CPU budget" in study.description, name
    assert load_study("vae_fashion_mnist").total_trials == 6 * 3 * 3 * 2
    main(["study", "list"])
    assert "vae_fashion_mnist " in capsys.readouterr().out


def test_the_study_files_ship_inside_the_package_and_the_clone_links_to_them():
    import tomllib

    assert (REPO / "studies").resolve() == STUDIES_DIR and STUDIES_DIR.parent == REPO / "dgm_lightning"
    assert (REPO / "studies" / "sweeps" / "vae_fashion_mnist.yaml").is_file()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["dgm_lightning"]
    assert {"study_files/*.yaml", "study_files/sweeps/*.yaml"} <= set(shipped), shipped


def sweep_agent_args(sweep: dict, params: dict) -> list[str]:
    """The command line W&B's agent builds for one run of a sweep: its macros replaced, ${args} by wandb's own
    ``--name=value`` list (``create_sweep_command_args``)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]
    macros = {"${env}": [], "${interpreter}": [], "${program}": []}
    command = [part for item in sweep["command"] for part in (flags if item == "${args}" else macros.get(item, [item]))]
    assert command[0] == "--config"
    return command


class ParseOnly(DGMCLI):
    """train.py's parser, without building the model, data and Trainer."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def test_every_shipped_sweep_is_in_sync_and_its_agent_command_lines_parse(monkeypatch):
    for name in ("FASHION_CLASSIFIER", "DIGITS_CLASSIFIER"):  # the shipped files hold the defaults' paths
        monkeypatch.delenv(name, raising=False)
    parser = None
    for name in study_names():
        study = load_study(name)
        sweep = sweep_config(study)
        shipped = STUDIES_DIR / "sweeps" / f"{name}.yaml"
        assert shipped.read_text() == sweep_yaml(study), f"regenerate: python train.py study sweep {name} > {shipped}"
        assert sweep["metric"] == {"name": study.metric, "goal": study.direction}
        # each value of each parameter in at least one run (the i-th run takes each parameter's i-th value)
        longest = max(len(spec["values"]) for spec in sweep["parameters"].values())
        for i in range(longest):
            params = {key: spec["values"][i % len(spec["values"])] for key, spec in sweep["parameters"].items()}
            # the agent's order of the parameters is its own: none may undo another (model.init_args, a mapping,
            # merges into the model's settings and keeps model.optimizer)
            params = dict(reversed(params.items())) if i % 2 else params
            args = sweep_agent_args(sweep, params)
            if parser is None:
                parser = ParseOnly(args=args, run=False)
            config = parser.parser.parse_args(expand_recipe_names(args))
            assert config.seed_everything == params["seed_everything"]
            assert config.trainer.logger.init_args.group == study.name
            for key, value in params.items():
                if key.startswith("model.") and key != "model.init_args":  # e.g. model.loss: hinge
                    parsed = config.model.init_args[key.removeprefix("model.")]
                    assert within(yaml.safe_load(str(value)), parsed), (key, value, parsed)
                if key == "model.init_args":
                    assert within(yaml.safe_load(value), config.model.init_args), (value, config.model.init_args)


def within(given, parsed) -> bool:
    """Whether the parser's value holds what was given (a mapping: each given key, parsed defaults beside)."""
    parsed = parsed.as_dict() if hasattr(parsed, "as_dict") else parsed
    if isinstance(given, dict):
        return isinstance(parsed, dict) and all(key in parsed and within(v, parsed[key]) for key, v in given.items())
    return given == parsed
