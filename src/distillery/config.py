"""Run configs: YAML loading (safe), recipe bases, dotted ``key=value`` overrides, readable errors.

A run config names one choice per axis of a distillation method: the data, the teacher, the student,
the loss terms with their weights, and how training goes. Each task has its own pydantic model
(:data:`distillery.tasks.TASKS`; the shared fields are :class:`distillery.tasks.base.RunConfigBase`),
and a config is validated as the model its ``task:`` key names (default ``classification``) before
anything is built or trained. Errors name the field and say what would be valid:

* an unknown key names the key and lists the valid keys at that place (a key of another task says so);
* a wrong type names the field path and the expected type;
* an impossible combination says which fields conflict.
"""

from __future__ import annotations

import functools
import json
import operator
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Discriminator, Tag, ValidationError

from distillery.errors import ConfigError
from distillery.recipes import DEFAULT_RECIPE, resolve_recipe
from distillery.tasks import DEFAULT_TASK, TASKS, RunConfigBase, task_class
from distillery.tasks.base import deep_merge


def task_of(data: Any) -> str:
    """The task a config describes: its ``task`` key, by default :data:`~distillery.tasks.DEFAULT_TASK`."""
    if isinstance(data, dict):
        return data.get("task", DEFAULT_TASK)
    return getattr(data, "task", DEFAULT_TASK)


# Any task's run config, told apart by `task` (the type of `distillery.load_config`'s result).
RunConfig = Annotated[
    functools.reduce(operator.or_, [Annotated[cls.config, Tag(name)] for name, cls in TASKS.items()]),
    Discriminator(task_of),
]

# ----------------------------------------------------------------------------------------------------
# Loading, overrides
# ----------------------------------------------------------------------------------------------------


# A run config is a few hundred values. YAML aliases can make a file of a few hundred bytes expand
# to billions of values ("billion laughs") when the config is copied or merged: such files are refused.
MAX_CONFIG_NODES = 100_000


def expanded_size(data: Any) -> int:
    """How many values ``data`` holds once every YAML alias is written out (counted without expanding)."""
    memo: dict[int, int] = {}

    def size(x: Any) -> int:
        if isinstance(x, dict):
            items = [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple)):
            items = list(x)
        else:
            return 1
        if id(x) not in memo:
            memo[id(x)] = 0  # a self-referencing alias counts once (and is refused by validation)
            memo[id(x)] = 1 + sum(size(v) for v in items)
        return memo[id(x)]

    return size(data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"the key {key!r} appears twice (first {seen[key]}); keep one of them", key_node.start_mark,
                )  # fmt: skip
            seen[key] = f"on line {key_node.start_mark.line + 1}"
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (safe loading: no tags that build objects; a key given twice in one
    mapping is an error, not silently the last one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): is it a YAML config?") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}; check its permissions") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if (size := expanded_size(data)) > MAX_CONFIG_NODES:
        raise ConfigError(
            f"{path} expands to {size:,} values through its YAML aliases (*name), more than the "
            f"{MAX_CONFIG_NODES:,} a run config may hold; write the values out instead of nesting aliases"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections (data, teacher, student, ...); got {type(data).__name__}"
        )
    return data


# Teacher sources with the same fields: a frozen teacher, and the same teacher read from its output cache.
FROZEN_LIKE = ("frozen", "cache")


def _other_source(new: Any, old: Any) -> bool:
    """Whether teacher.source ``new`` replaces ``old`` with a section of other fields."""
    return new != old and not (new in FROZEN_LIKE and old in FROZEN_LIKE)


