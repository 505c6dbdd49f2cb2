"""The command-line programs: ``htl-train``, ``htl-reproduce``, ``htl-tune``, ``htl-predict``,
``htl-export`` and ``htl-check-data`` (console scripts of the installed package; in a checkout
also ``python -m experiments.<main|reproduce|tune|predict|export>``). Each module defines its
own flags and a ``main``; :mod:`htl_jax.cli.common` holds what they share.
"""
