"""The site audit: header shortcut, export invariance on a sample, applicability per header value, the PDF."""
