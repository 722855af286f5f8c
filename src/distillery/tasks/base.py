"""The task protocol: what one kind of work brings to the experiment runner.

The runner (:mod:`distillery.experiment`) knows nothing about classifiers or language models. It
owns the run folder, the loop over seeds and arms, the teacher cache, training through
:func:`distillery.train.fit`, the records, the summary and the report. A *task* supplies the rest.
It is a class with these members; the runner calls them in this order for each seed:

=============================================  =====================================================
member                                         what it gives the runner
=============================================  =====================================================
``config``, ``metrics`` (class attributes)     the pydantic model of its run config; the metric
                                               columns of its summary (:class:`Metric`), headline
                                               first; ``dataset``: the data's name for the report
``__init__(cfg, context)``                     anything shared by every seed (a tokenizer, ...);
                                               ``context`` is a :class:`RunContext`
``arms()``                                     the trained arms in order, the paired baseline first
``prepare(seed) -> data``                      the seed's data: splits drawn for that seed (any object)
``describe(data) -> str``                      one line about the data, printed once
``teacher(data) -> TeacherSpec | None``        how the seed's teacher is obtained (trained and
                                               cached by the runner, or loaded; or several members,
                                               each obtained so); None: no teacher
``new_student(data) -> nn.Module``             a freshly initialised student; the runner seeds torch
                                               with the run seed first, and every arm starts from
                                               these initial weights
``arm(name, data, teacher, init, trained)``    an :class:`ArmJob`: what :func:`fit` trains for the arm
``evaluate(model, data, split, teacher)``      metrics of a model (a student or the teacher) on the
                                               ``"validation"`` split (during training) or the
                                               ``"test"`` split (once, at the end)
``save(student, arm_dir, data)`` /             the exported student on disk, and back; whether an
``load(arm_dir, data)`` / ``saved(arm_dir)``     arm folder holds one
``combined_arms(data, trained, records)``      records of arms built from trained ones (an ensemble
                                               of generations); ``{}`` for most tasks
``label(arm)``, ``description(arm)``           how the report names an arm and says how it trained
``sections(summary)``, ``arm_lines(record)``   extra report tables (per-exit results, ...) and console
                                               lines under an arm's result
=============================================  =====================================================

:class:`BaseTask` implements the optional members with defaults, so a new task writes its config,
its metrics, ``prepare``, ``teacher``, ``new_student``, ``arm`` and ``evaluate``. Tasks are named
in configs by ``task:`` from the table in :mod:`distillery.tasks`; adding one is one module and
one row there.

Every task's config extends :class:`RunConfigBase` (name, seeds, training, the paired baseline,
evaluation, output), so the runner can read those fields whatever the task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import Field, field_validator, model_validator
from rich.console import Console
from torch import nn

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.losses import LossTermConfig, Objective, SelfSupervisedTermConfig
from distillery.train.config import TrainConfig
from distillery.train.trackers import TRACKERS, check_trackers

BASELINE = "baseline"
DISTILLED = "distilled"

# ----------------------------------------------------------------------------------------------------
# Config fields every task shares
# ----------------------------------------------------------------------------------------------------


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``: mappings merge key by key, other values replace."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class BaselineConfig(StrictModel):
    """A paired control: the same student, same seeds, splits and initial weights, trained with
    cross-entropy on the labelled data only."""

    enabled: bool = True
    train: TrainConfig | None = Field(
        None, description="training settings, merged over the run's `train` section (e.g. another batch size)"
    )


class EvalConfig(StrictModel):
    batch_size: int = Field(1024, ge=1, description="examples per evaluation batch")


class OutputConfig(StrictModel):
    root: str = Field("runs", description="run directories are created under root/<name>/<timestamp>")
    dir: str | None = Field(None, description="exact run directory (overrides root)")
    tensorboard: bool | None = Field(
        None, description="TensorBoard logs (null: when tensorboard is installed)"
    )
    report_to: list[str] = Field(
        default_factory=list,
        description=f"experiment trackers (Accelerate's tracker API): any of {', '.join(TRACKERS)}",
    )
    push_to_hub: str | None = Field(
        None,
        description="a hub repo id: upload the distilled student's folder (model card included) after the run",
    )

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, names: list[str]) -> list[str]:
        try:
            check_trackers(names)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("output.report_to: ")) from None
        return list(dict.fromkeys(names))


class RunConfigBase(StrictModel):
    """What every run has, whatever its task."""

    task: str
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    train: TrainConfig
    baseline: BaselineConfig | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _merge_baseline_train(cls, data: Any) -> Any:
        """``baseline.train`` holds only what differs from ``train``: merge it over ``train``."""
        if (
            isinstance(data, dict)
            and isinstance(data.get("baseline"), dict)
            and isinstance(data.get("train"), dict)
        ):
            base = dict(data["baseline"])
            base["train"] = deep_merge(data["train"], base.get("train") or {})
            data = {**data, "baseline": base}
        return data

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str) -> str:
        if set(name) == {"."}:
            raise ValueError(
                f"name {name!r} would put the run outside output.root; use letters, digits, '_', '-' and '.'"
            )
        return name

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct; got {seeds}")
        return seeds

    def baseline_enabled(self) -> bool:
        return self.baseline is not None and self.baseline.enabled


class MembersConfigBase(StrictModel):
    """The fields of several teachers combined per row (``teacher.members``) that every task shares: how
    they are combined and dropped (:class:`distillery.teachers.multi.MultiTeacher`). A task's subclass
    adds ``members`` (a list of its frozen teacher sections, each with an optional ``name``)."""

    combine: Literal["mean", "weighted", "confidence", "agreement"] = Field(
        "mean", description="how the members' distributions are combined per row"
    )
    weights: list[float] | None = Field(
        None, description="combine=weighted: one non-negative weight per member, in order (normalised)"
    )
    confidence: Literal["entropy", "label"] | None = Field(
        None,
        description="combine=confidence: each member's score, entropy (no label needed) or label (default entropy)",
    )
    temperature: float | None = Field(
        None,
        gt=0.0,
        description="combine=confidence: temperature of the softmax over the members (default 1)",
    )
    drop: int | float = Field(
        0,
        description="teacher dropping per optimizer step: a number of members (an integer below the number of "
        "members) or a probability per member (a float in [0, 1), one member always kept); 0: none",
    )

    @model_validator(mode="after")
    def _members_consistent(self) -> MembersConfigBase:
        k = len(self.members)
        if k < 2:
            raise ValueError(
                f"teacher.members has {k} member(s); several teachers need at least 2 (for one teacher, give its "
                "model and train or checkpoint directly under teacher, without members)"
            )
        if self.weights is not None and self.combine != "weighted":
            raise ValueError(
                f"conflicting fields: teacher.weights are the fixed weights of teacher.combine=weighted, but "
                f"teacher.combine={self.combine}; set teacher.combine=weighted or remove teacher.weights"
            )
        if self.combine == "weighted":
            if self.weights is None:
                raise ValueError(
                    f"teacher.combine=weighted needs teacher.weights: one weight per member ({k} numbers, in the "
                    "order of teacher.members)"
                )
            if len(self.weights) != k:
                raise ValueError(
                    f"teacher.weights has {len(self.weights)} entries for {k} members; give one weight per member, "
                    "in the order of teacher.members"
                )
            if any(not w >= 0 or w == float("inf") for w in self.weights) or not sum(self.weights) > 0:
                raise ValueError(
                    f"teacher.weights={self.weights}: the weights must be finite and >= 0, and not all 0"
                )
        for name in ("confidence", "temperature"):
            if getattr(self, name) is not None and self.combine != "confidence":
                raise ValueError(
                    f"conflicting fields: teacher.{name} is a setting of teacher.combine=confidence, but "
                    f"teacher.combine={self.combine}; set teacher.combine=confidence or remove teacher.{name}"
                )
        if isinstance(self.drop, int):
            if not 0 <= self.drop < k:
                raise ValueError(
                    f"teacher.drop={self.drop} members per step of {k}: give a number from 0 to {k - 1} (one member "
                    "must stay), or a probability in [0, 1) such as 0.3"
                )
        elif not 0.0 <= self.drop < 1.0:
            raise ValueError(
                f"teacher.drop={self.drop}: a probability of dropping each member must lie in [0, 1) (an integer "
                "drops that many members)"
            )
        names = self.member_names()
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"teacher.members: the name {repeated[0]!r} is given to several members; names must differ"
            )
        seen: dict[str, int] = {}
        for i, member in enumerate(self.members):
            same = member.model_dump(mode="json", exclude={"name", "cache", "cache_dir"})
            key = repr(same)
            if key in seen:
                raise ValueError(
                    f"teacher.members.{seen[key]} and teacher.members.{i} are the same teacher (the same settings train "
                    "or load the same network); make them differ (architecture, training, checkpoint), or use "
                    "teacher.members.<k>.ensemble for several seeds of one architecture"
                )
            seen[key] = i
        return self

    def member_names(self) -> list[str]:
        return [m.name or f"member {i + 1}" for i, m in enumerate(self.members)]


class DistillationConfigBase(RunConfigBase):
    """A run whose objective is a named set of loss terms (``loss:``)."""

    loss: dict[str, LossTermConfig] = Field(default_factory=lambda: {"ce": {"name": "ce"}}, min_length=1)
    # self-supervised terms (dino, ...) need multi-view batches and a copy of the student as teacher
    self_supervised_terms: ClassVar[bool] = False

    @model_validator(mode="after")
    def _self_supervised_terms_where_they_run(self) -> DistillationConfigBase:
        if self.self_supervised_terms:
            return self
        found = [label for label, term in self.loss.items() if isinstance(term, SelfSupervisedTermConfig)]
        if found:
            raise ValueError(
                f"loss.{found[0]} ({self.loss[found[0]].name}) is a self-supervised term: it needs views of "
                f"unlabelled images and an EMA teacher of the student; use task: ssl (this is task: {self.task})"
            )
        return self

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


# ----------------------------------------------------------------------------------------------------
# What a task hands the runner
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One column of a task's summary.

    ``paired``: reported as a paired difference to the baseline; ``higher_is_better`` decides which
    seeds count as wins; ``unit`` follows values in one-line summaries (``%``); ``doc`` explains the
    column under the report's table.
    """

    key: str
    header: str
    digits: int = 2
    higher_is_better: bool = True
    paired: bool = True
    unit: str = ""
    doc: str = ""


