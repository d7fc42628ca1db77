"""Layer 2, the networks: architectures and weights, preprocessing, device and precision, ONNX Runtime, batched
inference and applicability (out-of-distribution) statistics. Imports core and io.
"""
