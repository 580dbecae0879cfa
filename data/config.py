"""The one configuration: which organs exist, and for each dataset which organs it labels.

A YAML file (``configs/default.yaml`` reproduces the seed) is loaded into frozen dataclasses and
checked once at load time; scripts override single fields with argparse flags.

Class indices: 0 is background, organ ``organs[i]`` is class ``i + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import InputError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
LAYOUTS = ("auto", "seed", "msd", "kits19")
# A label value may be declared as background: structures a dataset labels but UniMOS does not model.
BACKGROUND = "background"
# Label value of voxels no loss or metric looks at (crop padding, undeclared file values).
IGNORE_INDEX = 255
# Cross-entropy weights of background and organs (the original's); Config.class_weights' default.
DEFAULT_CLASS_WEIGHTS = (0.2, 1.2)
_UniqueKeyLoader = None  # built on first load_config (yaml is imported lazily)
# `other: background` in a dataset's labels: every value not listed is background (explicit, never implied).
OTHER = "other"


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset and what its label files mean.

    Attributes:
        name: dataset name, also its folder under the data root unless ``path`` is set.
        labels: file label value -> organ name, or ``background`` for structures the model
            ignores; values not listed are an error (0 is always background).
        path: folder relative to the data root (or absolute); defaults to ``name``.
        layout: ``seed`` (label/ labeled/ unlabeled/ validation/), ``msd`` (dataset.json,
            imagesTr/labelsTr/imagesTs), ``kits19`` (case_XXXXX/imaging + segmentation), or ``auto``.
        image_token / label_token: seed layout pairing; the case key of ``volume-7.nii`` with
            image_token ``volume`` is ``-7``, matched with ``segmentation-7.nii`` (label_token
            ``segmentation``). Both None: image and label share the file name.
        val_fraction: for layouts without a validation folder, the share of labeled cases
            (the last ones in sorted order) held out for validation.
        optional: a missing folder is skipped instead of being an error.
        other_background: ``other: background`` in ``labels``: values not listed are background
            instead of an error (label maps of other tools with many structures, e.g. TotalSegmentator).
    """

    name: str
    labels: dict[int, str]
    path: str | None = None
    layout: str = "auto"
    image_token: str | None = None
    label_token: str | None = None
    val_fraction: float = 0.2
    optional: bool = False
    other_background: bool = False

    def folder(self, data_root: str | Path) -> Path:
        p = Path(self.path) if self.path else Path(self.name)
        return p if p.is_absolute() else Path(data_root) / p

    def organ_names(self) -> tuple[str, ...]:
        seen: list[str] = []
        for organ in self.labels.values():
            if organ not in seen and organ != BACKGROUND:
                seen.append(organ)
        return tuple(seen)


@dataclass(frozen=True)
class Config:
    """Organs, datasets and preprocessing shared by every script.

    Attributes:
        organs: organ names; class ``i + 1`` is ``organs[i]``.
        datasets: the datasets, in the order training cycles through them.
        hu_window: CT intensities clipped to this window and scaled to [-1, 1].
        inplane_size: ``resample.py``'s in-plane grid (s1, s2).
        inplane_spacing: None = pad each slice with air to the grid's aspect, then resize (default);
            a spacing in mm = resample to it, then pad or crop to the grid (see data/inplane.py).
        components: organs kept as more than one connected component in post-processing.
        class_weights: cross-entropy weight of background and of organs (the original's 0.2/1.2).
        source: the YAML file this came from (for messages).
    """

    organs: tuple[str, ...]
    datasets: tuple[DatasetSpec, ...]
    hu_window: tuple[float, float] = (-200.0, 200.0)
    inplane_size: tuple[int, int] = (256, 256)
    inplane_spacing: float | None = None
    components: dict[str, int] = field(default_factory=lambda: {"kidney": 2})
    class_weights: tuple[float, float] = DEFAULT_CLASS_WEIGHTS
    source: str = "<memory>"

    @property
    def num_classes(self) -> int:
        return len(self.organs) + 1

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("background", *self.organs)

    def organ_index(self, organ: str) -> int:
        return self.organs.index(organ) + 1

    def dataset(self, name: str) -> DatasetSpec:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)

    def labeled_classes(self, dataset: DatasetSpec) -> tuple[int, ...]:
        """Classes a dataset's labels speak for: background plus its organs, sorted."""
        return (0, *sorted(self.organ_index(o) for o in dataset.organ_names()))

    def labeled_mask(self, dataset: DatasetSpec) -> np.ndarray:
        """Boolean (num_classes,) mask of :meth:`labeled_classes`."""
        mask = np.zeros(self.num_classes, dtype=bool)
        mask[list(self.labeled_classes(dataset))] = True
        return mask

    def is_fully_labeled(self, dataset: DatasetSpec) -> bool:
        return set(dataset.organ_names()) == set(self.organs)

    def label_lut(self, dataset: DatasetSpec) -> np.ndarray:
        """Lookup table file value -> class index; undeclared values map to IGNORE_INDEX (0 with
        ``other: background``)."""
        top = max([0, *dataset.labels.keys()])
        lut = np.full(max(256, top + 1), 0 if dataset.other_background else IGNORE_INDEX, dtype=np.uint8)
        lut[0] = 0
        for value, organ in dataset.labels.items():
            lut[value] = 0 if organ == BACKGROUND else self.organ_index(organ)
        return lut

    def map_labels(self, dataset: DatasetSpec, array: np.ndarray, path: str | Path) -> np.ndarray:
        """Map a label file's values to class indices (uint8).

        Raises:
            InputError: negative, non-integer or undeclared label values (names the file).
        """
        if array.dtype.kind == "f":
            if not np.isfinite(array).all():
                raise InputError(path, "label map contains NaN/Inf")
            if not np.array_equal(array, np.round(array)):
                raise InputError(path, "label map has non-integer values (was it resampled linearly?)")
        values = np.unique(array)
        if values.size and values.min() < 0:
            raise InputError(path, f"label map has negative values {values[values < 0][:5].tolist()}")
        lut = self.label_lut(dataset)
        if dataset.other_background:  # nothing is undeclared; values past the table are background
            lut = np.append(lut, np.uint8(0))
            return lut[np.minimum(array.astype(np.int64), lut.size - 1)]
        declared = set(dataset.labels) | {0}
        undeclared = [int(v) for v in values if int(v) not in declared]
        if undeclared:
            raise InputError(path, f"label values {undeclared} are not declared for dataset "
                             f"{dataset.name} (declared: {sorted(declared)}; see {self.source})")
        return lut[array.astype(np.int64)]


