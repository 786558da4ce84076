"""python -m train.evaluate --workdir DIR [--split valid|test] [--max_batches N] [--config.data.dir=...]

Prints one JSON line: loss (nats per token), perplexity, bits per byte (total NLL over the split's
UTF-8 bytes: comparable across tokenizers) and the number of scored tokens.
"""

from __future__ import annotations

import json

from absl import flags

from train import config as config_lib, distributed


def _define(fv):
  flags.DEFINE_enum('split', 'valid', ['train', 'valid', 'test'], 'split to evaluate', flag_values=fv)
  flags.DEFINE_integer('max_batches', 0, 'evaluate only this many batches (0 = the whole split)', flag_values=fv)


@config_lib.cli
def main(argv):
  fv = config_lib.parse_flags(argv, _define, config_from_workdir=True)
  distributed.maybe_initialize()
  import jax
  from train import restore
  setup, state = restore.load_run(fv.config, fv.workdir)
  result = setup.evaluate(setup.make_eval_step(), state['params'], state['model_state'], fv.split, fv.max_batches)
  if jax.process_index() == 0:
    print(json.dumps({'split': fv.split, 'step': int(jax.device_get(state['step'])), **result}))


if __name__ == '__main__':
  main()
