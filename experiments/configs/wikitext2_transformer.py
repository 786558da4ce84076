"""Baseline Transformer on WikiText-2, word level (33,278 types, <eos> per line).

  python -m experiments.run --name wikitext2-baseline --configs experiments/configs/wikitext2_transformer.py

CPU-sized (about 20 minutes on 2 cores); on an accelerator raise d_model/num_layers/steps.
"""

from train.config import default_config


def get_config(arg=None):
  c = default_config('transformer')
  c.model.update(d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=128, dropout=0.1)
  c.data.update(corpus='wikitext2', dir='../shared/data/wikitext-2', tokenizer='word', vocab_size=0)
  c.train.update(steps=1200, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=100, log_every=50,
                 eval_every=400, eval_batches=20)
  c.checkpoint.every = 400
  c.wandb.mode = 'disabled'
  return c
