"""Views for self-supervised distillation: reproducible from (seed, sample id, step), shapes, masks,
the identity configuration, and the config's errors."""

import pytest
import torch
from pydantic import ValidationError

from distillery.data.views import ViewsConfig, make_views, sample_seed
from distillery.errors import ConfigError

IDENTITY = dict(global_crops=1, global_scale=(1.0, 1.0), hflip=0.0, jitter=0.0, blur=[0.0], solarize=[0.0])


def _images(n=6, side=16, seed=0):
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed))


def test_shapes_of_the_multi_crop():
    cfg = ViewsConfig(global_crops=2, local_crops=3, local_size=8)
    v = make_views(_images(), torch.arange(6), step=0, seed=0, cfg=cfg)
    assert v.global_views.shape == (2, 6, 1, 16, 16)
    assert v.local_views.shape == (3, 6, 1, 8, 8)
    assert len(v.all_views()) == 5 and v.masks is None
    assert float(v.global_views.min()) >= 0 and float(v.global_views.max()) <= 1


def test_views_depend_only_on_seed_sample_and_step():
    cfg = ViewsConfig(global_crops=2, local_crops=2, local_size=8, mask="block", patch_size=4)
    x, ids = _images(), torch.tensor([10, 11, 12, 13, 14, 15])
    a = make_views(x, ids, step=7, seed=3, cfg=cfg)
    b = make_views(x, ids, step=7, seed=3, cfg=cfg)
    torch.testing.assert_close(a.global_views, b.global_views, rtol=0, atol=0)
    torch.testing.assert_close(a.local_views, b.local_views, rtol=0, atol=0)
    assert torch.equal(a.masks, b.masks)
    # another batch composition (reversed, and only part of it): each sample's views are unchanged
    perm = torch.tensor([5, 3, 1])
    c = make_views(x[perm], ids[perm], step=7, seed=3, cfg=cfg)
    torch.testing.assert_close(c.global_views, a.global_views[:, perm], rtol=0, atol=1e-6)
    torch.testing.assert_close(c.local_views, a.local_views[:, perm], rtol=0, atol=1e-6)
    assert torch.equal(c.masks, a.masks[:, perm])
    # another step, seed or sample id: other views
    d = make_views(x, ids, step=8, seed=3, cfg=cfg)
    e = make_views(x, ids, step=7, seed=4, cfg=cfg)
    f = make_views(x, ids + 100, step=7, seed=3, cfg=cfg)
    for other in (d, e, f):
        assert not torch.allclose(other.global_views, a.global_views)


def test_the_identity_configuration_returns_the_image():
    x = _images()
    v = make_views(x, torch.arange(6), step=0, seed=0, cfg=ViewsConfig(**IDENTITY))
    torch.testing.assert_close(v.global_views[0], x, rtol=0, atol=1e-5)


def test_flips_jitter_blur_and_solarise_each_change_the_view():
    x = _images()
    base = make_views(x, torch.arange(6), 0, 0, ViewsConfig(**IDENTITY)).global_views[0]
    for change in ({"hflip": 1.0}, {"jitter": 1.0}, {"blur": [1.0]}, {"solarize": [1.0]}):
        v = make_views(x, torch.arange(6), 0, 0, ViewsConfig(**{**IDENTITY, **change})).global_views[0]
        assert not torch.allclose(v, base, atol=1e-4), change
    flipped = make_views(x, torch.arange(6), 0, 0, ViewsConfig(**{**IDENTITY, "hflip": 1.0})).global_views[0]
    torch.testing.assert_close(flipped, x.flip(-1), rtol=0, atol=1e-5)
    solar = make_views(x, torch.arange(6), 0, 0, ViewsConfig(**{**IDENTITY, "solarize": [1.0]})).global_views[
        0
    ]
    torch.testing.assert_close(solar, torch.where(x >= 0.5, 1 - x, x), rtol=0, atol=1e-5)


