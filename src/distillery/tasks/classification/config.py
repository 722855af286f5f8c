"""The config of a classification run: data, teacher sources, student, loss terms, evaluation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from distillery.cache import OutputsConfig
from distillery.configbase import StrictModel
from distillery.data import DataConfig, FilesDataConfig, ImageDataConfig
from distillery.generation.inversion import DeepInversionConfig
from distillery.losses import LOSSES, SignalTermConfig
from distillery.models import NUMBER_MODELS, TEXT_MODELS, TEXT_MODELS_HELP, ModelConfig, named_model
from distillery.models.compression import CompressConfig
from distillery.models.exits import ExitConfig
from distillery.tasks.base import DistillationConfigBase, EvalConfig, MembersConfigBase
from distillery.train.config import TrainConfig


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
    checkpoint: str | None = Field(
        None,
        description="safetensors weights of `model` (or of an ensemble of them: a teacher-cache entry's "
        "model.safetensors, every member loaded)",
    )
    precompute: bool | None = Field(
        None,
        description="compute teacher outputs once per training example (null: whenever the student's "
        "training has no augmentation)",
    )
    cache: bool = Field(True, description="reuse a teacher trained earlier with the same settings")
    cache_dir: str | None = Field(None, description="teacher cache (default: ~/.cache/distillery/teachers)")

    @field_validator("model", mode="before")
    @classmethod
    def _pretrained_shorthand(cls, value: Any) -> Any:
        return named_model(value)

    @model_validator(mode="after")
    def _one_source(self) -> FrozenTeacherConfig:
        given = [k for k in ("train", "checkpoint") if getattr(self, k) is not None]
        pretrained = self.model is not None and self.model.name == "pretrained"
        if len(given) != 1 and not (pretrained and not given):
            raise ValueError(
                "conflicting fields: give exactly one of teacher.train (train it first) or teacher.checkpoint "
                f"(load weights), or a pretrained teacher.model; got {', '.join(given) or 'neither'}"
            )
        if self.model is None:
            raise ValueError(f"conflicting fields: teacher.{given[0]} needs teacher.model (the architecture)")
        if self.ensemble > 1 and pretrained and not given:
            raise ValueError(
                "conflicting fields: teacher.ensemble > 1 needs teacher.train (a pretrained teacher is loaded once)"
            )
        if self.ensemble > 1 and self.checkpoint is not None:
            raise ValueError(
                "conflicting fields: teacher.ensemble > 1 needs teacher.train (members are trained); a "
                "checkpoint of an ensemble (a teacher-cache entry) loads all its members with the default "
                "teacher.ensemble=1"
            )
        return self


class CacheTeacherConfig(FrozenTeacherConfig):
    """A frozen teacher (trained, loaded or pretrained, as for ``source: frozen``) whose outputs are
    computed once into an on-disk cache (``distillery cache``, or the run when the cache is missing)
    and read from it by sample id: no teacher forward during training."""

    source: Literal["cache"] = "cache"  # type: ignore[assignment]
    outputs: OutputsConfig = Field(
        default_factory=OutputsConfig, description="what the cache holds and where (kind dense: the logits)"
    )

    @model_validator(mode="after")
    def _dense_logits(self) -> CacheTeacherConfig:
        if self.outputs.kind != "dense":
            raise ValueError(
                f"teacher.outputs.kind={self.outputs.kind}: a classifier's cache stores its dense logits "
                "(teacher.outputs.kind=dense, fp32 or fp16); top-k and sampled caches are for language models"
            )
        if self.precompute is not None:
            raise ValueError(
                "conflicting fields: teacher.precompute keeps a frozen teacher's outputs in memory; with "
                "teacher.source=cache they come from the disk cache: drop teacher.precompute"
            )
        return self


class MemberTeacherConfig(FrozenTeacherConfig):
    """One of several teachers (``teacher.members``): a frozen teacher, trained first by this run (and
    cached exactly as a single ``teacher`` section with the same fields would be), loaded from a
    checkpoint, or pretrained."""

    name: str | None = Field(
        None,
        min_length=1,
        description="how the console, teacher.json and the arm's result name this member "
        "(default: member <k>, from 1)",
    )

    @model_validator(mode="after")
    def _precompute_for_all(self) -> MemberTeacherConfig:
        if self.precompute is not None:
            raise ValueError(
                "conflicting fields: a member's outputs are precomputed with the others': set teacher.precompute "
                "(for every member) and remove precompute from the member"
            )
        return self


class MultiTeacherConfig(MembersConfigBase):
    """Several frozen teachers whose distributions are combined per row (``teacher.members``).

    ``combine``: ``mean`` (of the probabilities), ``weighted`` (fixed ``weights``), ``confidence``
    (per-row weights, a softmax over the members of their ``confidence``: ``entropy`` (the negative
    entropy of each member's prediction) or ``label`` (each member's log-probability of the row's
    label; unlabelled rows use the entropy), at ``temperature``), or ``agreement`` (the mean, and the
    terms that use the teacher count only the rows where every member's top-1 class is the same;
    ``ce`` keeps every labelled row). ``drop`` leaves members out of each optimizer step at random
    (UNIC's teacher dropping)."""

    source: Literal["members"] = "members"
    members: list[MemberTeacherConfig] = Field(
        description="the teachers, each like a frozen `teacher` section (model with train, checkpoint or "
        "pretrained), plus an optional name"
    )
    precompute: bool | None = Field(
        None,
        description="compute each member's outputs once per training example (null: whenever the student's "
        "training has no augmentation)",
    )


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
    | CacheTeacherConfig
    | MultiTeacherConfig
    | EMATeacherConfig
    | RandomTeacherConfig
    | PastPredictionsTeacherConfig
    | SnapshotTeacherConfig
    | PeersTeacherConfig
    | ExitsTeacherConfig,
    Field(discriminator="source"),
]


