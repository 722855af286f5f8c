"""Pydantic models of a run; YAML loading (safe); dotted ``key=value`` overrides; readable errors.

A run config names one choice per axis of a distillation method: the data, the teacher, the student,
the loss terms with their weights, and how training goes. Everything is validated before anything is
built or trained. Errors name the field and say what would be valid:

* an unknown key names the key and lists the valid keys at that place;
* a wrong type names the field path and the expected type;
* an impossible combination says which fields conflict.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from distillery.configbase import StrictModel
from distillery.data import ImageDataConfig
from distillery.errors import ConfigError
from distillery.losses import LOSSES, LossTermConfig
from distillery.models import ModelConfig
from distillery.models.exits import ExitConfig
from distillery.train.config import TrainConfig

# ----------------------------------------------------------------------------------------------------
# Run sections
# ----------------------------------------------------------------------------------------------------


class FrozenTeacherConfig(StrictModel):
    """A fixed teacher: trained first by this run (and cached), or loaded from a checkpoint."""

    source: Literal["frozen"] = "frozen"
    model: ModelConfig | None = Field(
        None, description="teacher architecture (to train, or for the checkpoint)"
    )
    ensemble: int = Field(1, ge=1, description="train this many members and average their probabilities")
    train: TrainConfig | None = Field(
        None,
        description="train the teacher on the labelled split first (reused from the cache by config hash)",
    )
    checkpoint: str | None = Field(None, description="safetensors weights of `model`")
    precompute: bool | None = Field(
        None,
        description="compute teacher outputs once per training example (null: whenever the student's "
        "training has no augmentation)",
    )
    cache: bool = Field(True, description="reuse a teacher trained earlier with the same settings")
    cache_dir: str | None = Field(None, description="teacher cache (default: ~/.cache/distillery/teachers)")

    @model_validator(mode="after")
    def _one_source(self) -> FrozenTeacherConfig:
        given = [k for k in ("train", "checkpoint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "conflicting fields: give exactly one of teacher.train (train it first) or teacher.checkpoint "
                f"(load weights); got {', '.join(given) or 'neither'}"
            )
        if self.model is None:
            raise ValueError(f"conflicting fields: teacher.{given[0]} needs teacher.model (the architecture)")
        if self.ensemble > 1 and self.checkpoint is not None:
            raise ValueError(
                "conflicting fields: teacher.ensemble > 1 needs teacher.train (members are trained)"
            )
        return self


class EMATeacherConfig(StrictModel):
    """Mean teacher: an exponential moving average of the student's weights (and float buffers)."""

    source: Literal["ema"] = "ema"
    momentum: float = Field(
        0.99, ge=0.0, le=1.0, description="EMA momentum (weight the teacher keeps per step)"
    )
    momentum_end: float | None = Field(
        None, ge=0.0, le=1.0, description="cosine-ramp the momentum to this value over training (BYOL/DINO)"
    )


class RandomTeacherConfig(StrictModel):
    """A frozen, randomly initialised copy of the student ("Random Teachers are Good Teachers")."""

    source: Literal["random"] = "random"
    init_seed_offset: int = Field(
        10_000, description="the teacher is initialised with seed + offset (the student with seed)"
    )


class PastPredictionsTeacherConfig(StrictModel):
    """PS-KD: targets mix the labels with the student's own predictions from the previous epoch."""

    source: Literal["past_predictions"] = "past_predictions"
    alpha_T: float = Field(0.8, ge=0.0, le=1.0, description="final weight of the past predictions")


class SnapshotTeacherConfig(StrictModel):
    """Born-again networks: generation k+1 (a fresh student) learns from generation k; generation 0 is
    the cross-entropy baseline."""

    source: Literal["snapshot"] = "snapshot"
    generations: int = Field(3, ge=1, description="distilled generations after the CE generation 0")
    ensemble_eval: bool = Field(True, description="also report the ensemble of generations 1..N")


class PeersTeacherConfig(StrictModel):
    """Deep mutual learning: K students trained together, each learning from the others' mean."""

    source: Literal["peers"] = "peers"
    peers: int = Field(2, ge=2, description="number of students trained together")


class ExitsTeacherConfig(StrictModel):
    """Multi-exit self-distillation: auxiliary exits learn from the deepest one."""

    source: Literal["exits"] = "exits"
    exits: ExitConfig


