"""Classification (``task: classification``, the default task): a student classifier distilled from a
teacher, or from itself, on the built-in image datasets or on the user's files (text or numbers,
:mod:`distillery.data.user`).

Per seed: the labelled, transfer and test splits drawn for that seed; the teacher (a trained network,
cached, or a checkpoint) for the ``frozen`` source; one student initialisation shared by every arm;
the arms are the cross-entropy baseline and the distilled student, or the born-again generations
(plus their ensemble) for the ``snapshot`` source. How each teacher source sets up an arm is in
:mod:`distillery.tasks.classification.arms`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from distillery.cache import OutputCache, OutputSource, weights_sha256
from distillery.data import (
    ArrayDataset,
    ClassificationData,
    FilesDataConfig,
    TableSource,
    UserData,
    load_classification_data,
)
from distillery.data.text.tokenizer import same_tokenizer
from distillery.errors import ConfigError
from distillery.eval import classification_metrics, predict_logits
from distillery.fileio import is_local_source
from distillery.generation.inversion import synthesize
from distillery.losses import build_objective, signal_pairs
from distillery.losses.logit import CrossEntropyConfig
from distillery.models import ClassifierAdapter, Ensemble, build_model, count_parameters
from distillery.models.hub import check_model_dir, from_pretrained
from distillery.models.pretrained import resolve_kind, save_pretrained_student
from distillery.models.text import KeyedClassifierAdapter
from distillery.models.weights import load_weights, read_header
from distillery.report import fmt, image_grid
from distillery.tasks.base import (
    BASELINE,
    DISTILLED,
    ArmJob,
    BaseTask,
    Metric,
    RunContext,
    Section,
    TeacherSpec,
)
from distillery.tasks.classification.arms import ArmSetup, build_arm, model_inputs
from distillery.tasks.classification.compress import compress_job, compression_line
from distillery.tasks.classification.config import ClassificationConfig
from distillery.tasks.classification.signals import tap_arm, tapped_teacher
from distillery.tasks.outputs import teacher_outputs
from distillery.teachers import CachedTeacher, FrozenTeacher, MultiTeacher, OutputCacheTeacher
from distillery.train import fit

ENSEMBLE = "ensemble"
MULTI_TEACHER = "multi_teacher"  # the arm record's section of each member's contribution
LATENCY_BATCH = 256
# Batch key of the teacher's token ids when its tokenizer is not the student's (the student reads "x").
TEACHER_INPUT = "x_teacher"

SOURCE_LABELS = {
    "frozen": "student KD",
    "ema": "student, mean teacher",
    "random": "student, random teacher",
    "past_predictions": "student PS-KD",
    "peers": "student DML (peer 1)",
    "exits": "student multi-exit (final)",
    "members": "student multi-teacher KD",
}
SOURCE_HOW = {
    None: "no teacher",
    "frozen": "the trained teacher",
    "ema": "an exponential moving average of its own weights as teacher",
    "random": "a frozen random copy of itself as teacher",
    "past_predictions": "its own previous-epoch predictions mixed with the labels as targets",
    "peers": "peers trained together, each taught by the others' mean prediction",
    "exits": "auxiliary exits taught by its deepest exit",
    "members": "several trained teachers, combined per row",
}
MEMBER_HEADERS = ["output", "accuracy %", "ECE %", "params", "latency ms (batch of 256)"]


def _directory_state(path: str) -> list[tuple[str, int, int]] | None:
    """Names, sizes and modification times of a local model directory's files (None: a hub id)."""
    root = Path(path)
    if not root.is_dir():
        return None
    return [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()]  # fmt: skip


def _files_key(cfg: FilesDataConfig, tables: dict[str, str] | None) -> dict[str, Any]:
    """What of a ``files`` data section determines a teacher: the contents of the tables it learns from
    or is split against (SHA-256, not paths), the fields, labels and split settings; not the transfer
    split (the teacher never sees it)."""
    data = cfg.model_dump(mode="json", exclude={"train", "test", "validation", "unlabelled", "transfer"})
    for name in ("test", "validation"):
        value = getattr(cfg, name)
        data[name] = (
            value.model_dump(mode="json", exclude={"path", "hub"})
            if isinstance(value, TableSource)
            else value
        )
    data["train_source"] = cfg.train.model_dump(mode="json", exclude={"path", "hub"})
    data["tables_sha256"] = {k: v for k, v in (tables or {}).items() if k != "unlabelled"}
    return data


