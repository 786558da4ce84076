"""Any registered model at its `tiny` preset on the embedded stdlib corpus: a seconds-long smoke run.

  python -m train --config experiments/configs/tiny.py:NAME --workdir DIR   # NAME: python -c "import models; print(models.names())"

The shapes are the ones the shared test suite runs (`LanguageModel.presets['tiny']`); the tests use this
file as the base that their command-line overrides complete.
"""

from __future__ import annotations

import models
from train.config import default_config


def get_config(name='transformer'):
  c = default_config(name)
  c.model.update(**models.model_class(name).presets['tiny'])
  c.train.update(steps=20, batch_size=4, seq_len=16, warmup_steps=2, log_every=5, eval_every=20, eval_batches=2)
  c.checkpoint.every = 20
  c.mesh.data = 1
  c.wandb.mode = 'disabled'
  return c
