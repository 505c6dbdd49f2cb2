"""``htl-export``: export a trained run for serving with ``jax.export``.

  htl-export --workdir=runs/kuairand --out=exported/kuairand

writes ``model.jax_export`` (the eval function with the best checkpoint's parameters baked
in, serialized with ``jax.export`` for CPU and CUDA, batch dimension symbolic; input int32
field ids ``[b, F]``) and ``serving.json`` (the input / output signature and the
preprocessing that turns raw rows into those ids). A workdir without a finished run stops
with one line on stderr and exit code 2.
"""

from __future__ import annotations

from absl import flags

from htl_jax.cli import common
from htl_jax.serve.export import DEFAULT_PLATFORMS, export_run

flags.DEFINE_string('workdir', None, 'The training run (its --workdir).')
flags.DEFINE_string('out', None, 'Output directory.')
flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS),
                  'jax.export platforms (cpu, cuda, rocm, tpu); cpu alone if another fails.')
flags.mark_flags_as_required(['workdir', 'out'])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  summary = export_run(FLAGS.workdir, FLAGS.out, platforms=FLAGS.platforms)
  print(f'{summary.model_path} ({", ".join(summary.platforms)}, {summary.model_bytes} bytes) '
        f'and {summary.signature_path}')


def run() -> None:
  """The console script."""
  common.run(main)


if __name__ == '__main__':
  run()
