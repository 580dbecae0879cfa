"""Batched strong augmentation and CutMix for the semi-supervised step, on the training device, in float.

The original ran its strong augmentation per slice through 8-bit PIL images on the CPU, which is slow and
quantises the HU window to 256 levels (REFERENCE defect 5). Here every transform works on a whole batch
``(B, k, H, W)`` of windowed images in ``[-1, 1]``, with per-sample parameters drawn as tensors.

Each random transform is split into a *draw* (:func:`draw_strong_params`, :func:`cutmix_box`: random numbers
from an explicit ``torch.Generator``) and a deterministic *apply* (:func:`apply_strong`,
:func:`apply_cutmix`), so either half can be tested alone. All ``k`` slices of a sample share its intensity
and blur parameters: they are one 2.5D stack, and a slice-wise change would be a fake inter-slice signal.

Random numbers are drawn on the generator's device and moved to the images' device; pass a generator that
lives on the training device to keep the noise field off the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class StrongAugConfig:
    """Strengths and probabilities of the strong (intensity) augmentation.

    Brightness, contrast and gamma are applied together with probability ``p_jitter``, like the original's
    ``RandomApply(ColorJitter, p=0.8)``; blur and noise each have their own probability. Intensities are in
    the windowed ``[-1, 1]`` units of the network input.

    Attributes:
        p_jitter: probability of the brightness/contrast/gamma block.
        brightness: additive offset drawn from ``U(-brightness, brightness)``.
        contrast: factor drawn from ``U(1 - contrast, 1 + contrast)``, applied around the sample's mean.
        gamma: exponent range (log-uniform) applied to the image rescaled to ``[0, 1]``.
        p_blur: probability of a Gaussian blur.
        blur_sigma: blur sigma range in pixels (uniform).
        p_noise: probability of additive Gaussian noise.
        noise_std: noise standard deviation range (uniform).
    """

    p_jitter: float = 0.8
    brightness: float = 0.3
    contrast: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    p_noise: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.05)

    def __post_init__(self) -> None:
        for name in ("p_jitter", "p_blur", "p_noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"StrongAugConfig.{name} must be in [0, 1], got {value}")
        if self.brightness < 0:
            raise ValueError(f"StrongAugConfig.brightness must be >= 0, got {self.brightness}")
        if not 0.0 <= self.contrast < 1.0:
            raise ValueError(f"StrongAugConfig.contrast must be in [0, 1), got {self.contrast}")
        for name, allow_zero in (("gamma", False), ("blur_sigma", False), ("noise_std", True)):
            lo, hi = getattr(self, name)
            if not (lo >= 0.0 if allow_zero else lo > 0.0) or hi < lo:
                raise ValueError(f"StrongAugConfig.{name} must be a non-decreasing range of "
                                 f"{'non-negative' if allow_zero else 'positive'} values, got {(lo, hi)}")


@dataclass
class StrongAugParams:
    """Per-sample parameters of one strong augmentation (identity values where a transform is off).

    Attributes:
        brightness: ``(B,)`` additive offset.
        contrast: ``(B,)`` multiplicative factor around the sample mean.
        gamma: ``(B,)`` exponent on the ``[0, 1]``-rescaled image.
        jitter: ``(B,)`` bool, whether the brightness/contrast/gamma block applies.
        sigma: ``(B,)`` blur sigma in pixels, 0 = no blur.
        blur_radius: half-width of the blur kernels (shared by the batch).
        noise: ``(B, k, H, W)`` additive noise, already scaled (zeros where off), or None.
    """

    brightness: Tensor
    contrast: Tensor
    gamma: Tensor
    jitter: Tensor
    sigma: Tensor
    blur_radius: int
    noise: Tensor | None


def _uniform(u: Tensor, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * u


def draw_strong_params(shape: tuple[int, int, int, int], generator: torch.Generator,
                       cfg: StrongAugConfig | None = None,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> StrongAugParams:
    """Draw per-sample strong-augmentation parameters.

    The number of random values drawn depends only on ``shape`` and ``cfg`` (never on which transforms
    fire), so a generator in a given state always yields the same parameters.

    Args:
        shape: image batch shape ``(B, k, H, W)``.
        generator: source of randomness.
        cfg: augmentation settings (defaults when None).
        device: where the parameters go (the generator's device when None).
        dtype: floating dtype of the parameters.

    Returns:
        the parameters, on ``device``.
    """
    cfg = cfg or StrongAugConfig()
    b = shape[0]
    gdev = generator.device
    device = torch.device(device) if device is not None else gdev
    u = torch.rand((b, 8), generator=generator, device=gdev, dtype=torch.float64)
    jitter = u[:, 0] < cfg.p_jitter
    brightness = torch.where(jitter, _uniform(u[:, 1], -cfg.brightness, cfg.brightness), 0.0)
    contrast = torch.where(jitter, _uniform(u[:, 2], 1.0 - cfg.contrast, 1.0 + cfg.contrast), 1.0)
    log_gamma = _uniform(u[:, 3], math.log(cfg.gamma[0]), math.log(cfg.gamma[1]))
    gamma = torch.where(jitter, log_gamma.exp(), 1.0)
    sigma = torch.where(u[:, 4] < cfg.p_blur, _uniform(u[:, 5], *cfg.blur_sigma), 0.0)
    noise = None
    if cfg.p_noise > 0 and cfg.noise_std[1] > 0:
        std = torch.where(u[:, 6] < cfg.p_noise, _uniform(u[:, 7], *cfg.noise_std), 0.0)
        field = torch.randn(shape, generator=generator, device=gdev, dtype=dtype)
        noise = (field * std.to(dtype)[:, None, None, None]).to(device)
    radius = math.ceil(3.0 * cfg.blur_sigma[1]) if cfg.p_blur > 0 else 0

    def put(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype)

    return StrongAugParams(brightness=put(brightness), contrast=put(contrast), gamma=put(gamma),
                           jitter=jitter.to(device), sigma=put(sigma), blur_radius=radius, noise=noise)


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Normalised 1D Gaussian kernels, one per sigma; sigma 0 gives the identity (a delta).

    Args:
        sigma: ``(N,)`` standard deviations in pixels.
        radius: half-width; kernels have ``2 * radius + 1`` taps.

    Returns:
        ``(N, 2 * radius + 1)`` kernels summing to 1.
    """
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    off = sigma <= 0
    # Off samples get a placeholder sigma so the division stays finite; they are replaced by a delta.
    s = torch.where(off, torch.ones_like(sigma), sigma)
    kern = torch.exp(-0.5 * (t[None, :] / s[:, None]) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)
    delta = (t == 0).to(sigma.dtype).expand_as(kern)
    return torch.where(off[:, None], delta, kern)


def gaussian_blur(images: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with one sigma per sample, shared by its slices (grouped convolution).

    Args:
        images: ``(B, k, H, W)`` floating images.
        sigma: ``(B,)`` sigmas in pixels (0 = unchanged).
        radius: kernel half-width (at least ``3 * max(sigma)`` for an accurate Gaussian).

    Returns:
        blurred images, same shape and dtype; borders are reflected.
    """
    if radius <= 0:
        return images.clone()
    b, k, h, w = images.shape
    kern = gaussian_kernels(sigma.to(images.dtype), radius)        # (B, K)
    kern = kern.repeat_interleave(k, dim=0)                        # (B*k, K): same kernel for all slices
    size = 2 * radius + 1
    x = images.reshape(1, b * k, h, w)
    mode_w = "reflect" if radius < w else "replicate"
    mode_h = "reflect" if radius < h else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode_w), kern.view(b * k, 1, 1, size), groups=b * k)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode_h), kern.view(b * k, 1, size, 1), groups=b * k)
    return x.reshape(b, k, h, w)


def apply_strong(images: Tensor, params: StrongAugParams) -> Tensor:
    """Apply drawn strong-augmentation parameters (deterministic).

    Order: contrast around the sample mean and additive brightness, saturation to ``[-1, 1]`` (the HU window,
    as 8-bit jitter saturates at 0/255; it also keeps gamma defined), gamma on ``(x + 1) / 2``, then blur,
    then noise (not saturated: it stands in for acquisition noise).

    Args:
        images: ``(B, k, H, W)`` floating images in ``[-1, 1]``.
        params: from :func:`draw_strong_params` for this shape.

    Returns:
        a new tensor, same shape/dtype/device; ``images`` is not modified.

    Raises:
        ValueError: on a non-floating or non-4D input.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"strong augmentation needs a floating (B, k, H, W) tensor, got "
                         f"{tuple(images.shape)} {images.dtype}")
    dt = images.dtype

    def col(t: Tensor) -> Tensor:
        return t.to(device=images.device, dtype=dt)[:, None, None, None]

    x = images
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    jit = (x - mean) * col(params.contrast) + mean + col(params.brightness)
    jit01 = ((jit.clamp(-1.0, 1.0) + 1.0) * 0.5).pow(col(params.gamma))
    x = torch.where(params.jitter.to(images.device)[:, None, None, None], jit01 * 2.0 - 1.0, x)
    x = gaussian_blur(x, params.sigma.to(images.device), params.blur_radius)
    if params.noise is not None:
        x = x + params.noise.to(device=images.device, dtype=dt)
    return x


def strong_augment(images: Tensor, generator: torch.Generator, cfg: StrongAugConfig | None = None) -> Tensor:
    """Strong intensity augmentation of a batch of 2.5D stacks (draw, then apply).

    Args:
        images: ``(B, k, H, W)`` floating images in ``[-1, 1]``, on the training device.
        generator: source of randomness (ideally on the images' device).
        cfg: augmentation settings (defaults when None).

    Returns:
        augmented images, a new tensor of the same shape/dtype/device.
    """
    params = draw_strong_params(tuple(images.shape), generator, cfg, device=images.device, dtype=images.dtype)
    return apply_strong(images, params)


def cutmix_box(batch: int, height: int, width: int, generator: torch.Generator, p: float = 0.5,
               area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3),
               device: torch.device | str | None = None) -> Tensor:
    """Draw one CutMix rectangle per sample (UniMatch's box, vectorised; no rejection loop).

    The area fraction is uniform in ``area``; the aspect ratio ``w / h`` is log-uniform in ``ratio``,
    restricted to the ratios for which a box of that area fits in the image. Side lengths are rounded to
    pixels (so small boxes deviate slightly from ``ratio``) and then kept inside the ``area`` bounds.

    Args:
        batch, height, width: output size.
        generator: source of randomness.
        p: probability that a sample gets a box at all.
        area: box area as a fraction of ``height * width``.
        ratio: range of the aspect ratio ``w / h``.
        device: output device (the generator's when None).

    Returns:
        ``(B, H, W)`` bool, True inside the box.

    Raises:
        ValueError: on an invalid probability or range.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cutmix probability must be in [0, 1], got {p}")
    if not 0.0 < area[0] <= area[1] <= 1.0:
        raise ValueError(f"cutmix area must satisfy 0 < lo <= hi <= 1, got {area}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"cutmix ratio must satisfy 0 < lo <= hi, got {ratio}")
    gdev = generator.device
    device = torch.device(device) if device is not None else gdev
    hh, ww = float(height), float(width)
    n = hh * ww
    u = torch.rand((batch, 5), generator=generator, device=gdev, dtype=torch.float64)
    on = u[:, 0] < p
    s = _uniform(u[:, 1], area[0], area[1])
    # h = sqrt(s n / r) <= H and w = sqrt(s n r) <= W  <=>  s W / H <= r <= W / (s H).
    feas_lo, feas_hi = (s * ww / hh).log(), (ww / (s * hh)).log()
    lo = torch.clamp(torch.full_like(s, math.log(ratio[0])), feas_lo, feas_hi)
    hi = torch.clamp(torch.full_like(s, math.log(ratio[1])), feas_lo, feas_hi)
    r = (lo + (hi - lo) * u[:, 2]).exp()
    eps = 1e-9
    h = (s * n / r).sqrt().round().clamp(math.ceil(area[0] * hh - eps), hh)
    w = (s * n * r).sqrt().round()
    w = torch.maximum(w, torch.ceil(area[0] * n / h - eps))
    w = torch.minimum(w, torch.floor(area[1] * n / h + eps).clamp(max=ww)).clamp(min=1.0)
    y0 = torch.floor(u[:, 3] * (hh - h + 1)).clamp(max=hh - h)
    x0 = torch.floor(u[:, 4] * (ww - w + 1)).clamp(max=ww - w)
    box = torch.stack([y0, x0, h, w, on.to(torch.float64)], dim=1).to(device=device, dtype=torch.int64)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_y = (rows[None] >= box[:, 0:1]) & (rows[None] < box[:, 0:1] + box[:, 2:3])
    in_x = (cols[None] >= box[:, 1:2]) & (cols[None] < box[:, 1:2] + box[:, 3:4])
    return in_y[:, :, None] & in_x[:, None, :] & box[:, 4].bool()[:, None, None]


def apply_cutmix(dst_img: Tensor, src_img: Tensor, dst_pseudo: Tensor, src_pseudo: Tensor,
                 dst_conf: Tensor, src_conf: Tensor, box: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Paste ``src`` into ``dst`` inside ``box``, for the image, the pseudo-label and the confidence.

    Returns new tensors: no input is modified or aliased (the original wrote both boxes into one shared
    pseudo-label tensor, REFERENCE defect 3).

    Args:
        dst_img, src_img: ``(B, k, H, W)`` images.
        dst_pseudo, src_pseudo: ``(B, H, W)`` pseudo-labels.
        dst_conf, src_conf: ``(B, H, W)`` confidences.
        box: ``(B, H, W)`` bool, True where ``src`` is taken.

    Returns:
        ``(image, pseudo, conf)``, freshly allocated.

    Raises:
        ValueError: on mismatched shapes.
    """
    if box.dtype != torch.bool or box.ndim != 3:
        raise ValueError(f"cutmix box must be a (B, H, W) bool tensor, got {tuple(box.shape)} {box.dtype}")
    if dst_img.shape != src_img.shape or dst_img.ndim != 4 or dst_img.shape[-2:] != box.shape[-2:] \
            or dst_img.shape[0] != box.shape[0]:
        raise ValueError(f"cutmix images {tuple(dst_img.shape)} / {tuple(src_img.shape)} do not match the "
                         f"box {tuple(box.shape)}")
    for name, a, b in (("pseudo", dst_pseudo, src_pseudo), ("conf", dst_conf, src_conf)):
        if a.shape != box.shape or b.shape != box.shape:
            raise ValueError(f"cutmix {name} shapes {tuple(a.shape)} / {tuple(b.shape)} differ from the box "
                             f"{tuple(box.shape)}")
    img = torch.where(box[:, None], src_img, dst_img)
    pseudo = torch.where(box, src_pseudo, dst_pseudo)
    conf = torch.where(box, src_conf, dst_conf)
    return img, pseudo, conf
