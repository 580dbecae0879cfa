"""MOSNet: the shared model test (forward/backward, shapes), perturbation, fusion, errors; FLOP counting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import DEFAULT_NORM, LEGACY_NORM, MOSNet, MOSOutput, build_model
from models.blocks import NORMS
from utils.flops import count_flops, peak_tflops

torch.set_num_threads(1)

# (model_args, input sizes): tiny widths keep the suite fast; the second setting checks deeper levels.
# Without "norm" the models are the default network (DEFAULT_NORM, what Final.py trains); tests that
# matter for both normalisations are parametrized on NORMS.
CONFIGS = [
    ({"in_channels": 3, "num_classes": 4, "width": 4}, [(32, 32), (48, 80), (16, 64)]),
    ({"in_channels": 1, "num_classes": 3, "width": 4, "blocks": [1, 2, 1, 2]}, [(32, 48)]),
    ({"in_channels": 5, "num_classes": 2, "width": 2}, [(64, 32)]),
]


def _model(args: dict, seed: int = 0, norm: str = DEFAULT_NORM) -> MOSNet:
    """The network of ``args`` with ``norm`` unless ``args`` names one (build_model alone would take
    model_args without "norm" for a checkpoint from before the option: LEGACY_NORM)."""
    torch.manual_seed(seed)
    return build_model({"norm": norm, **args})


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("args,sizes", CONFIGS)
def test_forward_backward_shapes(args, sizes, norm):
    model = _model(args, norm=norm).train()
    c = args["num_classes"]
    for h, w in sizes:
        x = torch.randn(2, args["in_channels"], h, w)
        out = model(x)
        assert isinstance(out, MOSOutput)
        assert out.logits.shape == (2, c, h, w)
        assert len(out.scales) == 5 and all(s.shape == (2, c, h, w) for s in out.scales)
        assert out.fp_logits is None
        assert out.weights.shape == (2, 5)
        torch.testing.assert_close(out.weights.sum(dim=1), torch.ones(2))
        assert bool((out.weights > 0).all())
        model.zero_grad()
        (out.logits.square().mean() + sum(s.mean() for s in out.scales)).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
        assert any(float(p.grad.abs().sum()) > 0 for p in model.heads.parameters())


def test_fused_is_weighted_sum_of_scales():
    model = _model(CONFIGS[0][0]).eval()
    out = model(torch.randn(3, 3, 32, 32))
    manual = sum(out.weights[:, i, None, None, None] * s for i, s in enumerate(out.scales))
    torch.testing.assert_close(out.logits, manual, rtol=1e-5, atol=1e-5)


def test_fusion_scorer_matches_its_conv_definition():
    import torch.nn.functional as F

    from models.blocks import FusionScorer

    torch.manual_seed(0)
    sc = FusionScorer(4)
    nn.init.normal_(sc.conv2.weight)
    x = torch.randn(6, 4, 16, 24) * 3
    ref = sc.conv2(F.relu(sc.norm2(sc.conv1(F.relu(sc.norm1(x))))))
    torch.testing.assert_close(sc(x), ref.mean(dim=(1, 2, 3)) + ref.amax(dim=(1, 2, 3)))
    # per-image normalisation: an image's score does not depend on the rest of the batch
    torch.testing.assert_close(sc(x[:2]), sc(x)[:2])


@pytest.mark.parametrize("norm,mode", [(DEFAULT_NORM, "encoder"), (DEFAULT_NORM, "head"), ("batch", "head")])
def test_perturbation(norm, mode):
    model = _model({**CONFIGS[0][0], "norm": norm}).train()
    x = torch.randn(3, 3, 32, 48)
    torch.manual_seed(1)
    out = model(x, perturb=mode, perturb_from=1)
    # perturbed copies of samples 1: only
    assert out.fp_logits is not None and out.fp_logits.shape == (2, *out.logits.shape[1:])
    assert not torch.allclose(out.fp_logits, out.logits[1:])
    # the clean path of a perturbed call is the ordinary forward pass: per-image normalisation (or, for
    # "head", a norm that only sees clean features) keeps the perturbed copies out of its statistics
    plain = model(x)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-4, atol=1e-4)
    # both predictions train the network; encoder perturbation reaches the decoder's weights
    model.zero_grad()
    out.fp_logits.sum().backward()
    assert model.stem.conv1.weight.grad is not None
    dec_grad = model.decoder[0][0].conv1.weight.grad
    assert dec_grad is not None and bool(dec_grad.abs().sum() > 0)


def test_encoder_perturbation_drops_encoder_features():
    """'encoder' perturbs before the decoder: the perturbed logits differ from the clean ones even when
    the heads' dropout would be the identity, and eval mode (no dropout) gives back the clean logits."""
    model = _model({**CONFIGS[0][0], "norm": DEFAULT_NORM}).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, perturb="encoder")
    torch.testing.assert_close(out.fp_logits, out.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="perturb"):
        model(x, perturb="decoder")
    with pytest.raises(ValueError, match="perturb_from"):
        model(x, perturb=True, perturb_from=2)


@pytest.mark.parametrize("norm", NORMS)
def test_eval_deterministic_and_no_perturbation(norm):
    model = _model(CONFIGS[0][0], norm=norm)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x)  # move BN running statistics (if any) away from their initial values
    model.eval()
    a, b = model(x, perturb=True), model(x, perturb=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.fp_logits, a.logits, rtol=1e-5, atol=1e-5)  # Dropout2d off in eval


