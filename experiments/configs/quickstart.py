"""Quickstart: the baseline Transformer on the embedded corpus (Python stdlib source), byte level.

Command (about two minutes on 2 CPU cores):
  python -m train --config experiments/configs/quickstart.py --workdir /tmp/quickstart
Expected: validation perplexity far below the uniform 257 (measured: see README).
"""

from train.config import default_config


def get_config(arg=None):
  c = default_config('transformer')
  c.model.update(d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=128)
  c.data.update(corpus='stdlib', tokenizer='byte')
  c.train.update(steps=600, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50, log_every=20,
                 eval_every=300, eval_batches=50)
  c.checkpoint.every = 300
  c.wandb.mode = 'offline'
  return c
