"""Field of view: does a model find the organs on a body-tight, non-square crop as on the full scan?

    python -m bench.fov --model demo_out/model/resu_best_axial.pth.tar [--cases 4] [--seed 7]
                        [--margin 10] [--out fov.json]

For each case, a fully labeled (BTCV-style) phantom is drawn at the scanner's square field of view
from a seed the demo never trains on; the *same voxels* are then cropped to the body plus ``--margin``
mm on each side (a non-square, body-tight field of view like the real 366 x 303 mm CT of issue 15).
Both are segmented with the checkpoint (its recorded in-plane preprocessing) and scored against the
phantom's own labels, on the voxels they share (the crop). For comparison, the crop is also segmented
the way the seed did it (``stretched``: the slice resized to the grid whatever its shape, emulated by
giving the crop a row spacing that makes its field of view square, so nothing is padded). Prints a
Markdown table: Dice per organ at full and tight field of view and their difference (target: tight
within 0.03 of full).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.errors import run_cli  # noqa: E402


def body_crop(tissue, spacing: tuple[float, float], margin_mm: float) -> tuple[slice, slice]:
    """Rows and columns of the body's bounding box (all slices) plus ``margin_mm`` on each side."""
    import numpy as np

    body = tissue > 0
    rows = np.flatnonzero(body.any(axis=(0, 2)))
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    my, mx = (int(round(margin_mm / s)) for s in (spacing[1], spacing[0]))
    return (slice(max(0, rows[0] - my), min(tissue.shape[1], rows[-1] + 1 + my)),
            slice(max(0, cols[0] - mx), min(tissue.shape[2], cols[-1] + 1 + mx)))


def crop_volume(volume, rows: slice, cols: slice):
    """The same voxels of a canonical (identity-direction) volume, cropped in-plane."""
    import numpy as np

    from data.volume import Geometry, Volume

    g = volume.geometry
    origin = np.asarray(g.origin) + np.array([cols.start * g.spacing[0], rows.start * g.spacing[1], 0.0])
    arr = np.ascontiguousarray(volume.array[:, rows, cols])
    return Volume(arr, Geometry(arr.shape, g.spacing, tuple(float(o) for o in origin), g.direction))


def stretch_to_square(volume):
    """The same array with a row spacing that makes the slice's field of view square: pad mode then
    resizes it exactly as the seed resized every slice (anisotropically, no padding)."""
    from data.volume import Geometry, Volume

    g = volume.geometry
    n_p, n_l = volume.array.shape[1:]
    sy = n_l * g.spacing[0] / n_p
    return Volume(volume.array, Geometry(g.shape, (g.spacing[0], sy, g.spacing[2]), g.origin, g.direction))


def run(model: str, cases: int = 4, seed: int = 7, margin: float = 10.0) -> dict[str, Any]:
    """Segment ``cases`` phantoms at full and body-tight field of view; Dice per organ on the crop."""
    import numpy as np

    import data.phantom as P
    from inference.segment import load_model, segment_volume
    from utils.metrics import dice

    loaded = load_model(model, device="cpu")
    config = loaded.config
    btcv = config.dataset("BTCV")
    rows_out = []
    for n in range(cases):
        rng = P.case_rng(seed, "BTCV", 1000 + n)
        spec = replace(P.draw_spec(rng, P.DATASET_STYLES["BTCV"], 0.5), crop_margin=None)
        image, tissue = P.make_phantom(rng, spec)
        classes = config.map_labels(btcv, P.dataset_labels(tissue, "BTCV"), f"phantom {n}")
        r, c = body_crop(tissue, image.geometry.spacing, margin)
        full = segment_volume(loaded, image, device="cpu").array[:, r, c]
        tight_img = crop_volume(image, r, c)
        tight = segment_volume(loaded, tight_img, device="cpu").array
        stretched = segment_volume(loaded, stretch_to_square(tight_img), device="cpu").array
        gt = classes[:, r, c]
        g = image.geometry
        row = {"case": n, "full_fov_mm": [round(g.shape[2] * g.spacing[0]), round(g.shape[1] * g.spacing[1])],
               "tight_fov_mm": [round(tight.shape[2] * g.spacing[0]), round(tight.shape[1] * g.spacing[1])]}
        for k, organ in enumerate(config.organs, start=1):
            row[organ] = {"full": dice(full == k, gt == k), "tight": dice(tight == k, gt == k),
                          "stretched": dice(stretched == k, gt == k)}
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    means = {o: {v: float(np.mean([r[o][v] for r in rows_out])) for v in ("full", "tight", "stretched")}
             for o in config.organs}
    return {"model": str(model), "seed": seed, "margin_mm": margin, "cases": rows_out, "mean": means,
            "inplane_size": list(config.inplane_size), "inplane_spacing": config.inplane_spacing}


def to_markdown(result: dict[str, Any]) -> str:
    """Mean Dice per organ at full and tight field of view."""
    lines = ["| organ | Dice, full field of view | Dice, body-tight crop | tight - full | "
             "crop, stretched (seed) |", "|---|---|---|---|---|"]
    for organ, m in result["mean"].items():
        lines.append(f"| {organ} | {m['full']:.3f} | {m['tight']:.3f} | {m['tight'] - m['full']:+.3f} | "
                     f"{m['stretched']:.3f} |")
    fovs = ", ".join(f"{r['full_fov_mm'][0]}² -> {r['tight_fov_mm'][0]}x{r['tight_fov_mm'][1]}"
                     for r in result["cases"])
    return "\n".join(lines) + f"\n\nFields of view (mm): {fovs}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint file or folder (axial)")
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--seed", type=int, default=7, help="phantom seed (the demo trains on seed 0)")
    p.add_argument("--margin", type=float, default=10.0, help="mm kept around the body")
    p.add_argument("--out", default=None, help="JSON file for the numbers")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    result = run(args.model, args.cases, args.seed, args.margin)
    print(to_markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
