"""Write synthetic abdominal CT phantoms in the seed layout (UniMOS's default data, no download).

    python synth.py --out DIR [--cases N] [--unlabeled U] [--val V] [--seed S]
                    [--datasets LiTS,KiTS,MSDSpleen,BTCV] [--scale F] [--workers W]

Each dataset goes to DIR/<Dataset>/ with label/, labeled/, unlabeled/ and validation/ (BTCV, the
fully labeled set, has no unlabeled/), imitating the real datasets' file names, grids, storage
orientation, dtypes and intensity offsets. See data/phantom.py.
"""

from __future__ import annotations

import argparse
import os

from utils.errors import HelpFormatter, OneLineParser, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output root folder")
    p.add_argument("--cases", type=int, default=4, help="labeled cases per dataset")
    p.add_argument("--unlabeled", type=int, default=4, help="unlabeled cases per dataset")
    p.add_argument("--val", type=int, default=2, help="validation cases per dataset")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--datasets", default="LiTS,KiTS,MSDSpleen,BTCV",
                   help="comma-separated datasets")
    p.add_argument("--scale", type=float, default=1.0,
                   help="in-plane size factor, e.g. 0.5 gives 256 instead of 512")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="datasets written side by side by this many processes (same bytes for any count)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.validate import validate_synth_args

    validate_synth_args(args)
    from data.phantom import synthesize

    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    result = synthesize(args.out, cases=args.cases, unlabeled=args.unlabeled, val=args.val,
                        seed=args.seed, datasets=names, scale=args.scale, log=print, workers=args.workers)
    print(f"synthesized {len(result['datasets'])} dataset(s) in {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    # The phantoms need many small matrix products; OpenBLAS threads only add overhead there (3x
    # slower on a busy 2-core machine). Set before main() imports numpy; a user's setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    run_cli(main)
