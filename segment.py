"""Segment CT volumes with trained UniMOS checkpoints: one view, or several views fused.

    python segment.py INPUT OUTPUT --network-path CKPT [--view axial | --views axial,coronal,sagittal]
        [--slices 3] [--width W] [--config YAML] [--tta] [--device auto|cpu|cuda] [--batch 16]
        [--tile N] [--no-postprocess] [--png DIR]
        [--evaluating --label-filename GT [--gt-dataset NAME]]

INPUT is a NIfTI (or MHA/NRRD) file -> OUTPUT file (or OUTPUT/<same name> when OUTPUT is a folder),
a folder of such files -> OUTPUT folder with the same file names, or a DICOM series folder -> OUTPUT
.nii.gz file. CKPT is a checkpoint file or a folder holding resu_best_{view}.pth.tar. Several views
average their softmax probabilities on the canonical grid. Outputs are uint8 label maps (0 background,
i = i-th organ of the checkpoint's config) on exactly the input's grid.

--slices/--width/--config (its organs) are checked against every checkpoint; preprocessing (HU
window, in-plane size) always comes from the checkpoints. Inputs (a single input whole, a folder's
files by their headers), checkpoints and ground-truth headers are checked before anything is
segmented; bad input ends with one line naming the file and exit code 2, and outputs are written
atomically (never half-written).

--evaluating prints Dice, HD95 and ASSD (mm) per organ against --label-filename (a file, or a folder
paired by case name; --gt-dataset maps its label values with that dataset's map of the config).
--png writes one overlay per case (axial/coronal/sagittal planes through each organ).
"""

from __future__ import annotations

import argparse

from utils.errors import HelpFormatter, OneLineParser, naming, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("input", help="NIfTI file, folder of NIfTI files, or DICOM series folder")
    p.add_argument("output", help="output file (or folder for a folder input)")
    p.add_argument("--network-path", "--network_path", dest="network_path", required=True,
                   help="checkpoint file, or folder holding resu_best_{view}.pth.tar")
    p.add_argument("--view", choices=("axial", "coronal", "sagittal"), default=None,
                   help="view of a single model (default: the checkpoint file's view, or axial)")
    p.add_argument("--views", default=None,
                   help="comma-separated views to fuse, e.g. axial,coronal,sagittal (needs a folder)")
    p.add_argument("--slices", type=int, default=None, help="expected 2.5D slices of the checkpoints")
    p.add_argument("--width", type=int, default=None, help="expected network width of the checkpoints")
    p.add_argument("--config", default=None,
                   help="YAML config whose organs the checkpoints must have (default: their own)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over the flips the model was trained with")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch", type=int, default=None,
                   help="slices per forward pass (default: 1 on a CPU, one pass per core side by side; "
                        "16 on a GPU)")
    p.add_argument("--tile", type=int, default=None,
                   help="in-plane sliding-window size (0, or a multiple of 16 from 32 up); 0 = whole "
                        "slices; default: whole slices up to the area of a square of twice the training "
                        "block, tiles of the block beyond")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-postprocess", action="store_true",
                   help="keep every connected component (default: largest per organ, kidneys 2)")
    p.add_argument("--evaluating", action="store_true", help="score the result against --label-filename")
    p.add_argument("--label-filename", "--label_filename", dest="label_filename", default=None,
                   help="ground truth file, or folder for a folder input")
    p.add_argument("--gt-dataset", default=None,
                   help="config dataset whose label map converts ground-truth values (e.g. LiTS, BTCV)")
    p.add_argument("--png", default=None, help="folder for overlay PNGs")
    p.add_argument("--progress", action="store_true", help="progress bar")
    return p


def _views(args) -> list[str | None]:
    from data.volume import VIEWS
    from utils.errors import InputError

    if args.views is None:
        return [args.view]
    views = [v.strip() for v in args.views.split(",") if v.strip()]
    bad = [v for v in views if v not in VIEWS]
    if not views or bad or len(set(views)) != len(views):
        raise InputError(None, f"--views must list distinct views of {VIEWS}, got {args.views!r}")
    return views  # type: ignore[return-value]


def _check_flags(args) -> None:
    """Reject --batch < 1, a negative --tile and --evaluating without --label_filename.

    Raises:
        InputError: naming the flag.
    """
    from utils.errors import InputError

    if args.batch is not None and args.batch < 1:
        raise InputError(None, f"--batch must be >= 1, got {args.batch}")
    if args.tile is not None and args.tile < 0:
        raise InputError(None, f"--tile must be >= 0, got {args.tile}")
    if args.evaluating and not args.label_filename:
        raise InputError(None, "--evaluating needs --label_filename")


def _load_models(args, views: list[str | None], config, device) -> list:
    """The network of each view, checked against the flags, the config and each other (same organs).

    Raises:
        InputError: a single checkpoint file for several views, a checkpoint that does not fit, or
            models whose organs differ.
    """
    from pathlib import Path

    from inference.segment import load_model
    from utils.errors import InputError

    ckpt = Path(args.network_path)
    if ckpt.is_file() and len(views) > 1:
        raise InputError(ckpt, "is a single checkpoint; --views needs a folder with resu_best_{view}.pth.tar")
    expect = {"slices": args.slices, "width": args.width,
              "organs": list(config.organs) if config else None}
    models = [load_model(ckpt, view=v, expect=expect, device=device) for v in views]
    organs = models[0].organs
    for m in models[1:]:
        if m.organs != organs:
            raise InputError(m.path, f"organs {list(m.organs)} differ from {models[0].path}'s {list(organs)}")
    return models