def test_crops_cover_the_asked_area():
    """A crop of area fraction a, resized to the full side: a constant image stays constant, and a
    crop of scale (0.25, 0.25) of an image whose left half is 1 is a mix."""
    x = torch.zeros(64, 1, 16, 16)
    x[..., :8] = 1.0
    cfg = ViewsConfig(
        global_crops=1, global_scale=(0.1, 0.3), hflip=0.0, jitter=0.0, blur=[0.0], solarize=[0.0]
    )
    v = make_views(x, torch.arange(64), 0, 0, cfg).global_views[0]
    means = v.mean(dim=(1, 2, 3))
    assert (means < 0.01).any() and (means > 0.99).any()  # some crops fall in one half
    assert ((means > 0.05) & (means < 0.95)).any()  # some straddle the edge


@pytest.mark.parametrize("kind", ["random", "block"])
@pytest.mark.parametrize("ratio", [(0.1, 0.1), (0.3, 0.3), (0.1, 0.5)])
def test_masks_have_the_drawn_ratio(kind, ratio):
    cfg = ViewsConfig(global_crops=2, mask=kind, mask_ratio=ratio, mask_probability=1.0, patch_size=2)
    v = make_views(_images(n=20), torch.arange(20), 0, 0, cfg)
    assert v.masks.shape == (2, 20, 64)
    frac = v.masks.float().mean(-1)
    assert float(frac.min()) >= round(ratio[0] * 64) / 64 - 1e-6
    assert float(frac.max()) <= round(ratio[1] * 64) / 64 + 1e-6


def test_mask_probability_leaves_some_views_unmasked():
    cfg = ViewsConfig(
        global_crops=2, mask="random", mask_ratio=(0.3, 0.3), mask_probability=0.5, patch_size=4
    )
    v = make_views(_images(n=40), torch.arange(40), 0, 0, cfg)
    masked = v.masks.any(-1)
    assert 0 < float(masked.float().mean()) < 1


def test_block_masks_are_more_contiguous_than_random_ones():
    def neighbours(m):  # masked patches with a masked right or lower neighbour
        grid = m.view(-1, 8, 8)
        right = grid[:, :, :-1] & grid[:, :, 1:]
        down = grid[:, :-1, :] & grid[:, 1:, :]
        return (right.sum() + down.sum()).item()

    common = dict(global_crops=1, mask_ratio=(0.4, 0.4), mask_probability=1.0, patch_size=2)
    rand = make_views(_images(n=30), torch.arange(30), 0, 0, ViewsConfig(mask="random", **common)).masks
    block = make_views(_images(n=30), torch.arange(30), 0, 0, ViewsConfig(mask="block", **common)).masks
    assert rand.sum() == block.sum()
    assert neighbours(block) > 1.5 * neighbours(rand)


def test_sample_seeds_differ():
    seeds = {sample_seed(s, i, t) for s in range(3) for i in range(50) for t in range(20)}
    assert len(seeds) == 3 * 50 * 20


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"local_crops": 4, "global_crops": 0}, "global_crops"),
        ({"mask_ratio": (0.2, 1.0)}, "mask_ratio"),
        ({"mask_ratio": (-0.1, 0.5)}, "mask_ratio"),
        ({"global_scale": (0.5, 1.2)}, "global_scale"),
        ({"blur": []}, "blur"),
    ],
)
def test_bad_configs_name_the_field(fields, match):
    with pytest.raises(ValidationError, match=match):
        ViewsConfig(**fields)


def test_crops_larger_than_the_image_and_patch_sizes_that_do_not_divide():
    with pytest.raises(ConfigError, match=r"global_size=32 is larger than the 16x16 images"):
        ViewsConfig(global_size=32).check(16, 16)
    with pytest.raises(ConfigError, match=r"patch_size=5 does not divide the global crop side 16.*e\.g\. 4"):
        ViewsConfig(mask="block", patch_size=5).check(16, 16)
    ViewsConfig(mask="none", patch_size=5).check(16, 16)  # no mask: the patch size does not matter here
