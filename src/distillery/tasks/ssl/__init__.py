"""Self-supervised self-distillation (``task: ssl``): a network learns from an EMA copy of itself.

Each training image is turned into views at every step (:func:`distillery.data.views.make_views`:
global and local crops, photometric noise; a function of the seed, the image's id and the step).
The student (a backbone and a DINO head, :class:`~distillery.models.ssl.SSLNetwork`) sees every
view, the teacher, an EMA of the student (:class:`~distillery.teachers.ema.EMATeacher`), the global
ones; the loss terms (``dino``) compare them. No label is used in training.

The arms: ``baseline`` is the randomly initialised network, evaluated as it is; ``distilled`` the
trained one, from the same initial weights. Metrics on frozen backbone embeddings: weighted k-NN
accuracy (DINO's protocol) and linear-probe accuracy on the test split, with every training label
and with ``eval.few_labels`` of them (class-balanced, fixed per seed). During training the
validation split is scored by k-NN against ``eval.validation_bank`` training images, with two signs
of collapse: the entropy of the teacher's mean output (low: one prototype wins) and the standard
deviation of the L2-normalised embeddings (near 0: every image maps to one point).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distillery.data import ArrayDataset, ClassificationData, load_classification_data, stratified_sample
from distillery.data.views import make_views
from distillery.eval.probes import embedding_spread, knn_accuracy, linear_probe
from distillery.losses import DINOLoss, build_objective
from distillery.models.ssl import (
    GLOBAL_VIEWS,
    LOCAL_VIEWS,
    MASKS,
    CNNBackbone,
    DINOHead,
    MLPHead,
    SSLAdapter,
    SSLNetwork,
    ViTBackbone,
    ViTConfig,
)
from distillery.tasks.base import BASELINE, DISTILLED, ArmJob, BaseTask, Metric, RunContext
from distillery.tasks.ssl.config import SSLRunConfig
from distillery.teachers.ema import EMATeacher

FEW_SEED = 7919  # the few-label subset of seed s is drawn with seed s + this


@dataclass
class SSLSeedData:
    seed: int
    data: ClassificationData
    train: ArrayDataset  # the training images, labels hidden
    few: Tensor  # positions in data.labelled of the few-label subset
    bank: Tensor  # positions in data.labelled of the k-NN bank used during training


class SSLTask(BaseTask):
    config = SSLRunConfig
    metrics = (
        Metric("knn", "k-NN acc %", 2, unit="%", doc="weighted k-NN (k=20, T=0.07) on frozen embeddings, all labels"),
        Metric("probe", "linear probe %", 2, unit="%", doc="logistic regression on frozen embeddings, all labels"),
        Metric("knn_few", "k-NN few labels %", 2, unit="%", doc="the k-NN probe with eval.few_labels labels"),
        Metric("probe_few", "probe few labels %", 2, unit="%", doc="the linear probe with eval.few_labels labels"),
    )  # fmt: skip

    def __init__(self, cfg: SSLRunConfig, context: RunContext) -> None:
        super().__init__(cfg, context)
        self.dataset = cfg.data.name

    # ---- the task protocol --------------------------------------------------------------------------

    def prepare(self, seed: int) -> SSLSeedData:
        data = load_classification_data(self.cfg.data, seed)
        _, h, w = data.input_shape
        self.cfg.views.check(h, w, "views")
        n = len(data.labelled)
        few = self.cfg.eval.few_labels
        count = max(data.num_classes, round(few * n)) if isinstance(few, float) else min(few, n)
        g = torch.Generator().manual_seed(seed + FEW_SEED)
        few_pos = stratified_sample(data.labelled.y, count, g)
        bank = torch.randperm(n, generator=g)[: min(n, self.cfg.eval.validation_bank)].sort().values
        return SSLSeedData(seed, data, data.labelled.without_labels(), few_pos, bank)

    def describe(self, data: SSLSeedData) -> str:
        d = data.data
        val = 0 if d.validation is None else len(d.validation)
        v = self.cfg.views
        return (
            f"data: {d.name}: {len(data.train)} training images (labels unused in training), {val} validation, "
            f"{len(d.test)} test; {len(data.few)} labels for the few-label probes; views: {v.global_crops} global"
            + (f" + {v.local_crops} local" if v.local_crops else "")
            + " crops"
        )

    def _backbone(self, shape: tuple[int, ...]) -> nn.Module:
        b = self.cfg.model.backbone
        c, h, _ = shape
        if isinstance(b, ViTConfig):
            return ViTBackbone(b, image_size=self.cfg.views.sizes(h)[0], channels=c)
        return CNNBackbone(b.channels, c, pool_every=b.pool_every, pool_to=b.pool_to, batch_norm=b.batch_norm)

    def new_student(self, data: SSLSeedData) -> nn.Module:
        backbone = self._backbone(data.data.input_shape)
        h, pred = self.cfg.model.head, self.cfg.model.predictor
        if h.kind == "mlp":
            head: nn.Module = MLPHead(backbone.embed_dim, h.out_dim, h.hidden_dim)
        elif h.kind == "linear":  # data2vec's regression head
            head = nn.Linear(backbone.embed_dim, backbone.embed_dim)
        else:
            head = DINOHead(
                backbone.embed_dim,
                h.out_dim,
                h.hidden_dim,
                h.bottleneck_dim,
                h.layers,
                h.norm_last_layer,
                h.batch_norm,
            )
        predictor = None if pred is None else MLPHead(h.out_dim, h.out_dim, pred.hidden_dim)
        return SSLNetwork(backbone, head, predictor)

    def label(self, arm: str) -> str:
        return {BASELINE: "random init (untrained)", DISTILLED: "self-distilled"}.get(arm, arm)

    def description(self, arm: str) -> str:
        if arm == BASELINE:
            return "the network as initialised, without training: what the probes get from a random backbone"
        terms = ", ".join(f"{k} ({t.name})" for k, t in self.cfg.loss.items())
        teacher = "a random, frozen teacher" if self.cfg.teacher.source == "random" else "an EMA teacher"
        return f"trained on views of unlabelled images against {teacher}: {terms}"

    def arm(
        self,
        name: str,
        data: SSLSeedData,
        teacher: nn.Module | None,
        init_state: dict[str, Any],
        trained: dict[str, nn.Module],
    ) -> ArmJob:
        student = self.new_student(data)
        student.load_state_dict(init_state)
        objective = build_objective(self.cfg.loss)
        if name == BASELINE:
            return ArmJob(model=student, train_set=[], objective=objective, train=None)
        t = self.cfg.teacher
        steps = self.cfg.train.total_steps(len(data.train))
        if t.source == "random":  # a fresh network of the same architecture, never updated (momentum 1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(data.seed + t.init_seed_offset)
                source, momentum, momentum_end = self.new_student(data), 1.0, None
        else:
            source, momentum, momentum_end = student, t.momentum, t.momentum_end
        names = self.cfg.term_names()
        masked = bool(names & {"ibot", "data2vec"})
        top_k = next((term.top_k for term in self.cfg.loss.values() if term.name == "data2vec"), 0)
        ema = EMATeacher(
            source,
            momentum,
            momentum_end=momentum_end,
            total_steps=steps,
            adapter=SSLAdapter("global", patches="ibot" in names, blocks=top_k),
            batch_statistics=True,  # as DINO's teacher: batch norm on the batch's statistics
        )
        views, seed = self.cfg.views, data.seed
        frozen_until = round(
            self.cfg.model.head.freeze_last_layer_epochs * len(data.train) / self.cfg.train.batch_size
        )
        now = {"step": 0}
        if frozen_until > 0 and isinstance(student.head, DINOHead):  # DINO's cancel_gradients_last_layer
            for p in student.head.last_layer_parameters():
                p.register_hook(lambda g: torch.zeros_like(g) if now["step"] < frozen_until else g)

        def add_views(batch: dict[str, Tensor], model: nn.Module, step: int) -> dict[str, Tensor]:
            now["step"] = step
            v = make_views(batch["x"], batch["index"], step, seed, views)
            out = {**batch, GLOBAL_VIEWS: v.global_views, LOCAL_VIEWS: v.local_views}
            return out if v.masks is None else {**out, MASKS: v.masks}

        last: dict[str, float] = {}  # the latest validation: the collapse verdict reads it

        def validate(model: nn.Module) -> dict[str, float]:
            last.update(self._validation(model, data, objective))
            return dict(last)

        return ArmJob(
            model=student,
            train_set=data.train,
            objective=objective,
            train=self.cfg.train,
            teacher=ema,
            adapter=SSLAdapter(
                "all",
                predict=self.cfg.model.predictor is not None,
                patches=masked,
                masked=masked,
                embed="koleo" in names,
            ),
            batch_transform=add_views,
            evaluate=validate if data.data.validation is not None else None,
            record=lambda model, final: {"warnings": [w for w in [collapse_verdict(last)] if w]},
        )

    # ---- evaluation ---------------------------------------------------------------------------------

    def _centre_view(self, x: Tensor) -> Tensor:
        """Images at the global crops' side (resized when the crops are smaller than the image)."""
        side = self.cfg.views.sizes(x.shape[-1])[0]
        return x if x.shape[-1] == side else nn.functional.interpolate(x, size=(side, side), mode="bilinear")

    def _embed(self, model: nn.Module, x: Tensor) -> Tensor:
        was = model.training
        model.eval()
        out = []
        try:
            with torch.no_grad():
                for start in range(0, len(x), self.cfg.eval.batch_size):
                    out.append(
                        model.embed(self._centre_view(x[start : start + self.cfg.eval.batch_size])).float()
                    )
        finally:
            model.train(was)
        return torch.cat(out)

    def _validation(self, model: nn.Module, data: SSLSeedData, objective=None) -> dict[str, float]:
        """k-NN accuracy on the validation split against the bank, and the collapse signs: the entropies
        of the last training batch's DINO targets and the spread of the validation embeddings."""
        d = data.data
        bank = d.labelled.subset(data.bank)
        e = self.cfg.eval
        z_bank, z_val = self._embed(model, bank.x), self._embed(model, d.validation.x)
        knn = knn_accuracy(z_bank, bank.y, z_val, d.validation.y, k=e.knn_k, temperature=e.knn_temperature)
        out = {"knn": 100.0 * knn, "embedding_std": embedding_spread(z_val)}
        for term in [] if objective is None else objective.terms.values():
            if isinstance(term, DINOLoss):
                out.update(term.targets_entropy)
        return out

    def evaluate(
        self, model: nn.Module, data: SSLSeedData, split: str, teacher: nn.Module | None = None
    ) -> dict[str, float]:
        d = data.data
        if split == "validation":
            return self._validation(model, data)
        e = self.cfg.eval
        train_x, train_y = d.labelled.x, d.labelled.y
        z_train, z_test = self._embed(model, train_x), self._embed(model, d.test.x)
        few = data.few
        knn = dict(k=e.knn_k, temperature=e.knn_temperature, num_classes=d.num_classes)
        seed = self.cfg.data.split_seed
        return {
            "knn": 100.0 * knn_accuracy(z_train, train_y, z_test, d.test.y, **knn),
            "probe": 100.0
            * linear_probe(z_train, train_y, z_test, d.test.y, seed=seed, max_iter=e.probe_max_iter),
            "knn_few": 100.0 * knn_accuracy(z_train[few], train_y[few], z_test, d.test.y, **knn),
            "probe_few": 100.0
            * linear_probe(
                z_train[few], train_y[few], z_test, d.test.y, seed=seed, max_iter=e.probe_max_iter
            ),
        }

    def save(self, student: nn.Module, arm_dir: Path, data: SSLSeedData) -> None:
        """``student.safetensors`` (backbone and head); a ViT backbone also as ``backbone/``, a folder
        that ``transformers.ViTModel.from_pretrained`` loads."""
        super().save(student, arm_dir, data)
        backbone = student.backbone
        if isinstance(backbone, ViTBackbone):
            backbone.vit.save_pretrained(arm_dir / "backbone")


