"""TrainOptions: the same names and defaults as Final.py's parser, and the TINY settings agree."""

from __future__ import annotations

from dataclasses import fields

import pytest

from engine.options import TrainOptions
from Final import build_parser
from tests.conftest import train_argv, train_options


def test_fields_and_defaults_are_final_py_s():
    parsed = TrainOptions.from_namespace(build_parser().parse_args([]))
    assert parsed == TrainOptions()
    assert {f.name for f in fields(TrainOptions)} == set(vars(build_parser().parse_args([])))


def test_tiny_options_equal_the_tiny_command_line(tmp_path):
    argv = train_argv(tmp_path / "data", tmp_path / "out", "--no-semi", "--resume")
    assert TrainOptions.from_namespace(build_parser().parse_args(argv)) == \
        train_options(tmp_path / "data", tmp_path / "out", semi=False, resume="auto")


def test_unknown_destination_and_bad_block_are_refused():
    from argparse import Namespace

    from utils.errors import InputError

    ns = build_parser().parse_args([])
    with pytest.raises(TypeError, match="no field for brand_new"):
        TrainOptions.from_namespace(Namespace(**vars(ns), brand_new=1))
    with pytest.raises(InputError, match="multiple of 16"):
        TrainOptions(blocksize=40)


def test_plain_values_and_progress_default(monkeypatch):
    opts = TrainOptions(intensity_jitter=[0.2, 0.1])
    assert opts.intensity_jitter == (0.2, 0.1)
    assert opts.to_dict()["intensity_jitter"] == [0.2, 0.1]
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert TrainOptions(progress=None).progress_bars is True
    assert TrainOptions(progress=False).progress_bars is False


def test_semi_config_and_options_default_to_the_same_teacher():
    from engine.semi import SemiConfig

    cfg, opts = SemiConfig(), TrainOptions()
    assert cfg.teacher == opts.teacher
    assert cfg.organ_threshold == opts.organ_threshold
    assert (cfg.w_x, cfg.w_fp, cfg.w_s1, cfg.w_s2) == opts.semi_weights


def test_every_semi_setting_reaches_the_semi_config():
    """build_semi hands each semi-supervised flag to SemiConfig (--dice-weight once reached only the
    supervised loss: the unsupervised ones kept Dice 0 whatever the flag said)."""
    import torch

    from engine.build import build_semi

    opts = TrainOptions(dice_weight=0.5, semi_weights=(1.0, 0.4, 0.3, 0.2), organ_threshold=0.6,
                        unsup_class_weights=(0.2, 1.2), ema_momentum=0.9, teacher="ema", fp="head")
    cfg = build_semi(opts, torch.nn.Linear(2, 2)).config
    assert cfg.dice_weight == 0.5 and (cfg.w_x, cfg.w_fp, cfg.w_s1, cfg.w_s2) == (1.0, 0.4, 0.3, 0.2)
    assert cfg.organ_threshold == 0.6 and cfg.class_weights == (0.2, 1.2)
    assert cfg.ema_momentum == 0.9 and cfg.teacher == "ema" and cfg.fp == "head"