def _ground_truths(args, jobs: list, geometries: dict, eval_config) -> tuple:
    """``(spec, {input: ground truth file})`` for --evaluating: one file for one input, or a folder
    paired by case key; every ground truth on its input's grid (possibly in another index order).

    Raises:
        InputError: a missing ground truth, one file for a folder of inputs, a case without ground
            truth, two ground truths with one case key, a ground truth on another grid or with bad
            values.
    """
    from pathlib import Path

    from data.layout import index_by_key
    from data.volume import read_geometry, read_volume, same_physical_grid
    from inference.evaluation import case_key, check_ground_truth, class_spec, list_volume_files
    from utils.errors import InputError

    gts: dict[Path, Path] = {}
    spec = class_spec(eval_config, gt_dataset=args.gt_dataset)
    gt_root = Path(args.label_filename)
    if not gt_root.exists():
        raise InputError(gt_root, "ground truth does not exist")
    if gt_root.is_file():
        if len(jobs) > 1:
            raise InputError(gt_root, "is one file but the input is a folder of volumes")
        gts[jobs[0][0]] = gt_root
    else:
        img_tok = spec.gt_dataset.image_token if spec.gt_dataset else None
        lab_tok = spec.gt_dataset.label_token if spec.gt_dataset else None
        by_key = index_by_key(list_volume_files(gt_root), lambda p: case_key(p, lab_tok), "ground truths")
        for src, _ in jobs:
            key = case_key(src, img_tok)
            if key not in by_key:
                raise InputError(src, f"no ground truth for case '{key}' in {gt_root}")
            gts[src] = by_key[key]
    for src, gt in gts.items():  # the same voxels, possibly in another index order
        if not same_physical_grid(read_geometry(gt), geometries[src]):
            raise InputError(gt, f"ground truth grid differs from the input {src}")
    # and their values, read now: a bad one found while scoring stopped the run after its
    # segmentation had been written
    for gt in gts.values():
        check_ground_truth(read_volume(gt), spec, gt)
    return spec, gts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.validate import validate_segment_args

    validate_segment_args(args)
    import time
    from pathlib import Path

    from data.config import load_config
    from data.volume import match_grid, read_geometry, read_volume, write_volume
    from engine.runtime import retain_freed_memory
    from inference.evaluation import (
        case_key,
        format_case,
        format_summary,
        read_label_volume,
        score_volumes,
        summarize,
    )
    from inference.segment import plan_outputs, resolve_device, segment_volume
    from utils.fileio import check_writable

    retain_freed_memory()  # passes on the main thread reuse freed pages (see its docstring)

    views = _views(args)
    _check_flags(args)
    config = load_config(args.config) if args.config else None
    device = resolve_device(args.device)

    # Check everything before segmenting anything.
    jobs = plan_outputs(args.input, args.output)
    for folder in sorted({dst.parent for _, dst in jobs}):
        check_writable(folder, "output folder")  # a read-only folder fails now, not after the first volume
    # One input is read whole now (it is needed anyway, and a corrupt body fails before any work);
    # a folder is checked by headers, each volume read when its turn comes.
    preloaded = {jobs[0][0]: read_volume(jobs[0][0])} if len(jobs) == 1 else {}
    geometries = {src: preloaded[src].geometry if src in preloaded else read_geometry(src)
                  for src, _ in jobs}
    models = _load_models(args, views, config, device)
    organs = models[0].organs
    eval_config = config or models[0].config
    spec, gts = _ground_truths(args, jobs, geometries, eval_config) if args.evaluating else (None, {})

    if args.tta and all(m.tta_flips == ((),) for m in models):
        print("note: --tta averages nothing: the model was trained without flips (Final.py --flip), and a "
              "mirrored abdomen puts the liver where the spleen is", flush=True)
    results = []
    for src, dst in jobs:
        t0 = time.perf_counter()
        volume = preloaded.pop(src) if src in preloaded else read_volume(src)
        with naming(src):
            seg = segment_volume(models, volume, batch=args.batch, tta=args.tta,
                                 postprocess=not args.no_postprocess, device=device,
                                 amp=False if args.no_amp else None, progress=args.progress, tile=args.tile)
        write_volume(seg, dst)
        print(f"{src} -> {dst} ({time.perf_counter() - t0:.1f} s)", flush=True)
        gt_classes = None
        if spec is not None:
            gt_vol = match_grid(read_label_volume(gts[src]), seg.geometry)  # reoriented exactly
            metrics = score_volumes(seg, gt_vol, spec, dst, gts[src])
            results.append(metrics)
            print(format_case(case_key(dst), metrics), flush=True)
            gt_classes = (eval_config.map_labels(spec.gt_dataset, gt_vol.array, gts[src])
                          if spec.gt_dataset else gt_vol.array)
        if args.png:
            from inference.overlay import save_overlay

            save_overlay(Path(args.png) / f"{case_key(dst)}.png", volume, seg.array, gt_classes, organs,
                         models[0].config.hu_window, title=src.name)
    if spec is not None and len(results) > 1:
        print(format_summary(summarize(results, spec.organs)))
    return 0


if __name__ == "__main__":
    run_cli(main)
