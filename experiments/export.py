"""Export a trained run for serving: a thin wrapper over ``htl_jax.serve.export``.

  python -m experiments.export --workdir=runs/kuairand --out=exported/kuairand

writes ``model.jax_export`` (the eval function with the best checkpoint's parameters baked
in, serialized with ``jax.export`` for CPU and CUDA, batch dimension symbolic; input int32
field ids ``[b, F]``) and ``serving.json`` (the input / output signature and the
preprocessing that turns raw rows into those ids). A workdir without a finished run stops
with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

import experiments
from htl_jax.serve.export import DEFAULT_PLATFORMS, export_run
from htl_jax.serve.run import RunError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The training run (its --workdir).')
flags.DEFINE_string('out', None, 'Output directory.')
flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS),
                  'jax.export platforms (cpu, cuda, rocm, tpu); cpu alone if another fails.')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv: list[str]) -> None:
  experiments.start(argv)
  try:
    summary = export_run(FLAGS.workdir, FLAGS.out, platforms=FLAGS.platforms)
  except RunError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  print(f'{summary.model_path} ({", ".join(summary.platforms)}, {summary.model_bytes} bytes) '
        f'and {summary.signature_path}')


if __name__ == '__main__':
  app.run(main)
