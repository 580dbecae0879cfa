"""Inference: :mod:`inference.model` (load_model: checkpoint -> network + training settings),
:mod:`inference.window` (2.5D slabs, sliding window, blending: predict_stack), :mod:`inference.segment`
(segment_volume: preprocessing, multi-view fusion, exact geometry back), :mod:`inference.outputs`
(output file planning), :mod:`inference.postprocess` (largest connected components),
:mod:`inference.evaluation` (pairing files with ground truth, label maps, reports) and
:mod:`inference.overlay` (PNG overlays).

Submodules import torch; import them explicitly (scripts do so inside ``main``).
"""
