"""Train UniMOS (one view) on partially labeled + unlabeled CT datasets.

Usage (see README.md):
    python Final.py --data ./data --out ./runs/unimos --view axial
    torchrun --nproc_per_node 4 Final.py ...          # several GPUs
    sbatch Final.sh                                   # Slurm
"""

from __future__ import annotations

import argparse

from utils.errors import HelpFormatter, OneLineParser, run_cli


def _bool_or_none(value: str) -> bool:
    return value.lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=HelpFormatter)
    _data_args(p)
    _model_args(p)
    _optimisation_args(p)
    _semi_args(p)
    _run_args(p)
    return p


def _data_args(p: argparse.ArgumentParser) -> None:
    """The data flags."""
    g = p.add_argument_group("data")
    g.add_argument("--config", default=None, help="dataset/organ YAML (default configs/default.yaml)")
    g.add_argument("--data", default="./data", help="root holding one folder per dataset")
    g.add_argument("--datasets", default=None, help="comma-separated subset of the config's datasets")
    g.add_argument("--cache", default=None, help="slice cache folder (default DATA/.unimos_cache)")
    g.add_argument("--inplane", type=int, nargs=2, default=None, metavar=("S1", "S2"),
                   help="in-plane grid of the cache (default: the config's inplane_size)")
    g.add_argument("--spacing", type=float, default=None, metavar="MM",
                   help="resample slices to this in-plane spacing, then pad/crop to the grid (default: "
                        "the config's inplane_spacing; none = pad each slice with air to a square)")
    g.add_argument("--hu-window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="CT window in HU, LOW < HIGH (default: the config's hu_window)")
    g.add_argument("--view", default="axial", choices=("axial", "coronal", "sagittal"),
                   help="view the model is trained on")
    g.add_argument("-s", "--slices", type=int, default=3, help="adjacent slices per 2.5D input (odd)")
    g.add_argument("--blocksize", type=int, default=224, help="random crop size (multiple of 16)")
    g.add_argument("--fg-prob", type=float, default=0.8,
                   help="probability of centring a sample on a slice holding a labeled organ")
    # Off by default, unlike the original: a left-right flip moves the liver to where the spleen is,
    # and position is what tells these two organs of similar density apart.
    g.add_argument("--flip", action="store_true", help="random flips of training samples")
    g.add_argument("--intensity-jitter", type=float, nargs=2, default=(0.1, 0.15), metavar=("SCALE", "SHIFT"),
                   help="labeled samples: x*(1+U(-SCALE,SCALE)) + U(-SHIFT,SHIFT) on the [-1,1] window "
                        "(0.15 = 30 HU); 0 0 = off")
    g.add_argument("--weak-rot90", action="store_true",
                   help="random 90-degree rotations of the unlabeled weak view (the original's)")
    g.add_argument("--mix", default="batch", choices=("batch", "alternate"),
                   help="mix datasets within each batch, or give each step one dataset in turn")
    g.add_argument("--workers", type=int, default=2, help="data loader worker processes")


def _model_args(p: argparse.ArgumentParser) -> None:
    """The model flags."""
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, default=64, help="base channel width (paper: 64)")
    g.add_argument("--blocks", default=None,
                   help="residual blocks per encoder level 1..4: one count for all (2) or four (1,1,2,2) "
                        "(default: 1 each)")
    # literals, not models.DEFAULT_NORM / NORMS: importing models loads torch, and --help should not
    # (tests check they agree)
    g.add_argument("--norm", default="instance", choices=("batch", "instance"),
                   help="normalisation layers: instance (per image, as nnU-Net: no running statistics "
                        "that must fit the scans of every dataset at once; the semi-supervised module "
                        "needs it, see README) or batch (PIPO-FAN's)")


def _optimisation_args(p: argparse.ArgumentParser) -> None:
    """The optimisation flags."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=2500, help="training epochs")
    g.add_argument("--steps-per-epoch", type=int, default=100, help="optimizer steps per epoch")
    g.add_argument("-b", "--batchsize", type=int, default=8, help="labeled samples per step")
    g.add_argument("--lr", type=float, default=5e-4, help="learning rate (> 0)")
    g.add_argument("--momentum", type=float, default=0.9, help="RMSprop momentum, in [0, 1)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (>= 0)")
    g.add_argument("--schedule", default="step", choices=("step", "poly", "cosine"),
                   help="step: lr * lr_decay every lr_decay_every epochs (the original)")
    g.add_argument("--lr-decay", type=float, default=0.99, help="step schedule: factor, in (0, 1]")
    g.add_argument("--lr-decay-every", type=int, default=40, help="step schedule: epochs between decays")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    g.add_argument("--clip-grad", type=float, default=0.0, help="gradient norm clip (0: off)")
    g.add_argument("--loss", default="tal", choices=("tal", "naive"),
                   help="tal: target adaptive loss; naive: unlabeled organs count as background")
    g.add_argument("--class-weights", type=float, nargs=2, default=None, metavar=("BG", "ORGAN"),
                   help="CE weights of background and organs (default: the config's, 0.2 1.2)")
    g.add_argument("--dice-weight", type=float, default=0.0,
                   help="weight of soft Dice beside CE, in the supervised and the unsupervised losses")


def _semi_args(p: argparse.ArgumentParser) -> None:
    """The semi-supervised flags."""
    g = p.add_argument_group("semi-supervised")
    g.add_argument("--semi", dest="semi", action="store_true", default=None,
                   help="use unlabeled volumes (default: on when any are found)")
    g.add_argument("--no-semi", dest="semi", action="store_false", help="labeled volumes only")
    g.add_argument("--unlabeled-batchsize", type=int, default=0, help="default: --batchsize")
    g.add_argument("--teacher", default="ema", choices=("self", "ema"),
                   help="ema: mean teacher (EMA of the weights); self: UniMatch, the model itself, as the "
                        "original (on phantoms with 2 labeled volumes per dataset the self-teacher erased "
                        "the liver of LiTS-style scans in 3 of 3 runs; the EMA teacher did not)")
    g.add_argument("--ema-momentum", type=float, default=0.99, help="EMA teacher momentum, in [0, 1)")
    g.add_argument("--pseudo", default="merged", choices=("merged", "full"),
                   help="pseudo-labels in the source dataset's merged label space, or every organ")
    g.add_argument("--threshold", default="schedule",
                   help="confidence threshold: a number, or 'schedule' (0.7/0.8/0.9 as the original)")
    g.add_argument("--organ-threshold", type=float, default=0.5,
                   help="organ pseudo-labels count from this confidence (never above --threshold); "
                        "background keeps --threshold. 1 = one threshold for all, as the original (on "
                        "phantoms it taught the spleen away: README)")
    g.add_argument("--unsup-class-weights", type=float, nargs=2, default=(1.0, 1.0), metavar=("BG", "ORGAN"),
                   help="CE weights of the pseudo-label losses. Unlike labels, pseudo-labels feed back: "
                        "weighting organs up makes predicted organs grow every round (measured on phantoms: "
                        "liver precision 0.13 after 400 semi steps with 0.2 1.2)")
    g.add_argument("--semi-weights", type=float, nargs=4, default=(2.0, 0.5, 0.25, 0.25),
                   metavar=("X", "FP", "S1", "S2"),
                   help="weights of the labeled, feature-perturbed and two strong-view losses. The labeled "
                        "loss counts twice (UniMatch: once): on phantoms trained until supervised training "
                        "overfits, TAL + semi was then +0.098, +0.048, +0.002 mean Dice ahead of TAL at "
                        "1, 2, 4 labeled volumes per dataset (3 seeds, CutMix pairs by dataset; README)")
    g.add_argument("--semi-divisor", type=float, default=2.0,
                   help="the weighted sum is divided by this (the original's / 2)")
    g.add_argument("--semi-warmup", type=float, default=0.3,
                   help="supervised-only training first: a fraction of --epochs (< 1) or a number of epochs "
                        "(>= 1). Pseudo-labels of an untrained network are noise")
    g.add_argument("--semi-rampup", type=float, default=0.1,
                   help="after the warm-up, the unsupervised loss weights ramp up from ~0 over this fraction "
                        "of --epochs (< 1) or number of epochs (>= 1); 0: full weight at once")
    g.add_argument("--fp", default="encoder", choices=("encoder", "head"),
                   help="feature perturbation: dropout on every encoder level decoded by the whole decoder "
                        "(UniMatch), or on the scale features before the heads (the original)")
    g.add_argument("--cutmix-pairs", default="dataset", choices=("index", "dataset"),
                   help="datasets of the second weak batch (the CutMix source): those of the first batch, so "
                        "that every sample finds a partner labeling the same organs (--pseudo merged needs "
                        "one), or in turn by sample index (the default before; with 3 datasets and 2 + 2 "
                        "slices it left half the samples without)")


def _run_args(p: argparse.ArgumentParser) -> None:
    """The run flags: output, device, precision, resuming, validation, logging."""
    g = p.add_argument_group("run")
    g.add_argument("--out", default="./runs/unimos", help="checkpoint and log folder")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", nargs="?", const="auto", default="none", choices=("none", "bf16", "fp16", "auto"),
                   help="mixed precision (bare --amp = auto)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on CUDA only; on CPU it makes instance "
                        "norm 1.6x slower)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    g.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="checkpoint file/folder, or bare --resume / 'auto' for OUT's last checkpoint")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh (or from --resume PATH) in an --out that already holds this view's "
                        "checkpoints: they, its history and summary are removed when training starts; "
                        "without it such a start is refused")
    g.add_argument("--time-budget", type=float, default=0.0, help="stop after this many minutes (0: off)")
    g.add_argument("--val-every", type=int, default=1, help="validate every N epochs")
    g.add_argument("--val-batch", type=int, default=16, help="slices per validation forward pass")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars while caching (default: on in a terminal, off in logs and CI)")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from utils.validate import preflight_final, validate_final_args

    # Every flag, the config and the output/cache folders are checked before any volume is read
    # (a bad --val-every used to fail only after an epoch had trained).
    validate_final_args(args)
    preflight_final(args)
    from engine.options import TrainOptions
    from engine.runtime import retain_freed_memory
    from engine.trainer import fit

    retain_freed_memory()  # activations reuse freed pages instead of faulting in new ones
    summary = fit(TrainOptions.from_namespace(args))
    if summary["stop"] == "preempted":
        from engine.preempt import EXIT_REQUEUE

        return EXIT_REQUEUE  # Final.sh requeues the job; --resume continues it exactly
    if summary.get("validation") and summary.get("rank", 0) == 0:
        print("final validation: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["validation"].items()))
    return 0


if __name__ == "__main__":
    run_cli(main)
