"""The demo's Markdown report: Dice/HD95 tables, training curves, overlays, timings."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from utils.fileio import write_text_atomic
from utils.plot import line_chart

# The demo's quality bar on phantoms (README): validation Dice per organ.
DICE_TARGETS = {"liver": 0.90, "kidney": 0.85, "spleen": 0.85}


def pooled_organ_table(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per organ, metrics pooled over every scored case of every dataset.

    Args:
        reports: dataset name -> the JSON evaluate.py wrote (``organs``, ``cases``).

    Returns:
        organ -> {"n", "dice", "hd95", "assd", "n_not_finite"} with means over finite values.
    """
    pooled: dict[str, dict[str, list[float]]] = {}
    for rep in reports.values():
        for case in rep.get("cases", []):
            for organ in rep.get("organs", []):
                d = case.get(f"{organ}_dice")
                if d is None:
                    continue
                slot = pooled.setdefault(organ, {"dice": [], "hd95": [], "assd": []})
                for m in ("dice", "hd95", "assd"):
                    v = case.get(f"{organ}_{m}")
                    slot[m].append(float("inf") if v is None else float(v))
    table = {}
    for organ, vals in pooled.items():
        row: dict[str, Any] = {"n": len(vals["dice"])}
        for m, xs in vals.items():
            finite = [x for x in xs if math.isfinite(x)]
            row[m] = sum(finite) / len(finite) if finite else None
            if m != "dice":
                row[f"{m}_not_finite"] = len(xs) - len(finite)
        table[organ] = row
    return table


def _num(v: Any, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def format_pooled(table: dict[str, dict[str, Any]]) -> str:
    """Markdown table of :func:`pooled_organ_table` with the demo's Dice targets."""
    lines = ["| organ | cases | Dice | HD95 (mm) | ASSD (mm) | target Dice | met |",
             "|---|---|---|---|---|---|---|"]
    for organ, r in table.items():
        target = DICE_TARGETS.get(organ)
        met = "" if target is None or r["dice"] is None else ("yes" if r["dice"] >= target else "**no**")
        hd = _num(r["hd95"], 2) + (f" ({r['hd95_not_finite']} inf)" if r["hd95_not_finite"] else "")
        lines.append(f"| {organ} | {r['n']} | {_num(r['dice'], 4)} | {hd} | {_num(r['assd'], 2)} | "
                     f"{'' if target is None else f'{target:.2f}'} | {met} |")
    return "\n".join(lines)


def format_dataset(name: str, rep: dict[str, Any]) -> str:
    lines = [f"**{name}** ({len(rep.get('cases', []))} validation volumes)", "",
             "| organ | Dice | HD95 (mm) | ASSD (mm) | volume pred / GT (ml) |", "|---|---|---|---|---|"]
    def ms(stats: dict[str, Any], m: str, digits: int) -> str:
        st = stats[m]
        if st["mean"] is None:
            return "n/a"
        return f"{st['mean']:.{digits}f} ± {st['sd']:.{digits}f}"

    for organ, s in rep.get("summary", {}).items():
        lines.append(f"| {organ} | {ms(s, 'dice', 3)} | {ms(s, 'hd95', 2)} | {ms(s, 'assd', 2)} | "
                     f"{ms(s, 'vol_pred_ml', 1)} / {ms(s, 'vol_gt_ml', 1)} |")
    return "\n".join(lines)


def training_curves(history_csv: Path, out_dir: Path) -> list[Path]:
    """Loss and validation-Dice PNGs from a history CSV; [] when there is no history."""
    if not history_csv.is_file():
        return []
    with open(history_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return []

    def series(key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            if r.get(key) not in (None, ""):
                xs.append(float(r["step"]))
                ys.append(float(r[key]))
        return xs, ys

    keys = rows[0].keys() | set().union(*(r.keys() for r in rows))
    loss_keys = [k for k in ("loss", "loss_x", "loss_fp", "loss_s1", "loss_s2") if k in keys]
    val_keys = sorted(k for k in keys if k.startswith("val/"))
    paths = [line_chart({k: series(k) for k in loss_keys}, out_dir / "curve_loss.png",
                        title="training loss", xlabel="step")]
    if val_keys:
        paths.append(line_chart({k[4:]: series(k) for k in val_keys}, out_dir / "curve_val.png",
                                title="validation Dice (merged label space per dataset)",
                                xlabel="step", ylim=(0.0, 1.0)))
    return paths


def training_line(summary: dict[str, Any] | None) -> str:
    """One line on what was trained (steps, stop reason, the weights served), loud when cut short."""
    if not summary:
        return "Training summary: not found."
    best = summary.get("best_score")  # null in the JSON when no validation ran (non-finite)
    score = f"{best:.4f}" if isinstance(best, (int, float)) else "none yet"
    line = (f"Trained {summary.get('steps')} of {summary.get('total_steps')} steps "
            f"(stop: {summary.get('stop')}); best checkpoint serves the {summary.get('served', 'student')} "
            f"weights (validation score {score}).")
    if summary.get("stop") != "done":
        line = (f"**WARNING: training stopped early ({summary.get('stop')}): results are not the "
                "preset's.** " + line)
    return line


def write_demo_report(out: Path, reports: dict[str, dict[str, Any]], times: dict[str, float],
                      history_csv: Path, summary: dict[str, Any] | None = None) -> Path:
    """Write ``out/report.md`` and print the pooled per-organ table. Returns the report path."""
    pooled = pooled_organ_table(reports)
    table = format_pooled(pooled)
    print("\nValidation (phantoms, original grids, all datasets pooled):\n" + table)
    print(training_line(summary))
    curves = training_curves(history_csv, out)
    parts = ["# UniMOS demo report", "",
             "Synthetic phantoms; trained on the partial datasets (LiTS, KiTS, MSD Spleen) and their "
             "unlabeled volumes; segmented on each validation volume's original grid. BTCV is fully "
             "labeled and never trained on, so it scores every organ.", "", training_line(summary), "",
             "## Per organ (all validation volumes pooled)", "", table, ""]
    parts += ["## Per dataset", ""]
    for name, rep in reports.items():
        parts += [format_dataset(name, rep), ""]
    if curves:
        parts += ["## Training curves", ""]
        parts += [f"![{p.stem}]({os.path.relpath(p, out)})" for p in curves] + [""]
    pngs = sorted((out / "png").rglob("*.png")) if (out / "png").is_dir() else []
    if pngs:
        parts += ["## Overlays (prediction in colour, ground truth in white)", ""]
        parts += [f"![{p.stem}]({os.path.relpath(p, out)})" for p in pngs[:8]] + [""]
    parts += ["## Wall time (s)", "", "| step | seconds |", "|---|---|"]
    parts += [f"| {k} | {v:.1f} |" for k, v in times.items()] + [""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path