@dataclass
class RunContext:
    """What the runner shares with a task: the accelerator, the console (quiet on all but the main
    process), whether to show progress bars, and the run folder."""

    accelerator: Any
    console: Console
    progress: bool
    run_dir: Path


@dataclass
class TeacherSpec:
    """How the runner obtains one seed's teacher.

    Give ``load`` (a checkpoint or a pretrained model: returns the module and where it came from), or
    ``train`` (trains and returns the module) with ``build`` (the untrained architecture, to load
    cached weights into) and ``cache_key`` (a JSON-serialisable description of everything that
    determines the trained teacher; the runner hashes it with the training-code version).

    Several teachers: give ``members`` (one spec each, obtained, cached and evaluated one by one;
    ``teacher.json`` holds each member's record under ``members``) and ``combine`` (the members'
    modules -> the module the task is given as the seed's teacher). ``label`` names a member in the
    console and in ``teacher.json``; ``section`` is the config section that describes it, shown in
    the model card of a member the run trained (default: the run's ``teacher`` section).
    """

    build: Callable[[], nn.Module] | None = None
    train: Callable[[], nn.Module] | None = None
    load: Callable[[], tuple[nn.Module, str]] | None = None
    cache_key: dict[str, Any] | None = None
    cache: bool = True
    cache_dir: str | None = None
    members: list[TeacherSpec] | None = None
    combine: Callable[[list[nn.Module]], nn.Module] | None = None
    label: str | None = None
    section: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.members is not None:
            if self.load is not None or self.train is not None or self.combine is None:
                raise ValueError("a TeacherSpec with members needs combine, and neither load nor train")
            if any(m.members is not None for m in self.members):
                raise ValueError("a member of a TeacherSpec cannot have members of its own")
            return
        if (self.load is None) == (self.train is None):
            raise ValueError("a TeacherSpec needs exactly one of load or train")
        if self.train is not None and (self.build is None or self.cache_key is None):
            raise ValueError("a trained TeacherSpec needs build (for the cache) and cache_key")


