"""Semi-supervised teacher-student training (``task: semi``): a few labelled images, many unlabelled
ones, and a teacher whose outputs on the unlabelled ones the student learns.

The three classic methods are one composition each of a teacher source, two input noises and a loss:

==============  ==========================================  ====================  ====================
method          teacher (``teacher.source``)                 noise (student/teacher)  loss
==============  ==========================================  ====================  ====================
Mean Teacher    ``ema``: a moving average of the student     independent noises    ce + consistency_mse
FixMatch        ``self``: the student's current weights      strong / weak         ce + pseudo_label (0.95)
Noisy Student   ``generations``: the previous generation     noised / clean        ce + pseudo_label (soft)
==============  ==========================================  ====================  ====================

Every training batch mixes the labelled images (repeated so that they make ``labelled_fraction`` of
the rows) with the unlabelled ones (labels hidden, -100); ``ce`` reads the labelled rows, the teacher
terms every row. The views come from :func:`distillery.data.views.noisy_view`, a function of the
run seed, the image id and the step (the teacher's with another seed), so resumed runs see the same
noise. The ``baseline`` arm is "supervised only": the same student, noise and steps on the labelled
images alone. Noisy Student's arms are its generations; generation 0 is the baseline.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distillery.data import UNLABELLED, ArrayDataset, ClassificationData, load_classification_data
from distillery.data.views import noisy_view
from distillery.errors import ConfigError
from distillery.eval import classification_metrics, predict_logits
from distillery.losses import build_objective
from distillery.models import ClassifierAdapter, build_model, count_parameters
from distillery.models.text import KeyedClassifierAdapter
from distillery.tasks.base import BASELINE, DISTILLED, ArmJob, BaseTask, Metric
from distillery.tasks.semi.config import SemiConfig
from distillery.teachers import FrozenTeacher
from distillery.teachers.ema import EMATeacher

TEACHER_VIEW = "x_teacher"  # batch key of the teacher's view of each image
TEACHER_NOISE_SEED = 1_000_003  # the teacher's views are drawn with seed + this
GENERATION_SEED = 7919  # a generation with another architecture is initialised with seed + k * this


def generation_arm(k: int) -> str:
    return f"gen-{k}"  # as the born-again generations of task: classification


@dataclass
class SemiSeedData:
    seed: int
    data: ClassificationData
    train: ArrayDataset  # labelled images repeated + unlabelled ones (labels hidden)
    repeats: int  # copies of the labelled split in `train`


class SemiTask(BaseTask):
    config = SemiConfig
    metrics = (
        Metric("accuracy", "accuracy %", 2, unit="%"),
        Metric("ece", "ECE %", 2, higher_is_better=False, unit="%"),
        Metric("nll", "NLL", 3, higher_is_better=False),
    )

    def arms(self) -> list[str]:
        base = [BASELINE] if self.cfg.baseline_enabled() else []
        t = self.cfg.teacher
        if t.source == "generations":
            return base + [generation_arm(k) for k in range(1, t.generations + 1)]
        return [*base, DISTILLED]

    def prepare(self, seed: int) -> SemiSeedData:
        data = load_classification_data(self.cfg.data, seed)
        n_l, n_u = len(data.labelled), len(data.transfer)
        if n_u == 0:
            raise ConfigError(
                "data: this split leaves no unlabelled image for a semi-supervised run; lower data.labelled or "
                "data.validation"
            )
        self._equal_or_larger(data)
        f = self.cfg.labelled_fraction
        repeats = max(1, math.ceil(f / (1 - f) * n_u / n_l))
        train = ArrayDataset.concat(*([data.labelled] * repeats), data.transfer)
        return SemiSeedData(seed, data, train, repeats)

    def _equal_or_larger(self, data: ClassificationData) -> None:
        """Noisy Student's generations never shrink: checked before anything trains."""
        t = self.cfg.teacher
        if t.source != "generations" or t.students is None:
            return
        sizes = [
            count_parameters(build_model(self.cfg.student, data.input_shape, data.num_classes, "student"))
        ]
        for k, cfg in enumerate(t.students, start=1):
            cfg = cfg or self.cfg.student
            sizes.append(
                count_parameters(
                    build_model(cfg, data.input_shape, data.num_classes, f"teacher.students[{k - 1}]")
                )
            )
            if sizes[k] < sizes[k - 1]:
                raise ConfigError(
                    f"teacher.students[{k - 1}] has {sizes[k]:,} parameters, fewer than its teacher (generation "
                    f"{k - 1}: {sizes[k - 1]:,}); Noisy Student's students are equal or larger: choose a wider or "
                    "deeper architecture"
                )

    def describe(self, data: SemiSeedData) -> str:
        d = data.data
        val = 0 if d.validation is None else len(d.validation)
        share = data.repeats * len(d.labelled) / len(data.train)
        line = (
            f"data: {d.name}: {len(d.labelled)} labelled + {len(d.transfer)} unlabelled training images, {val} "
            f"validation, {len(d.test)} test; batches {share:.1%} labelled rows ({data.repeats} copies)"
        )
        return line + self._labelled_stream_note(share)

    def _labelled_stream_note(self, share: float) -> str:
        """Say so when the supervised-only baseline sees more labelled rows per step than the other
        arms: their cross-entropy then has a fraction of the baseline's labelled signal per step."""
        if not self.cfg.baseline_enabled():
            return ""
        per_step = share * self.cfg.train.batch_size
        baseline = self._baseline_train().batch_size
        if baseline <= 1.25 * per_step:
            return ""
        return (
            f"\n  note: about {per_step:.0f} labelled rows per step in the semi-supervised arms vs {baseline} in "
            "the supervised-only baseline; for the same labelled stream raise labelled_fraction or set "
            f"baseline.train.batch_size={round(per_step)}"
        )

    def _build(self, data: SemiSeedData, generation: int = 0) -> nn.Module:
        t = self.cfg.teacher
        cfg = self.cfg.student
        if generation and t.source == "generations" and t.students is not None:
            cfg = t.students[generation - 1] or cfg
        field = f"teacher.students[{generation - 1}]" if cfg is not self.cfg.student else "student"
        return build_model(cfg, data.data.input_shape, data.data.num_classes, field)

    def new_student(self, data: SemiSeedData) -> nn.Module:
        return self._build(data)

    def label(self, arm: str) -> str:
        if arm == BASELINE:
            return "supervised only"
        names = {"ema": "mean teacher", "self": "FixMatch"}
        return names.get(self.cfg.teacher.source, f"noisy student, generation {arm.split('-')[-1]}")

    def description(self, arm: str) -> str:
        d = self.cfg.data
        if arm == BASELINE:
            return f"the student trained with cross-entropy on the {d.labelled} labelled images alone"
        terms = ", ".join(f"{k} ({t.name})" for k, t in self.cfg.loss.items())
        how = {
            "ema": "an exponential moving average of its weights as teacher",
            "self": "its own current weights, on a weaker view, as teacher",
            "generations": "the previous generation as a frozen teacher",
        }[self.cfg.teacher.source]
        return f"labelled and unlabelled images with {how}: {terms}"

    # ---- arms -------------------------------------------------------------------------------------

    def _views(self, data: SemiSeedData, teacher_view: bool):
        noise, seed = self.cfg.noise, data.seed

        def weak(x: Tensor, ids: Tensor, step: int) -> Tensor:
            return (
                x
                if noise.teacher is None
                else noisy_view(x, ids, step, seed + TEACHER_NOISE_SEED, noise.teacher)
            )

        def transform(batch: dict[str, Tensor], model: nn.Module, step: int) -> dict[str, Tensor]:
            x, ids = batch["x"], batch["index"]
            student = noisy_view(x, ids, step, seed, noise.student)
            teacher = weak(x, ids, step) if teacher_view or noise.labelled == "teacher" else None
            if noise.labelled != "student":
                labelled = (batch["y"] != UNLABELLED).view(-1, *[1] * (x.dim() - 1))
                own = noise.labelled
                view = teacher if own == "teacher" else noisy_view(x, ids, step, seed, own)
                student = torch.where(labelled, view, student)
            out = {**batch, "x": student}
            if teacher_view:
                out[TEACHER_VIEW] = teacher
            return out

        return transform

    def _validator(self, data: SemiSeedData):
        if data.data.validation is None:
            return None
        return lambda model: self.evaluate(model, data, "validation")

    def arm(
        self,
        name: str,
        data: SemiSeedData,
        teacher: nn.Module | None,
        init_state: dict[str, Any],
        trained: dict[str, nn.Module],
    ) -> ArmJob:
        cfg = self.cfg
        if name == BASELINE:
            student = self.new_student(data)
            student.load_state_dict(init_state)
            supervised = {k: t for k, t in cfg.loss.items() if t.name == "ce"}
            return ArmJob(
                model=student,
                train_set=data.data.labelled,
                objective=build_objective(supervised),
                train=self._baseline_train(),
                adapter=ClassifierAdapter(),
                batch_transform=self._views(data, teacher_view=False),
                evaluate=self._validator(data),
            )
        t = cfg.teacher
        view = KeyedClassifierAdapter(TEACHER_VIEW)
        if t.source == "generations":
            k = int(name.split("-")[-1])
            previous = trained[BASELINE if k == 1 else generation_arm(k - 1)]
            student = self._build(data, k)
            if t.students is None or t.students[k - 1] is None:  # the student's architecture: its init
                student.load_state_dict(init_state)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(data.seed + k * GENERATION_SEED)
                    student = self._build(data, k)
            source: Any = FrozenTeacher(copy.deepcopy(previous), view)
        else:
            student = self.new_student(data)
            student.load_state_dict(init_state)
            momentum = 0.0 if t.source == "self" else t.momentum  # momentum 0: the current weights
            momentum_end = None if t.source == "self" else t.momentum_end
            source = EMATeacher(
                student,
                momentum,
                momentum_end=momentum_end,
                total_steps=cfg.train.total_steps(len(data.train)),
                adapter=view,
            )
        return ArmJob(
            model=student,
            train_set=data.train,
            objective=build_objective(cfg.loss),
            train=cfg.train,
            teacher=source,
            adapter=ClassifierAdapter(),
            batch_transform=self._views(data, teacher_view=True),
            evaluate=self._validator(data),
        )

    def _baseline_train(self):
        b = self.cfg.baseline
        return self.cfg.train if b is None or b.train is None else b.train

    # ---- evaluation ---------------------------------------------------------------------------------

    def evaluate(
        self, model: nn.Module, data: SemiSeedData, split: str, teacher: nn.Module | None = None
    ) -> dict[str, float]:
        rows = data.data.validation if split == "validation" else data.data.test
        logits = predict_logits(model, rows, ClassifierAdapter(), self.cfg.eval.batch_size)
        return classification_metrics(logits, rows.y, None, self.cfg.eval.ece_bins)


__all__ = ["SemiTask", "generation_arm"]
