"""Batched strong augmentation and CutMix (engine/augment.py)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.augment import (
    StrongAugConfig,
    StrongAugParams,
    apply_cutmix,
    apply_strong,
    cutmix_box,
    draw_strong_params,
    gaussian_blur,
    gaussian_kernels,
    strong_augment,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b=4, k=3, h=32, w=32, seed=0) -> torch.Tensor:
    return torch.rand((b, k, h, w), generator=gen(seed)) * 2 - 1


def identity_params(b: int, **kw) -> StrongAugParams:
    base = dict(brightness=torch.zeros(b), contrast=torch.ones(b), gamma=torch.ones(b),
                jitter=torch.zeros(b, dtype=torch.bool), sigma=torch.zeros(b), blur_radius=0, noise=None)
    base.update(kw)
    return StrongAugParams(**base)


# ---------------------------------------------------------------------------------------------- CutMix


def test_cutmix_hand_made_box_copies_exactly_and_allocates():
    dst_img = torch.zeros(2, 3, 4, 4)
    src_img = torch.arange(2 * 3 * 16, dtype=torch.float32).view(2, 3, 4, 4)
    dst_p = torch.zeros(2, 4, 4, dtype=torch.long)
    src_p = torch.full((2, 4, 4), 3, dtype=torch.long)
    dst_c = torch.full((2, 4, 4), 0.1)
    src_c = torch.full((2, 4, 4), 0.9)
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    box[0, 1:3, 0:2] = True                    # sample 1 gets no box
    copies = [t.clone() for t in (dst_img, src_img, dst_p, src_p, dst_c, src_c, box)]

    img, p, c = apply_cutmix(dst_img, src_img, dst_p, src_p, dst_c, src_c, box)

    expected_img = torch.zeros(2, 3, 4, 4)
    expected_img[0, :, 1:3, 0:2] = src_img[0, :, 1:3, 0:2]
    assert torch.equal(img, expected_img)
    assert p[0].tolist() == [[0, 0, 0, 0], [3, 3, 0, 0], [3, 3, 0, 0], [0, 0, 0, 0]]
    assert torch.equal(p[1], dst_p[1])
    assert c[0, 1, 1].item() == pytest.approx(0.9) and c[0, 0, 0].item() == pytest.approx(0.1)
    # inputs untouched, outputs own their memory (REFERENCE defect 3)
    for before, after in zip(copies, (dst_img, src_img, dst_p, src_p, dst_c, src_c, box)):
        assert torch.equal(before, after)
    for out, inp in ((img, dst_img), (img, src_img), (p, dst_p), (p, src_p), (c, dst_c), (c, src_c)):
        assert out.data_ptr() != inp.data_ptr()
    p[0, 0, 0] = 7
    c[1] = 0.0
    assert dst_p[0, 0, 0].item() == 0 and torch.all(dst_c[1] == 0.1)


def test_cutmix_random_boxes_inside_and_outside():
    b, k, h, w = 6, 3, 32, 48
    box = cutmix_box(b, h, w, gen(1), p=1.0)
    dst, src = images(b, k, h, w, seed=2), images(b, k, h, w, seed=3)
    dst_p = torch.randint(0, 4, (b, h, w), generator=gen(4))
    src_p = torch.randint(0, 4, (b, h, w), generator=gen(5))
    dst_c, src_c = torch.rand(b, h, w, generator=gen(6)), torch.rand(b, h, w, generator=gen(7))
    img, p, c = apply_cutmix(dst, src, dst_p, src_p, dst_c, src_c, box)
    inside = box[:, None].expand_as(dst)
    assert torch.equal(img[inside], src[inside]) and torch.equal(img[~inside], dst[~inside])
    assert torch.equal(p[box], src_p[box]) and torch.equal(p[~box], dst_p[~box])
    assert torch.equal(c[box], src_c[box]) and torch.equal(c[~box], dst_c[~box])


def test_cutmix_shape_errors():
    z = torch.zeros(2, 3, 8, 8)
    lab = torch.zeros(2, 8, 8, dtype=torch.long)
    conf = torch.zeros(2, 8, 8)
    with pytest.raises(ValueError, match="bool"):
        apply_cutmix(z, z, lab, lab, conf, conf, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="pseudo"):
        apply_cutmix(z, z, lab[:, :4], lab, conf, conf, torch.zeros(2, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize("h,w", [(64, 64), (32, 96), (128, 128), (16, 16)])
def test_cutmix_box_area_and_shape(h, w):
    n = 1500
    boxes = cutmix_box(n, h, w, gen(h + w), p=1.0, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3))
    assert boxes.shape == (n, h, w) and boxes.dtype == torch.bool
    area = boxes.sum(dim=(1, 2)).double()
    frac = area / (h * w)
    assert bool((frac >= 0.02).all()) and bool((frac <= 0.4).all())
    rows = boxes.any(dim=2).sum(dim=1).double()
    cols = boxes.any(dim=1).sum(dim=1).double()
    assert torch.equal(rows * cols, area)                    # one solid rectangle
    # the areas spread over the whole range
    assert frac.min().item() < 0.05 and frac.max().item() > 0.35
    if h == w and h >= 64:
        # within the ratio range up to rounding each side to a whole pixel
        assert bool(((cols + 0.5) / (rows - 0.5) >= 0.3).all())
        assert bool(((cols - 0.5) / (rows + 0.5) <= 1 / 0.3).all())


def test_cutmix_box_probability_and_determinism():
    boxes = cutmix_box(2000, 32, 32, gen(0), p=0.5)
    hit = boxes.any(dim=(1, 2)).double().mean().item()
    assert abs(hit - 0.5) < 0.05
    assert not cutmix_box(50, 32, 32, gen(0), p=0.0).any()
    assert torch.equal(cutmix_box(8, 32, 32, gen(9)), cutmix_box(8, 32, 32, gen(9)))
    with pytest.raises(ValueError):
        cutmix_box(2, 8, 8, gen(0), p=1.5)
    with pytest.raises(ValueError):
        cutmix_box(2, 8, 8, gen(0), area=(0.5, 0.1))


# ---------------------------------------------------------------------------------------------- strong


def test_strong_augment_deterministic_shape_dtype_finite():
    x = images()
    before = x.clone()
    a = strong_augment(x, gen(5))
    b = strong_augment(x, gen(5))
    c = strong_augment(x, gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and bool(torch.isfinite(a).all())
    assert torch.equal(x, before)
    x64 = x.double()
    assert strong_augment(x64, gen(5)).dtype == torch.float64


def test_strong_augment_changes_most_samples():
    x = images(b=32, seed=1)
    y = strong_augment(x, gen(0))
    changed = (y - x).abs().flatten(1).amax(dim=1) > 1e-6
    # P(a sample is untouched) = 0.2 * 0.5 * 0.8 = 0.08 with the defaults
    assert changed.float().mean().item() > 0.7


def test_same_parameters_for_all_slices():
    one = images(b=6, k=1, seed=3)
    x = one.expand(6, 3, 32, 32).contiguous()                  # every sample: three identical slices
    cfg = StrongAugConfig(p_jitter=1.0, p_blur=1.0, p_noise=0.0)
    y = strong_augment(x, gen(11), cfg)
    assert not torch.allclose(y, x)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])
    # and the stack result equals augmenting the single slice with the same draw
    y1 = strong_augment(one, gen(11), cfg)
    torch.testing.assert_close(y[:, :1], y1, atol=1e-6, rtol=0)


def test_apply_strong_hand_computed_intensity():
    # one sample, values 0 and 0.5 -> mean 0.25
    x = torch.tensor([0.0, 0.5]).view(1, 1, 1, 2).repeat(2, 2, 1, 1)
    params = identity_params(
        2, jitter=torch.tensor([True, False]), contrast=torch.tensor([2.0, 2.0]),
        brightness=torch.tensor([0.1, 0.1]), gamma=torch.tensor([2.0, 2.0]))
    y = apply_strong(x, params)
    # contrast/brightness: (x - 0.25) * 2 + 0.25 + 0.1 -> [-0.15, 0.85]; gamma 2 on (v + 1) / 2
    expected = [2 * ((-0.15 + 1) / 2) ** 2 - 1, 2 * ((0.85 + 1) / 2) ** 2 - 1]
    torch.testing.assert_close(y[0, :, 0], torch.tensor([expected, expected]))
    assert torch.equal(y[1], x[1])                             # jitter off: untouched
    # saturation at the window edge keeps gamma defined
    big = identity_params(1, jitter=torch.tensor([True]), brightness=torch.tensor([5.0]),
                          gamma=torch.tensor([0.5]))
    assert torch.all(apply_strong(torch.zeros(1, 1, 2, 2), big) == 1.0)


def test_apply_strong_noise_is_added():
    x = torch.zeros(1, 2, 4, 4)
    noise = torch.full((1, 2, 4, 4), 0.03)
    assert torch.allclose(apply_strong(x, identity_params(1, noise=noise)), noise)


def test_draw_is_independent_of_which_transforms_fire():
    # identical generator states give identical parameters for every config with the same shapes
    p1 = draw_strong_params((4, 3, 16, 16), gen(3), StrongAugConfig(p_jitter=0.0))
    p2 = draw_strong_params((4, 3, 16, 16), gen(3), StrongAugConfig(p_jitter=1.0))
    assert torch.equal(p1.sigma, p2.sigma) and torch.equal(p1.noise, p2.noise)
    assert not p1.jitter.any() and p2.jitter.all()
    assert bool((p2.contrast >= 0.5).all()) and bool((p2.contrast <= 1.5).all())
    assert bool((p2.gamma >= 0.7 - 1e-6).all()) and bool((p2.gamma <= 1.5 + 1e-6).all())
    assert bool((p2.brightness.abs() <= 0.3 + 1e-6).all())


def test_gaussian_kernels_and_blur():
    k = gaussian_kernels(torch.tensor([0.0, 1.0, 2.0]), radius=6)
    torch.testing.assert_close(k.sum(dim=1), torch.ones(3))
    assert k[0].tolist() == [0.0] * 6 + [1.0] + [0.0] * 6
    t = torch.arange(-6, 7, dtype=torch.float32)
    assert (k[1] * t ** 2).sum().item() == pytest.approx(1.0, abs=1e-3)   # variance = sigma^2
    assert (k[2] * t ** 2).sum().item() == pytest.approx(4.0, abs=0.05)   # slightly truncated at 3 sigma

    x = torch.zeros(3, 2, 21, 21)
    x[:, :, 10, 10] = 1.0
    y = gaussian_blur(x, torch.tensor([0.0, 1.0, 1.5]), radius=6)
    assert torch.equal(y[0], x[0])                                        # sigma 0: unchanged
    torch.testing.assert_close(y[1, 0], torch.outer(k[1], k[1]).new_zeros(21, 21).index_put_(
        (torch.arange(4, 17)[:, None], torch.arange(4, 17)[None]), torch.outer(k[1], k[1])))
    assert torch.equal(y[:, 0], y[:, 1])                                  # same kernel for every slice
    torch.testing.assert_close(y.sum(dim=(2, 3)), torch.ones(3, 2))       # mass kept away from borders
    flat = torch.full((2, 1, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([2.0, 0.5]), 6), flat)  # reflect borders


def test_config_validation():
    with pytest.raises(ValueError, match="p_blur"):
        StrongAugConfig(p_blur=1.5)
    with pytest.raises(ValueError, match="contrast"):
        StrongAugConfig(contrast=1.0)
    with pytest.raises(ValueError, match="gamma"):
        StrongAugConfig(gamma=(0.0, 1.0))
    with pytest.raises(ValueError, match="blur_sigma"):
        StrongAugConfig(blur_sigma=(2.0, 1.0))
    StrongAugConfig(noise_std=(0.0, 0.0), p_noise=1.0)
    with pytest.raises(ValueError, match="floating"):
        apply_strong(torch.zeros(1, 1, 4, 4, dtype=torch.long), identity_params(1))
    assert math.isfinite(StrongAugConfig().brightness)
