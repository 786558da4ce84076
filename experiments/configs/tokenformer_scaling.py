"""TokenFormer progressive scaling (paper Table 6 in shape) on WikiText-2 bytes.

  --config experiments/configs/tokenformer_scaling.py:SHAPE,ROW
    SHAPE  tiny (CPU: d=128, 3 layers, 4 heads, seq 128, batch 32, S=1,000 steps, n_attn 32 -> 128)
           | tiny-long (tiny at S=3,000 steps: the longer schedule for the grown-against-scratch comparison)
           | paper (accelerator: d=256, 6 layers, seq 256, S=5,000 steps, n_attn 64 -> 256; the spec's §2.8)
    ROW    small (n_attn = d/4, n_ffn = 4 n_attn) | large (n_attn = d, n_ffn = 4d: 4x the non-embedding params)
           | softmax (small with the exp+L1 activation, the paper's Table 4 ablation)
           | transformer (a bias-free GPT with RoPE, d_ff = 6d: the large TokenFormer's parameter count)

`python -m experiments.tokenformer_scaling --shape tiny` runs every row of the table, growing the small
model into the large one with `python -m train.grow`. AdamW (0.9, 0.95), weight decay 0.1, clipping 1.0,
cosine to 0.1x with a short warmup, no dropout, as the released configs (at a CPU-sized learning rate).
"""

from train.config import default_config

SHAPES = {
    'tiny': dict(d_model=128, depth=3, heads=4, seq_len=128, batch=32, steps=1000, lr=2e-3),
    'tiny-long': dict(d_model=128, depth=3, heads=4, seq_len=128, batch=32, steps=3000, lr=2e-3),
    'paper': dict(d_model=256, depth=6, heads=4, seq_len=256, batch=32, steps=5000, lr=1e-3),
}


def get_config(arg='tiny,small'):
  shape, row = arg.split(',')
  s = SHAPES[shape]
  d, depth, heads, seq_len, batch, steps, lr = (s[key] for key in ('d_model', 'depth', 'heads', 'seq_len', 'batch', 'steps', 'lr'))
  if row == 'transformer':
    c = default_config('transformer')
    # A Pattention has keys and values, so TokenFormer's attention holds 8d² to a Transformer's 4d²: an
    # FFN of 6d gives the Transformer the large TokenFormer's 16d² per layer.
    c.model.update(d_model=d, num_layers=depth, num_heads=heads, d_ff=6 * d, max_len=seq_len, positions='rope',
                   use_bias=False)
  else:
    c = default_config('tokenformer')
    n_attn = d if row == 'large' else d // 4
    c.model.update(d_model=d, num_layers=depth, num_heads=heads, n_attn=n_attn, n_ffn=4 * n_attn, max_len=seq_len,
                   activation='softmax' if row == 'softmax' else 'l2_gelu')
  c.data.update(corpus='wikitext2', dir='../shared/data/wikitext-2', tokenizer='byte')
  c.train.update(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, min_lr_ratio=0.1, warmup_steps=steps // 50,
                 weight_decay=0.1, grad_clip=1.0, log_every=50, eval_every=steps // 4, eval_batches=50)
  c.checkpoint.every = steps // 4
  c.wandb.mode = 'disabled'
  c.wandb.name = f'tokenformer-{shape}-{row}'
  return c
