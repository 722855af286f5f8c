"""Shipped recipes: YAML run configs in the repository's ``configs/`` directory.

A recipe is named by its file stem (``digits-kd`` is ``configs/digits-kd.yaml``). Each file opens with
comment lines: the first says what it does, the next how long it takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distillery.errors import ConfigError

DEFAULT_RECIPE = "digits-kd"


def recipes_dir() -> Path:
    installed = Path(__file__).resolve().parent.parent / "_configs"  # wheel installs
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[3] / "configs"  # source checkout (editable install)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    duration: str
    path: Path


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def list_recipes() -> list[Recipe]:
    out = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        header = _header(path)
        out.append(
            Recipe(
                name=path.stem,
                description=header[0] if header else "",
                duration=header[1] if len(header) > 1 else "",
                path=path,
            )
        )
    return out


def resolve_recipe(name_or_path: str) -> Path:
    """A path to an existing YAML file, or the file of a shipped recipe with that name."""
    path = Path(name_or_path).expanduser()
    # a directory that happens to carry a recipe's name (a run folder, say) does not hide the recipe
    if path.suffix in (".yaml", ".yml") or path.is_file() or "/" in name_or_path:
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; give a YAML config file or a recipe name")
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist (shipped recipes: {', '.join(r.name for r in list_recipes())})"
            )
        return path
    for recipe in list_recipes():
        if recipe.name == name_or_path:
            return recipe.path
    raise ConfigError(
        f"no recipe or config file named {name_or_path!r}; shipped recipes: "
        f"{', '.join(r.name for r in list_recipes())} (see `distillery recipes`), or give a path to a YAML file"
    )