SELF_SOURCES = ("ema", "random", "past_predictions", "snapshot", "peers", "exits")
TeacherConfig = Annotated[
    FrozenTeacherConfig
    | EMATeacherConfig
    | RandomTeacherConfig
    | PastPredictionsTeacherConfig
    | SnapshotTeacherConfig
    | PeersTeacherConfig
    | ExitsTeacherConfig,
    Field(discriminator="source"),
]


class BaselineConfig(StrictModel):
    """A paired control: the same student, same seeds, splits and initial weights, trained with
    cross-entropy on the labelled split only."""

    enabled: bool = True
    train: TrainConfig | None = Field(
        None, description="training settings, merged over the run's `train` section (e.g. another batch size)"
    )


class EvalConfig(StrictModel):
    ece_bins: int = Field(15, ge=1, description="confidence bins of the expected calibration error")
    batch_size: int = Field(1024, ge=1)


class OutputConfig(StrictModel):
    root: str = Field("runs", description="run directories are created under root/<name>/<timestamp>")
    dir: str | None = Field(None, description="exact run directory (overrides root)")
    tensorboard: bool | None = Field(
        None, description="TensorBoard logs (null: when tensorboard is installed)"
    )


class RunConfig(StrictModel):
    """One run of ``distillery run``: a student distilled from a teacher over several seeds, and
    (optionally) a paired cross-entropy baseline."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    data: ImageDataConfig = Field(default_factory=ImageDataConfig)
    teacher: TeacherConfig | None = None
    student: ModelConfig
    loss: dict[str, LossTermConfig] = Field(default_factory=lambda: {"ce": {"name": "ce"}}, min_length=1)
    train: TrainConfig
    baseline: BaselineConfig | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("loss", mode="before")
    @classmethod
    def _name_from_key(cls, value: Any) -> Any:
        """``loss: {kd: {temperature: 4}}`` means a term of type kd; ``{hi: {name: forward_kl}}`` labels it."""
        if not isinstance(value, dict):
            return value
        out = {}
        for key, spec in value.items():
            spec = {} if spec is None else spec
            if isinstance(spec, dict) and "name" not in spec:
                spec = {**spec, "name": key}
            out[key] = spec
        return out

    @field_validator("teacher", mode="before")
    @classmethod
    def _frozen_by_default(cls, value: Any) -> Any:
        """A teacher section without ``source`` is a frozen (trained or loaded) teacher."""
        if isinstance(value, dict) and "source" not in value:
            return {"source": "frozen", **value}
        return value

    @model_validator(mode="before")
    @classmethod
    def _merge_baseline_train(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and isinstance(data.get("baseline"), dict)
            and isinstance(data.get("train"), dict)
        ):
            base = dict(data["baseline"])
            base["train"] = deep_merge(data["train"], base.get("train") or {})
            data = {**data, "baseline": base}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct; got {self.seeds}")
        users = [label for label, term in self.loss.items() if LOSSES[term.name][1].needs_teacher]
        if users and self.teacher is None:
            raise ValueError(
                f"conflicting fields: loss.{users[0]} needs a teacher, but `teacher` is not set; "
                "add a teacher section or train with `ce` only"
            )
        if self.teacher is not None and not users:
            raise ValueError(
                f"conflicting fields: `teacher` is set but no loss term uses it (loss: {', '.join(self.loss)}); "
                "add a distillation term such as kd or forward_kl"
            )
        if self.data.transfer and not users:
            raise ValueError(
                f"conflicting fields: data.transfer={self.data.transfer} unlabelled examples, but no loss term "
                "uses a teacher, so they would contribute nothing; set data.transfer=0 or add a distillation term"
            )
        source = None if self.teacher is None else self.teacher.source
        if source == "past_predictions" and self.data.transfer:
            raise ValueError(
                f"conflicting fields: teacher.source=past_predictions (PS-KD) mixes each example's label with "
                f"its past prediction, but data.transfer={self.data.transfer} examples have no label; set "
                "data.transfer=0"
            )
        if source == "snapshot" and (self.baseline is None or not self.baseline.enabled):
            raise ValueError(
                "conflicting fields: teacher.source=snapshot starts from generation 0, the cross-entropy "
                "student of the baseline arm; set baseline.enabled=true"
            )
        hint_terms = [label for label, term in self.loss.items() if term.name == "hint"]
        hint_at = self.teacher.exits.hint_at if source == "exits" else None
        if hint_terms and hint_at is None:
            raise ValueError(
                f"conflicting fields: loss.{hint_terms[0]} (feature hints) needs a multi-exit student with hints; "
                "set teacher.source=exits and teacher.exits.hint_at to the deep module the exits should learn "
                "(e.g. the input of the final classifier)"
            )
        if hint_at is not None and not hint_terms:
            raise ValueError(
                f"conflicting fields: teacher.exits.hint_at={hint_at!r} adds hint projections, but no loss term "
                "trains them; add a `hint` term (e.g. loss.hint={weight: 1.0}) or drop hint_at"
            )
        if source == "frozen" and self.teacher.precompute and not self.train.augment.is_identity():
            raise ValueError(
                "conflicting fields: teacher.precompute=true stores one output per example, but train.augment "
                "changes the inputs every step; set teacher.precompute=false (or null) or turn augmentation off"
            )
        return self

    def teacher_precomputed(self) -> bool:
        if self.teacher is None or self.teacher.source != "frozen":
            return False
        if self.teacher.precompute is None:
            return self.train.augment.is_identity()
        return self.teacher.precompute


# ----------------------------------------------------------------------------------------------------
# Loading, overrides
# ----------------------------------------------------------------------------------------------------


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections (data, teacher, student, ...); got {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; ``value`` is parsed as YAML (numbers, lists, true, null...).

    ``teacher.source=<another source>`` starts a fresh teacher section (the old source's fields do not
    apply to the new one); later overrides can then set the new source's fields.
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
            if value != teacher.get("source", "frozen"):  # another source: its own fields, not these
                data["teacher"] = {"source": value}
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


def config_model(data: Any) -> type[BaseModel]:
    """The run model a config describes: ``task: lm`` is a language-model run, else classification."""
    if isinstance(data, dict) and data.get("task") == "lm":
        from distillery.lm.config import LMRunConfig

        return LMRunConfig
    if isinstance(data, dict) and data.get("task") not in (None, "classification"):
        raise ConfigError(f"task: unknown task {data.get('task')!r}; valid: classification, lm")
    return RunConfig


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    model = config_model(data)
    try:
        return model.model_validate(
            {k: v for k, v in data.items() if not (k == "task" and model is RunConfig)}
        )
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


# Sections that a derived recipe replaces instead of merging: a loss is a set of terms, and a
# derived recipe that names other terms means those terms only.
REPLACED_SECTIONS = ("loss",)


def merge_configs(base: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    """``derived`` over ``base``: mappings merge key by key, other values replace. ``loss`` is always
    replaced, and so is ``teacher`` when the derived recipe names another ``source``."""
    replaced = [k for k in REPLACED_SECTIONS if k in derived]
    b_teacher, d_teacher = base.get("teacher"), derived.get("teacher")
    if isinstance(b_teacher, dict) and isinstance(d_teacher, dict):
        if "source" in d_teacher and d_teacher["source"] != b_teacher.get("source", "frozen"):
            replaced.append("teacher")
    kept = {k: v for k, v in base.items() if k not in replaced}
    return deep_merge(kept, derived)


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config with its ``base:`` chain resolved.

    ``base`` names a shipped recipe or a YAML path (relative to the file that names it); the file's
    own keys are merged over the base's (see :func:`merge_configs`).
    """
    from distillery.recipes import resolve_recipe

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


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from a YAML path or a shipped recipe name (default: the built-in recipe)."""
    from distillery.recipes import DEFAULT_RECIPE, resolve_recipe

    path = resolve_recipe(DEFAULT_RECIPE if source is None else str(source))
    data = apply_overrides(read_recipe(path), overrides or [])
    return validate_config(data, source=str(path))


def dump_config(cfg: RunConfig) -> str:
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


def format_error(err: dict[str, Any], root: type[BaseModel] = RunConfig) -> str:
    path, model = _walk(root, err["loc"])
    where = ".".join(path) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = sorted(model.model_fields) if model is not None else []
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
