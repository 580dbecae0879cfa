"""Synthetic CT phantoms (data/phantom.py) and synth.py: layout, labels, geometry, orientation, HU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import data.phantom as P
import synth
from data.config import load_config
from data.volume import (
    Geometry,
    Volume,
    read_geometry,
    read_volume,
    slice_axis_index,
    to_canonical,
    to_storage,
)
from utils.errors import InputError

SCALE = 0.125  # LiTS/KiTS/BTCV 64x64, MSDSpleen 32x32 in-plane
SEED = 3
COUNTS = {"cases": 2, "unlabeled": 1, "val": 1}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    P.synthesize(out, seed=SEED, scale=SCALE, **COUNTS)
    return out


def _pairs(root: Path, name: str) -> list[tuple[int, Path, Path]]:
    """(case number, image, label) of the labeled and validation cases of a dataset."""
    style = P.DATASET_STYLES[name]
    nums = P.case_numbers(name, COUNTS["cases"], COUNTS["unlabeled"], COUNTS["val"])
    return [(n, root / name / split / style.image_name.format(n=n),
             root / name / "label" / style.label_name.format(n=n))
            for split in ("labeled", "validation") for n in nums[split]]


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Centroid in canonical array order (k, j, i) = (S, P, L)."""
    return np.argwhere(mask).mean(axis=0)


def _phantom(seed: int, **kw) -> tuple[Volume, np.ndarray]:
    spec = P.PhantomSpec(inplane_size=96, inplane_spacing=3.75, slice_spacing=5.0, **kw)
    return P.make_phantom(np.random.default_rng(seed), spec)


# ----------------------------------------------------------------------------------------------
# Phantom content


def test_make_phantom_is_deterministic_for_a_seed():
    a_img, a_tis = _phantom(11, liver_tumours=2, kidney_tumours=1)
    b_img, b_tis = _phantom(11, liver_tumours=2, kidney_tumours=1)
    assert a_img.array.tobytes() == b_img.array.tobytes()
    assert a_tis.tobytes() == b_tis.tobytes()
    assert a_img.geometry == b_img.geometry
    c_img, _ = _phantom(12, liver_tumours=2, kidney_tumours=1)
    assert c_img.array.shape != a_img.array.shape or not np.array_equal(c_img.array, a_img.array)


@pytest.mark.parametrize("seed", [0, 1])
def test_organ_hu_ranges(seed):
    img, tissue = _phantom(seed, liver_tumours=2, kidney_tumours=1)
    hu = img.array.astype(np.float64)
    # Interior voxels (in-plane erosion) so partial volume at the borders does not bias the means.
    erode = np.ones((1, 3, 3), dtype=bool)

    def interior(names: tuple[str, ...]) -> np.ndarray:
        mask = np.isin(tissue, [P.TISSUE_ID[n] for n in names])
        inner = ndimage.binary_erosion(mask, erode)
        assert inner.sum() >= 5, names
        return hu[inner]

    expected = {("liver",): (95, 127), ("spleen",): (101, 133), ("kidney_r", "kidney_l"): (148, 205),
                ("aorta",): (175, 255), ("bone",): (400, 700), ("fat",): (-125, -75),
                ("muscle",): (38, 62), ("liver_tumour",): (20, 70)}
    means = {}
    for names, (lo, hi) in expected.items():
        means[names] = interior(names).mean()
        assert lo <= means[names] <= hi, (names, means[names])
    assert abs(means[("liver",)] - means[("spleen",)]) < 25  # shape and position must tell them apart
    assert 5 < interior(("liver",)).std() < 30  # noise of CT, not a flat image
    air = hu[:, :3, 40:56]  # anterior corner of the field of view, inside the scan circle
    assert abs(air.mean() + 1000) < 10


