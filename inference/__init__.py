"""Inference: :mod:`inference.segment` (load_model, segment_volume: 2.5D sliding window, multi-view
fusion, exact geometry back), :mod:`inference.postprocess` (largest connected components) and
:mod:`inference.evaluation` (pairing files with ground truth, label maps, reports).

Submodules import torch; import them explicitly (scripts do so inside ``main``).
"""