def teacher_cache_key(
    cfg: ClassificationConfig, seed: int, tables: dict[str, str] | None = None, teacher: Any = None
) -> dict[str, Any]:
    """Everything that determines a trained `frozen` teacher (the runner hashes it). ``tables``: the
    content hashes of a ``files`` data section's tables (:meth:`UserData.fingerprint`); ``teacher``:
    the frozen teacher's section (default ``cfg.teacher``; one of ``teacher.members``, whose key is the
    key of the same section given as the run's only teacher, so that the two share a cache entry)."""
    t = cfg.teacher if teacher is None else teacher
    if isinstance(cfg.data, FilesDataConfig):
        data = _files_key(cfg.data, tables)
    else:
        data = cfg.data.model_dump(
            mode="json", include={"name", "validation", "labelled", "test", "split_seed"}
        )
        if cfg.data.label_noise is not None and cfg.data.label_noise.rate > 0:  # absent: clean keys unchanged
            data["label_noise"] = cfg.data.label_noise.model_dump(mode="json")
    key = {
        "kind": "classifier-teacher",
        "model": t.model.model_dump(mode="json"),
        "ensemble": t.ensemble,
        "train": t.train.model_dump(mode="json"),
        "data": data,
        "seed": seed,
    }
    if t.model.name == "pretrained":  # a pretrained starting point: its files are part of the key
        key["pretrained_files"] = _directory_state(t.model.pretrained)
    return key


def check_pretrained(model: Any, field: str) -> None:
    """A pretrained classifier's directory (or hub id) holds a model config (and, locally, weights);
    a ConfigError naming ``field`` otherwise. Nothing else is done for other architectures."""
    if model is None or model.name != "pretrained":
        return
    import transformers

    where = f"{field}.pretrained"
    if is_local_source(model.pretrained):
        check_model_dir(model.pretrained, where)
    if model.kind == "auto":
        from_pretrained(transformers.AutoConfig.from_pretrained, model.pretrained, where, "config")


def check_model_files(cfg: ClassificationConfig) -> None:
    """The files a run's models come from, checked before anything is built or trained (a teacher
    trained in vain for a student that cannot be loaded): a `frozen` teacher's checkpoint must be a
    safetensors file, a pretrained model's directory (or hub id) must hold a model. ``distillery
    eval`` needs them as well (it rebuilds the architectures). Whether the weights fit the
    architecture is checked when they are loaded."""
    t = cfg.teacher
    if t is not None and t.source in ("frozen", "cache"):
        if t.checkpoint is not None:
            read_header(t.checkpoint, "teacher.checkpoint")
        check_pretrained(t.model, "teacher.model")
    for i, member in enumerate(cfg.teacher_members()):
        if member.checkpoint is not None:
            read_header(member.checkpoint, f"teacher.members.{i}.checkpoint")
        check_pretrained(member.model, f"teacher.members.{i}.model")
    check_pretrained(cfg.student, "student")


class SeedData:
    """One seed's splits, and what the task derives from them once (the teacher's outputs)."""

    def __init__(self, seed: int, splits: ClassificationData) -> None:
        self.seed = seed
        self.splits = splits
        self.frozen_teacher: Any = None  # the Teacher of the `frozen` source, built once per seed
        self.synthetic: Any = None  # data_free: the inputs synthesised from the teacher, once per seed
        self.synthesis: dict[str, Any] = {}  # and how they were made (for the arm's record)
        self.teacher_logits: dict[str, torch.Tensor] = {}  # split -> the teacher's logits on it