def test_anatomy_is_where_it_belongs():
    for seed in range(3):
        img, tissue = _phantom(seed, kidney_tumours=1)
        organs = {o: np.isin(tissue, [P.TISSUE_ID[t] for t in ts]) for o, ts in P.ORGAN_TISSUES.items()}
        body = _centroid(tissue != P.TISSUE_ID["air"])
        liver, spleen, kidney = (_centroid(organs[o]) for o in ("liver", "spleen", "kidney"))
        # Canonical LPS: axis 2 runs to the patient's left, axis 1 posterior, axis 0 superior.
        assert liver[2] < body[2] < spleen[2]
        assert kidney[1] > body[1] and kidney[1] > liver[1]
        right = _centroid(tissue == P.TISSUE_ID["kidney_r"])
        left = _centroid(tissue == P.TISSUE_ID["kidney_l"])
        assert right[2] < left[2]
        top = {o: np.nonzero(m.any(axis=(1, 2)))[0].max() for o, m in organs.items()}
        assert top["kidney"] < top["liver"] and top["kidney"] < top["spleen"]
        # The z extent covers every organ: none touches the first or last slice.
        for m in organs.values():
            assert m.any() and not m[0].any() and not m[-1].any()
        extent = (img.array.shape[0] - 1) * img.geometry.spacing[2]
        assert 150 <= extent <= 230


