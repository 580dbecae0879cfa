"""Tiny line charts with Pillow (training curves for reports; no matplotlib dependency)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(t)
        t += step
    return ticks


def line_chart(series: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str = "",
               xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (720, 400),
               ylim: tuple[float, float] | None = None) -> Path:
    """Draw named ``(x, y)`` series as lines and save a PNG. Non-finite points are skipped."""
    from utils.fileio import atomic_path

    w, h = size
    left, right, top, bottom = 64, 150, 34, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)
           if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        d.text((left, h // 2), "no data", fill="black")
    else:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = ylim if ylim else (min(p[1] for p in pts), max(p[1] for p in pts))
        if x1 == x0:
            x1 = x0 + 1
        if y1 == y0:
            y1 = y0 + 1

        def sx(x: float) -> float:
            return left + (x - x0) / (x1 - x0) * (w - left - right)

        def sy(y: float) -> float:
            return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

        for t in _nice_ticks(y0, y1):
            if y0 <= t <= y1:
                d.line([(left, sy(t)), (w - right, sy(t))], fill=(230, 230, 230))
                d.text((4, sy(t) - 6), f"{t:.3g}", fill="black")
        for t in _nice_ticks(x0, x1):
            if x0 <= t <= x1:
                d.text((sx(t) - 8, h - bottom + 6), f"{t:.4g}", fill="black")
        d.rectangle([left, top, w - right, h - bottom], outline="black")
        for i, (name, (xs, ys)) in enumerate(series.items()):
            color = PALETTE[i % len(PALETTE)]
            line = [(sx(x), sy(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
            if len(line) > 1:
                d.line(line, fill=color, width=2)
            for p in line:
                d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
            d.text((w - right + 8, top + 14 * i), name[:22], fill=color)
    d.text((left, 8), title, fill="black")
    d.text(((w - right + left) // 2 - 20, h - 18), xlabel, fill="black")
    d.text((4, 14), ylabel, fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
