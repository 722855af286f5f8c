"""The token-level self-supervised terms (ibot, data2vec, koleo) against the functional maths, their
centres, and the ViT network's encode(): masks reach the tokens, patch and block outputs line up."""

import pytest
import torch

from distillery import functional as DF
from distillery.losses import LossInputs
from distillery.losses.self_supervised import Data2VecLoss, IBOTLoss, KoLeoLoss
from distillery.models.ssl import (
    MASKS,
    SSL_BLOCKS,
    SSL_EMBED,
    SSL_MASK,
    SSL_OUT,
    SSL_PATCH,
    CNNBackbone,
    DINOHead,
    SSLAdapter,
    SSLNetwork,
    ViTBackbone,
    ViTConfig,
)


def _inputs(student, teacher, b):
    return LossInputs(
        student_logits=None,
        target=torch.full((b,), -100),
        mask=torch.ones(b, dtype=torch.bool),
        student_features=student,
        teacher_features=teacher,
    )


def test_ibot_is_the_cls_term_plus_the_patch_term_with_two_centres():
    g = torch.Generator().manual_seed(0)
    g_views, b, p, k = 2, 5, 4, 8
    s_cls, t_cls = torch.randn(4, b, k, generator=g), torch.randn(g_views, b, k, generator=g)
    s_patch, t_patch = torch.randn(g_views, b, p, k, generator=g), torch.randn(g_views, b, p, k, generator=g)
    mask = torch.rand(g_views, b, p, generator=g) > 0.5
    term = IBOTLoss(teacher_temperature=0.05, teacher_patch_temperature=0.07, center_momentum=0.8,
                    patch_center_momentum=0.6, patch_weight=0.5, cls_weight=2.0)  # fmt: skip
    inputs = _inputs(
        {SSL_OUT: s_cls, SSL_PATCH: s_patch, SSL_MASK: mask}, {SSL_OUT: t_cls, SSL_PATCH: t_patch}, b
    )
    value = term(inputs)
    want = 2.0 * DF.dino_loss(
        s_cls, t_cls, torch.zeros(k), teacher_temperature=0.05
    ) + 0.5 * DF.ibot_patch_loss(s_patch, t_patch, mask, torch.zeros(k), teacher_temperature=0.07)
    torch.testing.assert_close(value, want)
    torch.testing.assert_close(term.center, 0.2 * t_cls.reshape(-1, k).mean(0))
    torch.testing.assert_close(term.patch_center, 0.4 * t_patch.reshape(-1, k).mean(0))
    # both centres are saved and restored (sized lazily on load)
    fresh = IBOTLoss()
    fresh.load_state_dict(term.state_dict())
    torch.testing.assert_close(fresh.patch_center, term.patch_center)
    torch.testing.assert_close(fresh.center, term.center)


def test_ibot_patch_temperature_warms_up_with_the_cls_one():
    term = IBOTLoss(teacher_temperature=0.04, teacher_temperature_start=0.02, teacher_temperature_warmup_epochs=2.0,
                    teacher_patch_temperature=0.06)  # fmt: skip
    assert term.patch_temperature_at(0.0) == pytest.approx(0.02)
    assert term.patch_temperature_at(1.0) == pytest.approx(0.04)
    assert term.patch_temperature_at(5.0) == pytest.approx(0.06)


def test_data2vec_term_regresses_the_normalised_block_average_at_masked_patches():
    g = torch.Generator().manual_seed(1)
    g_views, b, p, d, k = 2, 3, 4, 6, 3
    blocks = torch.randn(k, g_views, b, p, d, generator=g)
    pred = torch.randn(g_views, b, p, d, generator=g, requires_grad=True)
    mask = torch.rand(g_views, b, p, generator=g) > 0.4
    term = Data2VecLoss(top_k=2, beta=1.0)
    value = term(_inputs({SSL_PATCH: pred, SSL_MASK: mask}, {SSL_BLOCKS: blocks}, b))
    target = DF.data2vec_targets([x.flatten(0, 1) for x in blocks], 2)
    want = DF.data2vec_loss(pred.flatten(0, 1), target, mask.flatten(0, 1), beta=1.0)
    torch.testing.assert_close(value, want)
    value.backward()
    assert pred.grad is not None and torch.all(pred.grad[~mask] == 0)  # unmasked patches do not count


def test_koleo_term_averages_the_global_views():
    g = torch.Generator().manual_seed(2)
    embed = torch.randn(2, 7, 5, generator=g)
    value = KoLeoLoss()(_inputs({SSL_EMBED: embed}, {}, 7))
    torch.testing.assert_close(value, (DF.koleo_loss(embed[0]) + DF.koleo_loss(embed[1])) / 2)


