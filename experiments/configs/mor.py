"""Mixture-of-Recursions against its baselines at equal training FLOPs (the spec's §3.8 in shape).

  --config experiments/configs/mor.py:SHAPE,ROW[,BUDGET]
    SHAPE   tiny (CPU: d=128, 4 heads, seq 128, batch 16, vanilla 400 steps)
            | small (accelerator, the spec's §3.8: d=256, seq 512, batch 32, vanilla 4,000 steps)
    ROW     vanilla (6 unique layers) | recursive (Middle-Cycle 1 + 4 x 3 + 1, every token every recursion)
            | mor2 (expert-choice, 1 + 4 x 2 + 1) | mor3 (expert-choice, 1 + 4 x 3 + 1)
            | mor3_token (token-choice) | mor3_kvshare (expert-choice, recursive KV sharing)
    BUDGET  flops (default: steps so that the analytic training FLOPs equal vanilla's)
            | tokens (vanilla's steps, hence its tokens)

Every row has the same six unique layers' worth of blocks except vanilla, whose six are all unique
(Llama: RMSNorm, RoPE, SwiGLU, tied embeddings), on WikiText-2 bytes. AdamW (0.9, 0.95), weight decay
0.1, clipping 1.0, and the paper's trapezoid schedule (5% warm-up, linear cool-down over the last 20%).
"""

import math

from train.config import build_model, default_config
from train.tokenizers import ByteTokenizer

SHAPES = {   # vanilla_steps: the vanilla row's; every other row is matched to its training FLOPs
    'tiny': dict(d_model=128, heads=4, d_ff=344, seq_len=128, batch=16, vanilla_steps=400, lr=3e-3),
    'small': dict(d_model=256, heads=4, d_ff=688, seq_len=512, batch=32, vanilla_steps=4000, lr=3e-3),
}
ROWS = {   # the registered model, its unrolled layers and recursions, and any other model keys
    'vanilla': dict(name='llama', num_layers=6, num_recursions=1),
    'recursive': dict(name='recursive', num_layers=14, num_recursions=3),
    'mor2': dict(name='mor', num_layers=10, num_recursions=2),
    'mor3': dict(name='mor', num_layers=14, num_recursions=3),
    'mor3_token': dict(name='mor', num_layers=14, num_recursions=3, router='token'),
    'mor3_kvshare': dict(name='mor', num_layers=14, num_recursions=3, kv_sharing=True),
}


def model_config(row: str, *, d_model: int, heads: int, d_ff: int, seq_len: int):
  """The config of `row` at a shape (its data and model; train keys are the caller's)."""
  overrides = dict(ROWS[row])
  c = default_config(overrides.pop('name'))
  c.model.update(d_model=d_model, num_heads=heads, d_ff=d_ff, max_len=seq_len, **overrides)
  c.data.update(corpus='wikitext2', dir='../shared/data/wikitext-2', tokenizer='byte')
  return c


def get_config(arg='tiny,mor3'):
  shape, row, *budget = arg.split(',')
  budget = budget[0] if budget else 'flops'
  if budget not in ('flops', 'tokens'):
    raise ValueError(f'budget {budget!r} must be flops or tokens')
  s = SHAPES[shape]
  shape_keys = {key: s[key] for key in ('d_model', 'heads', 'd_ff', 'seq_len')}
  seq_len, batch, vanilla_steps, lr = s['seq_len'], s['batch'], s['vanilla_steps'], s['lr']
  c = model_config(row, **shape_keys)
  steps = vanilla_steps
  if budget == 'flops':
    # Training FLOPs are steps x tokens x (3 x forward FLOPs per token): equal them to vanilla's.
    vocab = ByteTokenizer.vocab_size
    vanilla = build_model(model_config('vanilla', **shape_keys), vocab_size=vocab)
    steps = math.floor(vanilla_steps * vanilla.flops_per_token(seq_len)
                       / build_model(c, vocab_size=vocab).flops_per_token(seq_len))
  c.train.update(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, schedule='wsd', decay_fraction=0.2,
                 min_lr_ratio=0.0, warmup_steps=max(1, steps // 20), weight_decay=0.1, grad_clip=1.0,
                 log_every=25, eval_every=steps, eval_batches=50)
  c.checkpoint.every = max(1, steps // 2)
  c.wandb.mode = 'disabled'
  c.wandb.name = f'mor-{shape}-{row}-{budget}'
  return c
