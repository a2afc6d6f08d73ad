"""The shipped recipes: YAML configs inside the package, so an installed user runs them by name from any folder.

``--config vae_digits`` names the recipe ``dgm_lightning/configs/vae_digits.yaml`` (``configs/`` in a clone links
there); a path to a file works as always. ``train.py recipes`` lists them.
"""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent / "configs"


def recipe_names() -> list[str]:
    """The names of the shipped recipes, sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of the recipe ``name`` (with or without ``.yaml``)."""
    path = RECIPES_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        raise FileNotFoundError(
            f"--config {name}: no such file and no recipe of that name; recipes: {', '.join(recipe_names())} "
            "(`train.py recipes` describes them)"
        )
    return path


def expand_recipe_names(args: list[str]) -> list[str]:
    """``--config NAME`` (or ``--config=NAME``) -> the recipe's path, unless NAME is an existing file or a path."""

    def expand(value: str) -> str:
        if Path(value).exists() or "/" in value or value.lstrip().startswith(("{", "[")):
            return value  # a file, a path (jsonargparse reports a missing one) or an inline config
        return str(recipe_path(value))

    expanded, previous = [], None
    for arg in args:
        if previous == "--config":
            arg = expand(arg)
        elif arg.startswith("--config="):
            arg = "--config=" + expand(arg.removeprefix("--config="))
        expanded.append(arg)
        previous = arg
    return expanded


def describe_recipes() -> str:
    """One line per recipe: its name and the first line of its opening comment."""
    lines = []
    for name in recipe_names():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[:1]
        summary = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        lines.append(f"{name:<28} {summary}")
    return "\n".join(lines)
