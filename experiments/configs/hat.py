"""HAT (hierarchical byte/word transformer) and its baselines on WikiText-2 bytes (the spec's §1.5 in shape).

  --config experiments/configs/hat.py:SHAPE[,ROW]
    SHAPE   tiny (CPU: byte modules 1 layer at d=64; backbone and baselines d=128, 4 heads; batch 8, 1000 steps)
            | small (accelerator, the spec's HAT-tiny: byte modules 2 layers at d=256, 4 heads; backbone
              8 layers at D=512, 8 heads; batch 64, 10k steps)
    ROW     hat (default) | bpe (Transformer on an 8k byte-level BPE trained on the train split; its depth
            is set by experiments/hat.py to match HAT's FLOPs per real byte, padded word slots left out) |
            byte (flat byte-level Transformer of the backbone's width and depth)

Every row reads the same windows of text: 512 bytes, or 512 / 4 BPE tokens (WikiText-2 averages about
4.3 bytes per token, so BPE windows hold slightly more text). HAT splits by the paper's whitespace rule,
words capped at 16 bytes (longer ones are cut), at most 144 words per window (WikiText-2 windows hold
about 100). Llama-style blocks everywhere (RMSNorm, SwiGLU, RoPE, no biases); AdamW (0.9, 0.95),
weight decay 0.1, cosine to 10% of the peak (the paper's recipe).
"""

from train.config import default_config

SHAPES = {   # byte_*: HAT's encoder and decoder; d_model, layers, heads: its backbone and the flat models
    'tiny': dict(byte_width=64, byte_heads=2, byte_layers=1, d_model=128, layers=4, heads=4, batch=8, steps=1000,
                 lr=2e-3),
    'small': dict(byte_width=256, byte_heads=4, byte_layers=2, d_model=512, layers=8, heads=8, batch=64, steps=10000,
                  lr=1e-3),
}
ROWS = ('hat', 'bpe', 'byte')
BYTES = 512
BPE_VOCAB = 8192


def get_config(arg='tiny,hat'):
  shape, row = (arg.split(',') + ['hat'])[:2]
  if row not in ROWS:
    raise ValueError(f'row {row!r} must be one of {", ".join(ROWS)}')
  s = SHAPES[shape]
  byte_width, byte_heads, byte_layers = s['byte_width'], s['byte_heads'], s['byte_layers']
  d, layers, heads, batch, steps, lr = s['d_model'], s['layers'], s['heads'], s['batch'], s['steps'], s['lr']
  if row == 'hat':
    c = default_config('hat')
    c.model.update(byte_width=byte_width, byte_heads=byte_heads, byte_ff=3 * byte_width,
                   encoder_layers=byte_layers, decoder_layers=byte_layers, max_words=144, max_word_bytes=16,
                   splitter='whitespace')
  else:
    c = default_config('transformer')
    c.model.update(positions='rope', norm='rmsnorm', mlp='swiglu', use_bias=False)
  c.model.update(d_model=d, num_layers=layers, num_heads=heads, d_ff=3 * d)
  c.data.update(corpus='wikitext2', dir='../shared/data/wikitext-2', tokenizer='bpe' if row == 'bpe' else 'byte',
                vocab_size=BPE_VOCAB if row == 'bpe' else 0)
  c.train.update(steps=steps, batch_size=batch, seq_len=BYTES // 4 if row == 'bpe' else BYTES, lr=lr,
                 min_lr_ratio=0.1, b2=0.95, warmup_steps=max(1, steps // 20), weight_decay=0.1, grad_clip=1.0,
                 log_every=25, eval_every=steps, eval_batches=20)
  c.checkpoint.every = max(1, steps // 2)
  c.wandb.mode = 'disabled'
  c.wandb.name = f'hat-{shape}-{row}'
  return c
