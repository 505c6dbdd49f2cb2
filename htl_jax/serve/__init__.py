"""Use a trained run: score new files and export the model for serving.

* :mod:`htl_jax.serve.run`: a finished run loaded back (config, preprocessing, the best
  checkpoint's parameters); the run's files themselves are :mod:`htl_jax.run_files`.
* :mod:`htl_jax.serve.predict`: chunked scoring of a file into a predictions file
  (``htl-predict``).
* :mod:`htl_jax.serve.export`: the eval function with its parameters baked in, serialized
  with ``jax.export`` (``htl-export``).
"""
