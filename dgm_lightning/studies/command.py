"""``python train.py study ...``: run a study's worker, print its report, list the shipped studies, write a W&B
sweep file."""

from __future__ import annotations

import argparse
from pathlib import Path

from dgm_lightning.studies import study as study_file
from dgm_lightning.studies.study import describe_studies, load_study

USAGE = """examples:
  python train.py study list
  python train.py study run vae_digits_quick                   # this machine; resumes if interrupted
  python train.py study run vae_fashion_mnist --storage postgresql://user:pw@host/db   # on each machine
  python train.py study report vae_digits_quick                # table.md/csv, plots, best.yaml
  python train.py study sweep vae_fashion_mnist > sweep.yaml   # the same study as a W&B sweep
"""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="train.py study",
        description=__doc__,
        epilog=USAGE + "\n" + (study_file.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the shipped studies")
    for name, text in (("run", "start or join the study's worker"), ("report", "write and print the report")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("study", help="a study file, or the name of a shipped study")
        sub.add_argument(
            "--storage", help="an Optuna RDB URL shared by workers (default: a SQLite file in the output folder)"
        )
        sub.add_argument("--output", type=Path, help="the study's folder (default: runs/studies/<name>)")
    run = commands.choices["run"]
    run.add_argument("--n-trials", type=int, help="stop after this many trials of this worker (default: until done)")
    run.add_argument("--in-process", action="store_true", help="run trials in this process, not one each")
    run.add_argument(
        "--heartbeat", type=int, default=60, help="seconds between heartbeats; a worker silent for twice that "
        "is taken for dead and its trial runs again (default 60)",
    )  # fmt: skip
    sweep = commands.add_parser("sweep", help="print a W&B sweep file of the study")
    sweep.add_argument("study", help="a study file, or the name of a shipped study")
    return top


def main(argv: list[str]) -> None:
    """The ``study`` subcommand of train.py."""
    args = parser().parse_args(argv)
    try:
        import optuna

        if args.command == "report":
            import matplotlib  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"strategy studies need Optuna and matplotlib ({error}): pip install -e '.[study]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created ..." in every worker's output
    if args.command == "list":
        print(describe_studies())
        return
    if args.command == "sweep":
        from dgm_lightning.studies.sweep import sweep_yaml

        print(sweep_yaml(load_study(args.study)), end="")
        return
    from dgm_lightning.studies.engine import default_output, default_storage, open_study, run_worker

    if args.command == "run":
        if args.n_trials is not None and args.n_trials < 1 or args.heartbeat < 1:
            raise SystemExit("--n-trials and --heartbeat must be positive")
        study = load_study(args.study)
        run_worker(
            study,
            storage=args.storage,
            output=args.output,
            n_trials=args.n_trials,
            in_process=args.in_process,
            heartbeat=args.heartbeat,
        )
        return
    from dgm_lightning.studies.report import write_report

    study = load_study(args.study, environment=False)
    output = args.output or default_output(study)
    storage = args.storage or default_storage(output)
    if not args.storage and not (output / "study.db").is_file():
        raise SystemExit(f"no study at {output / 'study.db'}: run it first, or give --storage / --output")
    print(write_report(study, open_study(study, storage, heartbeat=None), output / "report"), end="")
