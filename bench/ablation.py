"""Ablation on phantoms: naive loss vs target adaptive loss (TAL) vs TAL + semi-supervision.

    python -m bench.ablation --out DIR [--quick] [--labeled 1,2,4] [--train-seeds 0,1,2]
                             [--variants naive,tal,tal+semi] [--extra 2:tal+semi/head] [--steps 360]
                             [--unlabeled 10] [--semi-variants] [--device auto] [--reuse]
    python -m bench.ablation --out DIR --merge DIR1 DIR2 ...   # one report from several ablation folders

What it does (everything under ``DIR``):

1. Synthesizes phantoms once (``data.phantom.synthesize``) into ``DIR/phantoms``: the partial datasets
   LiTS (liver), KiTS (kidney), MSDSpleen (spleen) with ``max(--labeled)`` labeled, ``--val``
   validation and ``--unlabeled`` unlabeled cases each, and ``--held-out`` BTCV validation cases, which
   label all three organs. A rerun with the same settings reuses them.
2. Resamples the partial datasets in-plane once (``data.resample_tree.resample_tree``) to ``DIR/resampled``.
3. Makes one training root per labeled count ``n`` under ``DIR/train_data`` of symlinks into
   ``DIR/resampled``, keeping the first ``n`` labeled volumes of each dataset and every validation and
   unlabeled volume. No fully labeled data is trained on. One slice cache serves every run.
4. Trains every variant for every labeled count and training seed with ``python Final.py ...`` (what a
   user runs), the same number of labeled steps for all: ``naive`` (``--loss naive --no-semi``), ``tal``
   (``--loss tal --no-semi``), ``tal+semi`` (``--semi``: Final.py's defaults, nothing else), and the
   ``--extra`` runs (default: ``tal+semi/head``, head-level feature perturbation, at 2 labeled).
   Variants in ``--single-seed`` (default ``naive``, the known failure) run with the first seed only.
5. Segments each held-out BTCV volume on its original grid with the run's best checkpoint (selected on
   the partial datasets' validation volumes: what a user ships) and its last one, and scores Dice.

Writes ``DIR/ablation.json`` (settings, machine, every run's command, times, per-case and mean Dice),
``DIR/ablation.md`` (the table, the per-seed pairs TAL+semi vs TAL, organ losses) and
``DIR/ablation.png`` (mean Dice vs labeled volumes per dataset, TAL vs TAL+semi, error bars = sd over
seeds) after every run. Training logs go to ``DIR/runs/<setting>_<variant>[_seedN]/train.log``.
``--merge`` writes the same report from the runs of several ablation folders (e.g. two halves of the
seeds run side by side with ``--threads 1`` each).

Short CPU runs are noisy: the same command on 1 or 2 threads can differ by 0.05 mean Dice. A
difference between two variants means something only across seeds, paired by seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ablation_data import (  # noqa: E402, F401 -- re-exported: bench.ablation.<name>
    HELD_OUT,
    PARTIAL,
    RESAMPLE_STAMP,
    SYNTH_STAMP,
    held_out_cases,
    make_training_root,
    prepare_phantoms,
    resample_partial,
)
from bench.ablation_eval import evaluate  # noqa: E402
from bench.ablation_options import (  # noqa: E402, F401 -- re-exported
    QUICK,
    SEMI_VARIANTS,
    VARIANTS,
    VIEW,
    Options,
    _extra_pairs,
    check_options,
    setting_name,
)
from bench.ablation_report import format_table, merge_reports, write_report  # noqa: E402
from utils.errors import InputError, run_cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RUN_STAMP = "ablation_command.json"


# ----------------------------------------------------------------------------------------------
# Runs


def plan_runs(o: Options) -> list[tuple[int, str, int]]:
    """``(labeled count, variant, training seed)`` triples in run order.

    Seed by seed (all settings and variants of one seed before the next), so that an interrupted
    ablation already holds complete pairs.
    """
    pairs = [(n, v) for n in o.labeled for v in o.variants]
    pairs += [p for p in _extra_pairs(o) if p not in pairs]
    if o.semi_variants:
        pairs += [(min(o.labeled), v) for v in SEMI_VARIANTS if (min(o.labeled), v) not in pairs]
    seeds = o.seeds
    return [(n, v, t) for t in seeds for n, v in pairs if t == seeds[0] or v not in o.single_seed]


def run_name(o: Options, labeled: int, variant: str, seed: int) -> str:
    """Folder name of a run under ``DIR/runs`` (the phantom seed's run keeps the plain name)."""
    name = f"{setting_name(labeled)}_{variant.replace('+', '_').replace('/', '_')}"
    return name if seed == o.seed else f"{name}_seed{seed}"


def variant_args(variant: str) -> list[str]:
    """Final.py arguments of a variant (without the semi warm-up)."""
    return list(VARIANTS.get(variant) or SEMI_VARIANTS[variant])


def train_command(o: Options, data_root: Path, cache: Path, out: Path, variant: str,
                  seed: int | None = None) -> list[str]:
    """The ``python Final.py ...`` command line of one run.

    Args:
        o: options (preset, steps, seed).
        data_root: the setting's training root.
        cache: shared slice cache folder.
        out: the run's output folder.
        variant: key of :data:`VARIANTS` or :data:`SEMI_VARIANTS`.
        seed: training seed (default ``o.seed``).

    Returns:
        argv list starting with the Python executable.
    """
    args = variant_args(variant)
    cmd = [sys.executable, str(REPO / "Final.py"), "--data", str(data_root), "--datasets", ",".join(PARTIAL),
           "--cache", str(cache), "--out", str(out), "--view", VIEW,
           "--seed", str(o.seed if seed is None else seed),
           "--inplane", str(o.inplane), str(o.inplane), "--width", str(o.width),
           "--blocksize", str(o.blocksize), "-b", str(o.batch),
           "--unlabeled-batchsize", str(o.unlabeled_batch),
           "--schedule", "poly", "--workers", str(o.workers), "--device", o.device,
           "--epochs", str(o.epochs), "--steps-per-epoch", str(o.steps_per_epoch), *args]
    return cmd + shlex.split(o.final_args)


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    t = str(threads)
    env.update({"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


# Options that do not change what a run trains (where it writes, how it reports, loader processes)
_NOT_TRAINING = frozenset({"out", "resume", "overwrite", "progress", "tensorboard", "workers"})


def _final_defaults() -> dict[str, Any]:
    """Final.py's defaults now, as JSON values. A command leaves most settings to them, so the same
    command after a default changed (e.g. --cutmix-pairs in 4f6627f) trains something else."""
    from engine.options import TrainOptions

    return json.loads(json.dumps(asdict(TrainOptions()), default=str))


def _same_defaults(stored: dict[str, Any] | None) -> bool:
    """Whether a run stamped with ``stored`` defaults trained what today's defaults train.

    Compared on the options both know, leaving out those that do not change training: an option
    added since (``--overwrite``) must not make every finished run look different. One added with a
    default other than the old behaviour has its old value in ``engine.resume.LEGACY_ARGS``.
    """
    from engine.resume import LEGACY_ARGS

    if not isinstance(stored, dict):
        return False
    now = _final_defaults()
    then = {**LEGACY_ARGS, **stored}
    return all(then[k] == now[k] for k in now.keys() & then.keys() if k not in _NOT_TRAINING)


def _finished(out: Path, cmd: list[str]) -> bool:
    try:
        stamp = json.loads((out / RUN_STAMP).read_text())
        same = stamp["command"] == cmd[1:] and _same_defaults(stamp.get("final_defaults"))
        summary = json.loads((out / f"train_summary_{VIEW}.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return same and summary.get("stop") == "done" and (out / f"resu_best_{VIEW}.pth.tar").is_file()


def train(cmd: list[str], out: Path, threads: int, reuse: bool, log=print) -> dict[str, Any]:
    """Run one Final.py command (log in ``out/train.log``), or reuse a finished run of the identical
    command under the same Final.py defaults.

    Returns:
        ``{"returncode", "wall_s", "reused", "summary" (train_summary json or None), "tail"}``.

    Raises:
        InputError: ``out`` exists and was not written by this script.
    """
    if reuse and _finished(out, cmd):
        log("  reusing the finished run in " + str(out))
        summary = json.loads((out / f"train_summary_{VIEW}.json").read_text())
        return {"returncode": 0, "wall_s": 0.0, "reused": True, "summary": summary, "tail": ""}
    if out.exists():
        if not (out / RUN_STAMP).is_file() and any(out.iterdir()):
            raise InputError(out, f"exists and holds no {RUN_STAMP}: not a run of this script; "
                             "choose another --out")
        shutil.rmtree(out)  # a stale best checkpoint must not outlive its run
    out.mkdir(parents=True)
    from utils.fileio import write_json_atomic

    write_json_atomic(out / RUN_STAMP, {"command": cmd[1:], "final_defaults": _final_defaults()})
    log("  $ " + " ".join(shlex.quote(c) for c in ["python", *cmd[1:]]))
    t0 = time.time()
    tail: list[str] = []
    with open(out / "train.log", "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(threads), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            log("    " + line.rstrip())
            tail = (tail + [line.rstrip()])[-20:]
        rc = proc.wait()
    summary = None
    with contextlib.suppress(OSError, ValueError):  # a failed run writes no summary
        summary = json.loads((out / f"train_summary_{VIEW}.json").read_text())
    return {"returncode": rc, "wall_s": round(time.time() - t0, 1), "reused": False, "summary": summary,
            "tail": "\n".join(tail) if rc else ""}


# ----------------------------------------------------------------------------------------------
# Driver


def run_ablation(o: Options, log=print) -> dict[str, Any]:
    """Synthesize, resample, train every run, evaluate; write ``ablation.json`` / ``ablation.md``.

    Args:
        o: the options (see :class:`Options`).
        log: receives progress lines (training logs included).

    Returns:
        The report written to ``ablation.json``.

    Raises:
        InputError: bad options or an output folder that cannot be used.
    """
    import torch

    from bench.run import machine_info

    check_options(o)
    out = Path(o.out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output folder is a file")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(o.threads)
    t_all = time.time()
    report: dict[str, Any] = {
        "options": {**asdict(o), "steps_per_epoch": o.steps_per_epoch},
        "quick": o.quick, "machine": machine_info(), "load_avg_start": _load1(), "runs": []}
    raw = prepare_phantoms(o, log)
    res = resample_partial(o, raw, log)
    cases = held_out_cases(raw)
    roots, counts = {}, {}
    for n in o.labeled:
        roots[n] = out / "train_data" / setting_name(n)
        counts[setting_name(n)] = make_training_root(res, roots[n], n)
    report["data"] = {"counts": counts, "held_out": [c.case_id for c in cases]}

    def save() -> None:
        report["load_avg_end"] = _load1()
        report["seconds"] = round(time.time() - t_all, 1)
        write_report(out, report)

    plan = plan_runs(o)
    for i, (labeled, variant, seed) in enumerate(plan, 1):
        run_dir = out / "runs" / run_name(o, labeled, variant, seed)
        log(f"[{i}/{len(plan)}] {labeled} labeled / {variant} / seed {seed} (load average {_load1()})")
        cmd = train_command(o, roots[labeled], out / "cache", run_dir, variant, seed)
        rec: dict[str, Any] = {"setting": setting_name(labeled), "variant": variant, "seed": seed,
                               "labeled_per_dataset": labeled, "command": cmd[1:], "run_dir": str(run_dir)}
        tr = train(cmd, run_dir, o.threads, o.reuse, log)
        summary = tr["summary"] or {}
        rec.update({"returncode": tr["returncode"], "wall_s": tr["wall_s"], "reused": tr["reused"],
                    "train_s": summary.get("seconds"), "steps": summary.get("steps"),
                    "val_score": summary.get("best_score"), "val": summary.get("validation")})
        if tr["returncode"] != 0:
            rec["error"] = f"Final.py exit code {tr['returncode']}: " + (tr["tail"].splitlines() or [""])[-1]
        else:
            try:
                # Both checkpoints are scored: "best" is what segment.py uses, "last" is the
                # comparison at exactly the same number of labeled steps.
                other = "last" if o.checkpoint == "best" else "best"
                scores = evaluate(run_dir, cases, o.device, checkpoints=(o.checkpoint, other))
                rec.update(scores[o.checkpoint])
                rec["other"] = {"checkpoint": other,
                                **{k: scores[other][k] for k in ("dice", "mean", "checkpoint_step")}}
            except InputError as err:
                rec["error"] = f"evaluation: {err}"
        if "error" not in rec:
            report["organs"] = list(rec["dice"])
            log("  held-out Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in rec["dice"].items())
                + f"; mean {rec['mean']:.3f}")
        else:
            log("  " + rec["error"])
        report["runs"].append(rec)
        save()
    save()
    return report


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def build_parser() -> argparse.ArgumentParser:
    d = Options(out="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (phantoms, data, runs, tables)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny phantoms (64x64), width 4, 32x32, 6 steps per run (~30 s)")
    p.add_argument("--steps", type=int, default=None, help=f"labeled steps per run (default {d.steps})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs (validations) per run (default {d.epochs})")
    p.add_argument("--labeled", default=None,
                   help=f"comma-separated labeled volumes per dataset, one setting each "
                        f"(default {','.join(map(str, d.labeled))})")
    p.add_argument("--unlabeled", type=int, default=None,
                   help=f"unlabeled volumes per dataset ({d.unlabeled})")
    p.add_argument("--val", type=int, default=None, help=f"validation volumes per dataset ({d.val})")
    p.add_argument("--held-out", type=int, default=None, help=f"held-out BTCV volumes ({d.held_out})")
    p.add_argument("--scale", type=float, default=None, help=f"phantom in-plane scale ({d.scale}: 256x256)")
    p.add_argument("--inplane", type=int, default=None, help=f"resampled in-plane size ({d.inplane})")
    p.add_argument("--width", type=int, default=None, help=f"MOSNet width ({d.width})")
    p.add_argument("--blocksize", type=int, default=None, help=f"training crop ({d.blocksize})")
    p.add_argument("--batch", type=int, default=None, help=f"labeled batch ({d.batch})")
    p.add_argument("--unlabeled-batch", type=int, default=None, help=f"unlabeled batch ({d.unlabeled_batch})")
    p.add_argument("--workers", type=int, default=None, help=f"loader workers per run ({d.workers})")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--extra", default=None,
                   help=f"comma-separated n:variant runs added (default {','.join(d.extra)}; '' for none)")
    p.add_argument("--single-seed", default=",".join(d.single_seed),
                   help="comma-separated variants run with the first training seed only")
    p.add_argument("--semi-variants", action="store_true",
                   help="also the other semi variants (pseudo full, self teacher) at the smallest count")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the phantoms")
    p.add_argument("--train-seeds", default=None,
                   help="comma-separated training seeds: every run repeated per seed, table of mean +- sd "
                        f"(default {','.join(map(str, d.train_seeds))})")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="write one report into --out from the runs of these ablation folders, train nothing")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=d.threads, help="threads per process")
    p.add_argument("--final-args", default="", help="extra Final.py arguments for every run, quoted")
    p.add_argument("--checkpoint", choices=("best", "last"), default=d.checkpoint,
                   help="checkpoint scored: best on the partial datasets' validation, or last")
    p.add_argument("--reuse", action="store_true",
                   help="keep runs that finished with the identical command (resume an interrupted ablation)")
    return p


def options_from_args(a: argparse.Namespace) -> Options:
    """Defaults, then the ``--quick`` preset, then explicit flags."""
    o = Options(out=a.out, quick=a.quick)
    if a.quick:
        for k, v in QUICK.items():
            setattr(o, k, v)
    for k in ("steps", "epochs", "unlabeled", "val", "held_out", "scale", "inplane",
              "width", "blocksize", "batch", "unlabeled_batch", "workers"):
        v = getattr(a, k)
        if v is not None:
            setattr(o, k, v)

    def items(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    def ints(flag: str, text: str) -> list[int]:
        try:
            return [int(t) for t in items(text)]
        except ValueError:
            raise InputError(None, f"{flag} must be comma-separated integers, got {text!r}") from None

    if a.labeled is not None:
        o.labeled = ints("--labeled", a.labeled)
    if a.train_seeds is not None:
        o.train_seeds = ints("--train-seeds", a.train_seeds)
    if a.extra is not None:
        o.extra = items(a.extra)
    o.variants, o.single_seed = items(a.variants), items(a.single_seed)
    o.semi_variants, o.seed, o.device, o.threads = a.semi_variants, a.seed, a.device, a.threads
    o.final_args, o.reuse, o.checkpoint = a.final_args, a.reuse, a.checkpoint
    return o


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.merge:
        report = merge_reports([Path(d) for d in a.merge], Path(a.out))
        print(format_table(report["runs"], report.get("organs", ["liver", "kidney", "spleen"])))
        print(f"wrote {Path(a.out) / 'ablation.md'} from {len(report['runs'])} runs")
        return 0
    o = options_from_args(a)
    report = run_ablation(o)
    report_md = Path(o.out) / "ablation.md"
    print()
    print(format_table(report["runs"], report.get("organs", ["liver", "kidney", "spleen"])))
    print(f"wrote {Path(o.out) / 'ablation.json'} and {report_md}")
    return 1 if any("error" in r for r in report["runs"]) else 0


if __name__ == "__main__":
    # The phantoms need many small matrix products: OpenBLAS threads only add overhead (see synth.py).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    run_cli(main)