def _identity(model: nn.Module) -> nn.Module:
    return model


@dataclass
class ArmJob:
    """What the runner trains for one arm of one seed, through :func:`distillery.train.fit`.

    ``evaluate(model) -> metrics`` runs on the validation split on the evaluation schedule during
    training (None: no evaluation during training); ``test(model) -> metrics`` gives the arm's final
    numbers on the test split, once, after training (None: the task's ``evaluate`` of the exported
    student on ``"test"``). ``export`` turns the trained module into the student that is saved (peer
    0, exits removed); ``record``
    adds task-specific fields to the arm's ``result.json`` (given the trained module and the final
    metrics); ``save_extra`` writes files beside the student (given the trained module and the arm
    folder).
    """

    model: nn.Module
    train_set: Any
    objective: Objective
    train: TrainConfig | None  # None: the arm is evaluated as built, without training
    teacher: Any = None
    adapter: Any = None
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    test: Callable[[nn.Module], dict[str, float]] | None = None
    batch_transform: Callable | None = None
    before_step: Callable[[nn.Module, int], None] | None = None  # fit(before_step=...): pruning masks
    export: Callable[[nn.Module], nn.Module] = _identity
    record: Callable[[nn.Module, dict[str, float]], dict[str, Any]] | None = None
    save_extra: Callable[[nn.Module, Path], None] | None = None


