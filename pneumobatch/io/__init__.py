"""Layer 1, files in and out: atomic writes, discovery, the image readers and the predictions CSV (writer and reader).
Imports only :mod:`pneumobatch.core`; no torch.
"""
