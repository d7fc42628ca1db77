"""Layer 3, from predictions and labels to numbers: metrics (scikit-learn underneath), labels and their join,
the report. Imports core and io; never torch.
"""
