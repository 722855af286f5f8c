"""The config of a self-supervised self-distillation run (``task: ssl``)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from distillery.configbase import StrictModel
from distillery.data import ImageDataConfig
from distillery.data.views import ViewsConfig
from distillery.losses import LossTermConfig, SelfSupervisedTermConfig
from distillery.models.ssl import ViTConfig
from distillery.tasks.base import DistillationConfigBase, EvalConfig


class SSLCNNConfig(StrictModel):
    """The convolutional body of the small CNN as a backbone (no classifier head)."""

    name: Literal["cnn"] = "cnn"
    channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1, description="conv widths")
    pool_every: int = Field(1, ge=1, description="max-pool after every this many conv layers")
    pool_to: int = Field(1, ge=1, description="adaptive average pooling to this side before flattening")
    batch_norm: bool = Field(True, description="batch norm after every convolution (as in ResNets)")


Backbone = Annotated[ViTConfig | SSLCNNConfig, Field(discriminator="name")]


class HeadConfig(StrictModel):
    """The projection head: DINO's (``kind: dino``: an MLP, an L2-normalised bottleneck, then K
    weight-normalised prototypes; iBOT shares it between [CLS] and patches), BYOL's projector
    (``kind: mlp``: Linear, BatchNorm, ReLU, Linear to ``out_dim``) or data2vec's regression head
    (``kind: linear``: one linear layer to the backbone's width; ``out_dim`` is unused)."""

    kind: Literal["dino", "mlp", "linear"] = Field(
        "dino", description="dino (prototypes), mlp (BYOL's projector) or linear (data2vec's regression head)"
    )
    out_dim: int = Field(1024, ge=2, description="number of prototypes K (DINO: 65536)")
    hidden_dim: int = Field(256, ge=1, description="width of the MLP's hidden layers (DINO: 2048)")
    bottleneck_dim: int = Field(64, ge=1, description="width of the L2-normalised bottleneck (DINO: 256)")
    layers: int = Field(3, ge=1, description="linear layers before the bottleneck's normalisation")
    norm_last_layer: bool = Field(True, description="keep the last layer's weight norm at 1 (DINO's default)")
    batch_norm: bool = Field(False, description="batch norm after the hidden layers (DINO's use_bn_in_head)")
    freeze_last_layer_epochs: float = Field(
        0.0, ge=0.0, description="the last layer gets no gradient for this many epochs (DINO: 1)"
    )


class PredictorConfig(StrictModel):
    """BYOL's predictor on the student side: Linear, BatchNorm, ReLU, Linear back to the head's width."""

    hidden_dim: int = Field(256, ge=1, description="hidden width (BYOL: 4096)")


class SSLModelConfig(StrictModel):
    backbone: Backbone = Field(default_factory=SSLCNNConfig, description="vit or cnn")
    head: HeadConfig = Field(default_factory=HeadConfig)
    predictor: PredictorConfig | None = Field(None, description="BYOL's predictor (needed by the byol term)")


class SSLTeacherConfig(StrictModel):
    """The teacher: an EMA copy of the student (DINO, BYOL), or a randomly initialised network of the same
    architecture that never changes ("Random Teachers are Good Teachers")."""

    source: Literal["ema", "random"] = Field(
        "ema", description="ema (a moving average of the student) or random"
    )
    init_seed_offset: int = Field(
        1000, description="random teacher: initialised from seed + this (the student from seed)"
    )
    momentum: float = Field(0.996, ge=0.0, le=1.0, description="EMA momentum at the start (DINO: 0.996)")
    momentum_end: float | None = Field(
        1.0, ge=0.0, le=1.0, description="cosine-ramp the momentum to this value (DINO: 1.0); null = constant"
    )


class SSLEvalConfig(EvalConfig):
    knn_k: int = Field(20, ge=1, description="neighbours of the weighted k-NN probe (DINO: 20)")
    knn_temperature: float = Field(
        0.07, gt=0.0, description="temperature of the k-NN vote weights (DINO: 0.07)"
    )
    few_labels: int | float = Field(
        0.01,
        gt=0,
        description="labelled images of the few-label probes: a fraction (< 1) of the training split or a count "
        "(class-balanced, fixed per seed)",
    )
    validation_bank: int = Field(
        5000, ge=1, description="training images whose embeddings the k-NN probe searches during training"
    )
    probe_max_iter: int = Field(1000, ge=1, description="L-BFGS iterations of the linear probe at most")

    @field_validator("few_labels")
    @classmethod
    def _fraction(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not value < 1.0:
            raise ValueError(f"a fraction of the training split must be < 1 (or give a count); got {value}")
        return value


class SSLRunConfig(DistillationConfigBase):
    """A run of ``task: ssl``: a student learns from an EMA copy of itself on views of unlabelled images.

    The images are the training split of ``data`` (labels unused in training); the probes use its
    labels: k-NN and a linear probe on frozen embeddings with all of them, and with ``eval.few_labels``
    of them. The ``baseline`` arm is the randomly initialised network, evaluated without training.
    """

    self_supervised_terms: ClassVar[bool] = True

    task: Literal["ssl"] = "ssl"
    data: ImageDataConfig = Field(default_factory=ImageDataConfig)
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    model: SSLModelConfig = Field(default_factory=SSLModelConfig)
    teacher: SSLTeacherConfig = Field(default_factory=SSLTeacherConfig)
    eval: SSLEvalConfig = Field(default_factory=SSLEvalConfig)
    loss: dict[str, LossTermConfig] = Field(default_factory=lambda: {"dino": {"name": "dino"}}, min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> SSLRunConfig:
        others = [
            label for label, term in self.loss.items() if not isinstance(term, SelfSupervisedTermConfig)
        ]
        if others:
            raise ValueError(
                f"loss.{others[0]} ({self.loss[others[0]].name}) is not a self-supervised term; task: ssl trains on "
                "unlabelled views with dino, ibot, data2vec or byol (and koleo)"
            )
        names = {term.name for term in self.loss.values()}
        main = sorted(names & set(MAIN_TERMS))
        if len(main) > 1:
            raise ValueError(
                f"conflicting fields: loss has {' and '.join(main)}; each is a whole method with its own head and "
                "teacher outputs (ibot already contains dino's [CLS] term): train one of them (koleo can be added "
                "to any)"
            )
        if not main:
            raise ValueError(
                "loss: koleo only spreads the student's embeddings and learns nothing from the teacher; add one of "
                f"{', '.join(MAIN_TERMS)}"
            )
        self._token_level(main[0])
        head, predictor = self.model.head.kind, self.model.predictor
        if "byol" in names and (head != "mlp" or predictor is None):
            fixes = ([] if head == "mlp" else ["model.head.kind=mlp"]) + (
                [] if predictor is not None else ["model.predictor={hidden_dim: 256}"]
            )
            raise ValueError(
                f"conflicting fields: loss.byol needs BYOL's projector and predictor, but model.head.kind={head} and "
                f"model.predictor={'set' if predictor else 'null'}; set {' and '.join(fixes)}"
            )
        if head == "mlp" and self.model.head.freeze_last_layer_epochs > 0:
            raise ValueError(
                "conflicting fields: model.head.freeze_last_layer_epochs freezes DINO's prototypes, but "
                "model.head.kind=mlp has none; set it to 0"
            )
        for method in ("dino", "ibot"):
            if method in names and head != "dino":
                raise ValueError(
                    f"conflicting fields: loss.{method} compares distributions over prototypes, but "
                    f"model.head.kind={head}; set model.head.kind=dino"
                )
        if "data2vec" in names and head != "linear":
            raise ValueError(
                f"conflicting fields: loss.data2vec regresses the teacher's block outputs with a linear head, but "
                f"model.head.kind={head}; set model.head.kind=linear"
            )
        if "data2vec" not in names and self.views.global_crops < 2 and self.views.local_crops == 0:
            raise ValueError(
                f"views: global_crops={self.views.global_crops} and no local crops leave no pair of different "
                "views; use global_crops=2 (DINO's) or add local_crops"
            )
        if "data2vec" in names and self.views.local_crops:
            raise ValueError(
                f"conflicting fields: views.local_crops={self.views.local_crops}, but data2vec trains on the masked "
                "global views only; set views.local_crops=0"
            )
        if self.data.transfer not in (0, None):
            raise ValueError(
                "data.transfer: a self-supervised run trains on the whole training split without labels; set "
                "data.labelled to the number of training images and leave transfer at 0"
            )
        return self

    def _token_level(self, method: str) -> None:
        """iBOT and data2vec read patch tokens of masked views: a ViT whose patches are the mask's."""
        if method not in ("ibot", "data2vec"):
            return
        backbone, views = self.model.backbone, self.views
        if not isinstance(backbone, ViTConfig):
            raise ValueError(
                f"conflicting fields: loss.{method} learns from patch tokens, but model.backbone.name={backbone.name} "
                "has none; set model.backbone.name=vit"
            )
        if views.mask == "none":
            raise ValueError(
                f"conflicting fields: loss.{method} predicts the teacher's outputs at masked patches, but "
                "views.mask=none; set views.mask=block (or random)"
            )
        if views.patch_size != backbone.patch_size:
            raise ValueError(
                f"conflicting fields: views.patch_size={views.patch_size} draws masks on another grid than the "
                f"ViT's model.backbone.patch_size={backbone.patch_size}; set both to the same value"
            )
        top_k = next((t.top_k for t in self.loss.values() if t.name == "data2vec"), None)
        if top_k is not None and top_k > backbone.depth:
            raise ValueError(
                f"conflicting fields: loss.data2vec.top_k={top_k} averages more blocks than the ViT's "
                f"model.backbone.depth={backbone.depth}; choose top_k <= {backbone.depth}"
            )

    def term_names(self) -> set[str]:
        return {term.name for term in self.loss.values()}


# The terms that are a method each (at most one per run); koleo is a regulariser added to one of them.
MAIN_TERMS = ("dino", "ibot", "data2vec", "byol")

__all__ = [
    "MAIN_TERMS",
    "HeadConfig",
    "SSLCNNConfig",
    "SSLEvalConfig",
    "SSLModelConfig",
    "SSLRunConfig",
    "SSLTeacherConfig",
]
