"""losses.partial: TAL against hand-computed values, equivalences with cross-entropy, mixed label sets,
ignore_index, pixel weights, Dice, deep supervision, and finiteness under autocast."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from losses.partial import (
    IGNORE_INDEX,
    DeepSupervisedLoss,
    class_weight_vector,
    merge_log_probs,
    target_adaptive_loss,
)

torch.set_num_threads(1)

# Tiny case: B=1, C=3 (background, organ 1, organ 2), H=1, W=2.
Z = [[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]   # logits[c][w]
LOGITS = torch.tensor(Z)[None, :, None, :]  # (1, 3, 1, 2)


def _softmax_col(w: int) -> list[float]:
    e = [math.exp(Z[c][w]) for c in range(3)]
    return [v / sum(e) for v in e]


P0, P1 = _softmax_col(0), _softmax_col(1)


def _mask(*labeled: int) -> torch.Tensor:
    m = torch.zeros(1, 3, dtype=torch.bool)
    m[0, list(labeled)] = True
    return m


# (labeled classes, target, mode, class_weights, pixel_weight, expected loss by hand)
CASES = [
    # organ 2 unlabeled: its probability joins background; pixel 0 is organ 1, pixel 1 background
    ((0, 1), [1, 0], "tal", (0.2, 1.2), None,
     (1.2 * -math.log(P0[1]) + 0.2 * -math.log(P1[0] + P1[2])) / (1.2 + 0.2)),
    # organ 1 unlabeled
    ((0, 2), [0, 2], "tal", (0.2, 1.2), None,
     (0.2 * -math.log(P0[0] + P0[1]) + 1.2 * -math.log(P1[2])) / 1.4),
    # everything labeled: plain weighted CE
    ((0, 1, 2), [0, 2], "tal", (0.2, 1.2), None,
     (0.2 * -math.log(P0[0]) + 1.2 * -math.log(P1[2])) / 1.4),
    # naive: organ 2 treated as ordinary background pixels, no merging
    ((0, 1), [1, 0], "naive", (0.2, 1.2), None,
     (1.2 * -math.log(P0[1]) + 0.2 * -math.log(P1[0])) / 1.4),
    # ignore_index: only pixel 1 counts
    ((0, 1), [255, 0], "tal", (0.2, 1.2), None, -math.log(P1[0] + P1[2])),
    # per-class weight vector
    ((0, 1, 2), [1, 2], "tal", (0.5, 2.0, 3.0), None,
     (2.0 * -math.log(P0[1]) + 3.0 * -math.log(P1[2])) / 5.0),
    # pixel weights: numerator weighted, denominator sum of class weights of kept pixels
    ((0, 1), [1, 0], "tal", (0.2, 1.2), [0.5, 0.0],
     (0.5 * 1.2 * -math.log(P0[1])) / 1.4),
]


@pytest.mark.parametrize("labeled,target,mode,weights,pixel,expected", CASES)
def test_hand_computed(labeled, target, mode, weights, pixel, expected):
    t = torch.tensor(target)[None, None, :]
    pw = None if pixel is None else torch.tensor(pixel)[None, None, :]
    got = target_adaptive_loss(LOGITS, t, _mask(*labeled), class_weights=weights, mode=mode,
                               pixel_weight=pw)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_merge_log_probs_hand_computed():
    m = merge_log_probs(LOGITS, _mask(0, 1))
    assert m[0, 0, 0, 0].item() == pytest.approx(math.log(P0[0] + P0[2]), rel=1e-6)
    assert m[0, 1, 0, 1].item() == pytest.approx(math.log(P1[1]), rel=1e-6)
    assert torch.isneginf(m[0, 2]).all()
    # column 0 counts as labeled even when the mask says otherwise
    torch.testing.assert_close(merge_log_probs(LOGITS, torch.tensor([[False, True, False]])), m)


def test_merged_probabilities_sum_to_one():
    torch.manual_seed(0)
    z = torch.randn(4, 5, 3, 6) * 10
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
                        dtype=torch.bool)
    m = merge_log_probs(z, mask)
    torch.testing.assert_close(m.exp().sum(dim=1), torch.ones(4, 3, 6))
    # the last sample labels nothing but background: probability 1 everywhere
    torch.testing.assert_close(m[3, 0], torch.zeros(3, 6), atol=1e-6, rtol=0)


def _partial_batch(seed: int = 0, b: int = 4, c: int = 4, h: int = 5, w: int = 7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, h, w, generator=g) * 4
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)[:b]
    t = torch.randint(0, c, (b, h, w), generator=g)
    t[~mask.gather(1, t.flatten(1)).view_as(t)] = 0  # the dataset's labels: unlabeled organs read 0
    t[0, 0, :3] = 255
    return z, t, mask


def test_mixed_batch_equals_per_sample():
    z, t, mask = _partial_batch()
    cw = class_weight_vector((0.2, 1.2), 4)
    batch = target_adaptive_loss(z, t, mask)
    merged = merge_log_probs(z, mask)
    num = den = 0.0
    for i in range(z.shape[0]):
        valid = t[i] != 255
        d = float(cw[t[i][valid]].sum())
        num += float(target_adaptive_loss(z[i:i + 1], t[i:i + 1], mask[i:i + 1])) * d
        den += d
        torch.testing.assert_close(merged[i:i + 1], merge_log_probs(z[i:i + 1], mask[i:i + 1]))
    assert batch.item() == pytest.approx(num / den, rel=1e-5)


def test_tal_equals_cross_entropy_when_fully_labeled():
    z, t, _ = _partial_batch()
    full = torch.ones(4, 4, dtype=torch.bool)
    w = torch.tensor([0.2, 1.2, 1.2, 1.2])
    ref = F.cross_entropy(z, t, weight=w, ignore_index=255)
    torch.testing.assert_close(target_adaptive_loss(z, t, full), ref)
    torch.testing.assert_close(target_adaptive_loss(z, t, full, class_weights=[1, 1, 1, 1]),
                               F.cross_entropy(z, t, ignore_index=255))


def test_naive_equals_cross_entropy_with_unlabeled_as_background():
    z, t, mask = _partial_batch()
    ref = F.cross_entropy(z, t, weight=torch.tensor([0.2, 1.2, 1.2, 1.2]), ignore_index=255)
    torch.testing.assert_close(target_adaptive_loss(z, t, mask, mode="naive"), ref)
    # and TAL differs from it on partially labeled samples
    assert abs(target_adaptive_loss(z, t, mask).item() - ref.item()) > 1e-3


def test_ignore_index_leaves_pixels_out():
    z, t, mask = _partial_batch()
    t2 = t.clone()
    t2[:, :, -1] = 255
    ref = target_adaptive_loss(z[..., :-1], t[..., :-1].contiguous(), mask)
    torch.testing.assert_close(target_adaptive_loss(z, t2, mask), ref)
    # z at ignored pixels does not matter, and gets no gradient
    z = z.clone().requires_grad_(True)
    target_adaptive_loss(z, t2, mask).backward()
    assert float(z.grad[..., -1].abs().max()) == 0


def test_all_ignored_is_zero_with_graph():
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.full((2, 3, 3), 255)
    loss = target_adaptive_loss(z, t, torch.ones(2, 4, dtype=torch.bool), dice_weight=1.0)
    assert loss.item() == 0
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_pixel_weight_ones_is_unweighted():
    z, t, mask = _partial_batch()
    torch.testing.assert_close(target_adaptive_loss(z, t, mask, pixel_weight=torch.ones(4, 5, 7)),
                               target_adaptive_loss(z, t, mask))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradient_finite_under_autocast(dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 1)
    x = torch.randn(2, 4, 6, 6)
    x[:, :, :3] *= 200  # logits around +-50 and beyond
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    t = torch.zeros(2, 6, 6, dtype=torch.long)
    t[0, :2] = 1
    t[1, 4:] = 3
    with torch.autocast("cpu", dtype=dtype):
        z = conv(x)
        assert z.dtype == dtype and float(z.detach().float().abs().max()) > 50
        loss = target_adaptive_loss(z, t, mask, dice_weight=1.0)
        fp = DeepSupervisedLoss()(SimpleNamespace(logits=z, scales=[z, z]), t, mask)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(fp)
    (loss + fp).backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(conv.bias.grad).all()


def test_extreme_logits_finite_in_float32():
    z = torch.tensor([[[[60.0]], [[-60.0]], [[80.0]]]], requires_grad=True)  # (1, 3, 1, 1)
    loss = target_adaptive_loss(z, torch.tensor([[[1]]]), _mask(0, 1))
    assert loss.item() == pytest.approx(140.0, rel=1e-5)  # -log p1 = logsumexp(z) - z1 ~= 80 + 60
    loss.backward()
    assert torch.isfinite(z.grad).all()


# --- soft Dice -----------------------------------------------------------------------------------------

def _two_class(p_organ: list[float]) -> torch.Tensor:
    """(1, 2, 1, W) logits with softmax organ probability ``p_organ``."""
    d = torch.tensor([math.log(p / (1 - p)) for p in p_organ])
    return torch.stack([torch.zeros_like(d), d])[None, :, None, :]


def test_dice_hand_computed():
    z = _two_class([0.8, 0.3])
    t = torch.tensor([[[1, 0]]])
    full = torch.ones(1, 2, dtype=torch.bool)
    ce = (1.2 * -math.log(0.8) + 0.2 * -math.log(0.7)) / 1.4
    dice = 1 - (2 * 0.8 + 1.0) / (1.1 + 1.0 + 1.0)  # smoothing of one pixel (DICE_SMOOTH)
    got = target_adaptive_loss(z, t, full, dice_weight=0.5)
    assert got.item() == pytest.approx(ce + 0.5 * dice, rel=1e-6)


def test_dice_skips_class_absent_from_target_and_prediction():
    z = _two_class([0.2, 0.3])  # argmax background everywhere
    t = torch.zeros(1, 1, 2, dtype=torch.long)
    full = torch.ones(1, 2, dtype=torch.bool)
    torch.testing.assert_close(target_adaptive_loss(z, t, full, dice_weight=1.0),
                               target_adaptive_loss(z, t, full))
    # a false positive counts: loss |P| / (|P| + 1), P = 0.9 + 0.3 predicted organ mass
    z = _two_class([0.9, 0.3])
    diff = target_adaptive_loss(z, t, full, dice_weight=1.0) - target_adaptive_loss(z, t, full)
    assert diff.item() == pytest.approx(1.2 / 2.2, rel=1e-5)


def test_dice_pushes_false_positives_down():
    # organ predicted, target background only: without smoothing the Dice term is the constant 1
    z = _two_class([0.9, 0.6]).requires_grad_(True)
    t = torch.zeros(1, 1, 2, dtype=torch.long)
    full = torch.ones(1, 2, dtype=torch.bool)
    from losses.partial import _merge as merge
    from losses.partial import _prepare, _soft_dice

    tgt = _prepare(z.shape, t, full, (1.0, 1.0), "tal", 255, None, z.device)
    dice = _soft_dice(merge(torch.log_softmax(z, 1), full)[None], tgt)[0]
    dice.backward()
    organ_grad = z.grad[0, 1]
    assert bool((organ_grad > 0).all()), "descending the loss must lower the organ logits"


def test_dice_ignores_unlabeled_organs():
    # S = {bg, organ 1}; the network predicts organ 2 (unlabeled) everywhere and the target is background
    z = torch.zeros(1, 3, 2, 2)
    z[:, 2] = 4.0
    t = torch.zeros(1, 2, 2, dtype=torch.long)
    mask = _mask(0, 1)
    # merged, organ 2 is background: no organ of S is in target or prediction, so no Dice term
    torch.testing.assert_close(target_adaptive_loss(z, t, mask, dice_weight=1.0),
                               target_adaptive_loss(z, t, mask))
    # naive mode sees an organ-2 false positive (organ 1 is neither predicted nor present: skipped)
    diff = target_adaptive_loss(z, t, mask, mode="naive", dice_weight=1.0) - \
        target_adaptive_loss(z, t, mask, mode="naive")
    p2 = 4 * math.exp(4.0) / (math.exp(4.0) + 2)
    assert diff.item() == pytest.approx(p2 / (p2 + 1.0), rel=1e-5)


# --- deep supervision ----------------------------------------------------------------------------------

def test_deep_supervised_loss_is_weighted_sum():
    z, t, mask = _partial_batch()
    g = torch.Generator().manual_seed(3)
    scales = [torch.randn(z.shape, generator=g) for _ in range(5)]
    out = SimpleNamespace(logits=z, scales=scales)
    r = DeepSupervisedLoss(dice_weight=0.5)(out, t, mask)
    fused = target_adaptive_loss(z, t, mask, dice_weight=0.5)
    each = [target_adaptive_loss(s, t, mask, dice_weight=0.5) for s in scales]
    torch.testing.assert_close(r["fused"], fused)
    torch.testing.assert_close(r["scales"], torch.stack(each))
    torch.testing.assert_close(r["loss"], fused + 0.1 * sum(each))
    r2 = DeepSupervisedLoss(fused_weight=2.0, scale_weights=[1, 0, 0, 0, 0], mode="naive")(out, t, mask)
    torch.testing.assert_close(r2["loss"], 2 * target_adaptive_loss(z, t, mask, mode="naive")
                               + target_adaptive_loss(scales[0], t, mask, mode="naive"))


def test_deep_supervised_loss_on_model_output():
    from models import build_model

    torch.manual_seed(0)
    model = build_model({"in_channels": 3, "num_classes": 4, "width": 2})
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    t = torch.randint(0, 2, (2, 32, 32))
    r = DeepSupervisedLoss()(model(torch.randn(2, 3, 32, 32)), t, mask)
    assert set(r) == {"loss", "fused", "scales"} and r["scales"].shape == (5,)
    r["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_nll_without_the_merged_tensor_is_bit_identical_to_gathering_from_it():
    """The loss gathers an organ target's log-prob straight from the log-softmax and merges only the
    background (what the merged tensor holds there): the values and the gradients must equal, bit for
    bit, those of gathering from the full merged tensor, which the loss built before."""
    g = torch.Generator().manual_seed(5)
    b, c = 4, 4
    z = (3 * torch.randn(5, b, c, 8, 8, generator=g)).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    t = torch.randint(0, c, (b, 8, 8), generator=g)
    t[~mask.gather(1, t.flatten(1)).view_as(t)] = 0  # only classes the sample labels
    t[0, :2] = 255
    w = torch.rand(b, 8, 8, generator=g)

    def weighted_ce(nll):
        keep = (t != 255).float()
        cw = torch.tensor([1.0, 3.0, 3.0, 3.0])[torch.where(t == 255, 0, t)]
        return ((cw * keep * w) * nll).sum(dim=(1, 2, 3)) / (cw * keep).sum()

    merged = torch.stack([merge_log_probs(z[k], mask) for k in range(5)])
    index = torch.where(t == 255, 0, t)[None, :, None].expand(5, -1, -1, -1, -1)
    ref = weighted_ce(-merged.gather(2, index).squeeze(2))
    (ref_grad,) = torch.autograd.grad(ref.sum(), z)
    out = SimpleNamespace(logits=z[0], scales=list(z[1:]))
    got = DeepSupervisedLoss(class_weights=(1.0, 3.0), fused_weight=1.0, scale_weights=[1.0] * 4)(
        out, t, mask, pixel_weight=w)
    assert torch.equal(torch.cat([got["fused"][None], got["scales"]]), ref)
    (grad,) = torch.autograd.grad(got["loss"], z)
    assert torch.equal(grad, ref_grad)


# --- errors --------------------------------------------------------------------------------------------

def test_errors():
    z, t, mask = _partial_batch()
    with pytest.raises(ValueError, match="not labeled"):
        target_adaptive_loss(z, torch.full_like(t, 2), mask)  # sample 0 does not label organ 2
    with pytest.raises(ValueError, match="out of range"):
        target_adaptive_loss(z, torch.full_like(t, 7), mask, mode="naive")
    with pytest.raises(ValueError, match="mode"):
        target_adaptive_loss(z, t, mask, mode="dice")
    with pytest.raises(ValueError, match="labeled_mask"):
        target_adaptive_loss(z, t, mask[:, :3])
    with pytest.raises(ValueError, match="target"):
        target_adaptive_loss(z, t[:, :3], mask)
    with pytest.raises(ValueError, match="class_weights"):
        target_adaptive_loss(z, t, mask, class_weights=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="pixel_weight"):
        target_adaptive_loss(z, t, mask, pixel_weight=torch.ones(4, 5))
    with pytest.raises(ValueError, match="scale_weights"):
        DeepSupervisedLoss(scale_weights=[1.0, 1.0])(SimpleNamespace(logits=z, scales=[z] * 5), t, mask)


def test_background_column_of_the_labeled_mask_is_always_true():
    """Column 0 is 'treated as True whatever it holds' (docstring): background is the merged target of
    every sample, so a mask that leaves it False scores as one that sets it, instead of raising."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randint(0, 2, (2, 8, 8), generator=g)
    target[0, 0, 0] = IGNORE_INDEX
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    no_bg = mask.clone()
    no_bg[:, 0] = False
    want = target_adaptive_loss(logits, target, mask)
    assert torch.equal(target_adaptive_loss(logits, target, no_bg), want)
    out = SimpleNamespace(logits=logits, scales=[logits])
    loss = DeepSupervisedLoss()
    assert torch.equal(loss(out, target, no_bg)["loss"], loss(out, target, mask)["loss"])
