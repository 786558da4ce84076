"""Landmark attention against the same model without landmarks (the spec's §3.7 in shape).

  --config experiments/configs/landmark.py:SHAPE,ROW[,passkey]
    SHAPE   tiny (CPU: 4 layers, d=128, 4 heads, batch 8, 400 steps)
            | small (accelerator, the spec's §3.7: 6 layers, d=384, 6 heads, batch 64, 10k steps)
    ROW     landmark (ℓ_block = 50; windows of 502 bytes, 512 positions with the landmarks)
            | baseline (plain causal attention over 512 bytes)
    passkey  the passkey rows: 90% of the training windows are passkey sequences and the schedule is 6x
             longer (2,400 steps at tiny), to teach a tiny model to copy the key inside its window. Not
             enough yet: at tiny it answers 5% of in-window prompts (full forward; 2% cached), against
             0% at 10% and 400 steps, or 90% and 600 steps (results/landmark-tiny.md)

Byte-level, on the Gutenberg books of ../shared/data/gutenberg (whole books held out for validation
and test); AdamW (0.9, 0.95), weight decay 1e-3, cosine from lr to lr/5 after 2% warm-up (the paper's
recipe). `data.passkey_fraction` 0.1: a tenth of the training windows are synthetic passkey sequences
(a deviation from the paper, which the spec allows so that a tiny model can learn the skill at all).
"""

from train.config import default_config

SHAPES = {
    'tiny': dict(layers=4, d_model=128, heads=4, batch=8, steps=400, lr=2e-3),
    'small': dict(layers=6, d_model=384, heads=6, batch=64, steps=10000, lr=1e-3),
}
SEQ_LEN = {'landmark': 502, 'baseline': 512}


PASSKEY = dict(passkey_fraction=0.9, steps_factor=6)


def get_config(arg='tiny,landmark'):
  shape, row, *variant = arg.split(',')
  if variant not in ([], ['passkey']):
    raise ValueError(f'the variant {",".join(variant)!r} must be passkey (or left out)')
  if row not in SEQ_LEN:
    raise ValueError(f'row {row!r} must be one of {", ".join(SEQ_LEN)}')
  layers, d, heads, batch, steps, lr = (SHAPES[shape][key] for key in ('layers', 'd_model', 'heads', 'batch', 'steps',
                                                                        'lr'))
  passkey_fraction = PASSKEY['passkey_fraction'] if variant else 0.1
  steps *= PASSKEY['steps_factor'] if variant else 1
  c = default_config('landmark')
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, d_ff=4 * d, landmarks=row == 'landmark')
  c.data.update(corpus='documents', dir='../shared/data/gutenberg', tokenizer='byte', passkey_fraction=passkey_fraction)
  c.train.update(steps=steps, batch_size=batch, seq_len=SEQ_LEN[row], lr=lr, min_lr_ratio=0.2,
                 warmup_steps=max(1, steps // 50), weight_decay=1e-3, grad_clip=1.0, log_every=25,
                 eval_every=steps, eval_batches=20)
  c.checkpoint.every = max(1, steps // (6 if variant else 2))
  c.wandb.mode = 'disabled'
  c.wandb.name = f'landmark-{shape}-{row}' + ('-passkey' if variant else '')
  return c
