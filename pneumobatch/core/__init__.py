"""Layer 0, the vocabulary everything else speaks: errors and reason codes, the model card and its one decision rule,
tasks, study aggregation, subgroups and the site-file format. Imports no other layer; no torch.
"""
