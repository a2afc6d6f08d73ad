"""The many-machines path of a study: workers share a real PostgreSQL server (a throwaway cluster started here)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="studies need Optuna: pip install -e '.[study]'")
pytest.importorskip("psycopg2", reason="PostgreSQL storage needs a driver: pip install psycopg2-binary")

from optuna.trial import TrialState  # noqa: E402

from dgm_lightning.studies.engine import run_worker  # noqa: E402
from dgm_lightning.studies.report import write_report  # noqa: E402
from dgm_lightning.studies.study import load_study  # noqa: E402
from tests.test_studies import run_two_workers, write_study  # noqa: E402

BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin")) or [
    str(Path(p).parent) for p in filter(None, [shutil.which("initdb")])
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of its own (initdb into a temporary folder, a free port), stopped afterwards.

    PostgreSQL refuses to run as root, so under root the cluster belongs to the ``postgres`` user."""
    if not BINARIES:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    bin_dir = Path(BINARIES[-1])
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="dgm-postgres-"))
    if as_user:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command[0]}: {done.stdout[-2000:]} {done.stderr[-2000:]}"

    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "studies")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow  # about 30 s on 2 busy cores: the server, a worker process, eight tiny trials
def test_workers_on_two_machines_share_a_study_on_postgresql(tmp_path, postgres_url):
    axes = {"model.optimizer": {"adam": {"class_path": "torch.optim.Adam"}, "sgd": {"class_path": "torch.optim.SGD"}}}
    path = write_study(tmp_path, axes, seeds=[0, 1], settings={"trainer.logger": False})
    # two "machines": their own output folders, the study in the server
    handle, workers = run_two_workers(path, tmp_path / "machines", storage=postgres_url)
    complete = [t for t in handle.get_trials() if t.state == TrialState.COMPLETE]
    points = sorted((t.params["model.optimizer"], t.params["seed"]) for t in complete)
    assert points == [("adam", 0), ("adam", 1), ("sgd", 0), ("sgd", 1)] and len(handle.get_trials()) == 4
    assert sorted(workers.count(w) for w in set(workers)) == [2, 2]
    folders = {Path(t.user_attrs["folder"]).parent.parent.name for t in complete}
    assert folders == {"a", "b"}  # each machine's trials in its own folder
    # a third worker finds nothing left; the report comes from the server alone
    study = load_study(path)
    assert len(run_worker(study, storage=postgres_url, output=tmp_path / "c", in_process=True).trials) == 4
    report = write_report(study, handle, tmp_path / "report")
    assert "4/4 trials finished: 4 complete" in report and (tmp_path / "report" / "best.yaml").is_file()