def _number(value: Any, key: str, source: str, integer: bool = False, low: float | None = None,
            high: float | None = None, low_open: bool = False) -> float | int:
    """A finite number (an integer when ``integer``) within the given range, or InputError naming the key.

    YAML booleans are not numbers here (``yes`` would otherwise be 1); numeric text such as
    ``1e-3`` (which PyYAML reads as a string) is accepted.
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise InputError(source, f"'{key}' must be {kind}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(source, f"'{key}' must be {kind}, got {value!r}") from None
    if not np.isfinite(number):
        raise InputError(source, f"'{key}' must be finite, got {value!r}")
    if integer:
        if number != int(number):
            raise InputError(source, f"'{key}' must be an integer, got {value!r}")
        number = int(number)
    if low is not None and (number <= low if low_open else number < low):
        raise InputError(source, f"'{key}' must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and number > high:
        raise InputError(source, f"'{key}' must be <= {high:g}, got {value!r}")
    return number


def _as_pair(value: Any, key: str, source: str, cast=float, **limits: Any) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(source, f"'{key}' must be a list of two numbers, got {value!r}")
    return tuple(_number(v, key, source, integer=cast is int, **limits) for v in value)


def _parse_dataset(name: str, raw: Any, organs: tuple[str, ...], source: str) -> DatasetSpec:
    if not isinstance(raw, dict):
        raise InputError(source, f"dataset '{name}' must be a mapping")
    allowed = {"labels", "path", "layout", "image_token", "label_token", "val_fraction", "optional"}
    unknown = set(raw) - allowed
    if unknown:
        raise InputError(source, f"dataset '{name}': unknown keys {sorted(unknown)} "
                         f"(allowed: {sorted(allowed)})")
    labels_raw = raw.get("labels")
    if not isinstance(labels_raw, dict) or not labels_raw:
        raise InputError(source, f"dataset '{name}' needs 'labels': a map of file value -> organ")
    labels: dict[int, str] = {}
    other = labels_raw.get(OTHER)
    if other is not None and other != BACKGROUND:
        raise InputError(source, f"dataset '{name}': '{OTHER}' may only be '{BACKGROUND}', got {other!r}")
    for value, organ in labels_raw.items():
        if value == OTHER:
            continue
        # int(1.5) would silently declare label 1: reject fractional and boolean keys.
        try:
            v = _number(value, f"datasets.{name}.labels key {value!r}", source, integer=True)
        except InputError:
            raise InputError(source, f"dataset '{name}': label value {value!r} is not an integer") from None
        if not isinstance(organ, str):
            raise InputError(source, f"dataset '{name}': label {v} must map to an organ name, got {organ!r}")
        if v in labels:
            raise InputError(source, f"dataset '{name}': label value {v} is declared twice")
        if v <= 0 or v > 255:
            raise InputError(source, f"dataset '{name}': label value {v} must be in 1..255")
        if organ not in organs and organ != BACKGROUND:
            raise InputError(source, f"dataset '{name}': label {v} maps to unknown organ "
                             f"'{organ}' (organs: {list(organs)})")
        labels[v] = organ
    layout = raw.get("layout", "auto")
    if layout not in LAYOUTS:
        raise InputError(source, f"dataset '{name}': layout must be one of {LAYOUTS}, got {layout!r}")
    val_fraction = _number(raw.get("val_fraction", 0.2), f"datasets.{name}.val_fraction", source, low=0.0)
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(source, f"dataset '{name}': val_fraction must be in [0, 1)")
    image_token, label_token = raw.get("image_token"), raw.get("label_token")
    if (image_token is None) != (label_token is None):
        raise InputError(source, f"dataset '{name}': give both image_token and label_token or neither")
    for key in ("image_token", "label_token", "path"):
        if raw.get(key) is not None and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise InputError(source, f"dataset '{name}': {key} must be a non-empty string, got {raw[key]!r}")
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        raise InputError(source, f"dataset '{name}': optional must be true or false, got {optional!r}")
    return DatasetSpec(name=name, labels=labels, path=raw.get("path"), layout=layout,
                       image_token=image_token, label_token=label_token,
                       val_fraction=float(val_fraction), optional=optional,
                       other_background=other is not None)


def config_from_dict(raw: Any, source: str = "<memory>") -> Config:
    """Build and check a :class:`Config` from a parsed YAML mapping.

    Raises:
        InputError: naming ``source`` and the offending key.
    """
    if not isinstance(raw, dict):
        raise InputError(source, "config must be a YAML mapping")
    allowed = {"organs", "datasets", "hu_window", "inplane_size", "inplane_spacing", "components",
               "class_weights"}
    unknown = set(raw) - allowed
    if unknown:
        raise InputError(source, f"unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    organs = raw.get("organs")
    if not isinstance(organs, list) or not organs or not all(isinstance(o, str) for o in organs):
        raise InputError(source, "'organs' must be a non-empty list of names")
    if len(set(organs)) != len(organs) or "background" in organs:
        raise InputError(source, "'organs' must be unique and must not contain 'background'")
    organs_t = tuple(organs)
    ds_raw = raw.get("datasets")
    if not isinstance(ds_raw, dict) or not ds_raw:
        raise InputError(source, "'datasets' must be a non-empty mapping of name -> settings")
    datasets = tuple(_parse_dataset(str(n), d, organs_t, source) for n, d in ds_raw.items())
    for d in datasets:
        if not d.organ_names():
            raise InputError(source, f"dataset '{d.name}' labels no organ of {list(organs_t)}")
    kwargs: dict[str, Any] = {}
    if "hu_window" in raw:
        lo, hi = _as_pair(raw["hu_window"], "hu_window", source)
        if not lo < hi:
            raise InputError(source, "'hu_window' must be [low, high] with low < high")
        kwargs["hu_window"] = (float(lo), float(hi))
    if "inplane_size" in raw:
        kwargs["inplane_size"] = _as_pair(raw["inplane_size"], "inplane_size", source, int, low=1,
                                          high=16384)
    if raw.get("inplane_spacing") is not None:
        sp = raw["inplane_spacing"]
        if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not 0 < sp < 100:
            raise InputError(source, f"'inplane_spacing' must be a spacing in mm (0 < s < 100) or null, "
                             f"got {sp!r}")
        kwargs["inplane_spacing"] = float(sp)
    if "class_weights" in raw:
        bg, organ = _as_pair(raw["class_weights"], "class_weights", source, low=0.0)
        if organ <= 0:
            raise InputError(source, "'class_weights' organ weight must be > 0 "
                             "(organs would never be learnt)")
        kwargs["class_weights"] = (float(bg), float(organ))
    if "components" in raw:
        comps = raw["components"]
        if not isinstance(comps, dict) or any(k not in organs_t for k in comps):
            raise InputError(source, "'components' must map organ names to counts")
        # 0 components would make post-processing delete the organ.
        kwargs["components"] = {str(k): int(_number(v, f"components.{k}", source, integer=True, low=1))
                                for k, v in comps.items()}
    return Config(organs=organs_t, datasets=datasets, source=source, **kwargs)


def load_config(path: str | Path | None = None) -> Config:
    """Load and check a YAML config (default: ``configs/default.yaml``).

    Raises:
        InputError: missing file, YAML syntax error, or invalid content.
    """
    import yaml

    global _UniqueKeyLoader
    if _UniqueKeyLoader is None:
        _UniqueKeyLoader = _unique_key_loader()
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.exists():
        raise InputError(path, "config file does not exist")
    if not path.is_file():
        raise InputError(path, "config path is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(path, f"config is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise InputError(path, f"cannot read config ({err.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None)
        mark = getattr(err, "problem_mark", None)
        reason = (f"{problem}, line {mark.line + 1}" if problem and mark else
                  " ".join(str(err).split())[:200])
        raise InputError(path, f"invalid YAML ({reason})") from None
    return config_from_dict(raw, source=str(path))


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base constructor reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice",
                    key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain-data form of a config (what checkpoints store; loads back with config_from_dict)."""
    return {
        "organs": list(config.organs),
        "hu_window": list(config.hu_window),
        "inplane_size": list(config.inplane_size),
        "inplane_spacing": config.inplane_spacing,
        "components": dict(config.components),
        "class_weights": list(config.class_weights),
        "datasets": {
            d.name: {
                "labels": {**{int(k): v for k, v in d.labels.items()},
                           **({OTHER: BACKGROUND} if d.other_background else {})},
                **({"path": d.path} if d.path else {}),
                "layout": d.layout,
                **({"image_token": d.image_token, "label_token": d.label_token}
                   if d.image_token else {}),
                "val_fraction": d.val_fraction,
                "optional": d.optional,
            }
            for d in config.datasets
        },
    }
