"""Record the guard of behaviour: every registered model's 20-step training losses at its tiny config.

  python tests/golden/record.py [NAME ...]   # (re)records these models, or every registered one

Record a new architecture once; rerecord an existing one only for a change that is meant to alter its
training, and say so in the commit.

`tests/test_models.py::test_twenty_step_losses_are_unchanged` compares the current code against the file.
"""

import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

GOLDEN = pathlib.Path(__file__).with_name('losses.json')
STEPS = 20


def twenty_step_losses(name: str, cache_dir: str) -> list[float]:
  """The loss of each of the first 20 steps of `name`'s tiny config (seeded init, the trainer's own step)."""
  import jax
  from conftest import tiny_config

  from train import trainer
  config = tiny_config(name, **{'train.steps': STEPS, 'data.cache_dir': cache_dir})
  with tempfile.TemporaryDirectory() as workdir:
    run = trainer.Trainer(config, workdir)
    state = run.setup.init_state()
    batch = run.setup.global_batch(run.setup.dataset.train_batch(0, run.setup.rows))
    step = run.compile_train_step(state, batch)
    losses = []
    for s in range(STEPS):
      state, metrics = step(state, run.setup.global_batch(run.setup.dataset.train_batch(s, run.setup.rows)))
      losses.append(float(jax.device_get(metrics['loss'])))
  return losses


if __name__ == '__main__':
  import models
  names = sys.argv[1:] or models.names()
  golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
  with tempfile.TemporaryDirectory() as cache:
    golden.update({name: twenty_step_losses(name, cache) for name in names})
  GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + '\n')
  print(f'wrote {GOLDEN}: {", ".join(names)}')
