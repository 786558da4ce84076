"""python -m train --config experiments/configs/quickstart.py --workdir DIR [--config.key=value ...]

Without --config the run's own DIR/config.json is used (to resume, or to train a run made by train.grow).
"""

from __future__ import annotations

import json
import sys

import jax

from train import config as config_lib, distributed, trainer


@config_lib.cli
def main(argv):
  has_config_file = any(a == '--config' or a.startswith('--config=') for a in argv)
  fv = config_lib.parse_flags(argv, lambda fv: None, config_from_workdir=not has_config_file)
  distributed.maybe_initialize()
  result = trainer.Trainer(fv.config, fv.workdir).run()
  if jax.process_index() == 0:
    if 'eval_ppl' in result:
      print(f"step {result['step']}: eval loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f} "
            f"(uniform over the vocabulary: {fv.config.model.vocab_size}), bits per byte {result['eval_bpb']:.3f}",
            file=sys.stderr)
    print(json.dumps(result))


if __name__ == '__main__':
  main()
