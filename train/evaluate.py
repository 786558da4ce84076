"""python -m train.evaluate --workdir DIR [--split valid|test] [--max_batches N] [--draws K] [--per_position]
                          [--config.data.dir=...]

Prints one JSON line: loss (nats per token), perplexity, bits per byte (total NLL over the split's
UTF-8 bytes: comparable across tokenizers), accuracy, the number of scored tokens and the model's own
metrics (e.g. MrT5's deletion rate). `--draws K` averages over K keys of the model's RNG streams
(lexinvariant's random embedding tables) and adds `loss_std` across them; `--per_position` adds
`nll_by_position`, the mean NLL at each position of the context window.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
from absl import flags

from train import config as config_lib, distributed, restore


def _define(fv):
  flags.DEFINE_enum('split', 'valid', ['train', 'valid', 'test'], 'split to evaluate', flag_values=fv)
  flags.DEFINE_integer('max_batches', 0, 'evaluate only this many batches (0 = the whole split)', flag_values=fv)
  flags.DEFINE_integer('draws', 1, "average over this many keys of the model's RNG streams", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_bool('per_position', False, 'also report the mean NLL at each position of the window', flag_values=fv)


@config_lib.cli
def main(argv):
  fv = config_lib.parse_flags(argv, _define, config_from_workdir=True)
  distributed.maybe_initialize()
  setup, state = restore.load_run(fv.config, fv.workdir)
  eval_step = setup.make_eval_step()
  runs = [setup.evaluate(eval_step, state['params'], state['model_state'], fv.split, fv.max_batches, draw=draw,
                         per_position=fv.per_position) for draw in range(fv.draws)]
  losses = np.array([r['loss'] for r in runs])
  averaged = [k for k in runs[0] if k not in ('loss', 'ppl', 'tokens', 'nll_by_position')]
  result = {'loss': losses.mean(), 'ppl': math.exp(min(losses.mean(), 80.0)), 'tokens': runs[0]['tokens'],
            **{k: float(np.mean([r[k] for r in runs])) for k in averaged}}
  if fv.draws > 1:
    result.update(draws=fv.draws, loss_std=losses.std())
  if fv.per_position:
    result['nll_by_position'] = np.mean([r['nll_by_position'] for r in runs], axis=0).tolist()
  if jax.process_index() == 0:
    print(json.dumps({'split': fv.split, 'step': int(jax.device_get(state['step'])), **result}))


if __name__ == '__main__':
  main()
