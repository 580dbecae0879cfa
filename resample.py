"""Resample every volume of a dataset tree in-plane to s1 x s2 (slice count kept, anatomy not stretched).

    python resample.py -p1 RAW_DIR -p2 OUT_DIR -s1 256 -s2 256 [--spacing MM] [--workers 2] [--overwrite]

RAW_DIR is walked recursively and its folders are mirrored into OUT_DIR. For each volume (NIfTI,
MHA/NRRD, DICOM series folder -> ``<folder>.nii.gz``) the two axes other than the slice axis (the
index axis closest to superior-inferior, read from the direction matrix) get s1 x s2 voxels:
spacing = old * old_n / new_n, direction kept, and the origin moves by half the change of voxel size
so the field-of-view edges stay put (the original kept the origin, shifting content by half a voxel).
A slice whose field of view is not square (not the grid's aspect) is first padded with air (-1024 HU;
label maps: background) to a square in millimetres, so the anatomy is not stretched; with --spacing MM
the slice is instead resampled to that spacing, then padded or cropped (centred) to s1 x s2.
Images are interpolated linearly (integer types rounded), label maps with nearest neighbour; label
maps are the volumes under a folder named in --label-dirs or whose file name matches
--label-patterns. Other files (dataset.json, ...) are copied. Outputs that are up to date are
skipped unless --overwrite: a stamp written after the output's verified write must match the input,
the settings and the output's content (modification times alone are not trusted). Bad input stops
the run with one line naming the file (exit 2); every output is written atomically and verified, so
none is ever half-written.
"""

from __future__ import annotations

import argparse

from utils.errors import HelpFormatter, OneLineParser, run_cli


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("-p1", "--raw", "--input", dest="raw", required=True,
                   help="input folder (walked recursively)")
    p.add_argument("-p2", "--out", "--output", dest="out", required=True,
                   help="output folder (subfolders mirrored)")
    p.add_argument("-s1", "--size1", dest="s1", type=int, default=256,
                   help="size of the first in-plane axis (x for axial storage)")
    p.add_argument("-s2", "--size2", dest="s2", type=int, default=256,
                   help="size of the second in-plane axis (y for axial storage)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("S1", "S2"),
                   help="both in-plane sizes at once (overrides -s1/-s2)")
    p.add_argument("--label-dirs", type=_csv, default=("label", "labels", "labelsTr"),
                   help="comma-separated folder names holding label maps (default label,labels,labelsTr)")
    p.add_argument("--label-patterns", type=_csv, default=("segmentation.nii.gz", "segmentation.nii"),
                   help="comma-separated file-name patterns of label maps anywhere, e.g. 'seg*' "
                        "(default: KiTS19's segmentation.nii.gz,segmentation.nii)")
    p.add_argument("--spacing", type=float, default=None, metavar="MM",
                   help="physical mode: resample to this in-plane spacing, then pad/crop to s1 x s2 "
                        "(default: pad to a square with air, then resize)")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--overwrite", action="store_true",
                   help="redo outputs that are up to date (same input, settings and verified content)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.size is not None:
        args.s1, args.s2 = args.size
    from utils.validate import validate_resample_args

    validate_resample_args(args)
    from data.resample_tree import resample_tree

    counts = resample_tree(args.raw, args.out, (args.s1, args.s2), label_dirs=args.label_dirs,
                           label_patterns=args.label_patterns, workers=args.workers,
                           overwrite=args.overwrite, spacing_mm=args.spacing)
    print(f"resampled {counts['resampled']}, copied {counts['copied']}, "
          f"skipped {counts['skipped']} (up to date) -> {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
