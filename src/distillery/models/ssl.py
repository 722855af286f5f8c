"""Networks of self-supervised distillation: backbones that return embeddings, and their heads.

* :class:`ViTBackbone`: a small Vision Transformer from a config (Hugging Face ``ViTModel``: saved
  and loaded with ``save_pretrained`` / ``from_pretrained``), with a mask token for masked image
  modelling and position embeddings interpolated for crops of other sizes; it returns the [CLS]
  embedding and the patch tokens.
* :class:`CNNBackbone`: the convolutional body of :class:`~distillery.models.cnn.SmallCNN`.
* :class:`DINOHead`: DINO's projection head, an MLP to an L2-normalised bottleneck and a
  weight-normalised linear layer to K prototypes ("Emerging Properties in Self-Supervised Vision
  Transformers"); :class:`MLPHead`: BYOL's projector and predictor (Linear, BatchNorm, ReLU, Linear).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from distillery.configbase import StrictModel
from distillery.errors import ConfigError
from distillery.models.adapters import ModelOutput
from distillery.models.cnn import SmallCNN
from distillery.models.vit import hf_vit_kwargs

SSL_OUT = "ssl.out"  # the head outputs of every view, [V, B, K] (read by the self-supervised loss terms)
SSL_PRED = "ssl.pred"  # the predictor's outputs on the head outputs of every view, [V, B, D] (BYOL)
SSL_PATCH = "ssl.patch"  # the head on every patch token of the global views, [G, B, P, K] (iBOT, data2vec)
SSL_MASK = "ssl.mask"  # the masks the student's global views were given, [G, B, P] (True = masked)
SSL_EMBED = "ssl.embed"  # the backbone's embeddings of the global views, [G, B, D] (KoLeo)
SSL_BLOCKS = "ssl.blocks"  # the last blocks' outputs at the patch positions, [k, G, B, P, D] (data2vec)
GLOBAL_VIEWS, LOCAL_VIEWS = "global_views", "local_views"  # batch keys: [G, B, C, S, S], [L, B, C, s, s]
MASKS = "masks"  # batch key: [G, B, P] patch masks of the global views (views.mask)


class ViTConfig(StrictModel):
    """A small Vision Transformer."""

    name: Literal["vit"] = "vit"
    patch_size: int = Field(
        4, ge=1, description="side of a square patch in pixels; must divide the image side"
    )
    depth: int = Field(4, ge=1, description="transformer blocks")
    width: int = Field(64, ge=8, description="embedding width")
    heads: int = Field(4, ge=1, description="attention heads (must divide width)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP width as a multiple of the embedding width")


class ViTBackbone(nn.Module):
    """``forward(x, mask=None) -> [B, 1 + P, D]`` tokens ([CLS] first, after the final layer norm);
    ``embed(x)`` is the [CLS] embedding ``[B, D]``. ``mask`` ``[B, P]`` (True = masked) replaces those
    patches' embeddings with the learnt mask token before the blocks."""

    def __init__(self, cfg: ViTConfig, image_size: int, channels: int) -> None:
        super().__init__()
        from transformers import ViTConfig as HFViTConfig
        from transformers import ViTModel

        if image_size % cfg.patch_size:
            raise ConfigError(
                f"model.patch_size={cfg.patch_size} does not divide the image side {image_size}; choose a divisor "
                f"of {image_size}"
            )
        if cfg.width % cfg.heads:
            raise ConfigError(f"model.heads={cfg.heads} does not divide model.width={cfg.width}")
        hf = HFViTConfig(**hf_vit_kwargs(cfg, image_size, channels))
        self.vit = ViTModel(hf, add_pooling_layer=False, use_mask_token=True)
        self.image_size, self.patch_size, self.width = image_size, cfg.patch_size, cfg.width

    @property
    def embed_dim(self) -> int:
        return self.width

    def forward(self, x: Tensor, mask: Tensor | None = None, output_hidden_states: bool = False):
        out = self.vit(
            pixel_values=x,
            bool_masked_pos=mask,
            interpolate_pos_encoding=x.shape[-1] != self.image_size or x.shape[-2] != self.image_size,
            output_hidden_states=output_hidden_states,
        )
        return (out.last_hidden_state, out.hidden_states) if output_hidden_states else out.last_hidden_state

    def embed(self, x: Tensor) -> Tensor:
        return self.forward(x)[:, 0]


