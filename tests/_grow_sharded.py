"""Train a tiny TokenFormer on a (data=2, fsdp=2, tensor=2) mesh, grow it, print layout and losses."""
import json
import sys

import jax
import optax
from conftest import tiny_config

from train import config as config_lib, restore, trainer
from train.grow import grow_run

assert jax.device_count() == 8
workdir = sys.argv[1]
config = tiny_config('tokenformer', **{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2, 'train.steps': 2,
                                       'data.cache_dir': f'{workdir}/cache'})
trainer.Trainer(config, f'{workdir}/small').run()
grow_run(f'{workdir}/small', f'{workdir}/big', 8, key_init='zeros', pin_tau=True, optimizer='reset')
loss = lambda setup, state: setup.evaluate(setup.make_eval_step(), state['params'], {}, 'valid', 2)['loss']
small_setup, small = restore.load_run(config, f'{workdir}/small')
big_setup, big = restore.load_run(config_lib.load_workdir_config(f'{workdir}/big'), f'{workdir}/big')
ffn = big['params']['block_0']['ffn']
adam = next(s for s in jax.tree.leaves(big['opt_state'], is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState))
print(json.dumps({'keys_spec': str(ffn['keys'].sharding.spec), 'values_spec': str(ffn['values'].sharding.spec),
                  'keys_shape': list(ffn['keys'].shape), 'loss_before': loss(small_setup, small),
                  'loss_after': loss(big_setup, big), 'adam_count': int(adam.count),
                  'adam_mu_abs_sum': float(sum(abs(x).sum() for x in jax.tree.leaves(adam.mu)))}))
