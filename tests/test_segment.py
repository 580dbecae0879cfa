"""inference.segment / inference.postprocess / segment.py: geometry, view plumbing, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.config import config_from_dict, config_to_dict, load_config
from data.volume import Geometry, Volume, orientation_of, read_volume, write_volume
from engine.checkpoint import best_name, save_checkpoint
from inference.postprocess import keep_largest_components, largest_components
from inference.segment import (
    LoadedModel,
    load_model,
    plan_outputs,
    plan_tiles,
    probabilities_to_labels,
    segment_volume,
    tile_size,
    window_starts,
)
from models import MOSOutput, build_model
from tests.helpers import random_direction
from utils.errors import InputError, run_cli

torch.set_num_threads(1)

HU = {0: -1000.0, 1: -66.0, 2: 66.0, 3: 1000.0}  # window [-200, 200] -> -1, -0.33, 0.33, 1
LEVELS = (-1.0, -0.33, 0.33, 1.0)


def small_config(inplane: tuple[int, int]):
    raw = config_to_dict(load_config())
    raw["inplane_size"] = list(inplane)
    return config_from_dict(raw)


class IntensityModel(nn.Module):
    """Logits from one input channel: class k wins where the intensity is closest to LEVELS[k]."""

    def __init__(self, channel: int = 1, in_channels: int = 3) -> None:
        super().__init__()
        self.channel = channel
        self.in_channels = in_channels
        self.dummy = nn.Parameter(torch.zeros(()))
        self.register_buffer("levels", torch.tensor(LEVELS).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> MOSOutput:
        assert x.shape[1] == self.in_channels and x.shape[-1] % 16 == 0 and x.shape[-2] % 16 == 0
        v = x[:, self.channel:self.channel + 1]
        return MOSOutput(logits=-50.0 * (v - self.levels) ** 2 + self.dummy, scales=[])


def loaded(model: nn.Module, config, view: str, block: int = 224, slices: int = 3) -> LoadedModel:
    return LoadedModel(model=model, config=config, view=view, slices=slices, block=block,
                       organs=config.organs, path=Path(f"fake_{view}"), model_args={})


# ----------------------------------------------------------------------------------------------
# pure helpers


def test_window_starts_and_plan():
    assert window_starts(256, 224, 112) == [0, 32]
    assert window_starts(600, 224, 112) == [0, 112, 224, 336, 376]
    assert window_starts(100, 224, 112) == [0]
    plan = plan_tiles(37, 300, 224)
    assert plan.tile == (48, 224) and plan.padded == (48, 300)
    assert plan.starts == ([0], [0, 76])
    # every pixel covered, weights strictly positive
    cover = np.zeros(plan.padded)
    for h0 in plan.starts[0]:
        for w0 in plan.starts[1]:
            cover[h0:h0 + plan.tile[0], w0:w0 + plan.tile[1]] += plan.weight
    assert cover.min() > 0
    whole = plan_tiles(37, 300, tile_size(300, 10**9))  # what tile=0 uses
    assert whole.n_tiles == 1 and whole.padded == (48, 304)


class ConvModel(nn.Module):
    """A random 3x3 conv: not pointwise, so tiles overlap with different values."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> MOSOutput:
        return MOSOutput(logits=self.conv(x), scales=[])


@pytest.mark.parametrize("tile", [None, 0])
def test_predict_stack_blending_is_normalised(tile):
    from inference.segment import predict_stack

    cfg = load_config()
    stack = np.random.default_rng(0).uniform(-1, 1, (5, 40, 50)).astype(np.float32)
    out = np.zeros((4, 5, 40, 50), np.float32)
    lm = loaded(ConvModel(), cfg, "axial", block=16)
    predict_stack(lm, stack, out, batch=2, tta=True, device=torch.device("cpu"), tile=tile)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    # adding a second model's probabilities accumulates
    predict_stack(lm, stack, out, batch=3, device=torch.device("cpu"), tile=tile)
    np.testing.assert_allclose(out.sum(0), 2.0, atol=1e-5)
    if tile == 0:  # whole slices: exactly the softmax of the conv on the padded slice
        x = torch.from_numpy(stack[[0, 0, 1]])[None]
        x = torch.nn.functional.pad(x, (0, 14, 0, 8), value=-1.0)
        ref = torch.softmax(lm.model(x).logits, 1)[0, :, :40, :50].detach().numpy()
        first = np.zeros((4, 5, 40, 50), np.float32)
        predict_stack(lm, stack, first, device=torch.device("cpu"), tile=0)
        np.testing.assert_allclose(first[:, 0], ref, atol=1e-6)


