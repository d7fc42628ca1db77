"""Layer 5, what a hospital runs at night around predict: site calibration, monitoring, and the PACS (pull, push,
SR). Imports core, io and evaluation; never torch.
"""
