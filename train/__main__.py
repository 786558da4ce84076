"""python -m train --config experiments/configs/quickstart.py --workdir DIR [--config.key=value ...]"""

from __future__ import annotations

import json

from train import config as config_lib, distributed


@config_lib.cli
def main(argv):
  fv = config_lib.parse_flags(argv, lambda fv: None)
  distributed.maybe_initialize()
  from train import trainer
  result = trainer.Trainer(fv.config, fv.workdir).run()
  import jax
  if jax.process_index() == 0:
    print(json.dumps(result))


if __name__ == '__main__':
  main()