def _source_of(teacher: dict[str, Any]) -> Any:
    """A teacher section's source: ``source``, else ``members`` when it lists members, else ``frozen``."""
    return teacher.get("source", "members" if "members" in teacher else "frozen")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; ``value`` is parsed as YAML (numbers, lists, true, null...).

    ``teacher.source=<another source>`` starts a fresh teacher section (the old source's fields do not
    apply to the new one); later overrides can then set the new source's fields. ``frozen`` and
    ``cache`` share their fields (the same teacher, run live or read from its output cache): switching
    between them keeps the section. ``teacher.members=[...]`` over a section of another source starts a
    fresh section of several teachers as well.
    """
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        parts = key.strip().split(".")
        teacher = data.get("teacher")
        if parts == ["teacher", "source"] and isinstance(teacher, dict):
            if _other_source(value, _source_of(teacher)):  # its own fields, not these
                data["teacher"] = {"source": value}
                continue
        if parts == ["teacher", "members"] and isinstance(teacher, dict) and _source_of(teacher) != "members":
            data["teacher"] = {"members": value}  # several teachers: a fresh section (source: members)
            continue
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {item!r}: {where} is not an index of a {len(node)}-element list"
                    )
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {key} is not an index of a {len(node)}-element list")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} is a value, not a section")
    return data


def config_model(data: Any) -> type[RunConfigBase]:
    """The run model a config describes, chosen by its ``task`` key from the task table."""
    name = task_of(data)
    if not isinstance(name, str):
        raise ConfigError(f"task: expected a task name, got {name!r}; valid: {', '.join(sorted(TASKS))}")
    return task_class(name).config


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfigBase:
    """Validate ``data`` as the run config of its task; every problem is listed in one ConfigError."""
    model = config_model(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = [format_error(err, model) for err in errors]
        # baseline.train is merged from train: do not repeat an error the user made once, in train.
        unique = [
            line
            for err, line in zip(errors, lines)
            if not (
                err["loc"][:2] == ("baseline", "train")
                and format_error({**err, "loc": err["loc"][1:]}, model) in lines
            )
        ]
        unique = list(dict.fromkeys(unique))
        raise ConfigError(f"invalid {source}:\n" + "\n".join(f"  - {line}" for line in unique)) from None


def _owner_tasks(key: str, model: type[BaseModel]) -> list[str]:
    """The other tasks whose configs have a top-level ``key``."""
    return sorted(
        name for name, cls in TASKS.items() if cls.config is not model and key in cls.config.model_fields
    )


# Sections that a derived recipe replaces instead of merging: a loss is a set of terms, and a
# derived recipe that names other terms means those terms only.
REPLACED_SECTIONS = ("loss",)


def merge_configs(base: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    """``derived`` over ``base``: mappings merge key by key, other values replace. ``loss`` is always
    replaced, and so is ``teacher`` when the derived recipe names another ``source`` (``frozen`` and
    ``cache`` share their fields), and ``student``
    when it names another model (``name``: an MLP's fields do not apply to a CNN)."""
    replaced = [k for k in REPLACED_SECTIONS if k in derived]
    b_teacher, d_teacher = base.get("teacher"), derived.get("teacher")
    if isinstance(b_teacher, dict) and isinstance(d_teacher, dict):
        given = "source" in d_teacher or "members" in d_teacher  # members: source members
        if given and _other_source(_source_of(d_teacher), _source_of(b_teacher)):
            replaced.append("teacher")
    b_student, d_student = base.get("student"), derived.get("student")
    if isinstance(b_student, dict) and isinstance(d_student, dict):
        if "name" in d_student and d_student["name"] != b_student.get("name"):
            replaced.append("student")
    kept = {k: v for k, v in base.items() if k not in replaced}
    return deep_merge(kept, derived)


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its ``base:`` chain resolved.

    ``base`` names a shipped recipe or a YAML path (relative to the file that names it); the file's
    own keys are merged over the base's (see :func:`merge_configs`).
    """
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"recipe bases form a cycle: {cycle}; remove one of the `base:` keys")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path.name}: `base` must be a recipe name or a YAML path, got {base!r}")
    relative = path.parent / base
    base_path = relative if relative.is_file() else resolve_recipe(base)
    return merge_configs(read_recipe(base_path, (*_chain, path)), data)


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> RunConfigBase:
    """Load a run config from a YAML path or a shipped recipe name (default: the built-in recipe)."""
    path = resolve_recipe(DEFAULT_RECIPE if source is None else str(source))
    data = apply_overrides(read_recipe(path), overrides or [])
    return validate_config(data, source=str(path))


def dump_config(cfg: RunConfigBase) -> str:
    """The resolved config as YAML (every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------------------------
# Error messages
# ----------------------------------------------------------------------------------------------------

_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping (key: value entries)",
    "model_type": "a mapping (key: value entries)",
    "model_attributes_type": "a mapping (key: value entries)",
}


def format_error(err: dict[str, Any], root: type[BaseModel]) -> str:
    path, model = _walk(root, err["loc"])
    where = ".".join(path) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = sorted(model.model_fields) if model is not None else []
        others = _owner_tasks(path[0], root) if len(path) == 1 else []
        if others:
            task = root.model_fields["task"].default
            return (
                f"unknown key '{where}' for task: {task}; `{where}` belongs to task: {' / '.join(others)} "
                f"(set task: {others[0]}, or remove `{where}`)"
            )
        return f"unknown key '{where}'; valid keys{_at(path[:-1])}: {', '.join(valid)}"
    if kind == "missing":
        return f"missing required field '{where}'"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        what = "loss" if path and path[0] == "loss" else ctx.get("discriminator", "name").strip("'")
        valid = sorted(tag.strip(" '") for tag in str(ctx.get("expected_tags", "")).split(","))
        return f"{where}: unknown {what} {ctx.get('tag')!r}; valid: {', '.join(valid)}"
    if kind == "union_tag_not_found":
        return f"{where}: missing the `{err.get('ctx', {}).get('discriminator', 'name').strip(chr(39))}` key"
    if kind == "value_error":
        return (
            f"{where}: {err['msg'].removeprefix('Value error, ')}"
            if path
            else err["msg"].removeprefix("Value error, ")
        )
    if kind in _EXPECTED:
        return f"{where}: expected {_EXPECTED[kind]}, got {_show(err.get('input'))}"
    if kind == "literal_error":
        return f"{where}: {err['msg'].replace('Input should be', 'expected')}, got {_show(err.get('input'))}"
    return f"{where}: {err['msg']} (got {_show(err.get('input'))})"


def _at(path: list[str]) -> str:
    return f" in '{'.'.join(path)}'" if path else " at the top level"


def _show(value: Any) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 60 else text + f" ({type(value).__name__})"


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """Follow a pydantic error location through the config models.

    Returns the user-facing path (discriminator tags dropped) and the model that owns the last key
    (for listing valid keys).
    """
    path: list[str] = []
    current: Any = model
    owner: type[BaseModel] | None = model
    items = list(loc)
    i = 0
    while i < len(items):
        item = items[i]
        current = _strip(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            owner = current
            path.append(str(item))
            field = current.model_fields.get(str(item))
            current = field.annotation if field is not None else None
            i += 1
            continue
        origin = typing.get_origin(current)
        args = typing.get_args(current)
        if origin in (typing.Union, types.UnionType):
            members = [a for a in args if a is not type(None)]
            tagged = {_tag(m): m for m in members if _tag(m) is not None}
            if str(item) in tagged:
                current = tagged[str(item)]
                i += 1  # the tag is not part of the user's path
            elif len(members) == 1:
                current = members[0]
            else:
                current = None
            continue
        if origin is dict:
            path.append(str(item))
            current = args[1] if len(args) == 2 else None
            i += 1
            continue
        if origin in (list, tuple):
            path.append(str(item))
            current = args[0] if args else None
            i += 1
            continue
        path.append(str(item))
        current = None
        i += 1
    return path, owner


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _tag(member: Any) -> str | None:
    member = _strip(member)
    if isinstance(member, type) and issubclass(member, BaseModel):
        for key in ("name", "source"):
            field = member.model_fields.get(key)
            if field is not None and isinstance(field.default, str):
                return field.default
    return None