# below this (in units of log K) the teacher's targets say next to nothing about which image they are for
COLLAPSE_INFORMATION = 0.02


def collapse_verdict(signs: dict[str, float]) -> str | None:
    """A sentence when the collapse signs of a validation say the run collapsed, else None.

    The information the targets carry about the image is the entropy of the mean target minus the mean
    entropy of one image's target (the mutual information between image and prototype, in units of
    log K). Near 0, every image gets the same target: uniform ones (per-image entropy near 1: not enough
    sharpening) or one prototype for all (near 0: not enough centring), or any distribution in between.
    """
    if "teacher_entropy" not in signs or "teacher_mean_entropy" not in signs:
        return None
    per_image, mean = signs["teacher_entropy"], signs["teacher_mean_entropy"]
    if mean - per_image >= COLLAPSE_INFORMATION:
        return None
    kind = (
        "uniform targets: sharpen more (a lower teacher temperature)"
        if per_image > 0.9
        else "one prototype for every image: centre more (a lower center_momentum)"
        if per_image < 0.1
        else "the same target for every image"
    )
    return (
        f"collapsed: the teacher's targets no longer depend on the image (entropy {per_image:.3f} per image, "
        f"{mean:.3f} of the mean target, in units of log K): {kind}"
    )


__all__ = ["COLLAPSE_INFORMATION", "SSLTask", "collapse_verdict"]
