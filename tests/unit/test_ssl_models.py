"""Backbones and heads of self-supervised distillation."""

import pytest
import torch

from distillery.errors import ConfigError
from distillery.models.ssl import CNNBackbone, DINOHead, MLPHead, ViTBackbone, ViTConfig


def _vit(**kw):
    torch.manual_seed(0)
    return ViTBackbone(ViTConfig(patch_size=4, depth=2, width=32, heads=4, **kw), image_size=16, channels=1)


def test_vit_tokens_crops_and_masks():
    vit = _vit().eval()
    x = torch.rand(3, 1, 16, 16)
    tokens = vit(x)
    assert tokens.shape == (3, 1 + 16, 32) and vit.embed(x).shape == (3, 32)
    assert vit(torch.rand(3, 1, 8, 8)).shape == (3, 1 + 4, 32)  # a local crop: interpolated positions
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :5] = True
    masked = vit(x, mask=mask)
    assert not torch.allclose(masked[0], tokens[0])  # the mask token replaced five patches
    torch.testing.assert_close(masked[1:], tokens[1:])  # unmasked images are unchanged
    # the masked input is the mask token whatever the pixels were: changing masked pixels changes nothing
    x2 = x.clone()
    x2[0, :, :4, :] = 0.0  # patches 0-3 (first patch row) are all masked
    torch.testing.assert_close(vit(x2, mask=mask)[0], masked[0])
    last, hidden = vit(x, output_hidden_states=True)
    assert len(hidden) == 3 and hidden[-1].shape == last.shape == (3, 17, 32)  # embeddings + 2 blocks


def test_vit_saves_and_loads_with_save_pretrained(tmp_path):
    from transformers import ViTModel

    vit = _vit().eval()
    vit.vit.save_pretrained(tmp_path / "vit")
    loaded = ViTModel.from_pretrained(tmp_path / "vit", add_pooling_layer=False, use_mask_token=True).eval()
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded(pixel_values=x).last_hidden_state, vit(x))


def test_vit_config_errors():
    with pytest.raises(ConfigError, match="patch_size=5 does not divide the image side 16"):
        ViTBackbone(ViTConfig(patch_size=5), image_size=16, channels=1)
    with pytest.raises(ConfigError, match="heads=3 does not divide model.width=32"):
        ViTBackbone(ViTConfig(width=32, heads=3), image_size=16, channels=1)


def test_cnn_backbone_embeds():
    cnn = CNNBackbone([8, 16], in_channels=1)
    assert cnn.embed(torch.rand(4, 1, 16, 16)).shape == (4, 16) and cnn.embed_dim == 16


def test_dino_head_normalised_last_layer():
    torch.manual_seed(0)
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(5, 32)
    out = head(x)
    assert out.shape == (5, 100)
    w = head.last_layer.weight  # the weight-normalised weight: each prototype has norm g = 1
    torch.testing.assert_close(w.norm(dim=1), torch.ones(100))
    # outputs are inner products of unit vectors: bounded by 1 in absolute value
    assert float(out.detach().abs().max()) <= 1.0 + 1e-5
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and head.last_layer_parameters() == [
        head.last_layer.parametrizations.weight.original1
    ]
    trainable = DINOHead(32, 10, norm_last_layer=False)
    assert trainable.last_layer.parametrizations.weight.original0.requires_grad


def test_dino_head_one_layer_and_mlp_head():
    assert DINOHead(8, 4, layers=1, bottleneck_dim=6)(torch.randn(2, 8)).shape == (2, 4)
    assert MLPHead(8, 5, hidden_dim=12)(torch.randn(3, 8)).shape == (3, 5)


def test_cnn_backbone_with_batch_norm_and_the_network_groups_views_by_size():
    from distillery.models.ssl import SSLAdapter, SSLNetwork

    torch.manual_seed(0)
    net = SSLNetwork(CNNBackbone([8, 16], in_channels=1, batch_norm=True), DINOHead(16, 10, 16, 8)).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    g1, g2, l1 = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8), torch.rand(3, 1, 4, 4)
    out = net([g1, g2, l1])
    assert out.shape == (3, 3, 10)
    torch.testing.assert_close(out[2], net([l1])[0])  # each view's output is its own
    torch.testing.assert_close(out[0], net([g1])[0])
    batch = {"global_views": torch.stack([g1, g2]), "local_views": l1[None]}
    assert SSLAdapter("all").forward(net, batch).features["ssl.out"].shape == (3, 3, 10)
    assert SSLAdapter("global").forward(net, batch).features["ssl.out"].shape == (2, 3, 10)
    target, mask = SSLAdapter().rows(batch)
    assert target.tolist() == [-100] * 3 and mask.all()
