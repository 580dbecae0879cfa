"""Semi-supervised step, mean teacher, pseudo-labels and thresholds (engine/semi.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from data.sampling import LabeledBatch, UnlabeledBatch
from engine.semi import (
    EMATeacher,
    SemiConfig,
    ThresholdSchedule,
    confidence_mask,
    mix_partners,
    pseudo_label,
    semi_step,
    unsup_loss,
)
from losses.partial import DeepSupervisedLoss
from models import DEFAULT_NORM, MOSNet
from models.blocks import NORMS

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- threshold


def test_threshold_schedule_default_matches_original_epochs():
    s = ThresholdSchedule()
    # the original: 0.7 before epoch 700 of 2500, 0.8 before 1400, then 0.9
    for epoch, expected in [(0, 0.7), (699, 0.7), (700, 0.8), (1000, 0.8), (1399, 0.8), (1400, 0.9),
                            (2499, 0.9), (2500, 0.9)]:
        assert s.value(epoch / 2500) == expected, epoch
    assert s(0.5) == 0.8


def test_threshold_schedule_fixed_from_arg_and_state():
    assert ThresholdSchedule.fixed(0.95).value(0.0) == 0.95 == ThresholdSchedule.fixed(0.95).value(1.0)
    assert ThresholdSchedule.from_arg("schedule").values == [0.7, 0.8, 0.9]
    assert ThresholdSchedule.from_arg(None).milestones == [0.28, 0.56]
    assert ThresholdSchedule.from_arg("0.85").value(0.9) == 0.85
    with pytest.raises(ValueError, match="threshold"):
        ThresholdSchedule.from_arg("high")
    with pytest.raises(ValueError):
        ThresholdSchedule.fixed(1.5)
    with pytest.raises(ValueError):
        ThresholdSchedule(values=(0.5, 0.6), milestones=(0.2, 0.4))
    with pytest.raises(ValueError):
        ThresholdSchedule(values=(0.5, 0.6, 0.7), milestones=(0.4, 0.2))
    custom = ThresholdSchedule(values=(0.5, 0.95), milestones=(0.1,))
    fresh = ThresholdSchedule()
    fresh.load_state_dict(custom.state_dict())
    assert fresh.value(0.05) == 0.5 and fresh.value(0.1) == 0.95
    fresh.load_state_dict({})                       # an empty state leaves it alone
    assert fresh.values == [0.5, 0.95]


def test_threshold_masks_exactly_conf_at_or_above():
    conf = torch.tensor([[[0.5, 0.7, 0.6999, 0.9]]])
    assert confidence_mask(conf, 0.7).tolist() == [[[0.0, 1.0, 0.0, 1.0]]]

    logits = torch.tensor([[[[0.0, 1.0, -2.0, 0.5]], [[1.0, 0.0, 0.0, -1.0]]]])   # (1, 2, 1, 4)
    pseudo = torch.tensor([[[0, 1, 1, 0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = unsup_loss(logits, pseudo, conf[:, None].squeeze(1), mask, 0.7, class_weights=(0.2, 1.2))
    logp = torch.log_softmax(logits, dim=1)[0, :, 0]                                 # (2, 4)
    nll = [-logp[t, i].item() for i, t in enumerate([0, 1, 1, 0])]
    w = [0.2, 1.2, 1.2, 0.2]
    # pixels 1 and 3 train; every pixel counts in the denominator, which is the pixel count (UniMatch's
    # and the original's normalisation: the class weights scale the terms and are not renormalised)
    expected = (w[1] * nll[1] + w[3] * nll[3]) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # padding (ignore label 255) is in neither the numerator nor the denominator
    loss = unsup_loss(logits, torch.tensor([[[0, 1, 255, 0]]]), conf, mask, 0.7, class_weights=(0.2, 1.2))
    assert loss.item() == pytest.approx((w[1] * nll[1] + w[3] * nll[3]) / 3, rel=1e-6)
    assert unsup_loss(logits, pseudo, conf, mask, 0.95).item() == 0.0


def test_organ_threshold_keeps_unsure_organ_pixels_only():
    """--organ-threshold: organ pseudo-labels count from the lower threshold, background and padding
    keep theirs; never stricter than the schedule's threshold."""
    conf = torch.tensor([[[0.6, 0.6, 0.4, 0.6, 0.95]]])
    pseudo = torch.tensor([[[0, 2, 2, 255, 0]]])
    assert confidence_mask(conf, 0.9, pseudo, 0.5).tolist() == [[[0.0, 1.0, 0.0, 0.0, 1.0]]]
    assert confidence_mask(conf, 0.9).tolist() == [[[0.0, 0.0, 0.0, 0.0, 1.0]]]
    assert confidence_mask(conf, 0.3, pseudo, 0.5).tolist() == [[[1.0, 1.0, 1.0, 1.0, 1.0]]]
    with pytest.raises(ValueError, match="pseudo-labels"):
        confidence_mask(conf, 0.9, None, 0.5)
    # the loss then trains the unsure organ pixel (hand-computed: one weighted NLL over 4 real pixels)
    logits = torch.tensor([[[[0.0, 1.0, 0.0, 0.0, 2.0]], [[0.0, 0.0, 0.0, 0.0, 0.0]],
                            [[1.0, 0.5, 0.0, 0.0, 0.0]]]])                            # (1, 3, 1, 5)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss = unsup_loss(logits, pseudo, conf, mask, 0.9, class_weights=(0.2, 1.2), organ_threshold=0.5)
    logp = torch.log_softmax(logits, dim=1)[0, :, 0]
    expected = (1.2 * -logp[2, 1].item() + 0.2 * -logp[0, 4].item()) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="organ_threshold"):
        SemiConfig(organ_threshold=1.5)
    # with one organ the winner always has confidence >= 0.5: such an organ threshold would filter nothing
    from engine.semi import organ_threshold

    assert organ_threshold(SemiConfig(), 4) == 0.5 and organ_threshold(SemiConfig(), 2) is None
    assert organ_threshold(SemiConfig(organ_threshold=0.6), 2) == 0.6


