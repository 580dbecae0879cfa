"""PNG overlays for a quick look at a segmentation: contours on the windowed CT.

One image per case: a grid with one row per organ and three columns (axial, coronal, sagittal planes
through the organ's centre). Prediction contours are drawn in the organ's colour, ground-truth
contours (when given) in white. Planes are shown in radiological convention (patient's right on the
image's left, anterior / superior at the top) and resampled to square physical pixels, so thick
slices are not squashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from data.volume import Volume, to_canonical
from utils.errors import InputError

PALETTE = ((255, 70, 70), (70, 220, 70), (70, 150, 255), (255, 200, 40), (220, 80, 255),
           (40, 220, 220), (255, 140, 40), (160, 255, 120))
GT_COLOUR = (255, 255, 255)
PLANES = ("axial", "coronal", "sagittal")


def organ_colour(index: int) -> tuple[int, int, int]:
    """Colour of organ ``index`` (0-based position in the organ list)."""
    return PALETTE[index % len(PALETTE)]


def _window_uint8(array: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    lo, hi = float(hu_window[0]), float(hu_window[1])
    x = (np.clip(array.astype(np.float32), lo, hi) - lo) * (255.0 / (hi - lo))
    return x.astype(np.uint8)


def _plane(canon: np.ndarray, plane: str, centre: Sequence[int]) -> np.ndarray:
    """A 2D display plane of a canonical ``[S, P, L]`` array: rows top-to-bottom, columns left-to-right."""
    z, y, x = centre
    if plane == "axial":
        return canon[z]  # rows anterior -> posterior, columns patient right -> left
    if plane == "coronal":
        return canon[::-1, y, :]  # superior at the top
    return canon[::-1, :, x]  # superior at the top, anterior on the left


def _plane_spacing(spacing_xyz: Sequence[float], plane: str) -> tuple[float, float]:
    sx, sy, sz = (float(s) for s in spacing_xyz)
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[plane]


def _resize(a: np.ndarray, size_wh: tuple[int, int], nearest: bool) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(a))
    return np.asarray(img.resize(size_wh, Image.NEAREST if nearest else Image.BILINEAR))


def _contour(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _centre(masks: Sequence[np.ndarray | None], shape: Sequence[int]) -> tuple[int, int, int]:
    """Centre of mass of the largest connected component of the first non-empty mask (kidneys: one
    kidney, not the empty space between the two); the volume centre when all are empty."""
    for m in masks:
        if m is not None and m.any():
            comp, n = ndimage.label(m)
            biggest = int(np.argmax(np.bincount(comp.ravel())[1:])) + 1 if n > 1 else 1
            c = ndimage.center_of_mass(comp == biggest)
            return tuple(int(round(v)) for v in c)  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def render_panel(image: np.ndarray, spacing_rc: tuple[float, float],
                 layers: Sequence[tuple[np.ndarray, tuple]], size: int) -> np.ndarray:
    """One RGB panel: a uint8 plane resized to physical aspect within ``size x size``, contours on top.

    Args:
        image: uint8 2D plane.
        spacing_rc: pixel size (rows, columns) in mm.
        layers: ``(boolean mask, rgb)`` drawn in order as 1-pixel contours.
        size: the panel's side in pixels.

    Returns:
        ``(size, size, 3)`` uint8.
    """
    rows, cols = image.shape
    extent = max(rows * spacing_rc[0], cols * spacing_rc[1])
    scale = size / extent
    w = max(1, int(round(cols * spacing_rc[1] * scale)))
    h = max(1, int(round(rows * spacing_rc[0] * scale)))
    gray = _resize(image, (w, h), nearest=False)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for mask, colour in layers:
        if mask.any():
            m = _resize(mask.astype(np.uint8) * 255, (w, h), nearest=True) > 0
            rgb[_contour(m)] = colour
    panel = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    panel[top:top + h, left:left + w] = rgb
    return panel


def render_overlay(image: Volume, pred: np.ndarray, gt: np.ndarray | None, organs: Sequence[str],
                   hu_window: Sequence[float] = (-200.0, 200.0), title: str = "",
                   panel: int = 192) -> np.ndarray:
    """The overlay grid of a case as an RGB array.

    Args:
        image: the CT on its own grid.
        pred: class map on the same grid (class ``i + 1`` = ``organs[i]``).
        gt: ground-truth class map on the same grid, or None.
        organs: organ names.
        hu_window: display window (HU).
        title: text above the grid.
        panel: side of each panel in pixels.

    Returns:
        ``(H, W, 3)`` uint8 image.

    Raises:
        ValueError: shapes differ.
    """
    from PIL import Image, ImageDraw

    if pred.shape != image.array.shape or (gt is not None and gt.shape != image.array.shape):
        raise ValueError("image, prediction and ground truth must share a shape")
    canon, ori = to_canonical(image)
    img = _window_uint8(canon.array, hu_window)
    p = ori.apply(pred)
    g = ori.apply(gt) if gt is not None else None
    spacing = canon.geometry.spacing
    present = [k for k in range(1, len(organs) + 1) if (p == k).any() or (g is not None and (g == k).any())]
    rows = present or [0]
    header = 34
    label_h = 16
    grid = np.zeros((header + len(rows) * (panel + label_h), 3 * panel, 3), dtype=np.uint8)
    texts: list[tuple[tuple[int, int], str, tuple[int, int, int]]] = []
    for r, k in enumerate(rows):
        centre = _centre([p == k, g == k if g is not None else None], img.shape) if k else \
            _centre([], img.shape)
        y0 = header + r * (panel + label_h)
        name = organs[k - 1] if k else "no organ"
        for c, plane in enumerate(PLANES):
            layers = []
            for j in range(1, len(organs) + 1):
                if g is not None:
                    layers.append((_plane(g, plane, centre) == j, GT_COLOUR))
            for j in range(1, len(organs) + 1):
                layers.append((_plane(p, plane, centre) == j, organ_colour(j - 1)))
            grid[y0 + label_h:y0 + label_h + panel, c * panel:(c + 1) * panel] = render_panel(
                _plane(img, plane, centre), _plane_spacing(spacing, plane), layers, panel)
            texts.append(((c * panel + 4, y0 + 2), f"{name} - {plane}",
                          organ_colour(k - 1) if k else (200, 200, 200)))
    pil = Image.fromarray(grid)
    draw = ImageDraw.Draw(pil)
    draw.text((4, 2), title, fill=(255, 255, 255))
    x = 4
    for i, organ in enumerate(organs):
        draw.text((x, 18), organ, fill=organ_colour(i))
        x += 8 * len(organ) + 12
    if g is not None:
        draw.text((x, 18), "ground truth", fill=GT_COLOUR)
    for pos, text, colour in texts:
        draw.text(pos, text, fill=colour)
    return np.asarray(pil)


def save_overlay(path: str | Path, image: Volume, pred: np.ndarray, gt: np.ndarray | None,
                 organs: Sequence[str], hu_window: Sequence[float] = (-200.0, 200.0), title: str = "",
                 panel: int = 192) -> None:
    """Render :func:`render_overlay` and write it as a PNG, atomically."""
    from PIL import Image

    from utils.fileio import atomic_path

    rgb = render_overlay(image, pred, gt, organs, hu_window, title or Path(path).stem, panel)
    def readable(tmp: Path) -> None:
        # A full disk can cut the file short without an error from PIL: decode it before the rename.
        try:
            with Image.open(tmp) as im:
                im.load()
        except Exception:
            raise InputError(path, "cannot write overlay (the written PNG does not decode: disk full?); "
                             "the previous file, if any, is unchanged") from None

    with atomic_path(path, suffix=".png", verify=readable) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
