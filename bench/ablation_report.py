"""The ablation's report: the Dice table, the per-seed pairs TAL + semi vs TAL, organ losses, a figure.

Everything here reads run records (the ``runs`` of ``ablation.json``, see bench/ablation.py) and writes
``ablation.json``, ``ablation.md`` and ``ablation.png``; nothing trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from utils.errors import InputError

BASELINE, SEMI = "tal", "tal+semi"
# An organ is "lost" by a semi run when its held-out Dice falls below LOST_BELOW where the same seed's
# TAL run had above LOST_FROM_ABOVE (the failure the semi-supervised module must never produce).
LOST_BELOW, LOST_FROM_ABOVE = 0.5, 0.7


def _label(setting: str, result: dict[str, Any]) -> str:
    n = result.get("labeled_per_dataset")
    return f"{n} labeled/dataset" if n is not None else setting


def _mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _stat(values: list[float]) -> str:
    """``0.812`` for one value, ``0.812 ± 0.031`` (sample sd) for several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    m, sd = _mean_sd(values)
    return f"{m:.3f} ± {sd:.3f}"


def format_table(results: list[dict[str, Any]], organs: list[str]) -> str:
    """Markdown table: one row per (setting, variant), Dice per organ and their mean.

    Runs of the same setting and variant with several training seeds share a row: Dice as mean ± sample
    standard deviation over the seeds, checkpoint steps listed, train time summed. A failed run gets
    its own row.

    Args:
        results: run records (``setting``, ``variant``, ``labeled_per_dataset``, ``dice``, ``mean``,
            ``checkpoint_step``, optional ``other`` (the other checkpoint's score), ``seed``,
            ``train_s``, or ``error``).
        organs: organ column order.

    Returns:
        Markdown text (header + rows).
    """
    others = [r["other"]["checkpoint"] for r in results if "other" in r]
    seeded = len({r.get("seed") for r in results}) > 1
    head = ["labels", "variant", *organs, "mean", "checkpoint step"]
    if others:
        head.append(f"mean, {others[0]} checkpoint (step)")
    if seeded:
        head.append("seeds")
    head.append("train time")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    rows: list[list[dict[str, Any]]] = []
    for r in results:
        if "error" in r:
            rows.append([r])
            continue
        key = (r["setting"], r["variant"])
        if key not in groups:
            groups[key] = []
            rows.append(groups[key])
        groups[key].append(r)
    for group in rows:
        first = group[0]
        if "error" in first:
            cells = ["failed: " + str(first["error"]).replace("|", "/")[:120]] + [""] * (len(head) - 4)
        else:
            cells = [_stat([r["dice"].get(o, float("nan")) for r in group]) for o in organs]
            cells += [_stat([r["mean"] for r in group]),
                      ", ".join(str(r.get("checkpoint_step")) for r in group)]
            if others:
                alts = [r["other"] for r in group if "other" in r]
                cells.append(f"{_stat([a['mean'] for a in alts])} "
                             f"({', '.join(str(a.get('checkpoint_step')) for a in alts)})" if alts else "n/a")
            if seeded:
                cells.append(", ".join(str(r.get("seed")) for r in group))
        times = [r.get("train_s") for r in group]
        t = None if any(x is None for x in times) else sum(times)
        cells.append("n/a" if t is None else f"{t:.0f} s" if t < 100 else f"{t / 60:.1f} min")
        lines.append("| " + " | ".join([_label(first["setting"], first), first["variant"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def _ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if "error" not in r and "dice" in r]


def paired_differences(results: list[dict[str, Any]], variant: str = SEMI,
                       baseline: str = BASELINE) -> dict[int, dict[str, Any]]:
    """Per labeled count: ``variant`` minus ``baseline`` mean Dice, paired by training seed.

    Returns:
        ``{labeled: {"best": [diff per seed], "last": [...], "seeds": [...]}}`` for the counts where
        both variants ran with at least one common seed (seeds in ascending order).
    """
    by: dict[tuple[int, str, Any], dict[str, Any]] = {}
    for r in _ok(results):
        by[(r["labeled_per_dataset"], r["variant"], r.get("seed"))] = r
    out: dict[int, dict[str, Any]] = {}
    for (n, v, seed), r in sorted(by.items(), key=lambda kv: (kv[0][0], str(kv[0][2]))):
        if v != variant or (n, baseline, seed) not in by:
            continue
        b = by[(n, baseline, seed)]
        entry = out.setdefault(n, {"best": [], "last": [], "seeds": []})
        entry["seeds"].append(seed)
        entry["best"].append(r["mean"] - b["mean"])
        if "other" in r and "other" in b:
            entry["last"].append(r["other"]["mean"] - b["other"]["mean"])
    return out


def lost_organs(results: list[dict[str, Any]], variant: str = SEMI,
                baseline: str = BASELINE) -> list[str]:
    """Runs of ``variant`` that lost an organ its same-seed ``baseline`` run found (one line each)."""
    by = {(r["labeled_per_dataset"], r["variant"], r.get("seed")): r for r in _ok(results)}
    lines = []
    for (n, v, seed), r in sorted(by.items(), key=lambda kv: (kv[0][0], str(kv[0][2]))):
        b = by.get((n, baseline, seed))
        if v != variant or b is None:
            continue
        for organ, d in r["dice"].items():
            if d < LOST_BELOW and b["dice"].get(organ, 0.0) > LOST_FROM_ABOVE:
                lines.append(f"{n} labeled, seed {seed}: {organ} {b['dice'][organ]:.3f} -> {d:.3f}")
    return lines


def _pairs_text(results: list[dict[str, Any]], variant: str) -> list[str]:
    pairs = paired_differences(results, variant)
    if not pairs:
        return []
    lines = [f"Paired by seed, {variant} minus {BASELINE} (mean Dice over organs):", "",
             "| labels | checkpoint | per seed | mean ± sd | ahead |", "|---|---|---|---|---|"]
    for n, e in pairs.items():
        for ck in ("best", "last"):
            d = e[ck]
            if not d:
                continue
            m, sd = _mean_sd(d)
            lines.append(f"| {n} labeled/dataset | {ck} | {', '.join(f'{x:+.3f}' for x in d)} | "
                         f"{m:+.3f} ± {sd:.3f} | {sum(x > 0 for x in d)} of {len(d)} |")
    return [*lines, ""]


def format_markdown(report: dict[str, Any]) -> str:
    """``ablation.md``: what was trained, on what, the Dice table, the pairs and organ losses."""
    o = report["options"]
    organs = report.get("organs", ["liver", "kidney", "spleen"])
    m = report.get("machine", {})
    runs = report["runs"]
    lost = lost_organs(runs)
    variants = sorted({r["variant"] for r in _ok(runs) if r["variant"].startswith(SEMI)})
    lines = [
        "# UniMOS ablation on phantoms" + (" (--quick)" if report.get("quick") else ""), "",
        f"Trained on the partial datasets LiTS, KiTS, MSDSpleen only ({', '.join(map(str, o['labeled']))} "
        f"labeled phantoms per dataset; {o['unlabeled']} unlabeled and {o['val']} validation per dataset in "
        f"every setting); Dice on {o['held_out']} held-out fully labeled BTCV phantoms, segmented on their "
        "original grids with the best checkpoint (chosen on the partial datasets' validation volumes: what "
        "a user ships); the last checkpoint (same number of labeled steps in every run) in its own column.",
        "",
        f"Every run: `Final.py` {o['steps_per_epoch'] * o['epochs']} labeled steps ({o['epochs']} epochs x "
        f"{o['steps_per_epoch']}), batch {o['batch']}, width {o['width']}, {o['inplane']}x{o['inplane']} "
        f"in-plane, {o['blocksize']} crops; semi runs use Final.py's defaults and add 2 x "
        f"{o['unlabeled_batch']} unlabeled slices per step after the warm-up"
        + (f"; every run also got `{o['final_args']}`" if o.get("final_args") else "") + ".", "",
    ]
    if report.get("phantom_draws"):
        lines += ["Phantoms drawn separately for the labeled counts "
                  + ", ".join("/".join(map(str, d)) for d in report["phantom_draws"])
                  + " (one ablation each, joined with `--merge`): runs pair within a labeled count only.", ""]
    lines += [
        format_table(runs, organs),
    ]
    for v in variants:
        lines += _pairs_text(runs, v)
    lines += [f"Organs lost by {SEMI} (held-out Dice < {LOST_BELOW} where the same seed's {BASELINE} run had "
              f"> {LOST_FROM_ABOVE}): " + ("; ".join(lost) if lost else "none") + ".", "",
              f"Machine: {m.get('cpu_model', 'n/a')}, {m.get('cores', 'n/a')} cores, GPU "
              f"{', '.join(m.get('gpus') or []) or 'none'}, torch {m.get('torch', 'n/a')}; load average "
              f"(1 min) {report.get('load_avg_start')} at start, {report.get('load_avg_end')} at the end; "
              + (f"the joined ablations took {', '.join(f'{x / 60:.1f}' for x in report['seconds_each'])} "
                 "min." if report.get("seconds_each") else f"total {report.get('seconds', 0) / 60:.1f} min.")]
    return "\n".join(lines) + "\n"


def curve_points(results: list[dict[str, Any]], variant: str,
                 checkpoint: str = "best") -> list[tuple[int, float, float]]:
    """``(labeled, mean, sd)`` of the mean Dice over seeds per labeled count, for the figure."""
    by: dict[int, list[float]] = {}
    for r in _ok(results):
        if r["variant"] != variant:
            continue
        value = r["mean"] if checkpoint == "best" else r.get("other", {}).get("mean")
        if value is not None:
            by.setdefault(r["labeled_per_dataset"], []).append(float(value))
    return [(n, *_mean_sd(v)) for n, v in sorted(by.items())]


def draw_figure(results: list[dict[str, Any]], path: Path, variants: tuple[str, ...] = (BASELINE, SEMI),
                size: tuple[int, int] = (640, 400)) -> Path:
    """Mean held-out Dice (best checkpoint) vs labeled volumes per dataset, with sd error bars (PNG)."""
    from utils.fileio import atomic_path
    from utils.plot import PALETTE

    w, h = size
    left, right, top, bottom = 60, 130, 36, 48
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    curves = {v: curve_points(results, v) for v in variants}
    xs = sorted({p[0] for c in curves.values() for p in c})
    ys = [y for c in curves.values() for _, m, sd in c for y in (m - sd, m + sd)]
    if not xs:
        d.text((left, h // 2), "no finished runs", fill="black")
    else:
        y0 = max(0.0, math.floor(min(ys) * 10) / 10)
        y1 = min(1.0, math.ceil(max(ys) * 10) / 10)
        y1 = y1 if y1 > y0 else y0 + 0.1
        # labeled counts sit at even spacing (1, 2, 4 are a log scale in effect)

        def sx(n: int) -> float:
            i = xs.index(n)
            return left + (i + 0.5) / len(xs) * (w - left - right)

        def sy(y: float) -> float:
            return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

        d.rectangle([left, top, w - right, h - bottom], outline="black")
        t = y0
        while t <= y1 + 1e-9:
            d.line([(left, sy(t)), (w - right, sy(t))], fill=(230, 230, 230))
            d.text((8, sy(t) - 6), f"{t:.2f}", fill="black")
            t += 0.05 if y1 - y0 <= 0.4 else 0.1
        for n in xs:
            d.text((sx(n) - 4, h - bottom + 6), str(n), fill="black")
        for i, (name, pts) in enumerate(curves.items()):
            color = PALETTE[i % len(PALETTE)]
            shift = (i - (len(curves) - 1) / 2) * 6  # keep the error bars of the two curves apart
            line = [(sx(n) + shift, sy(m)) for n, m, _ in pts]
            if len(line) > 1:
                d.line(line, fill=color, width=2)
            for (_, m, sd), (px, py) in zip(pts, line):
                d.line([(px, sy(m - sd)), (px, sy(m + sd))], fill=color, width=1)
                d.line([(px - 4, sy(m - sd)), (px + 4, sy(m - sd))], fill=color)
                d.line([(px - 4, sy(m + sd)), (px + 4, sy(m + sd))], fill=color)
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
            d.text((w - right + 10, top + 16 * i), name, fill=color)
    d.text((left, 10), "held-out BTCV phantoms: mean Dice (best checkpoint), mean ± sd over seeds",
           fill="black")
    d.text(((w - right + left) // 2 - 80, h - 20), "labeled volumes per dataset", fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``ablation.json``, ``ablation.md`` and ``ablation.png`` into ``out``."""
    from utils.fileio import write_json_atomic, write_text_atomic

    write_json_atomic(out / "ablation.json", report)
    write_text_atomic(out / "ablation.md", format_markdown(report))
    draw_figure(report["runs"], out / "ablation.png")


def merge_reports(folders: list[Path], out: Path) -> dict[str, Any]:
    """One report from the ``ablation.json`` of several folders (same options but for the seeds).

    Raises:
        InputError: a folder without a readable report, or reports of different settings.
    """
    reports = []
    for f in folders:
        try:
            reports.append(json.loads((f / "ablation.json").read_text()))
        except (OSError, ValueError) as err:
            raise InputError(f / "ablation.json", f"cannot read the ablation report ({err})") from None
    # Everything that decides a run's result must agree, but the labeled counts: folders of different
    # counts are separate studies (one phantom draw each), joined in one table and figure.
    keys = ("unlabeled", "val", "held_out", "scale", "steps", "epochs", "inplane", "width",
            "blocksize", "batch", "unlabeled_batch", "seed", "final_args")
    first = reports[0]["options"]
    for f, r in zip(folders, reports):
        differ = [k for k in keys if r["options"].get(k, "") != first.get(k, "")]
        if differ:
            raise InputError(f / "ablation.json", f"options differ from {folders[0]}: {', '.join(differ)}")
    draws = sorted({tuple(r["options"]["labeled"]) for r in reports})
    counts = [n for d in draws for n in d]
    shared = sorted({n for n in counts if counts.count(n) > 1})
    if shared:  # two draws holding one labeled count would put unpaired runs into one row
        raise InputError(folders[0] / "ablation.json", f"labeled counts {shared} overlap between the phantom "
                         f"draws {[list(d) for d in draws]}")
    merged = dict(reports[0])
    # one table row per setting and variant, settings in order: runs of several folders interleave
    runs = [run for r in reports for run in r["runs"]]
    merged["runs"] = sorted(runs, key=lambda run: run.get("labeled_per_dataset") or 0)
    merged["options"] = {**first, "labeled": sorted({n for d in draws for n in d}),
                         "train_seeds": sorted({s for r in reports
                                                for s in r["options"].get("train_seeds", [])})}
    if len(draws) > 1:
        merged["phantom_draws"] = [list(d) for d in draws]
    merged["seconds"] = max(r.get("seconds", 0) for r in reports)
    merged["seconds_each"] = [r.get("seconds", 0) for r in reports]
    merged["merged_from"] = [str(f) for f in folders]
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, merged)
    return merged
