"""Applicability (out-of-distribution) statistics: :mod:`.stats` (numpy and safetensors only, what predict scores
with) and :mod:`.features` (the torch hooks that read the network's activations, used to fit them).
"""