@dataclass
class Section:
    """An extra table of the report: a title, headers and rows of text cells."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)


class Task(Protocol):
    """See the module docstring for what each member gives the runner."""

    config: ClassVar[type[RunConfigBase]]
    metrics: ClassVar[tuple[Metric, ...]]
    dataset: str

    def __init__(self, cfg: Any, context: RunContext) -> None: ...

    def arms(self) -> list[str]: ...

    def prepare(self, seed: int) -> Any: ...

    def describe(self, data: Any) -> str: ...

    def teacher(self, data: Any) -> TeacherSpec | None: ...

    def new_student(self, data: Any) -> nn.Module: ...

    def arm(
        self,
        name: str,
        data: Any,
        teacher: nn.Module | None,
        init_state: dict[str, Any],
        trained: dict[str, nn.Module],
    ) -> ArmJob: ...

    def evaluate(
        self, model: nn.Module, data: Any, split: str, teacher: nn.Module | None
    ) -> dict[str, float]: ...

    def save(self, student: nn.Module, arm_dir: Path, data: Any) -> None: ...

    def load(self, arm_dir: Path, data: Any) -> nn.Module: ...

    def saved(self, arm_dir: Path) -> bool: ...

    def combined_arms(
        self, data: Any, trained: dict[str, nn.Module], records: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]: ...

    def label(self, arm: str) -> str: ...

    def description(self, arm: str) -> str: ...

    def sections(self, summary: dict[str, Any]) -> list[Section]: ...

    def arm_lines(self, record: dict[str, Any]) -> list[str]: ...


class BaseTask:
    """Defaults for the optional members of the task protocol."""

    STUDENT_FILE = "student.safetensors"

    def __init__(self, cfg: Any, context: RunContext) -> None:
        self.cfg = cfg
        self.context = context
        data = getattr(cfg, "data", None)
        self.dataset = str(getattr(data, "name", ""))

    def arms(self) -> list[str]:
        return ([BASELINE] if self.cfg.baseline_enabled() else []) + [DISTILLED]

    def describe(self, data: Any) -> str:
        return str(data)

    def teacher(self, data: Any) -> TeacherSpec | None:
        return None

    def teacher_outputs(self, data: Any, teacher: nn.Module, write: bool | None = None) -> Any:
        """The seed's cache of the teacher's outputs (``teacher.source: cache``, see
        :mod:`distillery.tasks.outputs`), written first when missing and ``write`` (None: as
        ``teacher.outputs.write`` says). Tasks without such a cache refuse."""
        raise ConfigError(
            f"task {self.cfg.task} has no cache of teacher outputs (its teachers change while the student trains, "
            "or see views drawn anew at every step); teacher.source=cache is available for the classification, lm "
            "and encoder tasks"
        )

    def save(self, student: nn.Module, arm_dir: Path, data: Any) -> None:
        """The student's weights as ``student.safetensors`` (written to a temporary file, then renamed)."""
        from safetensors.torch import save_model

        arm_dir.mkdir(parents=True, exist_ok=True)
        tmp = arm_dir / f".{self.STUDENT_FILE}.tmp"
        save_model(student, str(tmp))
        tmp.replace(arm_dir / self.STUDENT_FILE)

    def load(self, arm_dir: Path, data: Any) -> nn.Module:
        from safetensors.torch import load_model

        model = self.new_student(data)
        load_model(model, str(arm_dir / self.STUDENT_FILE))
        return model

    def saved(self, arm_dir: Path) -> bool:
        """Whether ``arm_dir`` holds a saved student."""
        return (arm_dir / self.STUDENT_FILE).is_file()

    def combined_arms(
        self, data: Any, trained: dict[str, nn.Module], records: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        return {}

    def label(self, arm: str) -> str:
        return {BASELINE: "student CE", DISTILLED: "student KD"}.get(arm, arm)

    def description(self, arm: str) -> str:
        return ""

    def sections(self, summary: dict[str, Any]) -> list[Section]:
        return []

    def arm_lines(self, record: dict[str, Any]) -> list[str]:
        return []
