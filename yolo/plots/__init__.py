"""Figures and images written by the steps (no fonts or files fetched at run time)."""
