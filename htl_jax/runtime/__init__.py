"""What a process sets up once, before it trains: the program's entry calls these.

- :mod:`~htl_jax.runtime.compilation_cache`: JAX's persistent compilation cache;
- :mod:`~htl_jax.runtime.determinism`: deterministic GPU kernels, float32 matmuls;
- :mod:`~htl_jax.runtime.allocator`: glibc's thresholds for XLA:CPU's step scratch;
- :mod:`~htl_jax.runtime.distributed`: ``jax.distributed`` start-up and failure handling;
- :mod:`~htl_jax.runtime.preemption`: SIGTERM / SIGINT as a stop request;
- :mod:`~htl_jax.runtime.orbax_noise`: no tracebacks from orbax's abandoned I/O.

The commands (:mod:`htl_jax.cli`) call the parts they need; library code
(``htl_jax.train`` and below) never changes the process, it only asks (has a stop been
requested?). This package imports nothing of ``htl_jax.train``.
"""