def test_predict_stack_side_by_side_passes_give_the_same_probabilities():
    """CPU workers (threads each running whole passes) change the speed, not a single probability;
    the intra-op thread count is restored, and a failing pass fails the call."""
    from inference.segment import predict_stack

    cfg = load_config()
    stack = np.random.default_rng(2).uniform(-1, 1, (7, 24, 20)).astype(np.float32)
    lm = loaded(ConvModel(), cfg, "axial", block=16)
    threads = torch.get_num_threads()
    one, two = (np.zeros((4, 7, 24, 20), np.float32) for _ in range(2))
    predict_stack(lm, stack, one, batch=1, device=torch.device("cpu"), workers=1)
    predict_stack(lm, stack, two, batch=1, device=torch.device("cpu"), workers=2)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)
    np.testing.assert_allclose(one.sum(0), 1.0, atol=1e-5)
    assert torch.get_num_threads() == threads

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> MOSOutput:
            raise RuntimeError("pass failed")

    with pytest.raises(RuntimeError, match="pass failed"):
        predict_stack(loaded(Broken(), cfg, "axial", block=16), stack, np.zeros_like(one), batch=1,
                      device=torch.device("cpu"), workers=2)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("shape, tiled", [((80, 12), False), ((40, 40), True)])
def test_default_tiling_bounds_the_slice_area(shape, tiled):
    """tile=None: whole slices up to (2 x block)^2 pixels, however tall and narrow (a coronal slice of
    a long scan), tiles of the block beyond."""
    from inference.segment import predict_stack

    cfg = load_config()
    stack = np.random.default_rng(1).uniform(-1, 1, (3, *shape)).astype(np.float32)
    lm = loaded(ConvModel(), cfg, "axial", block=16)  # (2 x 16)^2 = 1024 pixels
    got, whole, tiles = (np.zeros((4, 3, *shape), np.float32) for _ in range(3))
    for out, tile in ((got, None), (whole, 0), (tiles, 16)):
        predict_stack(lm, stack, out, batch=2, device=torch.device("cpu"), tile=tile)
    assert not np.allclose(whole, tiles, atol=1e-4)  # the two ways differ: the test can tell them apart
    np.testing.assert_array_equal(got, tiles if tiled else whole)


def test_probabilities_to_labels_matches_resample_axis():
    from data.resample import resample_axis

    rng = np.random.default_rng(0)
    probs = rng.random((4, 5, 8, 6)).astype(np.float32)
    ref = resample_axis(resample_axis(probs, 2, 13, False), 3, 11, False).argmax(0)
    out = probabilities_to_labels(probs, (5, 13, 11), torch.device("cpu"), slab_bytes=1)
    np.testing.assert_array_equal(out, ref)


def test_largest_components():
    m = np.zeros((1, 10, 10), bool)
    m[0, 0:2, 0:2] = True      # 4 voxels
    m[0, 5:8, 5:8] = True      # 9 voxels
    m[0, 0, 9] = True          # 1 voxel
    assert largest_components(m, 1).sum() == 9
    two = largest_components(m, 2)
    assert two.sum() == 13 and not two[0, 0, 9]
    assert largest_components(np.zeros((3, 3), bool)).sum() == 0


def test_keep_largest_components_per_organ():
    cfg = load_config()  # liver 1, kidney 2 (two components kept), spleen 3
    lab = np.zeros((5, 20, 20), np.uint8)
    lab[1:4, 0:5, 0:5] = 1
    lab[0, 15, 15] = 1           # stray liver voxel
    lab[1:4, 10:13, 0:3] = 2     # kidney 1
    lab[1:4, 10:13, 15:18] = 2   # kidney 2
    lab[4, 19, 0] = 2            # stray kidney voxel (third component)
    lab[2, 8, 8] = 3
    out = keep_largest_components(lab, cfg)
    assert out[0, 15, 15] == 0 and out[4, 19, 0] == 0
    assert (out == 1).sum() == 75 and (out == 2).sum() == 54 and (out == 3).sum() == 1
    assert lab[0, 15, 15] == 1  # not in place by default


# ----------------------------------------------------------------------------------------------
# segment_volume: views, orientation inversion, sliding window


