"""Evaluation of label files against ground truth: pairing, label mapping, reports.

Used by ``evaluate.py`` and ``segment.py --evaluating``. The metrics themselves are the pure
functions of :mod:`utils.metrics`.

Class spaces: each evaluated organ has one or more values in the prediction (``--labels``, e.g.
``kidney:2,3``, or the config order, class ``i + 1``) and in the ground truth (the same, or the config
class after mapping the file values with a dataset's label map, ``--gt-dataset``). Both maps are
brought to one space (organ ``n`` of the evaluated list = ``n + 1``) before scoring. Prediction and
ground truth are always mapped consistently: with ``--labels`` and ``--gt-dataset`` together, a
prediction value that ``--labels`` leaves out (it would count as background) while the dataset maps it
to a scored organ is refused -- e.g. ``kidney:2`` on a prediction holding BTCV's left kidney 3.
A ground truth on the prediction's physical grid in another index order is reoriented exactly.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.config import Config, DatasetSpec
from data.layout import case_key, index_by_key
from data.volume import VOLUME_SUFFIXES, Volume, match_grid, read_volume, strip_volume_suffix
from utils.errors import InputError
from utils.fileio import json_dumps, write_texts_atomic
from utils.metrics import evaluate_case

METRICS = ("dice", "hd95", "assd", "vol_pred_ml", "vol_gt_ml")


def parse_labels(text: str) -> dict[str, tuple[int, ...]]:
    """``"liver:1,kidney:2,3"`` -> ``{"liver": (1,), "kidney": (2, 3)}``.

    A bare number continues the organ before it, so several file values may map to one organ.

    Raises:
        InputError: malformed text, a repeated name or value, values outside 1..255.
    """
    out: dict[str, list[int]] = {}
    current: str | None = None
    seen: set[int] = set()
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, value = item.partition(":") if ":" in item else ("", "", item)
        try:
            v = int(value)
        except ValueError:
            v = -1
        if sep and name.strip():
            current = name.strip()
            if current in out:
                raise InputError(None, f"--labels: '{item}' repeats the name {current!r}")
            out[current] = []
        elif sep or current is None:
            current = None
        if current is None or not 1 <= v <= 255:
            raise InputError(None, f"--labels: '{item}' is not NAME:VALUE[,VALUE...] with values in 1..255")
        if v in seen:
            raise InputError(None, f"--labels: value {v} is given twice")
        seen.add(v)
        out[current].append(v)
    if not out:
        raise InputError(None, "--labels is empty")
    return {k: tuple(v) for k, v in out.items()}


@dataclass(frozen=True)
class ClassSpec:
    """Which organs are scored and which label values they have in the prediction and the ground truth.

    Attributes:
        organs: evaluated organ names (report order).
        pred_values: the values of each organ in prediction files.
        gt_values: the values of each organ in ground truth files *after* the dataset mapping (if any).
        gt_dataset: dataset whose label map converts ground-truth file values, or None.
        config: the config (for the dataset mapping).
        allowed: label values accepted in the files (the config's classes when there is no
            ``--labels``; other values are an error), or None: values not listed count as background.
    """

    organs: tuple[str, ...]
    pred_values: tuple[tuple[int, ...], ...]
    gt_values: tuple[tuple[int, ...], ...]
    gt_dataset: DatasetSpec | None
    config: Config
    allowed: tuple[int, ...] | None = None


def unlisted_organ_values(spec: ClassSpec, present: Sequence[int]) -> list[int]:
    """Values in a prediction that ``--labels`` leaves out but ``--gt-dataset`` maps to a scored organ.

    Such a value counts as background in the prediction and as an organ in the ground truth: the two
    would be mapped differently (only checked when both ``--labels`` and a dataset are given, and when
    ``--labels`` is in the dataset's own numbering: every listed value is one the dataset gives to
    that organ. A prediction in UniMOS's numbering, e.g. ``liver:1,kidney:2`` against BTCV, where 1
    is the spleen, says nothing about what its other values are.)
    """
    if spec.gt_dataset is None or spec.allowed is not None:
        return []
    ds = spec.gt_dataset
    if any(ds.labels.get(int(v)) != organ for organ, vs in zip(spec.organs, spec.pred_values) for v in vs):
        return []
    listed = {v for vs in spec.pred_values for v in vs}
    return [int(v) for v in present
            if v and v not in listed and ds.labels.get(int(v)) in spec.organs]


def class_spec(config: Config, labels: dict[str, tuple[int, ...]] | None = None,
               gt_dataset: str | None = None) -> ClassSpec:
    """Build the :class:`ClassSpec` from a config, optional ``--labels`` and ``--gt-dataset``.

    With a dataset, only the organs it labels are scored (a LiTS label map says nothing about
    kidneys).

    Raises:
        InputError: unknown dataset, organs of ``labels`` unknown to the config while a dataset maps
            the ground truth, or nothing left to score.
    """
    ds = None
    if gt_dataset is not None:
        try:
            ds = config.dataset(gt_dataset)
        except KeyError:
            raise InputError(config.source, f"--gt-dataset '{gt_dataset}' is not a dataset of this config "
                             f"(datasets: {[d.name for d in config.datasets]})") from None
    if labels is None:
        organs = list(config.organs)
        pred_values = {o: (config.organ_index(o),) for o in organs}
    else:
        labels = {o: (v,) if isinstance(v, int) else tuple(v) for o, v in labels.items()}
        organs = list(labels)
        pred_values = dict(labels)
    if ds is not None:
        unknown = [o for o in organs if o not in config.organs]
        if unknown:
            raise InputError(None, f"--labels organs {unknown} are not organs of {config.source} "
                             f"({list(config.organs)}), so --gt-dataset cannot map them")
        organs = [o for o in organs if o in ds.organ_names()]
        gt_values = {o: (config.organ_index(o),) for o in organs}
    else:
        gt_values = dict(pred_values)
    if not organs:
        raise InputError(None, f"no organ to evaluate (dataset {gt_dataset} labels "
                         f"{list(ds.organ_names()) if ds else []})")
    return ClassSpec(tuple(organs), tuple(pred_values[o] for o in organs),
                     tuple(gt_values[o] for o in organs), ds, config,
                     allowed=tuple(range(1, config.num_classes)) if labels is None else None)


def _check_integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind == "f" and (not np.isfinite(array).all()
                                    or not np.array_equal(array, np.round(array))):
        raise InputError(path, "label map has non-integer values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(path, f"label values outside 0..255 (min {array.min()}, max {array.max()})")
    return array.astype(np.uint8, copy=False)


def to_eval_space(array: np.ndarray, values: Sequence[int | Sequence[int]], path: Path,
                  allowed: Sequence[int] | None = None) -> np.ndarray:
    """Map label values to the evaluation space (organ ``n`` -> ``n + 1``, everything else 0).

    Args:
        values: per organ, its value or values.
        allowed: values accepted besides 0; others are an error. None accepts anything.

    Raises:
        InputError: non-integer or out-of-range values; values outside ``allowed``.
    """
    a = _check_integer_labels(array, path)
    if allowed is not None:
        present = np.flatnonzero(np.bincount(a.ravel(), minlength=256))
        extra = sorted(set(int(v) for v in present) - {0, *allowed})
        if extra:
            raise InputError(path, f"label values {extra} are not classes of the config "
                             f"({list(allowed)}); give --labels NAME:VALUE,... or --gt-dataset")
    lut = np.zeros(256, dtype=np.uint8)
    for n, v in enumerate(values):
        lut[[v] if isinstance(v, (int, np.integer)) else list(v)] = n + 1
    return lut[a]


def check_ground_truth(gt: Volume, spec: ClassSpec, gt_path: Path) -> None:
    """The value checks :func:`score_volumes` makes on a ground truth, without a prediction: run
    before any work (segment.py --evaluating), so a bad ground truth stops the run before outputs
    are written rather than after.

    Raises:
        InputError: non-integer or undeclared label values (names the file).
    """
    _check_integer_labels(gt.array, gt_path)
    _gt_eval_space(gt.array, spec, gt_path)


def _gt_eval_space(gt_arr: np.ndarray, spec: ClassSpec, gt_path: Path) -> np.ndarray:
    """A ground truth's values in evaluation space (its dataset's map first, when one is given)."""
    if spec.gt_dataset is not None:
        gt_arr = spec.config.map_labels(spec.gt_dataset, gt_arr, gt_path)
        return to_eval_space(gt_arr, spec.gt_values, gt_path)
    return to_eval_space(gt_arr, spec.gt_values, gt_path, spec.allowed)


def score_volumes(pred: Volume, gt: Volume, spec: ClassSpec, pred_path: Path,
                  gt_path: Path) -> dict[str, dict[str, float]]:
    """Per-organ metrics of a prediction volume against a ground-truth volume.

    A ground truth holding the prediction's voxels in another index order (flipped or permuted axes)
    is reoriented exactly (:func:`data.volume.match_grid`).

    Raises:
        InputError: the grids differ (names the ground truth file), bad label values.
    """
    matched = match_grid(gt, pred.geometry)
    if matched is None:
        raise InputError(gt_path, f"grid differs from the prediction {pred_path} "
                         f"({gt.geometry.describe()} vs {pred.geometry.describe()})")
    gt_eval = _gt_eval_space(matched.array, spec, gt_path)
    pred_eval = to_eval_space(pred.array, spec.pred_values, pred_path, spec.allowed)
    present = np.flatnonzero(np.bincount(pred.array.astype(np.uint8, copy=False).ravel(), minlength=256))
    clash = unlisted_organ_values(spec, present)
    if clash:
        ds = spec.gt_dataset
        raise InputError(pred_path, f"holds values {clash} that --labels leaves out (background) but "
                         f"{ds.name} maps to {sorted({ds.labels[v] for v in clash})} in the ground truth; "
                         "prediction and ground truth would be mapped differently: list them in --labels "
                         "(e.g. kidney:2,3)")
    spacing_zyx = tuple(reversed(pred.geometry.spacing))
    return evaluate_case(pred_eval, gt_eval, spacing_zyx, {o: n + 1 for n, o in enumerate(spec.organs)})


# ----------------------------------------------------------------------------------------------
# Pairing files


def list_volume_files(folder: Path) -> list[Path]:
    """Volume files (NIfTI, MHA, NRRD) directly in ``folder``, sorted; hidden files skipped.

    Raises:
        InputError: a volume name that is a dangling symbolic link (skipping it left a case out
            without a word).
    """
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.lower().endswith(VOLUME_SUFFIXES):
            continue
        if p.is_symlink() and not p.exists():
            raise InputError(p, "is a dangling symbolic link (its target does not exist)")
        if p.is_file():
            files.append(p)
    return files


@dataclass(frozen=True)
class CasePair:
    """A prediction and its ground truth; ``key`` pairs them, ``name`` is what reports show."""

    key: str
    pred: Path
    gt: Path

    @property
    def name(self) -> str:
        # The pairing key of volume-7 / segmentation-7 is "-7"; a reader looks for "volume-7".
        return strip_volume_suffix(self.pred.name)


def _index(files: Sequence[Path], token: str | None) -> dict[str, Path]:
    return index_by_key(list(files), lambda p: case_key(p, token), "files")


def pair_cases(pred: str | Path, gt: str | Path, pred_token: str | None = None,
               gt_token: str | None = None) -> tuple[list[CasePair], list[Path], list[Path]]:
    """Pair prediction and ground-truth files by case key.

    Args:
        pred, gt: files or folders (a single prediction file may pair with a folder of ground truth).
        pred_token, gt_token: tokens removed from names before comparing (dataset image/label tokens).

    Returns:
        ``(pairs, predictions without ground truth, ground truth without prediction)``.

    Raises:
        InputError: missing paths, a folder of predictions against a single file, empty folders,
            duplicate case names, or no pair at all.
    """
    pred, gt = Path(pred), Path(gt)
    for p in (pred, gt):
        if not p.exists():
            raise InputError(p, "does not exist")
    if pred.is_file() and gt.is_file():
        return [CasePair(case_key(pred, pred_token), pred, gt)], [], []
    if pred.is_dir() and gt.is_file():
        raise InputError(gt, "is a single file but the predictions are a folder")
    pred_files = [pred] if pred.is_file() else list_volume_files(pred)
    if not pred_files:
        raise InputError(pred, "holds no volume files")
    gt_files = list_volume_files(gt)
    if not gt_files:
        raise InputError(gt, "holds no volume files")
    p_idx, g_idx = _index(pred_files, pred_token), _index(gt_files, gt_token)
    pairs = [CasePair(k, p_idx[k], g_idx[k]) for k in sorted(p_idx) if k in g_idx]
    if not pairs:
        raise InputError(gt, f"no ground truth file pairs with the predictions in {pred} "
                         f"(e.g. case '{next(iter(p_idx))}')")
    return (pairs, [p_idx[k] for k in sorted(p_idx) if k not in g_idx],
            [g_idx[k] for k in sorted(g_idx) if k not in p_idx])


def read_label_volume(path: Path) -> Volume:
    """Read a label file (checked: integer values in 0..255)."""
    vol = read_volume(path)
    _check_integer_labels(vol.array, path)
    return vol


# ----------------------------------------------------------------------------------------------
# Reports


def case_row(key: str, pred: Path, gt: Path, metrics: dict[str, dict[str, float]],
             organs: Sequence[str]) -> dict[str, Any]:
    """One flat CSV row: case, files, then ``{organ}_{metric}`` columns (blank if not scored)."""
    row: dict[str, Any] = {"case": key, "pred": str(pred), "gt": str(gt)}
    for o in organs:
        for m in METRICS:
            row[f"{o}_{m}"] = metrics.get(o, {}).get(m)
    return row


def summarize(per_case: Sequence[dict[str, dict[str, float]]], organs: Sequence[str]) -> dict[str, Any]:
    """Mean and standard deviation per organ and metric over cases.

    Non-finite distances (an organ missed or invented) are left out of the mean and counted in
    ``n_not_finite``; the sample standard deviation (ddof 1) is 0 for a single case.
    """
    out: dict[str, Any] = {}
    for o in organs:
        out[o] = {}
        for m in METRICS:
            vals = np.asarray([c[o][m] for c in per_case if o in c], dtype=np.float64)
            finite = vals[np.isfinite(vals)]
            out[o][m] = {
                "mean": float(finite.mean()) if finite.size else None,
                "sd": float(finite.std(ddof=1)) if finite.size > 1 else (0.0 if finite.size else None),
                "n": int(vals.size),
                "n_not_finite": int(vals.size - finite.size),
            }
    return out


def _fmt(stat: dict[str, Any], digits: int) -> str:
    if stat["mean"] is None:
        text = "n/a" if stat["n"] == 0 else "not finite"
    else:
        text = f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"
    if stat["n_not_finite"] and stat["mean"] is not None:
        text += f" ({stat['n_not_finite']} not finite)"
    return text


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as an aligned text table (mean ± sd per organ)."""
    head = ["organ", "n", "Dice", "HD95 (mm)", "ASSD (mm)", "volume pred (ml)", "volume GT (ml)"]
    rows = [head]
    for o, s in summary.items():
        rows.append([o, str(s["dice"]["n"]), _fmt(s["dice"], 3), _fmt(s["hd95"], 2), _fmt(s["assd"], 2),
                     _fmt(s["vol_pred_ml"], 1), _fmt(s["vol_gt_ml"], 1)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_case(key: str, metrics: dict[str, dict[str, float]]) -> str:
    """One line per organ: Dice, HD95, ASSD of a single case."""
    lines = []
    for o, m in metrics.items():
        lines.append(f"{key}  {o:<10s} Dice {m['dice']:.4f}  HD95 {_num(m['hd95'])} mm  "
                     f"ASSD {_num(m['assd'])} mm  volume {m['vol_pred_ml']:.1f} / {m['vol_gt_ml']:.1f} ml")
    return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else "not finite"


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def write_report(out_csv: str | Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> Path:
    """Write per-case rows as CSV (``inf`` for non-finite distances) and the same plus the summary as
    JSON next to it (same stem, ``.json``; non-finite values become null). Both atomic.

    Returns:
        The JSON path.
    """
    out_csv = Path(out_csv)
    buf = io.StringIO()
    fields = list(rows[0].keys()) if rows else ["case"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                         for k, v in r.items()})
    json_path = out_csv.with_suffix(".json")
    payload = {**(extra or {}), "cases": list(rows), "summary": summary,
               "notes": "distances in mm (HD95 = symmetric 95th percentile Hausdorff, ASSD = average "
                        "symmetric surface distance); null = not finite (organ missing in prediction "
                        "or ground truth); volumes in ml"}
    # both files or neither: a failed write must not leave a new CSV beside the previous JSON
    write_texts_atomic({out_csv: buf.getvalue(), json_path: json_dumps(_json_safe(payload))})
    return json_path

