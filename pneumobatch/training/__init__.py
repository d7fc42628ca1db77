"""Layer 4, ``pneumobatch train``, ``retune`` and ``fit-applicability``. Imports the layers below it.

``config`` (TrainConfig, torch-free), ``data`` (labels, splits, decoding), ``augment``,
``evaluate`` (logits, selection score, card metrics), ``loop`` (``train``),
``operating_points`` (temperature, thresholds, ``retune``), ``applicability`` (its
statistics on training data) and ``plots`` (the curves figure).
"""
