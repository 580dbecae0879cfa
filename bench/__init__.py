"""Benchmarks of UniMOS (data loading, training steps, inference) and the phantom ablation.

``python -m bench.run --out DIR`` runs every benchmark once and writes ``bench.json`` + ``bench.md``;
``python -m bench.ablation --out DIR`` trains the loss / semi-supervision variants on phantoms. The
single benchmarks (``bench/loader.py``, ``train_step.py``, ``semi_step.py``, ``inference.py``) also
run on their own. See ``bench/README.md``.
"""