@pytest.mark.parametrize("shape", [(2, 3, 30, 32), (2, 3, 32, 40), (2, 3, 8, 8), (2, 4, 32, 32), (3, 32, 32)])
def test_bad_input_raises(shape):
    model = _model(CONFIGS[0][0])
    with pytest.raises(ValueError):
        model(torch.randn(*shape))


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="unknown model_args"):
        build_model({"widht": 8})
    with pytest.raises(ValueError, match="blocks"):
        build_model({"width": 4, "blocks": [1, 1, 1]})
    with pytest.raises(ValueError, match="fp_dropout"):
        MOSNet(width=4, fp_dropout=1.0)


def test_equal_convolutional_depth():
    blocks = (1, 2, 1, 3)
    model = MOSNet(width=2, blocks=blocks, norm=DEFAULT_NORM)
    # pyramid level l has as many blocks as the encoder before it: sum(blocks[:l-1])
    assert [len(p) for p in model.pyramid] == [0, 1, 3, 4]
    assert [len(e) for e in model.encoder] == list(blocks)
    assert [len(d) for d in model.decoder] == list(blocks)
    # every scale output: decoder blocks above it + branch blocks = the full decoder depth (7)
    dec_above = [sum(blocks[lvl:]) for lvl in range(5)]
    assert [d + len(b) for d, b in zip(dec_above, model.branches)] == [sum(blocks)] * 5


def test_build_model_state_roundtrip():
    args = {"in_channels": 3, "num_classes": 4, "width": 4, "blocks": 1}
    a, b = _model(args, seed=0).eval(), _model(args, seed=1).eval()
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(a(x).logits, b(x).logits)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x).logits, b(x).logits)


def test_instance_norm_option():
    # Instance norm keeps no running statistics: train- and eval-mode outputs agree, and an image's
    # prediction does not depend on the rest of the batch. model_args without the key mean batch
    # norm (checkpoints written before the option).
    net = build_model({"in_channels": 3, "num_classes": 4, "width": 4, "norm": "instance"})
    assert net.norm == "instance" and not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert not list(net.buffers())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        train_out = net.train()(x).logits
        eval_out = net.eval()(x).logits
        alone = net(x[:1]).logits
    torch.testing.assert_close(train_out, eval_out)
    torch.testing.assert_close(alone, eval_out[:1], rtol=1e-4, atol=1e-5)
    assert build_model({"in_channels": 3, "num_classes": 4, "width": 4}).norm == LEGACY_NORM
    with pytest.raises(ValueError, match="norm"):
        MOSNet(3, 4, 4, norm="layer")


def test_final_py_norm_choices_are_the_models():
    from Final import build_parser

    parser = build_parser()
    assert parser.parse_args([]).norm == DEFAULT_NORM
    for norm in NORMS:
        assert parser.parse_args(["--norm", norm]).norm == norm
    with pytest.raises(SystemExit):
        parser.parse_args(["--norm", "layer"])


def test_channels_last_matches_contiguous():
    model = _model(CONFIGS[0][0]).eval()
    x = torch.randn(2, 3, 32, 48)
    ref = model(x).logits
    model = model.to(memory_format=torch.channels_last)
    got = model(x.contiguous(memory_format=torch.channels_last)).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # a contiguous input to a channels_last model is converted: the whole pass runs channels_last
    out = model(x)
    assert out.scales[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_cpu_finite():
    model = _model(CONFIGS[0][0]).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, perturb=True)
    # the scale outputs are bf16, the fusion (weights and weighted sum) runs in float32
    assert out.scales[0].dtype == torch.bfloat16
    assert out.logits.dtype == torch.float32 and out.fp_logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model._fuse([s.float() for s in out.scales])[0]
    torch.testing.assert_close(out.logits, ref[:2], rtol=0, atol=0)
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.fp_logits.float()).all()
    torch.testing.assert_close(out.weights.sum(dim=1), torch.ones(2))
    out.logits.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = _model(CONFIGS[0][0]).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x, perturb=True).logits, model(x).logits, rtol=1e-4, atol=1e-4)


# --- utils.flops -------------------------------------------------------------------------------------

def test_count_flops_hand_computed():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    fwd = 2 * (4 * 8 * 8) * (3 * 3 * 3)  # 2 FLOPs per multiply-add, per output value
    assert count_flops(conv, (1, 3, 8, 8)) == fwd
    # backward: the weight gradient only (the input does not require grad) costs the same again
    assert count_flops(conv, (1, 3, 8, 8), backward=True) == 2 * fwd
    assert conv.weight.grad is None


@pytest.mark.parametrize("norm", NORMS)
def test_count_flops_leaves_model_state_alone(norm):
    model = _model(CONFIGS[0][0], norm=norm).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = count_flops(model, (2, 3, 32, 32), backward=True)
    assert n > count_flops(model, (2, 3, 32, 32)) > 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_peak_tflops_cpu_is_none():
    assert peak_tflops("cpu") is None


def test_train_step_bench_smoke():
    from bench.train_step import run

    r = run(width=2, size=32, batch=2, steps=1, warmup=1)
    assert r["slices_per_s"] > 0 and r["train_flops_per_slice"] > r["fwd_flops_per_slice"] > 0
    assert r["frac_peak"] is None


@pytest.mark.parametrize("norm", NORMS)
def test_relu_in_place_changes_no_number(norm):
    """The norm-ReLU pairs overwrite the norm's output; forward and gradients equal the out-of-place
    form's exactly (the norms' backward keeps their input, not their output)."""
    from bench.train_step import set_relu_inplace
    from models.blocks import NormReLUModule

    x = torch.randn(2, 3, 32, 32)
    results = []
    for inplace in (True, False):
        model = set_relu_inplace(_model({"width": 8}, norm=norm), inplace).train()
        assert all(m.relu_inplace is inplace for m in model.modules() if isinstance(m, NormReLUModule))
        out = model(x, perturb="encoder", perturb_from=1)
        loss = out.logits.square().mean() + sum(s.square().mean() for s in out.scales) + \
            out.fp_logits.square().mean()
        loss.backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