def test_upsample_linear_hand_values():
    # the phantoms' integer upsampling is data.resample.resample_axis (cell-centred, edges replicated)
    from data.resample import resample_axis

    a = np.array([[0.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(resample_axis(a, 1, 4, is_label=False), [[0, 1, 3, 4]])
    np.testing.assert_allclose(resample_axis(a, 1, 2, is_label=False), a)
    # factor 3: samples at -1/3, 0, +1/3 of a cell (edges replicated)
    np.testing.assert_allclose(resample_axis(a, 1, 6, is_label=False), [[0, 0, 4 / 3, 8 / 3, 4, 4]],
                               atol=1e-6)


@pytest.mark.parametrize("name", list(P.DATASET_STYLES))
def test_to_storage_round_trip_is_exact(name):
    rng = np.random.default_rng(5)
    arr = rng.integers(-1000, 1000, size=(4, 5, 6)).astype(np.int16)
    canon = Volume(arr, Geometry((4, 5, 6), (0.7, 0.8, 3.0), (-100.0, -50.0, -300.0)))
    stored = to_storage(canon, P.DATASET_STYLES[name].direction)
    back, _ = to_canonical(stored)
    assert np.array_equal(back.array, arr)
    assert back.geometry.same_grid(canon.geometry, tol=1e-9)
    # The same voxel sits at the same place in the world in both grids.
    idx = np.argwhere(stored.array == arr[1, 2, 3])
    hit = [tuple(int(v) for v in i) for i in idx if stored.array[tuple(i)] == arr[1, 2, 3]]
    worlds = [stored.geometry.index_to_world(np.array(k[::-1], dtype=float)) for k in hit]
    target = canon.geometry.index_to_world(np.array([3.0, 2.0, 1.0]))
    assert any(np.allclose(w, target) for w in worlds)


def test_to_storage_rejects_non_permutations():
    canon = Volume(np.zeros((2, 2, 2), np.int16), Geometry((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    with pytest.raises(ValueError):
        to_storage(canon, (0.8, 0.6, 0, -0.6, 0.8, 0, 0, 0, 1))


# ----------------------------------------------------------------------------------------------
# Datasets on disk


def test_layout_and_file_names(synth_root):
    def names(rel: str) -> set[str]:
        return {p.name for p in (synth_root / rel).iterdir()}

    assert names("LiTS/labeled") == {"volume-0.nii", "volume-1.nii"}
    assert names("LiTS/validation") == {"volume-2.nii"}
    assert names("LiTS/unlabeled") == {"volume-3.nii"}
    assert names("LiTS/label") == {"segmentation-0.nii", "segmentation-1.nii", "segmentation-2.nii"}
    assert names("KiTS/labeled") == {"scan_00000.nii.gz", "scan_00001.nii.gz"}
    assert names("KiTS/label") == {f"label_{n:05d}.nii.gz" for n in range(3)}
    assert names("MSDSpleen/validation") == {"spleen_3.nii.gz"}
    assert names("MSDSpleen/label") == {"spleen_1.nii.gz", "spleen_2.nii.gz", "spleen_3.nii.gz"}
    assert names("BTCV/labeled") == {"img0001.nii.gz", "img0002.nii.gz"}
    assert names("BTCV/label") == {"label0001.nii.gz", "label0002.nii.gz", "label0003.nii.gz"}
    assert not (synth_root / "BTCV" / "unlabeled").exists()
    # LiTS is stored uncompressed, the others gzip-compressed.
    assert (synth_root / "LiTS/labeled/volume-0.nii").read_bytes()[:2] != b"\x1f\x8b"
    assert (synth_root / "KiTS/labeled/scan_00000.nii.gz").read_bytes()[:2] == b"\x1f\x8b"


@pytest.mark.parametrize("name,allowed", [("LiTS", {0, 1, 2}), ("KiTS", {0, 1, 2}),
                                          ("MSDSpleen", {0, 1})])
def test_partial_labels_hold_only_their_organ(synth_root, name, allowed):
    seen: set[int] = set()
    for _, _, label in _pairs(synth_root, name):
        values = set(np.unique(read_volume(label).array).tolist())
        assert values <= allowed and 1 in values, (label, values)
        seen |= values
    assert seen == allowed  # tumours (2) appear in LiTS and KiTS cases


def test_btcv_label_values(synth_root):
    declared = set(load_config().dataset("BTCV").labels)
    for _, _, label in _pairs(synth_root, "BTCV"):
        values = set(np.unique(read_volume(label).array).tolist())
        assert {0, 1, 2, 3, 6} <= values <= declared | {0}, values


@pytest.mark.parametrize("name", list(P.DATASET_STYLES))
def test_label_geometry_equals_image_geometry(synth_root, name):
    for _, image, label in _pairs(synth_root, name):
        assert read_geometry(image) == read_geometry(label)


@pytest.mark.parametrize("name", list(P.DATASET_STYLES))
def test_read_back_gives_the_canonical_phantom(synth_root, name):
    n, image, label = _pairs(synth_root, name)[0]
    img, lab = read_volume(image), read_volume(label)
    style = P.DATASET_STYLES[name]
    assert img.array.dtype == np.dtype(style.dtype) and lab.array.dtype == np.uint8
    assert np.allclose(img.geometry.direction, style.direction)
    canon_img, _ = to_canonical(img)
    canon_lab, _ = to_canonical(lab)
    expected, tissue = P.make_case(SEED, name, n, SCALE)
    assert np.array_equal(canon_img.array, expected.array)
    assert canon_img.geometry.same_grid(expected.geometry)
    assert np.array_equal(canon_lab.array, P.dataset_labels(tissue, name))
    spec = P.draw_spec(P.case_rng(SEED, name, n), style, SCALE)
    if spec.crop_margin is None:  # the scanner's square field of view
        assert canon_img.array.shape[1] == canon_img.array.shape[2] == round(style.inplane_size * SCALE)
    else:  # a body-tight crop: smaller, and wider than deep
        assert canon_img.array.shape[1] < canon_img.array.shape[2] <= round(style.inplane_size * SCALE)


def test_orientation_after_canonicalising(synth_root):
    for name in P.DATASET_STYLES:
        for _, _, label in _pairs(synth_root, name):
            lab, _ = to_canonical(read_volume(label))
            arr, (_, nj, ni) = lab.array, lab.array.shape
            if name == "LiTS":
                assert _centroid(arr > 0)[2] < ni / 2  # liver on the patient's right (low L index)
            elif name == "KiTS":
                assert _centroid(arr > 0)[1] > nj / 2  # kidneys posterior
            elif name == "MSDSpleen":
                assert _centroid(arr > 0)[2] > ni / 2
            else:
                liver, spleen = _centroid(arr == 6), _centroid(arr == 1)
                right, left = _centroid(arr == 2), _centroid(arr == 3)
                assert liver[2] < spleen[2] and right[2] < left[2]
                assert right[1] > liver[1] and left[1] > liver[1]


def test_kits_is_stored_slices_first(synth_root):
    _, image, label = _pairs(synth_root, "KiTS")[0]
    geo = read_geometry(image)
    assert slice_axis_index(geo) == 0  # ITK index i runs superior-inferior
    vol = read_volume(image)
    canon, _ = to_canonical(vol)
    assert vol.array.shape[2] == canon.array.shape[0]  # numpy's last axis = slices
    assert vol.array.shape[:2] == (canon.array.shape[2], canon.array.shape[1])
    assert geo.spacing[0] == canon.geometry.spacing[2] and geo.spacing[0] >= 3.0
    assert slice_axis_index(read_geometry(synth_root / "LiTS/labeled/volume-0.nii")) == 2


def test_labels_load_with_the_default_config(synth_root):
    config = load_config()
    for spec in config.datasets:
        for _, _, label in _pairs(synth_root, spec.name):
            classes = set(np.unique(config.map_labels(spec, read_volume(label).array, label)).tolist())
            assert classes <= set(config.labeled_classes(spec))
            assert classes - {0}, label


def test_same_seed_writes_identical_files(synth_root, tmp_path):
    # synth_root was written by one process; two worker processes write the same bytes
    lines: list[str] = []
    P.synthesize(tmp_path, seed=SEED, scale=SCALE, datasets=["KiTS", "MSDSpleen"], workers=2,
                 log=lines.append, **COUNTS)
    assert [ln.split(":")[0] for ln in lines] == ["KiTS", "MSDSpleen"]  # logged in the given order
    for name in ("KiTS", "MSDSpleen"):
        for rel in (synth_root / name).rglob("*.nii*"):
            again = tmp_path / rel.relative_to(synth_root)
            assert read_volume(rel).array.tobytes() == read_volume(again).array.tobytes()
    P.synthesize(tmp_path / "other", seed=SEED + 1, scale=SCALE, datasets=["KiTS"], cases=1, val=0,
                 unlabeled=0)
    a = read_volume(synth_root / "KiTS/labeled/scan_00000.nii.gz").array
    b = read_volume(tmp_path / "other/KiTS/labeled/scan_00000.nii.gz").array
    assert a.shape != b.shape or not np.array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Bad input, reruns, CLI


def test_out_under_a_file_is_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError):
        P.synthesize(blocker / "out", scale=SCALE, cases=1, unlabeled=0, val=0)
    with pytest.raises(InputError):
        P.synthesize(blocker, scale=SCALE, cases=1, unlabeled=0, val=0)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_out_writes_nothing(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(InputError):
            P.synthesize(out, scale=SCALE, cases=1, unlabeled=0, val=0)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


def test_cli_bad_out_exits_2_with_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        synth.run_cli(synth.main, ["--out", str(blocker / "o"), "--scale", str(SCALE)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "file" in err[0]


@pytest.mark.parametrize("kwargs", [{"cases": -1}, {"val": 1.5}, {"seed": -2}, {"scale": 0.0},
                                    {"scale": float("nan")}, {"datasets": ["LiTS", "Nope"]}])
def test_bad_arguments_are_input_errors(tmp_path, kwargs):
    with pytest.raises(InputError):
        P.synthesize(tmp_path / "o", **{"scale": SCALE, "cases": 1, "unlabeled": 0, "val": 0, **kwargs})
    assert not (tmp_path / "o").exists()


def test_foreign_folder_is_not_overwritten(tmp_path):
    mine = tmp_path / "KiTS" / "labeled"
    mine.mkdir(parents=True)
    (mine / "scan_00000.nii.gz").write_bytes(b"real data")
    with pytest.raises(InputError, match="not written by synth.py"):
        P.synthesize(tmp_path, scale=SCALE, cases=1, unlabeled=0, val=0, datasets=["LiTS", "KiTS"])
    assert (mine / "scan_00000.nii.gz").read_bytes() == b"real data"
    assert not (tmp_path / "LiTS").exists()  # checked before anything was written


def test_rerun_replaces_the_previous_set(tmp_path):
    P.synthesize(tmp_path, scale=SCALE, cases=3, unlabeled=2, val=1, datasets=["LiTS"])
    P.synthesize(tmp_path, scale=SCALE, cases=1, unlabeled=0, val=1, datasets=["LiTS"])
    files = {str(p.relative_to(tmp_path / "LiTS")) for p in (tmp_path / "LiTS").rglob("*.nii")}
    assert files == {"labeled/volume-0.nii", "validation/volume-1.nii", "label/segmentation-0.nii",
                     "label/segmentation-1.nii"}


def test_cli_prints_one_line_per_dataset(tmp_path, capsys):
    code = synth.main(["--out", str(tmp_path), "--cases", "1", "--unlabeled", "1", "--val", "0",
                       "--scale", str(SCALE), "--datasets", "MSDSpleen,BTCV", "--seed", "4"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[:2]] == ["MSDSpleen", "BTCV"]
    assert (tmp_path / "MSDSpleen/unlabeled/spleen_2.nii.gz").is_file()
    assert not (tmp_path / "BTCV/unlabeled").exists()


# ----------------------------------------------------------------------------------------------
# Field-of-view variety (issue 15): body-tight non-square crops and square fields of 358-500 mm


def test_fields_of_view_vary_in_every_style():
    for name, style in P.DATASET_STYLES.items():
        specs = [P.draw_spec(P.case_rng(0, name, n), style) for n in range(40)]
        tight = [s for s in specs if s.crop_margin is not None]
        square = [s.inplane_size * s.inplane_spacing for s in specs if s.crop_margin is None]
        assert 4 <= len(tight) <= 24, name  # about 30 %
        assert min(square) >= 355 and max(square) <= 500 and max(square) - min(square) > 60, name
        assert len({s.slice_spacing for s in specs}) == len(style.slice_spacing)
        assert max(s.z_margin[0] for s in specs) > 20


@pytest.mark.parametrize("seed", [0, 1])
def test_body_tight_crop_is_non_square_and_holds_the_whole_body(seed):
    spec = P.PhantomSpec(inplane_size=128, inplane_spacing=3.0, slice_spacing=5.0,
                         crop_margin=(8.0, 15.0), z_margin=(20.0, 0.0))
    image, tissue = P.make_phantom(np.random.default_rng(seed), spec)
    _, ny, nx = image.array.shape
    fov = (nx * 3.0, ny * 3.0)
    assert 300 <= fov[0] <= 400 and 240 <= fov[1] <= 320 and nx > ny
    # nothing of the body touches the border (air all round), and no scanner circle inside the crop
    body = tissue != P.TISSUE_ID["air"]
    outside = ~ndimage.binary_fill_holes(body[body.shape[0] // 2])
    assert outside[0].all() and outside[-1].all() and outside[:, 0].all() and outside[:, -1].all()
    assert (image.array[:, 0, 0] == P.PADDING_HU).mean() < 0.5  # noisy air, not the padding value
    same, _ = P.make_phantom(np.random.default_rng(seed), spec)
    assert same.array.tobytes() == image.array.tobytes()  # seeded determinism


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes in /proc")
def test_killed_worker_exits_2_with_one_line(tmp_path):
    """A phantom worker killed while writing: one line, exit code 2, no traceback; a rerun works."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "p"
    cmd = [sys.executable, str(repo / "synth.py"), "--out", str(out), "--datasets", "KiTS,MSDSpleen",
           "--cases", "8", "--unlabeled", "0", "--val", "0", "--scale", "0.5", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = False, time.time() + 60
    try:
        # Once both workers write their dataset (each has written its marker first), kill one. Not
        # earlier: a worker killed while it is still being spawned can leave the pool waiting.
        while not all((out / name / P.MARKER).exists() for name in ("KiTS", "MSDSpleen")):
            assert proc.poll() is None and time.time() < deadline, "the workers never started"
            time.sleep(0.01)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        # the pool's workers (not multiprocessing's resource tracker)
        workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(int(workers[0]), signal.SIGKILL)
        killed = True
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "worker process died" in lines[0], err
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
