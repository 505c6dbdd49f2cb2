"""Use a trained run: score new files and export the model for serving.

* :mod:`htl_jax.serve.preprocessing`: the preprocessing fitted at training time, stored in
  the run's workdir (``preprocessing.json``; written by ``train_and_evaluate``).
* :mod:`htl_jax.serve.run`: a finished run loaded back (config, best checkpoint,
  preprocessing).
* :mod:`htl_jax.serve.predict`: chunked scoring of a file into a predictions file
  (``python -m experiments.predict``).
* :mod:`htl_jax.serve.export`: the eval function with its parameters baked in, serialized
  with ``jax.export`` (``python -m experiments.export``).

Submodules are imported on use, so that the trainer can import ``preprocessing`` alone.
"""