# the model names built on Hugging Face models (which have gradient checkpointing)
HF_MODELS = ("pretrained", "vit")


class ClassificationEvalConfig(EvalConfig):
    ece_bins: int = Field(15, ge=1, description="confidence bins of the expected calibration error")


class ClassificationConfig(DistillationConfigBase):
    """A classification run (``task: classification``, the default): a student distilled from a teacher
    over several seeds, and (optionally) a paired cross-entropy baseline."""

    task: Literal["classification"] = "classification"
    data: DataConfig = Field(default_factory=ImageDataConfig)
    teacher: TeacherConfig | None = None
    student: ModelConfig
    eval: ClassificationEvalConfig = Field(default_factory=ClassificationEvalConfig)
    compress: CompressConfig | None = Field(
        None,
        description="train every student arm compressed: int8 quantization-aware (method: qat) or gradually "
        "magnitude-pruned (method: prune); the paired difference is then what the teacher adds to a compressed student",
    )

    data_free: DeepInversionConfig | None = Field(
        None,
        description="data-free distillation: the distilled arm trains only on inputs synthesised from the teacher "
        "(DeepInversion: its batch-norm statistics and class predictions matched under image priors)",
    )

    @field_validator("student", mode="before")
    @classmethod
    def _pretrained_student(cls, value: Any) -> Any:
        return named_model(value)

    @field_validator("teacher", mode="before")
    @classmethod
    def _frozen_by_default(cls, value: Any) -> Any:
        """A teacher section without ``source`` is a frozen (trained or loaded) teacher, or several of
        them when it has ``members``."""
        if isinstance(value, dict) and "source" not in value:
            return {"source": "members" if "members" in value else "frozen", **value}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClassificationConfig:
        for field, model in (
            ("train", self.student),
            ("teacher.train", getattr(self.teacher, "model", None)),
        ):
            train = self.train if field == "train" else getattr(self.teacher, "train", None)
            if (
                train is not None
                and train.gradient_checkpointing
                and getattr(model, "name", None) not in HF_MODELS
            ):
                raise ValueError(
                    f"{field}.gradient_checkpointing=true needs a Hugging Face model ({' or '.join(HF_MODELS)}), not "
                    f"{getattr(model, 'name', model)}; set {field}.gradient_checkpointing=false"
                )
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
        unlabelled = isinstance(self.data, FilesDataConfig) and self.data.unlabelled is not None
        if unlabelled and self.data.transfer != 0 and not users:
            raise ValueError(
                "conflicting fields: data.unlabelled gives unlabelled examples for the transfer split, but no "
                "loss term uses a teacher, so they would contribute nothing; drop data.unlabelled (or set "
                "data.transfer=0) or add a distillation term"
            )
        if self.data.transfer and not users:
            raise ValueError(
                f"conflicting fields: data.transfer={self.data.transfer} unlabelled examples, but no loss term "
                "uses a teacher, so they would contribute nothing; set data.transfer=0 or add a distillation term"
            )
        source = None if self.teacher is None else self.teacher.source
        if self.compress is not None:
            if source not in (None, "frozen", "cache", "members"):
                raise ValueError(
                    f"conflicting fields: compress.method={self.compress.method} compresses the student of a run "
                    f"with a trained teacher (teacher.source frozen, cache or members) or none, not "
                    f"teacher.source={source}; drop compress or use a trained teacher"
                )
            if getattr(self.student, "name", None) not in ("cnn", "mlp"):
                raise ValueError(
                    f"compress.method={self.compress.method} supports cnn and mlp students, not "
                    f"student.name={getattr(self.student, 'name', self.student)}"
                )
            signals = [label for label, term in self.loss.items() if isinstance(term, SignalTermConfig)]
            if signals:
                raise ValueError(
                    f"conflicting fields: compress with representation terms ({', '.join(signals)}): "
                    "the compressed student's layers are rewritten (fused, observed); use logit terms"
                )
            if self.train.parallel == "fsdp":
                raise ValueError(
                    "conflicting fields: compress with train.parallel=fsdp (the compressed student is small: use ddp)"
                )
        if self.data_free is not None:
            if source != "frozen":
                raise ValueError(
                    f"conflicting fields: data_free synthesises inputs from a trained teacher (teacher.source=frozen), "
                    f"not teacher.source={source}"
                )
            model = self.teacher.model
            if model is not None and not getattr(model, "batch_norm", False):
                kind = getattr(model, "name", "this model")
                raise ValueError(
                    f"data_free (DeepInversion) matches the statistics of the teacher's batch-norm layers, and a "
                    f"{kind} teacher without them has none: use a cnn teacher and set teacher.model.batch_norm: true"
                )
            if self.data.transfer:
                raise ValueError(
                    f"conflicting fields: data_free replaces the transfer set with synthesised inputs, but "
                    f"data.transfer={self.data.transfer}; set data.transfer=0"
                )
            if self.compress is not None:
                raise ValueError(
                    "conflicting fields: data_free and compress together are not supported; use one"
                )
        if source == "past_predictions" and unlabelled and self.data.transfer != 0:
            raise ValueError(
                "conflicting fields: teacher.source=past_predictions (PS-KD) mixes each example's label with "
                "its past prediction, but the rows of data.unlabelled have no label; drop data.unlabelled or "
                "set data.transfer=0"
            )
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
        signal_terms = [label for label, term in self.loss.items() if isinstance(term, SignalTermConfig)]
        if signal_terms and source == "members":
            raise ValueError(
                f"conflicting fields: loss.{signal_terms[0]} ({self.loss[signal_terms[0]].name}) matches the layers "
                "of the student and one teacher network, but teacher.members gives several; distil the layers of one "
                "teacher (teacher.source=frozen), or use terms over the logits (kd, forward_kl, ...) with members"
            )
        if source == "members" and self.teacher.combine == "agreement":
            unweighted = [
                label
                for label, term in self.loss.items()
                if LOSSES[term.name][1].needs_teacher and not LOSSES[term.name][1].supports_row_weight
            ]
            if unweighted:
                raise ValueError(
                    f"conflicting fields: teacher.combine=agreement leaves out of the teacher's terms the rows its "
                    f"members disagree on (per-row weights), but loss.{unweighted[0]} ({self.loss[unweighted[0]].name}) "
                    "cannot weight its rows; use terms over the logits (kd, forward_kl, ...) or another teacher.combine"
                )
        if signal_terms and source not in ("frozen", "cache", "snapshot"):
            raise ValueError(
                f"conflicting fields: loss.{signal_terms[0]} ({self.loss[signal_terms[0]].name}) matches the layers "
                f"of the student and a teacher network, but teacher.source={source}; use teacher.source=frozen "
                "(or snapshot)"
            )
        if signal_terms and source == "frozen" and self.teacher.precompute:
            raise ValueError(
                f"conflicting fields: teacher.precompute=true stores the teacher's logits only, but "
                f"loss.{signal_terms[0]} needs its layers on every batch; set teacher.precompute=null (or false)"
            )
        if signal_terms and source in ("frozen", "cache") and self.teacher.ensemble > 1:
            raise ValueError(
                f"conflicting fields: loss.{signal_terms[0]} reads one teacher network's layers, but "
                f"teacher.ensemble={self.teacher.ensemble}; set teacher.ensemble=1"
            )
        deit_terms = [label for label, term in self.loss.items() if term.name == "deit"]
        token = self.student.name == "vit" and self.student.distillation_token
        if deit_terms and not token:
            raise ValueError(
                f"conflicting fields: loss.{deit_terms[0]} trains DeiT's distillation head, but the student has none; "
                "set student.name=vit and student.distillation_token=true"
            )
        if token and not deit_terms:
            raise ValueError(
                "conflicting fields: student.distillation_token=true adds a distillation head that no loss term "
                "trains (and the prediction averages it in); add loss.deit or set distillation_token=false"
            )
        if deit_terms and source not in ("frozen", "snapshot", "members"):
            raise ValueError(
                f"conflicting fields: loss.{deit_terms[0]} learns a separate teacher's decisions, but "
                f"teacher.source={source}; use teacher.source=frozen"
            )
        self._models_fit_the_data()
        if source == "cache" and not self.train.augment.is_identity():
            raise ValueError(
                "conflicting fields: teacher.source=cache stores one output per example, but train.augment changes "
                "the inputs every step; use teacher.source=frozen or turn augmentation off"
            )
        if (
            source in ("frozen", "members")
            and self.teacher.precompute
            and not self.train.augment.is_identity()
        ):
            raise ValueError(
                "conflicting fields: teacher.precompute=true stores one output per example, but train.augment "
                "changes the inputs every step; set teacher.precompute=false (or null) or turn augmentation off"
            )
        return self

    def text_data(self) -> bool:
        """Whether the examples are text (``data: {name: files, text_field: ...}``)."""
        return isinstance(self.data, FilesDataConfig) and self.data.text_field is not None

    def _models_fit_the_data(self) -> None:
        """Text data take text models, numbers and images the others; text cannot be augmented."""
        text = self.text_data()
        models = [("student", self.student)]
        if self.teacher is not None and self.teacher.source in ("frozen", "cache"):
            models.append(("teacher.model", self.teacher.model))
        for i, member in enumerate(self.teacher_members()):
            models.append((f"teacher.members.{i}.model", member.model))
        for field, model in models:
            if text and model.name in NUMBER_MODELS:
                raise ValueError(
                    f"conflicting fields: {field}.name={model.name} takes numbers, but data.text_field="
                    f"{self.data.text_field!r} gives text; models that take text: {TEXT_MODELS_HELP}"
                )
            if text and model.name == "pretrained" and model.kind == "image":
                raise ValueError(
                    f"conflicting fields: {field}.kind=image, but data.text_field={self.data.text_field!r} "
                    f"gives text; models that take text: {TEXT_MODELS_HELP}"
                )
            if not text and model.name in TEXT_MODELS:
                where = (
                    f"data.features_field={self.data.features_field!r} gives numbers"
                    if isinstance(self.data, FilesDataConfig)
                    else f"data.name={self.data.name} gives images"
                )
                raise ValueError(
                    f"conflicting fields: {field}.name={model.name} takes text, but {where}; use mlp or cnn, or "
                    "text data (data: {name: files, text_field: <field>})"
                )
        if text:
            trains = [("train", self.train), ("teacher.train", getattr(self.teacher, "train", None))]
            trains += [(f"teacher.members.{i}.train", m.train) for i, m in enumerate(self.teacher_members())]
            for field, train in trains:
                if train is not None and not train.augment.is_identity():
                    raise ValueError(
                        f"conflicting fields: {field}.augment transforms images, but data.text_field="
                        f"{self.data.text_field!r} gives text; remove {field}.augment"
                    )

    def uses_transfer(self) -> bool:
        """Whether the distilled arms train on a transfer split besides the labelled one."""
        if isinstance(self.data, FilesDataConfig):
            return self.data.transfer != 0
        return bool(self.data.transfer)

    def teacher_members(self) -> list[MemberTeacherConfig]:
        """The members of ``teacher.members`` (empty for every other teacher source)."""
        return (
            list(self.teacher.members)
            if self.teacher is not None and self.teacher.source == "members"
            else []
        )

    def teacher_precomputed(self) -> bool:
        """Whether the frozen teacher's outputs (or each member's) are computed once per training example."""
        if self.teacher is None or self.teacher.source not in ("frozen", "members"):
            return False
        if self.data_free is not None:
            return False  # the distilled arm's inputs are synthesised: the teacher runs on them
        if any(isinstance(term, SignalTermConfig) for term in self.loss.values()):
            return False  # representation terms read the teacher's layers on every batch
        if self.teacher.precompute is None:
            return self.train.augment.is_identity()
        return self.teacher.precompute