@pytest.mark.parametrize(
    ("term", "features", "message"),
    [
        (IBOTLoss(), {SSL_OUT: torch.zeros(2, 1, 3)}, "patch outputs"),
        (Data2VecLoss(), {SSL_PATCH: torch.zeros(1, 1, 2, 3)}, "masks"),
        (KoLeoLoss(), {}, "embeddings"),
    ],
)
def test_terms_say_what_they_miss(term, features, message):
    with pytest.raises(ValueError, match=message):
        term(_inputs(features, {SSL_OUT: torch.zeros(2, 1, 3)}, 1))


def _vit(depth=2):
    torch.manual_seed(0)
    backbone = ViTBackbone(ViTConfig(patch_size=2, depth=depth, width=16, heads=2), image_size=8, channels=1)
    return SSLNetwork(backbone, DINOHead(16, 10, hidden_dim=16, bottleneck_dim=8))


def test_encode_gives_cls_patch_and_block_outputs_of_the_global_views():
    net = _vit(depth=3).eval()
    views = torch.rand(2, 4, 1, 8, 8)
    out = net.encode(views, patches=True, blocks=2)
    assert out[SSL_OUT].shape == (2, 4, 10) and out[SSL_EMBED].shape == (2, 4, 16)
    assert out[SSL_PATCH].shape == (2, 4, 16, 10) and out[SSL_BLOCKS].shape == (2, 2, 4, 16, 16)
    # the [CLS] outputs equal the plain forward's, view by view
    torch.testing.assert_close(out[SSL_OUT], net(list(views.unbind(0))))
    # the last block's output, layer-normalised, is the final patch tokens
    tokens = net.backbone(views.flatten(0, 1))
    final = net.backbone.vit.layernorm(out[SSL_BLOCKS][-1].flatten(0, 1))
    torch.testing.assert_close(final, tokens[:, 1:])


def test_masks_change_the_masked_inputs_only_through_the_mask_token():
    net = _vit().eval()
    views = torch.rand(1, 2, 1, 8, 8)
    none = torch.zeros(1, 2, 16, dtype=torch.bool)
    some = none.clone()
    some[0, 0, :5] = True  # image 0 has 5 masked patches, image 1 none
    a = net.encode(views, none, patches=True)[SSL_PATCH]
    b = net.encode(views, some, patches=True)[SSL_PATCH]
    assert not torch.allclose(a[0, 0], b[0, 0])
    torch.testing.assert_close(a[0, 1], b[0, 1])  # another image in the batch is untouched
    # the masked image no longer depends on its masked pixels
    other = views.clone()
    other[0, 0, :, 0:2, 0:8] = 0.0  # the first row of patches (patches 0-3, all masked)
    c = net.encode(other, some, patches=True)[SSL_PATCH]
    torch.testing.assert_close(b[0, 0], c[0, 0])


def test_the_adapters_pass_masks_to_the_student_and_not_the_teacher():
    net = _vit()
    batch = {
        "global_views": torch.rand(2, 3, 1, 8, 8),
        "local_views": torch.rand(2, 3, 1, 4, 4),
        MASKS: torch.rand(2, 3, 16) > 0.5,
    }
    student = SSLAdapter("all", patches=True, masked=True, embed=True)
    assert MASKS in student.batch_keys
    s = student.forward(net, batch).features
    assert s[SSL_OUT].shape == (4, 3, 10) and torch.equal(s[SSL_MASK], batch[MASKS])
    assert s[SSL_EMBED].shape == (2, 3, 16)
    t = SSLAdapter("global", patches=True).forward(net, batch).features
    assert SSL_MASK not in t and t[SSL_OUT].shape == (2, 3, 10) and SSL_EMBED not in t
    missing = {k: v for k, v in batch.items() if k != MASKS}
    with pytest.raises(ValueError, match="views.mask"):
        student.forward(net, missing)


def test_a_cnn_backbone_gives_embeddings_but_no_patches():
    net = SSLNetwork(CNNBackbone([4, 8], 1), DINOHead(8, 10, hidden_dim=8, bottleneck_dim=4))
    out = net.encode(torch.rand(2, 3, 1, 8, 8))
    assert out[SSL_EMBED].shape == (2, 3, 8) and out[SSL_OUT].shape == (2, 3, 10)
    with pytest.raises(ValueError, match="ViT backbone"):
        net.encode(torch.rand(2, 3, 1, 8, 8), patches=True)
