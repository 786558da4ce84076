"""ByT5 and MrT5 on span corruption over WikiText-2 bytes, and MrT5's vowel-removal diagnostic (the spec's §2.7).

  --config experiments/configs/mrt5.py:SHAPE,ROW
    SHAPE   tiny (CPU: 6 encoder / 2 decoder layers at d=128, 4 heads; inputs of 128 bytes, batch 32)
            | small (accelerator, the spec's T5-tiny: d=256, 4 heads; inputs of 1024 bytes, batch 32)
    ROW     byt5 (no deletion) | mrt5 (delete gate at layer 2, PI controller toward model.target_deletion)
            | random | fixed (deletion at model.target_deletion: the paper's RandomT5 and FixedT5)
            | vowel_t5 | vowel_mrt5 (the diagnostic: 3 + 3 layers; tiny: strings of 24 random letters,
              2,000 steps, the gate loss from step 1,000; small: the paper's 64 letters, 30k steps)
            | vowel_random | vowel_fixed (the diagnostic with random / fixed deletion at the input's
              vowel share, the rate the learned gate reaches)

Span corruption: noise density 0.15, mean span 20 bytes (the paper's; tiny: 3 bytes, T5's default, so
that the tiny decoder has more reason to read its encoder: at 20 bytes it read it for 0.01 nats, at 3 for
0.04, both far below what would make deletion costly; results/mrt5-tiny.md). The deletion rows are meant to
continue a trained byt5 run (`--config.train.init_from=DIR`), as the paper continues ByT5: AdamW at a
constant learning rate (the paper: 1e-4, linear decay, no warm-up; ours is higher for the short runs),
no gate-loss delay, β = 0.5 for the score regulariser. The diagnostic follows the paper's: the gate at
layer 2 with k = -10, a fixed α = 1e-3 (the paper's 1e-4 and 1e-3; 1e-2 deleted everything here)
after a delay, softmax₁ everywhere.
"""

from train.config import default_config

SHAPES = {
    'tiny': dict(d_model=128, heads=4, d_ff=320, seq_len=128, batch=32, steps=1200, lr=3e-3, mean_span=3.0),
    'small': dict(d_model=256, heads=4, d_ff=640, seq_len=1024, batch=32, steps=5000, lr=1e-3, mean_span=20.0),
}
VOWEL_SHAPES = {   # letters per string (the gate loss starts half-way through the steps)
    'tiny': dict(letters=24, batch=64, steps=2000),
    'small': dict(letters=64, batch=128, steps=30000),   # the paper's diagnostic (its delay is 10k of 30k steps)
}
ROWS = ('byt5', 'mrt5', 'random', 'fixed', 'vowel_t5', 'vowel_mrt5', 'vowel_random', 'vowel_fixed')
VOWEL_SHARE = 0.18   # of the diagnostic's inputs (5 of 26 letters, and the eos): measured 0.183


def get_config(arg='tiny,byt5'):
  shape, row = (arg.split(',') + ['byt5'])[:2]
  if row not in ROWS:
    raise ValueError(f'row {row!r} must be one of {", ".join(ROWS)}')
  s = SHAPES[shape]
  d, heads, d_ff, seq_len, batch, steps, lr = (s[key] for key in ('d_model', 'heads', 'd_ff', 'seq_len', 'batch',
                                                                  'steps', 'lr'))
  vowels = row.startswith('vowel')
  c = default_config('byt5' if row in ('byt5', 'vowel_t5') else 'mrt5')
  deletion = {'byt5': 'none', 'vowel_t5': 'none', 'mrt5': 'gate', 'vowel_mrt5': 'gate'}.get(row, row.split('_')[-1])
  c.model.update(d_model=d, num_heads=heads, d_ff=d_ff, encoder_layers=6, decoder_layers=2, gate_layer=2,
                 deletion=deletion, mean_span=s['mean_span'])
  c.data.update(corpus='wikitext2', dir='../shared/data/wikitext-2', tokenizer='byte')
  c.train.update(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, min_lr_ratio=0.1, b2=0.99,
                 warmup_steps=steps // 20, weight_decay=0.01, grad_clip=1.0, log_every=25, eval_every=steps,
                 eval_batches=20)
  if vowels:   # the corpus only seeds the random strings
    letters, batch, steps = (VOWEL_SHAPES[shape][key] for key in ('letters', 'batch', 'steps'))
    c.model.update(task='vowel_removal', encoder_layers=3, decoder_layers=3, gate_scale=-10.0, controller='fixed',
                   gate_alpha=1e-3, regularizer_delay=steps // 2)
    if deletion in ('random', 'fixed'):
      c.model.target_deletion = VOWEL_SHARE
    c.train.update(seq_len=letters + 1, batch_size=batch, steps=steps, warmup_steps=steps // 20, eval_every=steps)
  c.checkpoint.every = c.train.steps
  c.wandb.mode = 'disabled'
  c.wandb.name = f'mrt5-{shape}-{row}'
  return c