# ---------------------------------------------------------------------------------------------- EMA


class Tiny(nn.Module):
    """Two scalar parameters and one buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.register_buffer("stat", torch.zeros(1))

    def forward(self, x, perturb=False):
        return self.lin(x)


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel (exposes ``.module``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def set_tiny(m: Tiny, w: float, b: float, stat: float) -> None:
    with torch.no_grad():
        m.lin.weight.fill_(w)
        m.lin.bias.fill_(b)
        m.stat.fill_(stat)


@pytest.mark.parametrize("wrap", ["plain", "ddp", "compiled"])
def test_ema_update_hand_computed(wrap):
    student = Tiny()
    set_tiny(student, 1.0, 2.0, 0.0)
    if wrap == "compiled":
        wrapped = torch.compile(student)      # wrapping only: nothing is compiled before a forward
    else:
        wrapped = Wrapper(student) if wrap == "ddp" else student
    teacher = EMATeacher(wrapped, momentum=0.9)
    assert type(teacher.module) is Tiny and teacher.module is not student
    assert not any(p.requires_grad for p in teacher.module.parameters()) and not teacher.module.training

    set_tiny(student, 3.0, -1.0, 5.0)
    teacher.update(wrapped)
    assert teacher.module.lin.weight.item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)      # 1.2
    assert teacher.module.lin.bias.item() == pytest.approx(0.9 * 2.0 + 0.1 * -1.0)       # 1.7
    assert teacher.module.stat.item() == 5.0                                              # copied
    teacher.update(wrapped)
    assert teacher.module.lin.weight.item() == pytest.approx(0.9 * 1.2 + 0.1 * 3.0)      # 1.38
    assert teacher.module.lin.bias.item() == pytest.approx(0.9 * 1.7 + 0.1 * -1.0)       # 1.43
    assert student.lin.weight.item() == 3.0 and teacher.updates == 2
    assert teacher(torch.ones(1, 1)).item() == pytest.approx(1.38 + 1.43)


def test_ema_state_roundtrip_and_errors():
    student = Tiny()
    teacher = EMATeacher(student, momentum=0.5)
    set_tiny(student, 4.0, 4.0, 1.0)
    teacher.update(student)
    other = EMATeacher(Tiny(), momentum=0.99)
    other.load_state_dict(teacher.state_dict())
    assert other.momentum == 0.5 and other.updates == 1
    assert other.module.lin.weight.item() == teacher.module.lin.weight.item()
    with pytest.raises(ValueError):
        EMATeacher(student, momentum=1.0)
    with pytest.raises(ValueError, match="parameters"):
        teacher.update(nn.Linear(2, 2))


def test_semi_state_roundtrip_weights_only():
    """What a checkpoint stores of the semi-supervised state (thresholds, EMA teacher) loads back."""
    thresholds = ThresholdSchedule(values=(0.6, 0.9), milestones=(0.5,))
    student = Tiny()
    teacher = EMATeacher(student, momentum=0.9)
    set_tiny(student, 2.0, 2.0, 3.0)
    teacher.update(student)
    buf = io.BytesIO()
    torch.save({"semi_state": {"thresholds": thresholds.state_dict()}, "ema": teacher.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    t2, e2 = ThresholdSchedule(), EMATeacher(Tiny())
    t2.load_state_dict(state["semi_state"]["thresholds"])
    e2.load_state_dict(state["ema"])
    assert t2.values == [0.6, 0.9] and e2.module.stat.item() == 3.0


# ---------------------------------------------------------------------------------------------- pseudo


def test_pseudo_label_merged_vs_full_hand_computed():
    # pixel 0: logits (0, 3, 1, 0); pixel 1: (0, 0, 5, 0). The dataset labels class 2 only.
    logits = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 5.0], [0.0, 0.0]]).view(1, 4, 1, 2)
    mask = torch.tensor([[True, False, True, False]])
    e = math.e
    z0, z1 = 2 + e ** 3 + e, 3 + e ** 5

    full_p, full_c = pseudo_label(logits, mask, "full")
    assert full_p.tolist() == [[[1, 2]]]
    assert full_c[0, 0].tolist() == pytest.approx([e ** 3 / z0, e ** 5 / z1], rel=1e-6)

    merged_p, merged_c = pseudo_label(logits, mask, "merged")
    assert merged_p.tolist() == [[[0, 2]]]                  # the unlabeled organ 1 became background
    # confidence: the largest probability over all classes, not the merged background's (2 + e^3) / z0
    assert merged_c[0, 0].tolist() == pytest.approx([e ** 3 / z0, e ** 5 / z1], rel=1e-6)
    assert full_p.dtype == torch.int64 and full_c.dtype == torch.float32
    with pytest.raises(ValueError):
        pseudo_label(logits, mask, "soft")


def test_merged_pseudo_label_is_the_merged_argmax_below_one_half():
    # probabilities (bg 0.25, organ 1 0.40, organ 2 0.35), organ 2 unlabeled: organ 1 is the full
    # argmax, but the merged background (0.60) is the merged argmax; with an organ threshold <= 0.4 the
    # pixel must not train as organ 1. (0.1, 0.6, 0.3): organ 1 wins in both spaces.
    probs = torch.tensor([[0.25, 0.40, 0.35, 1e-9], [0.1, 0.6, 0.3, 1e-9]])
    logits = probs.log().T.reshape(1, 4, 1, 2)
    mask = torch.tensor([[True, True, False, True]])
    pseudo, conf = pseudo_label(logits, mask, "merged")
    assert pseudo.tolist() == [[[0, 1]]]
    assert conf[0, 0].tolist() == pytest.approx([0.40, 0.6], rel=1e-5)  # still the full-space maximum
    assert pseudo_label(logits, mask, "full")[0].tolist() == [[[1, 1]]]


def test_pseudo_label_softmax_once_confident_logits():
    # REFERENCE defect 4: softmax applied twice caps the confidence of 4 classes at e/(e+3) ~ 0.475
    logits = torch.tensor([0.0, 8.0, 0.0, 0.0]).view(1, 4, 1, 1)
    for mode in ("full", "merged"):
        _, conf = pseudo_label(logits, torch.ones(1, 4, dtype=torch.bool), mode)
        assert conf.item() == pytest.approx(math.exp(8) / (math.exp(8) + 3), rel=1e-6)
        assert conf.item() > 0.9


def test_mix_partners_respect_label_sets():
    a = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    seen = set()
    for seed in range(20):
        idx, ok = mix_partners(a, b, torch.Generator().manual_seed(seed), same_labels=True)
        assert ok.tolist() == [True, True, False]
        assert idx[0].item() in (1, 3) and idx[1].item() in (0, 2)
        seen.add(idx[0].item())
        idx, ok = mix_partners(a, b, torch.Generator().manual_seed(seed), same_labels=False)
        assert bool(ok.all()) and bool((idx < 4).all())
    assert seen == {1, 3}


# ---------------------------------------------------------------------------------------------- the step

C = 4


def net(in_channels: int, num_classes: int, width: int, norm: str = DEFAULT_NORM, **kwargs) -> MOSNet:
    """The network Final.py trains (the default norm unless a test asks for another)."""
    return MOSNet(in_channels, num_classes, width, norm=norm, **kwargs)


MASKS = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)


def batches(seed: int, n: int = 3, size: int = 32):
    g = torch.Generator().manual_seed(seed)

    def img():
        return torch.rand(n, 3, size, size, generator=g) * 2 - 1

    lmask = MASKS[[0, 1, 3]]
    label = torch.randint(0, C, (n, size, size), generator=g)
    label = torch.where(lmask.gather(1, label.flatten(1)).view_as(label), label, 0)   # only labeled classes
    label[0, :2] = 255                                                                   # padding
    ds = torch.arange(n)
    lab = LabeledBatch(img(), label, lmask, ds)
    valid = torch.ones(n, size, size, dtype=torch.bool)
    ua = UnlabeledBatch(img(), MASKS[[0, 1, 2]], ds, valid)
    ub = UnlabeledBatch(img(), MASKS[[1, 0, 3]], ds, valid)   # a's sample 2 has no same-label partner
    return lab, ua, ub


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("teacher_kind,pseudo", [("self", "merged"), ("self", "full"), ("ema", "merged"),
                                                 ("ema", "full")])
def test_semi_step_finite_backward(teacher_kind, pseudo, norm):
    torch.manual_seed(0)
    model = net(3, C, 8, norm=norm)
    teacher = EMATeacher(model) if teacher_kind == "ema" else None
    teacher_before = None if teacher is None else [p.clone() for p in teacher.module.parameters()]
    lab, ua, ub = batches(1)
    inputs = [t.clone() for t in (lab.image, lab.label, ua.image, ub.image)]
    cfg = SemiConfig(pseudo=pseudo, teacher=teacher_kind, cutmix_p=1.0)
    out = semi_step(model, teacher, lab, ua, ub, DeepSupervisedLoss(), 0.5, cfg,
                    torch.Generator().manual_seed(2))

    assert set(out) == {"loss", "loss_x", "loss_fp", "loss_s1", "loss_s2", "mask_ratio", "conf_mean"}
    assert all(bool(torch.isfinite(v)) for v in out.values())
    assert out["loss"].requires_grad and not any(out[k].requires_grad for k in out if k != "loss")
    # the default weights (2, 0.5, 0.25, 0.25) and divisor 2
    expected = (2 * out["loss_x"] + 0.5 * out["loss_fp"] + 0.25 * out["loss_s1"] + 0.25 * out["loss_s2"]) / 2
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.0 <= out["mask_ratio"].item() <= 1.0 and 0.25 <= out["conf_mean"].item() <= 1.0
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert model.training
    for before, after in zip(inputs, (lab.image, lab.label, ua.image, ub.image)):
        assert torch.equal(before, after)
    if teacher is not None:
        assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.module.parameters()))
        assert all(p.grad is None for p in teacher.module.parameters())


def test_rampup_hand_values_and_scaled_unsupervised_weights():
    from engine.semi import rampup

    assert rampup(0, 10) == pytest.approx(math.exp(-5.0))
    assert rampup(5, 10) == pytest.approx(math.exp(-1.25))  # t = 0.5: exp(-5 * 0.25)
    assert rampup(10, 10) == 1.0 and rampup(99, 10) == 1.0 and rampup(3, 0) == 1.0
    assert all(rampup(k, 10) < rampup(k + 1, 10) for k in range(10))

    torch.manual_seed(0)
    model = net(3, C, 8)
    lab, ua, ub = batches(1)
    cfg = SemiConfig(teacher="self", cutmix_p=1.0, w_x=2.0, divisor=4.0)
    out = semi_step(model, None, lab, ua, ub, DeepSupervisedLoss(), 0.5, cfg,
                    torch.Generator().manual_seed(2), unsup_scale=0.3)
    unsup = 0.5 * out["loss_fp"] + 0.25 * out["loss_s1"] + 0.25 * out["loss_s2"]
    assert out["loss"].item() == pytest.approx(((2.0 * out["loss_x"] + 0.3 * unsup) / 4.0).item(), rel=1e-5)


def test_feature_perturbation_target_not_corrupted_by_cutmix():
    # REFERENCE defect 3: pasting CutMix boxes into the shared weak pseudo-label tensor changed L_fp's target.
    # Without dropout the perturbed branch equals the clean one, so L_fp must equal the loss of the clean
    # weak logits against their own pseudo-labels, whatever was pasted into the strong views' targets.
    torch.manual_seed(0)
    model = net(3, C, 8, fp_dropout=0.0)
    lab, ua, ub = batches(5)
    cfg = SemiConfig(teacher="self", pseudo="full", cutmix_p=1.0, cutmix_area=(0.3, 0.4))
    out = semi_step(model, None, lab, ua, ub, DeepSupervisedLoss(), 0.0, cfg,
                    torch.Generator().manual_seed(1))
    with torch.no_grad():
        weak = model(torch.cat([lab.image, ua.image])).logits[3:]
    everything = torch.ones(3, C, dtype=torch.bool)
    pseudo, conf = pseudo_label(weak, everything, "full")
    expected = unsup_loss(weak, pseudo, conf, everything, 0.0)
    assert out["loss_fp"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_semi_step_nothing_confident_leaves_supervised_loss():
    torch.manual_seed(0)
    model = net(3, C, 8)
    lab, ua, ub = batches(3)
    out = semi_step(model, None, lab, ua, ub, DeepSupervisedLoss(), 1.01,
                    SemiConfig(teacher="self", organ_threshold=None), torch.Generator().manual_seed(0))
    assert out["loss_fp"].item() == out["loss_s1"].item() == out["loss_s2"].item() == 0.0
    assert out["mask_ratio"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["loss_x"].item())  # (w_x L_x) / divisor = 2 L_x / 2


@pytest.mark.parametrize("pseudo", ["merged", "full"])
def test_untrained_network_is_confident_nowhere(pseudo):
    """A freshly initialised default network must not produce confident pseudo-labels (issue: the merged
    background of a near-uniform prediction has probability 0.75 >= the first threshold 0.7)."""
    from models import DEFAULT_NORM, build_model

    torch.manual_seed(0)
    model = build_model({"in_channels": 3, "num_classes": C, "width": 8, "norm": DEFAULT_NORM}).eval()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        logits = model(x).logits
    labels, conf = pseudo_label(logits, MASKS, pseudo)
    assert confidence_mask(conf, 0.7).mean().item() < 0.01
    # also with the default lower threshold for organ pseudo-labels
    assert confidence_mask(conf, 0.7, labels, SemiConfig().organ_threshold).mean().item() < 0.01
    # while the merged space itself would have called almost everything confident background
    from losses.partial import merge_log_probs

    merged_conf = merge_log_probs(logits, MASKS).exp().amax(dim=1)
    assert confidence_mask(merged_conf, 0.7).mean().item() > 0.5


def test_padding_is_in_no_unsupervised_loss_and_not_in_the_mask_ratio():
    torch.manual_seed(0)
    model = MOSNet(3, C, 8, norm="instance")
    lab, ua, ub = batches(2)
    for b in (ua, ub):
        b.valid[:, :, 16:] = False  # right half is padding
    cfg = SemiConfig(teacher="self", pseudo="full", cutmix_p=1.0)
    out = semi_step(model, None, lab, ua, ub, DeepSupervisedLoss(), 0.0, cfg,
                    torch.Generator().manual_seed(0))
    # threshold 0: every real pixel is confident, padding is not counted at all
    assert out["mask_ratio"].item() == 1.0
    # the padded half's image content does not matter for the unsupervised losses of the weak view
    ua2 = UnlabeledBatch(ua.image.clone(), ua.labeled_mask, ua.dataset, ua.valid)
    ua2.image[:, :, :, 16:] = -1.0
    with torch.no_grad():
        weak = model(torch.cat([lab.image, ua.image])).logits[3:]
    from engine.semi import _masked_pseudo_label

    pseudo, conf = _masked_pseudo_label(weak, ua, "full")
    assert bool((pseudo[:, :, 16:] == 255).all()) and bool((conf[:, :, 16:] == 0).all())
    assert bool((pseudo[:, :, :16] != 255).all())
    # nothing real: unsupervised losses are 0
    for b in (ua, ub):
        b.valid[:] = False
    out = semi_step(model, None, lab, ua, ub, DeepSupervisedLoss(), 0.0, cfg,
                    torch.Generator().manual_seed(0))
    assert out["loss_fp"].item() == out["loss_s1"].item() == out["loss_s2"].item() == 0.0
    assert out["mask_ratio"].item() == 0.0


def test_semi_step_argument_errors():
    model = net(3, C, 8)
    lab, ua, ub = batches(4)
    with pytest.raises(ValueError, match="EMATeacher"):
        semi_step(model, None, lab, ua, ub, DeepSupervisedLoss(), 0.5, SemiConfig(teacher="ema"),
                  torch.Generator())
    small = UnlabeledBatch(ub.image[:, :, :16, :16], ub.labeled_mask, ub.dataset, ub.valid[:, :16, :16])
    with pytest.raises(ValueError, match="same"):
        semi_step(model, None, lab, ua, small, DeepSupervisedLoss(), 0.5, SemiConfig(teacher="self"),
                  torch.Generator())
    with pytest.raises(ValueError):
        SemiConfig(pseudo="soft")
    with pytest.raises(ValueError):
        SemiConfig(w_fp=-1.0)


# ---------------------------------------------------------------------------------------------- learning


def disks(n: int, g: torch.Generator, size: int = 32, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright disks ("organ", class 1) of random centre and radius on noisy background."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    u = torch.rand(n, 3, generator=g)
    cy, cx, r = 8 + u[:, 0] * (size - 16), 8 + u[:, 1] * (size - 16), 4 + 4 * u[:, 2]
    dist2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    inside = dist2 <= r[:, None, None] ** 2
    img = -0.4 + 0.25 * torch.randn(n, k, size, size, generator=g) + 0.8 * inside[:, None].float()
    return img.clamp(-1, 1), inside.long()


def test_short_run_pseudo_label_confidence_rises():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = net(3, 2, 8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loss_fn = DeepSupervisedLoss()
    mask = torch.ones(4, 2, dtype=torch.bool)
    ds = torch.zeros(4, dtype=torch.long)
    conf, ratio = [], []
    for _ in range(40):
        x, y = disks(4, g)
        valid = torch.ones(4, 32, 32, dtype=torch.bool)
        out = semi_step(model, None, LabeledBatch(x, y, mask, ds),
                        UnlabeledBatch(disks(4, g)[0], mask, ds, valid),
                        UnlabeledBatch(disks(4, g)[0], mask, ds, valid), loss_fn, 0.8,
                        SemiConfig(teacher="self", pseudo="full"),
                        g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        conf.append(out["conf_mean"].item())
        ratio.append(out["mask_ratio"].item())
    first, last = sum(conf[:5]) / 5, sum(conf[-5:]) / 5
    assert last > first + 0.05, (first, last)
    assert sum(ratio[-5:]) > sum(ratio[:5])
    # and the pseudo-labels are right: the disks are found on held-out unlabeled images
    x, y = disks(8, torch.Generator().manual_seed(99))
    with torch.no_grad():
        pseudo, _ = pseudo_label(model(x).logits, torch.ones(8, 2, dtype=torch.bool), "full")
    dice = 2 * ((pseudo == 1) & (y == 1)).sum() / ((pseudo == 1).sum() + (y == 1).sum())
    assert dice.item() > 0.7


def test_strong_views_do_not_update_bn_running_statistics():
    from engine.semi import frozen_bn_statistics

    bn = torch.nn.BatchNorm2d(2)
    model = torch.nn.Sequential(bn)
    model.train()
    x = torch.randn(4, 2, 5, 5) * 3 + 7
    with frozen_bn_statistics(model):
        y = model(x)
    assert torch.equal(bn.running_mean, torch.zeros(2)) and torch.equal(bn.running_var, torch.ones(2))
    # Still normalised with the batch's own statistics, and momentum restored afterwards.
    assert y.mean().abs() < 1e-5 and bn.momentum == 0.1
    model(x)
    assert bn.running_mean.abs().sum() > 0


def test_ema_reset_restarts_the_average_at_the_model():
    torch.manual_seed(0)
    model = net(3, C, 4)
    teacher = EMATeacher(model, momentum=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    teacher.update(model)
    assert teacher.updates == 1
    teacher.reset(model)
    assert teacher.updates == 0
    for a, b in zip(teacher.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_the_teacher_starts_from_the_student_when_the_semi_phase_begins(tiny_data, tmp_path, monkeypatch):
    """The warm-up's EMA lags far behind the student; the semi-supervised phase must not start from it."""
    from engine import teacher as teacher_mod
    from engine.trainer import fit
    from tests.conftest import train_options

    calls = []
    original = teacher_mod.EMATeacher.reset

    def spy(self, model):
        calls.append(self.updates)
        original(self, model)

    monkeypatch.setattr(teacher_mod.EMATeacher, "reset", spy)
    # 2 epochs of 2 steps, warm-up 1 epoch: the semi phase begins at step 2, after two EMA updates
    fit(train_options(tiny_data, tmp_path, semi=True, semi_warmup=1, semi_rampup=0))
    assert calls == [2]
