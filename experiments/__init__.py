"""Thin entry points of a checkout: ``python -m experiments.<main|reproduce|tune|predict|export>``
run the same programs as the installed console commands (:mod:`htl_jax.cli`)."""
