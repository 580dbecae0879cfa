"""Score label maps against ground truth: Dice, HD95 and ASSD (mm), volumes (ml), per case and organ.

    python evaluate.py --pred PRED --gt GT --out report.csv [--config YAML]
        [--labels liver:1,kidney:2,spleen:3] [--gt-dataset NAME] [--png DIR --image IMG]

PRED and GT are files or folders; folders pair files by case name (file name minus its suffix; with
--gt-dataset the dataset's tokens are removed first, so LiTS segmentation-7.nii pairs with the
prediction volume-7.nii.gz). Organ label values: --labels (in both prediction and ground truth), else
the config order (class i = i-th organ); several values may form one organ (--labels kidney:2,3), and
values not listed count as background. --gt-dataset maps ground-truth values with that dataset's
label map (e.g. BTCV values, LiTS tumour = liver; `other: background` in the config for many-structure
maps) and scores only the organs it labels; with --labels too, the two must agree (refused otherwise).
Prediction and ground truth must hold the same voxels: the same grid, or the same physical grid in
another index order (e.g. flipped axes of dcm2niix), which is reoriented exactly.

Writes per-case rows to the CSV and the same plus a mean ± sd summary per organ to a JSON file of the
same stem; prints the summary. Non-finite distances (organ missing on one side) are counted apart.
--png DIR --image IMG writes overlays (IMG: the CT file, DICOM series folder, or a folder of CT files
paired like the predictions).
"""

from __future__ import annotations

import argparse
import sys

from utils.errors import HelpFormatter, OneLineParser, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--pred", required=True, help="prediction file or folder")
    p.add_argument("--gt", required=True, help="ground-truth file or folder")
    p.add_argument("--out", required=True, help="CSV report (a .json with the same stem is written too)")
    p.add_argument("--config", default=None, help="YAML config (default configs/default.yaml)")
    p.add_argument("--labels", default=None,
                   help="organ label values, e.g. liver:1,kidney:2,3,spleen:4 (other values: background)")
    p.add_argument("--gt-dataset", default=None, help="config dataset whose label map converts GT values")
    p.add_argument("--png", default=None, help="folder for overlay PNGs (needs --image)")
    p.add_argument("--image", default=None,
                   help="CT file, DICOM series folder or folder of CT files for the overlays")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pathlib import Path

    from data.config import load_config
    from data.volume import is_dicom_dir, match_grid, read_geometry, read_volume, same_physical_grid
    from inference.evaluation import (
        case_key,
        case_row,
        class_spec,
        format_summary,
        list_volume_files,
        pair_cases,
        parse_labels,
        read_label_volume,
        score_volumes,
        summarize,
        write_report,
    )
    from utils.errors import InputError
    from utils.validate import validate_evaluate_args

    validate_evaluate_args(args)
    config = load_config(args.config)
    spec = class_spec(config, parse_labels(args.labels) if args.labels else None, args.gt_dataset)
    ds = spec.gt_dataset
    pairs, lone_pred, lone_gt = pair_cases(args.pred, args.gt, ds.image_token if ds else None,
                                           ds.label_token if ds else None)
    for p in lone_pred:
        print(f"note: {p}: no ground truth, skipped", file=sys.stderr)
    if lone_gt:
        print(f"note: {len(lone_gt)} ground-truth file(s) have no prediction "
              f"(e.g. {lone_gt[0].name})", file=sys.stderr)

    # Check every pair's grids and find the overlay images before scoring anything.
    for pair in pairs:  # the same voxels, possibly in another index order (reoriented when read)
        if not same_physical_grid(read_geometry(pair.pred), read_geometry(pair.gt)):
            raise InputError(pair.gt, f"grid differs from the prediction {pair.pred}")
    images: dict[str, Path] = {}
    if args.png:
        img = Path(args.image)
        if not img.exists():
            raise InputError(img, "image does not exist")
        if img.is_file() or is_dicom_dir(img):
            if len(pairs) > 1:
                raise InputError(img, "is one file but there are several cases")
            images[pairs[0].key] = img
        else:
            by_key = {case_key(p, ds.image_token if ds else None): p for p in list_volume_files(img)}
            for pair in pairs:
                if pair.key not in by_key:
                    raise InputError(pair.pred, f"no image for case '{pair.key}' in {img}")
                images[pair.key] = by_key[pair.key]
        for pair in pairs:
            if not same_physical_grid(read_geometry(images[pair.key]), read_geometry(pair.pred)):
                raise InputError(images[pair.key], f"grid differs from the prediction {pair.pred}")

    rows, per_case = [], []
    for pair in pairs:
        pred, gt = read_label_volume(pair.pred), read_label_volume(pair.gt)
        metrics = score_volumes(pred, gt, spec, pair.pred, pair.gt)
        per_case.append(metrics)
        rows.append(case_row(pair.name, pair.pred, pair.gt, metrics, spec.organs))
        if args.png:
            from inference.overlay import save_overlay

            gt = match_grid(gt, pred.geometry)  # checked above: same voxels
            gt_arr = config.map_labels(ds, gt.array, pair.gt) if ds else gt.array
            image = match_grid(read_volume(images[pair.key]), pred.geometry)
            _save_case_overlay(save_overlay, Path(args.png) / f"{pair.name}.png",
                               image, pred.array, gt_arr, spec, config)
    summary = summarize(per_case, spec.organs)
    json_path = write_report(args.out, rows, summary,
                             extra={"organs": list(spec.organs), "gt_dataset": ds.name if ds else None})
    print(format_summary(summary))
    print(f"{len(rows)} case(s) -> {args.out}, {json_path}")
    return 0


def _save_case_overlay(save_overlay, path, image, pred, gt, spec, config) -> None:
    """Overlays show organs in evaluation order: bring both maps to that space first."""
    import numpy as np

    from inference.evaluation import to_eval_space

    pred_e = to_eval_space(pred, spec.pred_values, path, None)
    gt_e = to_eval_space(np.asarray(gt), spec.gt_values, path, None)
    save_overlay(path, image, pred_e, gt_e, spec.organs, config.hu_window, title=path.stem)


if __name__ == "__main__":
    run_cli(main)