def _phantom(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for cls in (1, 2, 3):
        for _ in range(2):
            lo = [int(rng.integers(0, s - 3)) for s in shape]
            hi = [int(lo[a] + rng.integers(2, max(3, shape[a] // 2))) for a in range(3)]
            lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = cls
    return lab


def _exact_case(seed: int):
    """Random orientation; canonical spacing 1 mm so the S-I resampling of coronal and sagittal stacks
    is the identity; config in-plane size = canonical in-plane shape, whose field of view then has the
    grid's aspect (no padding, no resampling)."""
    rng = np.random.default_rng(seed)
    direction = random_direction(rng)
    ori = orientation_of(direction)
    canon_spacing = (1.0, 1.0, 1.0)
    spacing = [0.0, 0.0, 0.0]
    for c in range(3):
        spacing[ori.perm[c]] = canon_spacing[c]
    shape = (21, 19, 23)
    labels = _phantom(rng, shape)
    image = np.vectorize(HU.get)(labels).astype(np.int16)
    geo = Geometry(shape, tuple(spacing), (3.0, -7.0, 11.0), direction)  # type: ignore[arg-type]
    canon_shape = ori.apply(labels).shape
    return Volume(image, geo), labels, ori, small_config((canon_shape[2], canon_shape[1]))


@pytest.mark.parametrize("block", [16, 224])
@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_known_function_each_view(view, block):
    vol, labels, ori, cfg = _exact_case(seed=3)
    # centre channel: the segmentation is the phantom itself
    out = segment_volume(loaded(IntensityModel(1), cfg, view, block), vol, postprocess=False,
                         device="cpu", batch=5)
    assert out.geometry == vol.geometry and out.array.dtype == np.uint8
    np.testing.assert_array_equal(out.array, labels)
    # channel 0 = previous slice along the view's slice axis (canonical axis 0/1/2), edge clamped
    out = segment_volume(loaded(IntensityModel(0), cfg, view, block), vol, postprocess=False,
                         device="cpu", batch=7)
    axis = {"axial": 0, "coronal": 1, "sagittal": 2}[view]
    canon = ori.apply(labels)
    idx = np.clip(np.arange(canon.shape[axis]) - 1, 0, None)
    expect = ori.invert(np.take(canon, idx, axis=axis))
    np.testing.assert_array_equal(out.array, expect)


@pytest.mark.parametrize("tile", [None, 0, 32])
def test_known_function_fused_views_tta(tile):
    vol, labels, _, cfg = _exact_case(seed=5)
    models = [loaded(IntensityModel(1), cfg, v, block=16) for v in ("axial", "coronal", "sagittal")]
    out = segment_volume(models, vol, postprocess=False, device="cpu", tta=True, tile=tile)
    np.testing.assert_array_equal(out.array, labels)


def test_inplane_resampling_back():
    # In-plane size 2x smaller than the volume: away from organ borders the labels are exact.
    rng = np.random.default_rng(1)
    shape = (6, 40, 36)
    labels = np.zeros(shape, np.uint8)
    labels[:, 4:20, 6:30] = 1
    labels[:, 24:36, 4:16] = 2
    image = np.vectorize(HU.get)(labels).astype(np.int16)
    vol = Volume(image, Geometry(shape, (0.7, 0.8, 2.5), tuple(rng.uniform(-5, 5, 3))))
    out = segment_volume(loaded(IntensityModel(1), small_config((18, 20)), "axial"), vol, device="cpu")
    assert out.array.shape == shape
    from scipy import ndimage

    for cls in (0, 1, 2):
        inner = ndimage.binary_erosion(labels == cls, np.ones((1, 5, 5)), border_value=1)
        assert (out.array[inner] == cls).all()
    assert (out.array == labels).mean() > 0.95


def test_models_must_share_preprocessing():
    vol, _, _, cfg = _exact_case(seed=0)
    other = small_config((32, 32))
    with pytest.raises(InputError, match="in-plane size"):
        segment_volume([loaded(IntensityModel(), cfg, "axial"), loaded(IntensityModel(), other, "coronal")],
                       vol, device="cpu")


# ----------------------------------------------------------------------------------------------
# a real (random-init) network: the output sits exactly on the input's grid


def _ckpt(folder: Path, view: str = "axial", slices: int = 3, width: int = 2, inplane=(32, 32),
          train_args: dict | None = None) -> Path:
    cfg = small_config(inplane)
    torch.manual_seed(0)
    args = {"in_channels": slices, "num_classes": cfg.num_classes, "width": width}
    model = build_model(args)
    path = folder / best_name(view)
    save_checkpoint({"model": model.state_dict(), "model_args": args, "organs": list(cfg.organs),
                     "view": view, "slices": slices, "block": 224, "config": config_to_dict(cfg),
                     "epoch": 1, "best_score": 0.5, "args": train_args or {}}, path)
    return path


def test_tta_uses_only_the_flips_the_model_was_trained_with(tmp_path):
    """A model trained without --flip never saw mirrored anatomy (the liver where the spleen is):
    TTA must not average it in. Trained with --flip, all four flips of the slice plane are used."""
    from inference.segment import TTA_FLIPS, predict_stack

    no_flip = load_model(_ckpt(tmp_path / "a", train_args={"flip": False}), view="axial")
    flipped = load_model(_ckpt(tmp_path / "b", train_args={"flip": True}), view="axial")
    legacy = load_model(_ckpt(tmp_path / "c"), view="axial")  # no record: trained without flips
    assert no_flip.tta_flips == ((),) and legacy.tta_flips == ((),)
    assert flipped.tta_flips == TTA_FLIPS
    stack = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32)).astype(np.float32)
    plain, tta = (np.zeros((4, 4, 32, 32), np.float32) for _ in range(2))
    predict_stack(no_flip, stack, plain, device=torch.device("cpu"))
    predict_stack(no_flip, stack, tta, tta=True, device=torch.device("cpu"))
    np.testing.assert_array_equal(plain, tta)
    tta_flipped = np.zeros_like(plain)
    predict_stack(flipped, stack, tta_flipped, tta=True, device=torch.device("cpu"))
    assert not np.allclose(tta_flipped, plain, atol=1e-6)  # the same weights, four flips averaged


def _direction(kind: str, rng: np.random.Generator) -> tuple[float, ...]:
    if kind == "oblique":
        return random_direction(rng, oblique=True)
    if kind == "slices_first":  # the S-I axis is ITK index i (numpy last axis), flipped
        return (0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0)
    return (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS-style flips


@pytest.mark.parametrize("kind", ["oblique", "slices_first", "flipped"])
def test_geometry_roundtrip_real_model(tmp_path, kind):
    import nibabel as nib
    rng = np.random.default_rng(11)
    ckpt = _ckpt(tmp_path)
    lm = load_model(ckpt, view="axial")
    shape = (9, 13, 11)
    geo = Geometry(shape, (0.7, 1.3, 3.1), (10.5, -20.25, 33.0), _direction(kind, rng))
    src = tmp_path / "in.nii.gz"
    write_volume(Volume(rng.integers(-300, 300, shape).astype(np.int16), geo), src)
    vol = read_volume(src)
    out = segment_volume(lm, vol, device="cpu")
    assert out.array.shape == vol.array.shape and out.array.dtype == np.uint8
    assert out.geometry == vol.geometry
    assert int(out.array.max()) <= 3
    dst = tmp_path / "out.nii.gz"
    write_volume(out, dst)
    # The same geometry written twice gives bit-identical headers; against the original file the
    # NIfTI float32 sform/quaternion round trip may differ in the last float32 digit.
    ref = tmp_path / "ref.nii.gz"
    write_volume(vol, ref)
    a, b, r = nib.load(str(src)), nib.load(str(dst)), nib.load(str(ref))
    assert a.shape == b.shape
    np.testing.assert_array_equal(b.affine, r.affine)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
    assert read_volume(dst).geometry == read_volume(ref).geometry
    assert read_volume(dst).geometry.same_grid(vol.geometry, tol=1e-6)


def test_load_model_checks(tmp_path):
    ckpt = _ckpt(tmp_path, slices=3, width=2)
    assert load_model(tmp_path, view="axial", expect={"slices": 3, "width": 2}).slices == 3
    with pytest.raises(InputError, match="slices"):
        load_model(ckpt, expect={"slices": 5})
    with pytest.raises(InputError, match="width"):
        load_model(ckpt, expect={"width": 16})
    with pytest.raises(InputError, match="organs"):
        load_model(ckpt, expect={"organs": ["liver"]})
    with pytest.raises(InputError, match="view") as err:
        load_model(ckpt, view="coronal")
    assert str(ckpt) in str(err.value)
    with pytest.raises(InputError) as err:
        load_model(tmp_path, view="sagittal")
    assert best_name("sagittal") in str(err.value)


def test_plan_outputs(tmp_path):
    f = tmp_path / "a.nii.gz"
    f.write_bytes(b"x")
    assert plan_outputs(f, tmp_path / "o.nii.gz") == [(f, tmp_path / "o.nii.gz")]
    with pytest.raises(InputError, match="output must be"):
        plan_outputs(f, tmp_path / "o.txt")
    with pytest.raises(InputError, match="overwrite"):
        plan_outputs(f, f)
    # an .mhd output would be two files (header + voxels), only one of them renamed into place
    with pytest.raises(InputError, match=r"\.mha"):
        plan_outputs(f, tmp_path / "o.MHD")
    with pytest.raises(InputError, match=r"\.mha"):
        write_volume(Volume(np.zeros((2, 3, 4), np.int16), Geometry((2, 3, 4), (1, 1, 1), (0, 0, 0))),
                     tmp_path / "o.mhd")
    assert not list(tmp_path.glob("*o.*"))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "b.nii").write_bytes(b"x")
    (folder / "c.mhd").write_bytes(b"x")
    assert plan_outputs(folder, tmp_path / "out") == [(folder / "b.nii", tmp_path / "out" / "b.nii"),
                                                      (folder / "c.mhd", tmp_path / "out" / "c.mha")]
    with pytest.raises(InputError, match="differ"):
        plan_outputs(folder, folder)


def test_plan_outputs_refuses_two_inputs_for_one_output_and_dangling_links(tmp_path):
    """a.mhd and a.mha both become a.mha: the second replaced the first beside an input it does not
    belong to. A dangling link among the inputs was skipped without a word."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.mha").write_bytes(b"x")
    (folder / "a.mhd").write_bytes(b"x")
    with pytest.raises(InputError, match=r"would be written to .*a\.mha, as .*a\.mha is") as err:
        plan_outputs(folder, tmp_path / "out")
    assert err.value.path == str(folder / "a.mhd")
    (folder / "a.mhd").unlink()
    (folder / "d.nii.gz").symlink_to(folder / "nowhere.nii.gz")
    with pytest.raises(InputError, match="dangling") as err:
        plan_outputs(folder, tmp_path / "out")
    assert err.value.path == str(folder / "d.nii.gz")


# ----------------------------------------------------------------------------------------------
# segment.py CLI


def _cli(argv: list[str]) -> int:
    import segment

    with pytest.raises(SystemExit) as ex:
        run_cli(segment.main, argv)
    return int(ex.value.code)


def _case(tmp_path: Path, name: str = "case_001.nii.gz", shape=(8, 20, 24)) -> tuple[Path, Path]:
    rng = np.random.default_rng(2)
    geo = Geometry(shape, (0.9, 0.8, 2.5), (1.0, 2.0, 3.0))
    img = tmp_path / "img" / name
    gt = tmp_path / "gt" / name
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 5:15, 4:12] = 1
    write_volume(Volume(rng.integers(-200, 200, shape).astype(np.int16), geo), img)
    write_volume(Volume(labels, geo), gt)
    return img, gt


def test_cli_end_to_end(tmp_path, capsys):
    models = tmp_path / "models"
    for v in ("axial", "coronal", "sagittal"):
        _ckpt(models, view=v)
    img, gt = _case(tmp_path)
    out = tmp_path / "out" / "seg.nii.gz"
    code = _cli([str(img), str(out), "--network_path", str(models), "--views", "axial,coronal,sagittal",
                 "--slices", "3", "--width", "2", "--device", "cpu", "--evaluating", "--label_filename",
                 str(gt), "--png", str(tmp_path / "png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Dice" in captured.out and "liver" in captured.out
    seg = read_volume(out)
    assert seg.geometry == read_volume(img).geometry and seg.array.dtype == np.uint8
    assert (tmp_path / "png" / "seg.png").is_file()
    # a folder of inputs -> a folder of outputs with the same names
    _case(tmp_path, "case_002.nii.gz")
    code = _cli([str(img.parent), str(tmp_path / "outdir"), "--network_path",
                 str(models / best_name("axial")), "--device", "cpu", "--no-postprocess"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "outdir").iterdir()) == ["case_001.nii.gz", "case_002.nii.gz"]


@pytest.mark.parametrize("problem", ["slices", "width", "missing_view", "4d", "corrupt", "organs", "gt_grid"])
def test_cli_bad_input(tmp_path, capsys, problem):
    models = tmp_path / "models"
    _ckpt(models, view="axial")
    img, gt = _case(tmp_path)
    out = tmp_path / "out" / "seg.nii.gz"
    args = [str(img), str(out), "--network_path", str(models), "--device", "cpu"]
    names = {"slices": best_name("axial"), "width": best_name("axial"), "organs": best_name("axial"),
             "missing_view": best_name("coronal"), "4d": "bad.nii.gz", "corrupt": "bad.nii.gz",
             "gt_grid": "gt.nii.gz"}
    if problem == "slices":
        args += ["--slices", "5"]
    elif problem == "width":
        args += ["--width", "64"]
    elif problem == "missing_view":
        args += ["--views", "axial,coronal"]
    elif problem == "organs":
        cfg = tmp_path / "two.yaml"
        cfg.write_text("organs: [liver, kidney]\ndatasets:\n  A:\n    labels: {1: liver}\n")
        args += ["--config", str(cfg)]
    elif problem == "4d":
        import SimpleITK as sitk  # noqa: N813

        bad = tmp_path / "bad.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(bad))
        args[0] = str(bad)
    elif problem == "corrupt":
        bad = tmp_path / "bad.nii.gz"
        bad.write_bytes(b"not a nifti at all" * 10)
        args[0] = str(bad)
    elif problem == "gt_grid":
        g = tmp_path / "gt.nii.gz"
        write_volume(Volume(np.zeros((8, 20, 25), np.uint8), Geometry((8, 20, 25), (1, 1, 1), (0, 0, 0))), g)
        args += ["--evaluating", "--label_filename", str(g)]
    code = _cli(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and names[problem] in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temporary left behind


def test_cli_unwritable_output_folder_fails_before_any_segmentation(tmp_path, capsys, monkeypatch):
    import inference.segment

    def segmented(*args, **kwargs):
        raise AssertionError("segmented before the output folder was checked")

    monkeypatch.setattr(inference.segment, "segment_volume", segmented)
    _ckpt(tmp_path / "models")
    img, _ = _case(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file where the output folder's parent should be")
    out = blocker / "sub" / "seg.nii.gz"
    code = _cli([str(img), str(out), "--network_path", str(tmp_path / "models"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {blocker / 'sub'}: cannot create output folder")
    assert blocker.read_bytes().startswith(b"a file")


def test_cli_two_ground_truths_with_one_case_key_are_refused(tmp_path, capsys):
    _ckpt(tmp_path / "models")
    img, gt = _case(tmp_path)
    write_volume(read_volume(gt), gt.with_name("case_001.nii"))  # which one would be scored?
    code = _cli([str(img.parent), str(tmp_path / "out"), "--network_path", str(tmp_path / "models"),
                 "--device", "cpu", "--evaluating", "--label_filename", str(gt.parent)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "two ground truths with the same case key 'case_001'" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _dicom_series(folder: Path, shape=(6, 20, 24)) -> np.ndarray:
    import SimpleITK as sitk  # noqa: N813

    folder.mkdir(parents=True)
    arr = np.random.default_rng(4).integers(-500, 500, shape).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 0.8, 2.5))
    img.SetOrigin((1.0, 2.0, 3.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(shape[0]):
        s = img[:, :, k]
        for tag, value in (("0020|000e", uid), ("0020|000d", uid + ".0"), ("0008|0060", "CT"),
                           ("0020|0013", str(k + 1)), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0028|0030", "0.8\\0.9"),
                           ("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    return arr


def test_cli_dicom_series(tmp_path):
    _ckpt(tmp_path / "models")
    series = tmp_path / "series"
    _dicom_series(series)
    out = tmp_path / "seg.nii.gz"
    assert _cli([str(series), str(out), "--network_path", str(tmp_path / "models"), "--device", "cpu"]) == 0
    assert read_volume(out).geometry.same_grid(read_volume(series).geometry, tol=1e-6)
    (tmp_path / "outdir").mkdir()
    assert _cli([str(series), str(tmp_path / "outdir"), "--network_path", str(tmp_path / "models"),
                 "--device", "cpu"]) == 0
    assert (tmp_path / "outdir" / "series.nii.gz").is_file()