class CNNBackbone(nn.Module):
    """Convolutions (3x3, ReLU, optionally batch norm), max-pooling, global pooling, flatten:
    ``embed(x) -> [B, D]``. Without batch norm it is the body of :class:`SmallCNN`."""

    def __init__(
        self,
        channels: list[int],
        in_channels: int,
        pool_every: int = 1,
        pool_to: int = 1,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if batch_norm:
            layers: list[nn.Module] = []
            width = in_channels
            for i, c in enumerate(channels):
                layers += [nn.Conv2d(width, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                if (i + 1) % pool_every == 0 and i + 1 < len(channels):
                    layers.append(nn.MaxPool2d(2))
                width = c
            self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool_to), nn.Flatten())
        else:
            cnn = SmallCNN(in_channels, 1, channels, pool_every=pool_every, dropout=0.0, pool_to=pool_to)
            self.body = cnn.body
        self.out_dim = channels[-1] * pool_to * pool_to

    @property
    def embed_dim(self) -> int:
        return self.out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.contiguous(memory_format=torch.channels_last))

    def embed(self, x: Tensor) -> Tensor:
        return self.forward(x)


class DINOHead(nn.Module):
    """MLP (GELU) -> L2-normalised bottleneck -> weight-normalised linear layer to ``out_dim`` logits.

    As DINO's ``DINOHead``: hidden layers and the bottleneck are initialised with a truncated normal
    (std 0.02) and zero biases; the last layer has no bias, its weight norm ``g`` starts at 1 and,
    with ``norm_last_layer`` (the default), stays 1 (not trained). ``batch_norm`` adds batch norm after
    the hidden layers (DINO's ``use_bn_in_head``, for convolutional backbones). ``last_layer_parameters()``
    lists what DINO freezes during the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 256,
        bottleneck_dim: int = 64,
        layers: int = 3,
        norm_last_layer: bool = True,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            bn = (lambda: [nn.BatchNorm1d(hidden_dim)]) if batch_norm else list
            mods: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), *bn(), nn.GELU()]
            for _ in range(layers - 2):
                mods += [nn.Linear(hidden_dim, hidden_dim), *bn(), nn.GELU()]
            mods.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.last_layer.parameters() if p.requires_grad]


class MLPHead(nn.Module):
    """BYOL's projector and predictor: Linear -> BatchNorm -> ReLU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SSLNetwork(nn.Module):
    """A backbone, a head and optionally a predictor: ``forward(views) -> [V, B, K]`` for a list of view
    batches ``[B, C, S, S]``; ``predict(out) -> [V, B, D]`` applies the predictor to each view's head
    outputs (BYOL's online network; the EMA target network keeps an unused copy of it).

    Consecutive views of the same size run through the backbone as one batch (DINO's
    ``MultiCropWrapper``: one pass for the global crops, one for the local ones).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.predictor = predictor

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        out: list[Tensor] = []
        i = 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape == views[i].shape:
                j += 1
            group = torch.cat(list(views[i:j]))
            out.extend(self.head(self.backbone.embed(group)).chunk(j - i))
            i = j
        return torch.stack(out)

    def predict(self, out: Tensor) -> Tensor:
        """The predictor on each view's head outputs (one batch per view, as its batch norm expects)."""
        if self.predictor is None:
            raise ValueError("this network has no predictor (model.predictor in the config)")
        return torch.stack([self.predictor(v) for v in out.unbind(0)])

    def embed(self, x: Tensor) -> Tensor:
        """The backbone's embedding ``[B, D]`` of images ``[B, C, H, W]`` (what the probes read)."""
        return self.backbone.embed(x)

    def encode(
        self,
        views: Tensor,
        masks: Tensor | None = None,
        *,
        patches: bool = False,
        blocks: int = 0,
    ) -> dict[str, Tensor]:
        """Views ``[G, B, C, S, S]`` of one size through the backbone once, with what the token-level
        methods read: ``SSL_OUT`` ``[G, B, K]`` (the head on the embeddings) and ``SSL_EMBED``
        ``[G, B, D]``; with ``patches`` the head on every patch token, ``SSL_PATCH`` ``[G, B, P, K]``;
        with ``masks`` ``[G, B, P]`` the masked patches replaced by the mask token first; with
        ``blocks = k`` the outputs of the last k transformer blocks at the patch positions (before the
        final layer norm), ``SSL_BLOCKS`` ``[k, G, B, P, D]``. Patches, masks and blocks need a ViT."""
        g, b = views.shape[:2]
        x = views.flatten(0, 1)
        if not isinstance(self.backbone, ViTBackbone):
            if patches or masks is not None or blocks:
                raise ValueError(
                    "patch outputs, masks and block outputs need a ViT backbone (model.backbone.name=vit)"
                )
            embed = self.backbone.embed(x)
            return {SSL_EMBED: embed.unflatten(0, (g, b)), SSL_OUT: self.head(embed).unflatten(0, (g, b))}
        flat_mask = None if masks is None else masks.flatten(0, 1)
        if blocks:
            tokens, hidden = self.backbone(x, mask=flat_mask, output_hidden_states=True)
        else:
            tokens, hidden = self.backbone(x, mask=flat_mask), ()
        embed = tokens[:, 0]
        out = {SSL_EMBED: embed.unflatten(0, (g, b)), SSL_OUT: self.head(embed).unflatten(0, (g, b))}
        if patches:
            p = tokens[:, 1:]
            out[SSL_PATCH] = self.head(p.flatten(0, 1)).unflatten(0, (g, b, p.shape[1]))
        if blocks:
            if blocks > len(hidden) - 1:
                raise ValueError(f"asked for the last {blocks} blocks of a ViT of depth {len(hidden) - 1}")
            out[SSL_BLOCKS] = torch.stack([h[:, 1:].unflatten(0, (g, b)) for h in hidden[-blocks:]])
        return out


