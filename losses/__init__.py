"""Losses for partially labeled multi-organ segmentation (see ``losses.partial``)."""

from losses.partial import (
    DeepSupervisedLoss,
    class_weight_vector,
    merge_log_probs,
    target_adaptive_loss,
)

__all__ = ["DeepSupervisedLoss", "class_weight_vector", "merge_log_probs", "target_adaptive_loss"]
