"""Synthetic DICOMs in every supported encoding, for the tests, the sample studies and the benchmarks."""