class SSLAdapter:
    """Batches with the views of :func:`distillery.data.views.make_views` (``global_views``,
    ``local_views``, ``masks``); one row per image. ``views="all"`` (the student) runs the network on
    every view, ``"global"`` (the teacher) on the global ones; the outputs are ``features[SSL_OUT]``,
    and with ``predict`` the predictor's outputs ``features[SSL_PRED]``.

    The token-level methods ask for more, through :meth:`SSLNetwork.encode` on the global views:
    ``masked`` gives the student's global views the batch's masks (and ``features[SSL_MASK]``),
    ``patches`` adds the head on the patch tokens (``SSL_PATCH``: iBOT), ``blocks = k`` the last k
    blocks' outputs (``SSL_BLOCKS``: data2vec's teacher), ``embed`` the backbone embeddings
    (``SSL_EMBED``: KoLeo)."""

    target_key = "y"

    def __init__(
        self,
        views: Literal["all", "global"] = "all",
        predict: bool = False,
        *,
        patches: bool = False,
        masked: bool = False,
        blocks: int = 0,
        embed: bool = False,
    ) -> None:
        self.views, self.predict = views, predict
        self.patches, self.masked, self.blocks, self.embed = patches, masked, blocks, embed

    @property
    def token_level(self) -> bool:
        return self.patches or self.masked or self.blocks > 0 or self.embed

    @property
    def batch_keys(self) -> tuple[str, ...]:
        keys = (GLOBAL_VIEWS, LOCAL_VIEWS) if self.views == "all" else (GLOBAL_VIEWS,)
        return (*keys, MASKS) if self.masked else keys

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        return int(batch[GLOBAL_VIEWS].shape[1])

    def rows(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(target [B], mask [B])``: every image is a row; labels, when the batch has them, are unused."""
        b = self.batch_size(batch)
        device = batch[GLOBAL_VIEWS].device
        target = batch.get(self.target_key)
        if target is None:
            target = torch.full((b,), -100, dtype=torch.long, device=device)
        return target, torch.ones(b, dtype=torch.bool, device=device)

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> ModelOutput:
        if self.token_level:
            return self._token_level(model, batch)
        views = list(batch[GLOBAL_VIEWS].unbind(0))
        if self.views == "all":
            views += list(batch[LOCAL_VIEWS].unbind(0))
        out = model(views)
        features = {SSL_OUT: out}
        if self.predict:
            features[SSL_PRED] = model.predict(out)
        return ModelOutput(logits=None, features=features)

    def _token_level(self, model: nn.Module, batch: Mapping[str, Tensor]) -> ModelOutput:
        masks = None
        if self.masked:
            masks = batch.get(MASKS)
            if masks is None:
                raise ValueError(
                    "the student's views have no masks; masked image modelling (ibot, data2vec) needs views.mask "
                    "set to random or block"
                )
        features = model.encode(batch[GLOBAL_VIEWS], masks, patches=self.patches, blocks=self.blocks)
        if masks is not None:
            features[SSL_MASK] = masks
        if not self.embed:
            features.pop(SSL_EMBED)
        out = features[SSL_OUT]
        local = batch.get(LOCAL_VIEWS)
        if self.views == "all" and local is not None and local.shape[0] > 0:
            out = features[SSL_OUT] = torch.cat([out, model(list(local.unbind(0)))])
        if self.predict:
            features[SSL_PRED] = model.predict(out)
        return ModelOutput(logits=None, features=features)


__all__ = [
    "GLOBAL_VIEWS",
    "LOCAL_VIEWS",
    "MASKS",
    "SSL_BLOCKS",
    "SSL_EMBED",
    "SSL_MASK",
    "SSL_OUT",
    "SSL_PATCH",
    "SSL_PRED",
    "CNNBackbone",
    "DINOHead",
    "MLPHead",
    "SSLAdapter",
    "SSLNetwork",
    "ViTBackbone",
    "ViTConfig",
]
