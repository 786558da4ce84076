"""HAT (hierarchical byte/word transformer) on WikiText-2 bytes.

  --config experiments/configs/hat.py:SHAPE
    SHAPE   tiny (CPU: byte modules 1 layer at d=64, backbone 4 layers at D=128, batch 8, 300 steps)
            | small (accelerator, the spec's §1.5 HAT-tiny: byte modules 2 layers at d=256, 4 heads;
              backbone 8 layers at D=512, 8 heads)

Windows of 512 bytes split by the paper's whitespace rule, at most 160 words of at most 32 bytes.
AdamW (0.9, 0.95), weight decay 0.1, cosine to 10% of the peak (the paper's recipe).
"""

from train.config import default_config

SHAPES = {   # byte width, byte heads, byte layers, d_model, layers, heads, batch, steps, lr
    'tiny': (64, 2, 1, 128, 4, 4, 8, 300, 2e-3),
    'small': (256, 4, 2, 512, 8, 8, 64, 10000, 1e-3),
}


def get_config(shape='tiny'):
  byte_width, byte_heads, byte_layers, d, layers, heads, batch, steps, lr = SHAPES[shape]
  c = default_config('hat')
  c.model.update(byte_width=byte_width, byte_heads=byte_heads, byte_ff=3 * byte_width, encoder_layers=byte_layers,
                 decoder_layers=byte_layers, d_model=d, num_layers=layers, num_heads=heads, d_ff=3 * d,
                 max_words=160, max_word_bytes=32, splitter='whitespace')
  c.data.update(corpus='wikitext2', dir='../shared/data/wikitext-2', tokenizer='byte')
  c.train.update(steps=steps, batch_size=batch, seq_len=512, lr=lr, min_lr_ratio=0.1, b2=0.95,
                 warmup_steps=max(1, steps // 20), weight_decay=0.1, grad_clip=1.0, log_every=25,
                 eval_every=steps, eval_batches=20)
  c.checkpoint.every = max(1, steps // 2)
  c.wandb.mode = 'disabled'
  c.wandb.name = f'hat-{shape}'
  return c
