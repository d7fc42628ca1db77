"""Nightly drift monitoring: the run record predict writes, drift statistics and alerts, the PDF."""
