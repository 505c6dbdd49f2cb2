"""Reproduction and tuning of the paper's experiments (DESIGN section 10)."""