class ClassificationTask(BaseTask):
    config = ClassificationConfig
    metrics = (
        Metric("accuracy", "accuracy %", 2, unit="%"),
        Metric("ece", "ECE %", 2, higher_is_better=False, unit="%"),
        Metric("nll", "NLL", 3, higher_is_better=False),
        Metric("agreement", "agreement %", 1, paired=False, unit="%", doc="top-1 agreement with the teacher"),
    )

    def __init__(self, cfg: ClassificationConfig, context: RunContext) -> None:
        super().__init__(cfg, context)
        source = None if cfg.teacher is None else cfg.teacher.source
        # a cached teacher is a frozen one whose outputs are read from disk during training
        self.cached = source == "cache"
        self.source = "frozen" if self.cached else source
        self.adapter = ClassifierAdapter()
        self.teacher_adapter = self.adapter  # another batch key when the teacher has its own tokenizer
        self._teachers: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules built as the teacher
        check_model_files(cfg)
        self._signals_checked = False
        self.user: UserData | None = None
        if isinstance(cfg.data, FilesDataConfig):
            self.dataset = cfg.data.title()
            self.user = UserData(cfg.data)  # read and checked once: every seed splits the same tables
            self._check_inputs()
            if cfg.data.text_field is not None:
                self._encode_text()

    def _check_inputs(self) -> None:
        """Augmentation needs images: refused for features that are not ``[C, H, W]``."""
        shape = tuple(self.user.pool.inputs.shape[1:]) if self.cfg.data.features_field is not None else ()
        if len(shape) == 3:
            return
        t = self.cfg.teacher
        trains = [("train", self.cfg.train), ("teacher.train", getattr(t, "train", None))]
        trains += [(f"teacher.members.{i}.train", m.train) for i, m in enumerate(self.cfg.teacher_members())]
        for field, train in trains:
            if train is not None and not train.augment.is_identity():
                raise ConfigError(
                    f"{field}.augment transforms images [C, H, W], but the rows of data.features_field have "
                    f"shape {list(shape)}; set data.input_shape (e.g. [1, 8, 8]) or remove {field}.augment"
                )

    def _tokenizer(self, model_cfg: Any, field: str):
        """The tokenizer of a text model: a pretrained model's own, else trained on the training texts."""
        if model_cfg.name == "pretrained":
            if resolve_kind(model_cfg, field) != "sequence":
                raise ConfigError(
                    f"{field}.pretrained={model_cfg.pretrained!r} is an image classifier, but data.text_field="
                    f"{self.cfg.data.text_field!r} gives text; use a sequence classifier or a text model"
                )
            return self.user.tokenizer(
                "pretrained", pretrained=model_cfg.pretrained, field=f"{field}.pretrained"
            )
        return self.user.tokenizer(model_cfg.tokenizer.kind, model_cfg.tokenizer.vocab_size)

    def _encode_text(self) -> None:
        """Token ids of every text once per tokenizer: the student's under ``x``; the teacher's under
        :data:`TEACHER_INPUT` when its tokenizer maps text to other ids."""
        cfg = self.cfg
        student = self._tokenizer(cfg.student, "student")
        tokenizers = {"x": student}
        t = cfg.teacher
        teacher = None
        if self.source == "frozen":
            teacher = self._tokenizer(t.model, "teacher.model")
        elif self.source == "members":  # the members read one batch key: they share one tokenizer
            found = [self._tokenizer(m.model, f"teacher.members.{i}.model") for i, m in enumerate(t.members)]
            teacher = found[0]
            for i, other in enumerate(found[1:], start=1):
                if other is not teacher and not same_tokenizer(other, teacher):
                    raise ConfigError(
                        f"teacher.members.{i}.model maps text to other token ids than teacher.members.0.model (another "
                        "tokenizer); the members of one run read the same token ids: give them models with one "
                        "tokenizer (the same pretrained family, or the same tokenizer settings)"
                    )
        if teacher is not None:
            if teacher is not student and not same_tokenizer(teacher, student):
                tokenizers[TEACHER_INPUT] = teacher
                self.teacher_adapter = KeyedClassifierAdapter(TEACHER_INPUT)
        self.user.encode(tokenizers)

    # ---- data and models --------------------------------------------------------------------------

    def arms(self) -> list[str]:
        arms = [BASELINE] if self.cfg.baseline_enabled() else []
        if self.source == "snapshot":
            return arms + [f"gen-{k}" for k in range(1, self.cfg.teacher.generations + 1)]
        return [*arms, DISTILLED]

    def prepare(self, seed: int) -> SeedData:
        if self.user is not None:
            return SeedData(seed, self.user.splits(seed))
        return SeedData(seed, load_classification_data(self.cfg.data, seed))

    def describe(self, data: SeedData) -> str:
        return f"data: {data.splits.describe()}"

    def _build(self, model_cfg, data: SeedData, field: str = "teacher.model") -> nn.Module:
        key = "x" if field == "student" or self.teacher_adapter is self.adapter else TEACHER_INPUT
        splits = data.splits
        return build_model(
            model_cfg, splits.input_shape, splits.num_classes, field, **model_inputs(splits, key)
        )

    def _teacher_module(self, module: nn.Module) -> nn.Module:
        """Remember ``module`` as the teacher: it reads the teacher's batch key when evaluated."""
        self._teachers.add(module)
        return module

    def _adapter_of(self, model: nn.Module):
        return self.teacher_adapter if model in self._teachers else self.adapter

    def new_student(self, data: SeedData) -> nn.Module:
        return self._build(self.cfg.student, data, "student")

    # ---- teacher ----------------------------------------------------------------------------------

    def teacher(self, data: SeedData) -> TeacherSpec | None:
        self._check_signals(data)
        if self.source == "members":
            return self._members_spec(data)
        if self.source != "frozen":
            return None
        return self._frozen_spec(self.cfg.teacher, data)

    def _frozen_spec(
        self, t: Any, data: SeedData, where: str = "teacher", name: str | None = None
    ) -> TeacherSpec:
        """How the runner obtains the frozen teacher of section ``t`` (at ``where`` in the config): a
        pretrained classifier as it is, a checkpoint, or trained on the labelled split and cached."""
        seed = data.seed
        who = "teacher" if name is None else f"teacher {name}"
        if t.train is None and t.checkpoint is None:  # a pretrained classifier, as it is
            return TeacherSpec(
                load=lambda: (
                    self._teacher_module(self._build(t.model, data, f"{where}.model")),
                    t.model.pretrained,
                ),
                label=name,
            )
        if t.checkpoint is not None:

            def load() -> tuple[nn.Module, str]:
                # a teacher-cache entry holds an ensemble (members.<k>.*): rebuild as many members
                keys = read_header(t.checkpoint, f"{where}.checkpoint")
                members = {k.split(".")[1] for k in keys if k.startswith("members.")}
                if keys and members and all(k.startswith("members.") for k in keys):
                    model = Ensemble([self._build(t.model, data, f"{where}.model") for _ in members])
                else:
                    model = self._build(t.model, data, f"{where}.model")
                load_weights(model, t.checkpoint, f"{where}.checkpoint")  # a clear error for a wrong file
                return self._teacher_module(model), str(Path(t.checkpoint))

            return TeacherSpec(load=load, label=name)

        def build() -> nn.Module:
            return self._teacher_module(
                Ensemble([self._build(t.model, data, f"{where}.model") for _ in range(t.ensemble)])
            )

        def train() -> nn.Module:
            objective = build_objective({"ce": CrossEntropyConfig()})
            members = []
            for k in range(t.ensemble):
                member_seed = 1000 + 100 * seed + k
                torch.manual_seed(member_seed)
                member = self._build(t.model, data, f"{where}.model")
                fit(
                    member,
                    data.splits.labelled,
                    objective,
                    t.train,
                    seed=member_seed,
                    adapter=self.teacher_adapter,
                    accelerator=self.context.accelerator,
                    progress=self.context.progress,
                    label=f"seed {seed} {who} {k + 1}/{t.ensemble}",
                )
                members.append(member)
            return self._teacher_module(Ensemble(members))

        tables = None if self.user is None else self.user.fingerprint()
        return TeacherSpec(
            build=build,
            train=train,
            cache_key=teacher_cache_key(self.cfg, seed, tables, teacher=t),
            cache=t.cache,
            cache_dir=t.cache_dir,
            label=name,
        )

    def _members_spec(self, data: SeedData) -> TeacherSpec:
        """Several teachers (``teacher.members``): each obtained as a frozen teacher of its own section
        (cached under the key the same section would have as the only teacher); the seed's teacher
        module is their (weighted) mean, on which the teacher's test metrics and the students'
        agreement are computed. The combination the students learn from is built per arm."""
        t = self.cfg.teacher
        self._check_member_outputs(data)
        names = t.member_names()
        specs = [
            dataclasses.replace(
                self._frozen_spec(member, data, f"teacher.members.{i}", names[i]),
                section=member.model_dump(mode="json", exclude={"name"}),
            )
            for i, member in enumerate(t.members)
        ]
        weights = t.weights if t.combine == "weighted" else None
        return TeacherSpec(
            members=specs, combine=lambda modules: self._teacher_module(Ensemble(modules, weights))
        )

    def _check_member_outputs(self, data: SeedData) -> None:
        """Every member must predict the data's classes, or its distribution cannot be combined with the
        others' (nor compared with the student's): checked from the files before any member trains, so
        that a wrong member fails the run before anything is written."""
        classes = data.splits.num_classes
        found = []  # (index, classes, where they come from) of the members that predict other classes
        for i, member in enumerate(self.cfg.teacher.members):
            where = f"teacher.members.{i}"
            size = None
            model = member.model
            if model.name == "pretrained" and not (member.train is not None and model.new_head):
                size, what = self._pretrained_classes(model, f"{where}.model"), f"{where}.model.pretrained"
            elif member.checkpoint is not None:
                size, what = self._checkpoint_classes(member, data, where), f"{where}.checkpoint"
            if size is not None and size != classes:
                found.append((i, size, what))
        if not found:
            return
        names = self.cfg.teacher.member_names()
        listed = "; ".join(f"{names[i]} ({what}) predicts {size}" for i, size, what in found)
        i = found[0][0]
        raise ConfigError(
            f"teacher.members: the members give outputs of different sizes: the data has {classes} classes, but "
            f"{listed}; the members' distributions are combined class by class and compared with the student's "
            f"{classes}-class output, so every member must predict exactly the data's classes: give "
            f"teacher.members.{i} a checkpoint trained on these labels, or train it in this run "
            f"(teacher.members.{i}.train, with new_head: true for a pretrained model)"
        )

    @staticmethod
    def _pretrained_classes(model: Any, field: str) -> int | None:
        import transformers

        config = from_pretrained(
            transformers.AutoConfig.from_pretrained, model.pretrained, f"{field}.pretrained", "config"
        )
        return getattr(config, "num_labels", None)

    def _checkpoint_classes(self, member: Any, data: SeedData, where: str) -> int | None:
        """The number of classes a member's checkpoint predicts, read from its header against the
        architecture. A file that does not fit the architecture otherwise is refused now (the error of
        loading it), before any other member trains."""
        if member.model.name == "pretrained":
            return None
        field = f"{where}.checkpoint"
        shapes = read_header(member.checkpoint, field)
        ensemble = {k.split(".")[1] for k in shapes if k.startswith("members.")}
        if shapes and ensemble and all(k.startswith("members.") for k in shapes):  # a teacher-cache entry
            model = Ensemble([self._build(member.model, data, f"{where}.model") for _ in ensemble])
        else:
            model = self._build(member.model, data, f"{where}.model")
        state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if state.keys() == shapes.keys():
            classes, sizes = data.splits.num_classes, set()
            for key, shape in shapes.items():
                want = state[key]
                if want != shape and want[0] == classes and shape[0] != classes and want[1:] == shape[1:]:
                    sizes.add(shape[0])
                elif want != shape:
                    sizes = set()
                    break
            if len(sizes) == 1:  # only the output layer differs: the member predicts other classes
                return sizes.pop()
        if state != shapes:
            load_weights(model, member.checkpoint, field)  # says what else is wrong with the file
        return None

    def _check_signals(self, data: SeedData) -> None:
        """The representation terms' module paths and signal shapes, checked on untrained models of
        the configured architectures before anything trains (a wrong path is an error at once, not
        after the teacher and the baseline have trained)."""
        pairs = signal_pairs(self.cfg.loss)
        if not pairs or self._signals_checked:
            return
        t = self.cfg.teacher
        if self.source == "frozen":
            network = self._build(t.model, data)
        else:  # snapshot: the teacher is an earlier generation of the student
            network = self._build(self.cfg.student, data, "student")
        student = self._build(self.cfg.student, data, "student")
        train_set = data.splits.distillation_set() if len(data.splits.transfer) else data.splits.labelled
        example = train_set.get_batch(torch.arange(min(2, len(train_set))))
        setup = ArmSetup(student, self.adapter, None, lambda m: m)
        tap_arm(setup, network, pairs, example, self.teacher_adapter, data.seed)
        self._signals_checked = True

    def _multi_teacher(self, data: SeedData, module: Ensemble) -> MultiTeacher:
        """The students' teacher for ``teacher.members``: the members (their outputs precomputed once per
        seed when allowed) combined by a :class:`MultiTeacher`, new for each arm (it counts each
        member's contribution, and its drops follow the arm's steps)."""
        t = self.cfg.teacher
        if data.frozen_teacher is None:
            members = [FrozenTeacher(m, self.teacher_adapter) for m in module.members]
            if self.cfg.teacher_precomputed():
                rows = data.splits.distillation_set()
                members = [CachedTeacher.precompute(m, rows, self.cfg.eval.batch_size) for m in members]
            data.frozen_teacher = members
        return MultiTeacher(
            data.frozen_teacher,
            t.combine,
            weights=t.weights,
            confidence=t.confidence or "entropy",
            temperature=1.0 if t.temperature is None else t.temperature,
            drop=t.drop,
            seed=data.seed,
            names=t.member_names(),
            adapter=self.teacher_adapter,
        )

    def _frozen_teacher(self, data: SeedData, module: nn.Module):
        """The seed's teacher for the `frozen` source: built once (outputs precomputed when allowed)."""
        if data.frozen_teacher is None:
            teacher = FrozenTeacher(module, self.teacher_adapter)
            if self.cached:
                teacher = OutputCacheTeacher(self.teacher_outputs(data, module))
            elif self.cfg.teacher_precomputed():
                teacher = CachedTeacher.precompute(
                    teacher, data.splits.distillation_set(), self.cfg.eval.batch_size
                )
            data.frozen_teacher = teacher
        return data.frozen_teacher

    def _synthetic_set(self, data: SeedData, module: nn.Module) -> ArrayDataset:
        """data_free: the seed's transfer set synthesised from the teacher by DeepInversion (once per seed;
        a function of the teacher and the seed, so a resumed run makes the same one). No labels: only
        the teacher's outputs teach on it."""
        if data.synthetic is None:
            cfg, console = self.cfg.data_free, self.context.console
            t0 = time.perf_counter()

            def progress(done: int, total: int, losses: dict[str, float]) -> None:
                console.print(
                    f"  seed {data.seed} DeepInversion: batch {done}/{total}, teacher accuracy on it "
                    f"{losses['teacher_accuracy']:.1f}%, batch-norm distance {losses['bn']:.3f}",
                    markup=False,
                    highlight=False,
                )

            x, targets, losses = synthesize(
                module, cfg, data.splits.input_shape, data.splits.num_classes, data.seed,
                device=self._device(), on_batch=progress,
            )  # fmt: skip
            data.synthetic = ArrayDataset(x, torch.full_like(targets, -100), torch.arange(len(x)))
            data.synthesis = {
                "images": len(x),
                "seconds": time.perf_counter() - t0,
                "teacher_accuracy": sum(b["teacher_accuracy"] for b in losses) / len(losses),
                "bn_distance": sum(b["bn"] for b in losses) / len(losses),
                "targets": targets.tolist(),
            }
        return data.synthetic

    def output_source(self, data: SeedData, module: nn.Module) -> OutputSource:
        """The seed's teacher outputs for a cache: its logits, and the signals of the representation terms
        (read by the tapped teacher), on every row a distilled student trains on."""
        adapter, pairs = self.teacher_adapter, signal_pairs(self.cfg.loss)
        forward = tapped_teacher(module, pairs, adapter) if pairs else FrozenTeacher(module, adapter)
        return OutputSource(
            dataset=data.splits.distillation_set() if len(data.splits.transfer) else data.splits.labelled,
            forward=forward,
            keys=(adapter.input_key,),
            vocab_size=data.splits.num_classes,
            identity={"task": "classification", "teacher": weights_sha256(module), "tokenizer": None},
            device=self._device(),
        )

    def teacher_outputs(self, data: SeedData, module: nn.Module, write: bool | None = None) -> OutputCache:
        """The seed's cache of the teacher's outputs (``teacher.source: cache``), written when missing; the
        representation terms' signals are stored beside the logits."""
        outputs = self.cfg.teacher.outputs
        keys = sorted({p.key for p in signal_pairs(self.cfg.loss)})
        if keys:
            outputs = outputs.model_copy(update={"features": keys})
        return teacher_outputs(
            outputs,
            self.output_source(data, module),
            data.seed,
            self.context,
            batch_size=outputs.batch_size or self.cfg.eval.batch_size,
            write=write,
        )

    # ---- evaluation -------------------------------------------------------------------------------

    def _split(self, data: SeedData, split: str):
        return {"validation": data.splits.validation, "test": data.splits.test}[split]

    def _teacher_logits(self, data: SeedData, teacher: nn.Module | None, split: str) -> torch.Tensor | None:
        if teacher is None:
            return None
        if split not in data.teacher_logits:
            data.teacher_logits[split] = predict_logits(
                teacher,
                self._split(data, split),
                self.teacher_adapter,
                self.cfg.eval.batch_size,
                self._device(),
            )
        return data.teacher_logits[split]

    def _device(self):
        return self.context.accelerator.device

    def evaluate(
        self, model: nn.Module, data: SeedData, split: str, teacher: nn.Module | None
    ) -> dict[str, float]:
        rows = self._split(data, split)
        logits = predict_logits(
            model, rows, self._adapter_of(model), self.cfg.eval.batch_size, self._device()
        )
        return classification_metrics(
            logits, rows.y, self._teacher_logits(data, teacher, split), self.cfg.eval.ece_bins
        )

    def _evaluator(self, data: SeedData, setup: ArmSetup, teacher: nn.Module | None, split: str):
        """``evaluate(model) -> metrics`` on ``split``. Stacked models (exits, peers) report their main
        output under the usual names and every output as ``accuracy@<name>``, ``ece@<name>``."""
        cfg, rows = self.cfg, self._split(data, split)

        def evaluate(model: nn.Module) -> dict[str, float]:
            teacher_logits = self._teacher_logits(data, teacher, split)
            logits = predict_logits(model, rows, setup.adapter, cfg.eval.batch_size, self._device())
            if not setup.members:
                return classification_metrics(logits, rows.y, teacher_logits, cfg.eval.ece_bins)
            out = classification_metrics(logits[setup.main_member], rows.y, teacher_logits, cfg.eval.ece_bins)
            for name, member_logits in zip(setup.members, logits):
                m = classification_metrics(member_logits, rows.y, None, cfg.eval.ece_bins)
                out.update(
                    {f"accuracy@{name}": m["accuracy"], f"ece@{name}": m["ece"], f"nll@{name}": m["nll"]}
                )
            return out

        return evaluate

    def _member_records(self, setup: ArmSetup, data: SeedData):
        """Per-output results of a stacked model: metrics, and for exits parameters and latency."""

        def record(model: nn.Module, final: dict[str, float]) -> dict[str, Any]:
            out = {name: {m: final[f"{m}@{name}"] for m in ("accuracy", "ece", "nll") if f"{m}@{name}" in final}
                   for name in setup.members}  # fmt: skip
            if hasattr(model, "parameter_counts"):
                x = data.splits.test.x[:LATENCY_BATCH].to(self._device())
                params, latency = model.parameter_counts(), model.latency(x, repeats=10)
                for name in setup.members:
                    out[name]["params"] = params[name]
                    out[name]["latency_ms"] = 1000.0 * latency[name]
            return {"members": out}

        return record

    # ---- arms -------------------------------------------------------------------------------------

    def arm(
        self,
        name: str,
        data: SeedData,
        teacher: nn.Module | None,
        init_state: dict[str, Any],
        trained: dict[str, nn.Module],
    ) -> ArmJob:
        cfg, splits = self.cfg, data.splits
        if name == BASELINE:
            objective = build_objective({"ce": CrossEntropyConfig()})
            train_set, train_cfg = splits.labelled, cfg.baseline.train or cfg.train
            setup = build_arm(
                cfg, splits, data.seed, init_state, train_cfg, len(train_set), None, baseline=True
            )
        else:
            objective = build_objective(cfg.loss)
            train_set = splits.distillation_set() if len(splits.transfer) else splits.labelled
            if cfg.data_free is not None:  # no training data: inputs synthesised from the teacher
                train_set = self._synthetic_set(data, teacher)
            train_cfg = cfg.train
            arm_teacher = None
            if self.source == "frozen":
                arm_teacher = self._frozen_teacher(data, teacher)
            elif self.source == "members":
                arm_teacher = self._multi_teacher(data, teacher)
            elif self.source == "snapshot":  # generation k learns from generation k-1 (0: the CE student)
                k = int(name.removeprefix("gen-"))
                previous = trained[BASELINE if k == 1 else f"gen-{k - 1}"]
                arm_teacher = FrozenTeacher(copy.deepcopy(previous), self.adapter)
            setup = build_arm(cfg, splits, data.seed, init_state, train_cfg, len(train_set), arm_teacher)
            pairs = signal_pairs(cfg.loss)
            if pairs:  # representation terms: read the named layers, project where the shapes differ
                network = teacher if self.source == "frozen" else arm_teacher.module
                example = train_set.get_batch(torch.arange(min(2, len(train_set))))
                setup, projectors = tap_arm(setup, network, pairs, example, self.teacher_adapter, data.seed)
                if self.cached:  # the tapped teacher's logits and signals, read from its output cache
                    setup = dataclasses.replace(setup, teacher=arm_teacher)
                for key, text in projectors.items():
                    self.context.console.print(
                        f"  seed {data.seed} {name}: projector {key}: {text} (trained with the student, not exported)",
                        markup=False,
                        highlight=False,
                    )
        job = ArmJob(
            model=setup.model,
            train_set=train_set,
            objective=objective,
            train=train_cfg,
            teacher=setup.teacher,
            adapter=setup.adapter,
            evaluate=self._evaluator(data, setup, teacher, "validation") if len(splits.validation) else None,
            test=self._evaluator(data, setup, teacher, "test"),
            export=setup.export,
        )
        if setup.members:
            job.record = self._member_records(setup, data)
            job.save_extra = _save_stacked
        if name != BASELINE and signal_pairs(cfg.loss):
            described = dict(projectors)
            job.record = lambda model, final: {"projectors": described}
        if name != BASELINE and isinstance(setup.teacher, MultiTeacher):
            job.record = _contributions(setup.teacher)
        if cfg.data_free is not None and name != BASELINE:
            synthesis = data.synthesis

            def record_synthesis(model: nn.Module, final: dict[str, float]) -> dict[str, Any]:
                return {"data_free": {k: v for k, v in synthesis.items() if k != "targets"}}

            def save_grid(model: nn.Module, arm_dir: Path) -> None:
                image_grid(
                    data.synthetic.x,
                    synthesis["targets"],
                    arm_dir / "synthetic.png",
                    title="DeepInversion: inputs synthesised from the teacher, by target class",
                )

            before = job.record
            job.record = (
                record_synthesis
                if before is None
                else lambda model, final: {**before(model, final), **record_synthesis(model, final)}
            )
            job.save_extra = save_grid
        if cfg.compress is not None:  # every student arm trained compressed (QAT int8 or pruned)
            before = job.record
            job = compress_job(
                job, cfg.compress, splits.test, lambda: self._teacher_logits(data, teacher, "test"),
                cfg.eval.ece_bins, cfg.eval.batch_size,
            )  # fmt: skip
            if before is not None:
                mine = job.record
                job.record = lambda model, final: {**before(model, final), **mine(model, final)}
        return job

    def combined_arms(
        self, data: SeedData, trained: dict[str, nn.Module], records: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Born-again: the ensemble of generations 1..N, when asked for."""
        t = self.cfg.teacher
        if self.source != "snapshot" or not t.ensemble_eval or t.generations < 2:
            return {}
        gens = [f"gen-{k}" for k in range(1, t.generations + 1)]
        members = [trained[g] for g in gens]
        logits = predict_logits(
            Ensemble(members), data.splits.test, self.adapter, self.cfg.eval.batch_size, self._device()
        )
        return {
            ENSEMBLE: {
                "metrics": classification_metrics(logits, data.splits.test.y, None, self.cfg.eval.ece_bins),
                "params": sum(count_parameters(m) for m in members),
                "seconds": sum(records[g]["seconds"] for g in gens),
                "train_examples": records[gens[-1]]["train_examples"],
                "history": [],
            }
        }

    def save(self, student: nn.Module, arm_dir: Path, data: SeedData) -> None:
        """``student.safetensors``; a Hugging Face student also with ``save_pretrained`` in ``model/``
        (with its tokenizer for text); a text student built from a config with its tokenizer in
        ``tokenizer/``."""
        super().save(student, arm_dir, data)
        tokenizer = getattr(data.splits, "tokenizers", {}).get("x")
        if not save_pretrained_student(student, arm_dir / "model", tokenizer) and tokenizer is not None:
            tokenizer.save_pretrained(str(arm_dir / "tokenizer"))

    def load(self, arm_dir: Path, data: SeedData) -> nn.Module:
        """The saved student; a text student's saved tokenizer must be the one its ids come from now
        (a tokenizer trained again on the same texts, or the pretrained model's)."""
        saved = arm_dir / "tokenizer"
        tokenizer = getattr(data.splits, "tokenizers", {}).get("x")
        if tokenizer is not None and (saved / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            if not same_tokenizer(PreTrainedTokenizerFast.from_pretrained(str(saved)), tokenizer):
                raise ConfigError(
                    f"{saved}: the student was trained with this tokenizer, but the one built now from the "
                    "training texts differs (the data files or the tokenizer settings changed since the run)"
                )
        return super().load(arm_dir, data)

    # ---- report -----------------------------------------------------------------------------------

    def label(self, arm: str) -> str:
        if arm == BASELINE:
            return "student CE"
        if arm == ENSEMBLE:
            return f"ensemble of generations 1-{self.cfg.teacher.generations}"
        if arm.startswith("gen-"):
            return f"born-again generation {arm.removeprefix('gen-')}"
        if self.source is None:
            return "student (" + " + ".join(self.cfg.loss) + ")"
        return SOURCE_LABELS[self.source]

    def description(self, arm: str) -> str:
        cfg = self.cfg
        terms = " + ".join(f"{k} (weight {v.weight:g})" for k, v in cfg.loss.items())
        data = "on the labelled split" + (" plus the transfer set" if cfg.uses_transfer() else "")
        if arm == BASELINE:
            return "the student trained with cross-entropy on the labelled split only (same seeds, splits, initial weights)"
        if arm == ENSEMBLE:
            return "the mean probability of the born-again generations"
        if arm.startswith("gen-"):
            k = int(arm.removeprefix("gen-"))
            return f"a fresh student trained with {terms} {data}, taught by generation {k - 1} (0 = the CE student)"
        if self.source == "members":
            t = cfg.teacher
            how = f"{len(t.members)} trained teachers ({', '.join(t.member_names())}) combined by {t.combine}"
            how += "" if not t.drop else f", with teacher dropping (drop={t.drop})"
            return f"the student trained with {terms} {data}; {how}"
        return f"the student trained with {terms} {data}; {SOURCE_HOW[self.source]}"

    def sections(self, summary: dict[str, Any]) -> list[Section]:
        """Per-exit / per-peer tables."""
        out = []
        for m in summary["models"].values():
            if "members" not in m:
                continue
            rows = []
            for name, r in m["members"].items():
                row = [name, fmt(r["accuracy"]), fmt(r["ece"])]
                if "params" in r:
                    row += [f"{r['params']['mean']:,.0f}", fmt(r["latency_ms"], 3)]
                rows.append(row)
            out.append(Section(f"{m['label']}: every output", MEMBER_HEADERS[: len(rows[0])], rows))
        return out

    def arm_lines(self, record: dict[str, Any]) -> list[str]:
        """Extra console lines under an arm's result: each output of a stacked student; each member's
        contribution to the targets of a multi-teacher student; a compressed student's size and latency."""
        lines = []
        compressed = compression_line(record)
        if compressed is not None:
            lines.append(compressed)
        multi = record.get(MULTI_TEACHER)
        if multi is not None:
            steps = multi["steps"]
            kept = (
                f", rows kept {100 * multi['kept_fraction']:.1f}%" if multi["combine"] == "agreement" else ""
            )
            lines.append(f"    teachers combined by {multi['combine']}{kept}")
            for name, m in multi["members"].items():
                dropped = f", dropped from {m['dropped_steps']} of {steps} steps" if multi["drop"] else ""
                lines.append(f"    {name}: mean weight {m['mean_weight']:.3f}{dropped}")
        for name, r in record.get("members", {}).items():
            extra = f", {r['params']:,} params, {r['latency_ms']:.2f} ms" if "params" in r else ""
            lines.append(f"    {name}: accuracy {r['accuracy']:.2f}%, ECE {r['ece']:.2f}%{extra}")
        return lines


def _contributions(teacher: MultiTeacher):
    """The arm's record of what each member contributed to the training targets."""
    t = teacher

    def record(model: nn.Module, final: dict[str, float]) -> dict[str, Any]:
        numbers = t.metrics()
        return {
            MULTI_TEACHER: {
                "combine": t.combine,
                **(
                    {"confidence": t.confidence, "temperature": t.temperature}
                    if t.combine == "confidence"
                    else {}
                ),
                "drop": t.drop,
                "steps": int(numbers["steps"]),
                "rows": int(numbers["rows"]),
                "kept_fraction": numbers["kept_fraction"],
                "members": t.member_metrics(),
            }
        }

    return record


def _save_stacked(model: nn.Module, arm_dir: Path) -> None:
    """The stacked model (exit heads or all peers) beside the exported student."""
    tmp = arm_dir / ".stacked.safetensors.tmp"
    save_model(model, str(tmp))
    tmp.replace(arm_dir / "stacked.safetensors")
