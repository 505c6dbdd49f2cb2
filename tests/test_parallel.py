"""``parallel``: what goes to the devices is laid out as ``pmap`` takes it, so no step moves it.

The checks run in a subprocess with 2 fake CPU devices (``XLA_FLAGS`` must be set before JAX
starts). ``jax.transfer_guard('disallow')`` turns any transfer a pmapped call would make
(a device-to-device reshard of a state built on one device, as ``jnp.broadcast_to`` did)
into an error; the donated replicas themselves are consumed (deleted), not a copy of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO
from htl_jax.train import parallel

_CHILD = """
import json
import jax, jax.numpy as jnp, numpy as np
from htl_jax.train import parallel

state = {'table': np.arange(12, dtype=np.float32).reshape(4, 3),
         'step': jnp.zeros((), jnp.int32), 'tau': 2.5}
rstate = parallel.replicate(state)
table = rstate['table']
out = {'devices': [str(s.device) for s in table.addressable_shards],
       'shapes': [list(s.data.shape) for s in table.addressable_shards],
       'tau_dtype': str(rstate['tau'].dtype)}
batch = parallel.put_sharded({'x': np.arange(8, dtype=np.float32).reshape(2, 4)})
out['batch_devices'] = [str(s.device) for s in batch['x'].addressable_shards]

def step(s, b):
  return {'table': s['table'] + jnp.sum(b['x']), 'step': s['step'] + 1, 'tau': s['tau']}

p_step = parallel.pmap_program(step, donate=0)
with jax.transfer_guard('disallow'):
  new = p_step(rstate, batch)
  new = p_step(new, batch)
out['donated_deleted'] = table.is_deleted()
out['platform'] = parallel.platform()
out['copies'] = np.asarray(new['table']).tolist()
out['steps'] = np.asarray(new['step']).tolist()
out['host_table_unchanged'] = bool(np.all(state['table'] == np.arange(12).reshape(4, 3)))
out['unreplicated'] = np.asarray(parallel.unreplicate(new)['table']).tolist()
print(json.dumps(out))
"""


def test_replicas_are_built_on_their_devices_and_steps_move_nothing():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run([sys.executable, '-c', _CHILD], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert len(set(out['devices'])) == 2 and out['devices'] == out['batch_devices']
  assert out['shapes'] == [[1, 4, 3], [1, 4, 3]]
  assert out['tau_dtype'] == 'float32'
  # The step took the replicas as they were: no transfer, and the donated buffers are gone.
  assert out['donated_deleted'] and out['platform'] == 'cpu'
  # Device 0 adds the sum of its batch slice (0+1+2+3 = 6), device 1 its own (4+...+7 = 22).
  table = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.testing.assert_array_equal(out['copies'], [table + 12, table + 44])
  assert out['steps'] == [2, 2] and out['host_table_unchanged']
  np.testing.assert_array_equal(out['unreplicated'], table + 12)


def test_replicate_and_put_sharded_on_one_device():
  tree = {'a': np.ones((2, 3), np.float32), 'b': np.int32(7)}
  replicated = parallel.replicate(tree)
  n = parallel.local_device_count()
  assert replicated['a'].shape == (n, 2, 3) and replicated['b'].shape == (n,)
  np.testing.assert_array_equal(parallel.unreplicate(replicated)['a'], tree['a'])
  sharded = parallel.put_sharded({'x': np.arange(3 * n).reshape(n, 3)})
  np.testing.assert_array_equal(np.asarray(sharded['x']), np.arange(3 * n).reshape(n, 3))
