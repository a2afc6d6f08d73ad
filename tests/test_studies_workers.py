"""Robust study workers: an interrupted or killed worker's study resumes without repeating a finished trial,
two workers on one storage split a grid, and a trial runs in a process of its own (on several devices too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="studies need Optuna: pip install -e '.[study]'")

from optuna.trial import TrialState  # noqa: E402

from dgm_lightning.studies.engine import run_in_subprocess, run_worker  # noqa: E402
from dgm_lightning.studies.report import write_report  # noqa: E402
from dgm_lightning.studies.study import flag_args, load_study  # noqa: E402
from tests.helpers import REPO, tree_under_test_env  # noqa: E402
from tests.test_studies import run_two_workers, storage_trials, write_study  # noqa: E402


def test_an_interrupted_study_resumes_with_the_interrupted_trial_and_repeats_no_finished_one(tmp_path, monkeypatch):
    axes = {"objective": {"elbo": {"model.objective": "elbo"}}}
    study = load_study(write_study(tmp_path, axes, seeds=[0, 1, 2], settings={"trainer.logger": False}))
    import dgm_lightning.studies.engine as engine

    calls, run_trial = [], engine.run_trial

    def interrupted_second(spec, trial):  # Ctrl-C in the second trial
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_trial(spec, trial)

    monkeypatch.setattr(engine, "run_trial", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        run_worker(study, output=tmp_path / "out", in_process=True)
    monkeypatch.undo()
    states = [
        t.state for t in optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/out/study.db").trials
    ]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]  # the interrupted one, queued again
    handle = run_worker(study, output=tmp_path / "out", in_process=True)
    complete = [t for t in handle.get_trials() if t.state == TrialState.COMPLETE]
    assert sorted(t.params["seed"] for t in complete) == [0, 1, 2] and len(handle.get_trials()) == 4
    assert handle.trials[1].user_attrs["interrupted"] and handle.trials[2].system_attrs["failed_trial"] == 1
    assert "3/3 trials finished: 3 complete, 0 failed" in write_report(study, handle, tmp_path / "report")


def test_a_trial_in_a_process_of_its_own_reports_its_result(tmp_path):
    axes = {"objective": {"elbo": {"model.objective": "elbo"}}}
    study = load_study(write_study(tmp_path, axes, seeds=[0], settings={"trainer.logger": False}))
    flags = flag_args(study.trial_flags({"objective": "elbo"}, 0)) + ["--trainer.default_root_dir=t"]
    spec = {
        "args": ["--config", study.recipe, *flags],
        "metric": study.metric, "direction": study.direction, "monitor": study.monitor, "sign": -1.0,
        "storage": None, "trial_id": None, "pruning": None, "result": str(tmp_path / "result.json"),
    }  # fmt: skip
    result = run_in_subprocess(spec, tmp_path)
    assert result["status"] == "complete", (tmp_path / "trial.log").read_text()[-3000:]
    assert 10 < result["metrics"]["test/nll"] < 60 and "val/elbo" in result["curves"]
    assert "model:" in result["config"] and Path(result["run_dir"]).is_dir()


@pytest.mark.slow  # about 30 s on 2 busy cores
def test_a_killed_worker_leaves_a_study_that_resumes_without_repeating_finished_trials(tmp_path):
    axes = {"model.optimizer": {"adam": {"class_path": "torch.optim.Adam"}, "sgd": {"class_path": "torch.optim.SGD"}}}
    settings = {"trainer.logger": False, "trainer.limit_train_batches": 20}
    path = write_study(tmp_path, axes, seeds=[0, 1], settings=settings)
    output = tmp_path / "out"
    command = [sys.executable, str(REPO / "train.py"), "study", "run", str(path), "--output", str(output)]
    worker = subprocess.Popen(
        [*command, "--in-process", "--heartbeat", "1"], env=tree_under_test_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it in its second trial
        trials = storage_trials(output)
        if any(state == "COMPLETE" for _, state, _ in trials) and any(s == "RUNNING" and w for _, s, w in trials):
            break  # (its heartbeats began before its worker attribute was written)
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    before = storage_trials(output)
    finished = [n for n, state, _ in before if state == "COMPLETE"]
    assert finished and any(state == "RUNNING" for _, state, _ in before), before
    time.sleep(2.5)  # past the heartbeat's grace (2 beats): the killed worker's trial is stale

    study = load_study(path)
    handle = run_worker(study, output=output, in_process=True, heartbeat=1)
    trials = handle.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    points = sorted((t.params["model.optimizer"], t.params["seed"]) for t in complete)
    assert points == [("adam", 0), ("adam", 1), ("sgd", 0), ("sgd", 1)]  # each grid point once
    assert all(t.number in finished or t.user_attrs["worker"].endswith(f":{os.getpid()}") for t in complete)
    (stale,) = [t for t in trials if t.state == TrialState.FAIL]
    assert any(t.system_attrs.get("failed_trial") == stale.number for t in complete)
    report = write_report(study, handle, tmp_path / "report")
    assert "4/4 trials finished: 4 complete, 0 failed" in report


@pytest.mark.slow  # about 40 s: two processes of a DDP trial, started in the trial's own process
def test_a_trial_may_itself_train_on_several_devices(tmp_path):
    # DDP on two CPU processes (gloo): the trial's process launches its second rank, and only rank 0 writes the
    # result; the validation values agree across ranks through the reporter's broadcast
    axes = {"objective": {"elbo": {"model.objective": "elbo"}}}
    settings = {"trainer.logger": False, "trainer.accelerator": "cpu", "trainer.devices": 2, "trainer.strategy": "ddp"}
    study = load_study(write_study(tmp_path, axes, seeds=[0], settings=settings))
    handle = run_worker(study, output=tmp_path / "out")
    (trial,) = handle.get_trials()
    log = (Path(trial.user_attrs["folder"]) / "trial.log").read_text()
    assert trial.state == TrialState.COMPLETE, log[-3000:]
    assert "MEMBER: 2/2" in log and 10 < trial.value < 60


def test_two_workers_on_one_storage_split_the_grid_without_overlap(tmp_path):
    axes = {"model.optimizer": {"adam": {"class_path": "torch.optim.Adam"}, "sgd": {"class_path": "torch.optim.SGD"}}}
    path = write_study(tmp_path, axes, seeds=[0, 1], settings={"trainer.logger": False})
    handle, workers = run_two_workers(path, tmp_path / "out")
    complete = [t for t in handle.get_trials() if t.state == TrialState.COMPLETE]
    points = sorted((t.params["model.optimizer"], t.params["seed"]) for t in complete)
    assert points == [("adam", 0), ("adam", 1), ("sgd", 0), ("sgd", 1)] and len(handle.get_trials()) == 4
    assert sorted(workers.count(w) for w in set(workers)) == [2, 2]  # each worker ran two of the four
