"""The arena: every architecture at the baseline Transformer's non-embedding parameters and training FLOPs.

  --config experiments/configs/arena.py:PRESET,MODEL
    PRESET  tiny (CPU: d=128, 4 layers, 4 heads, 256-byte windows, batch 8, baseline 300 steps)
            | small (accelerator: d=384, 6 layers, 6 heads, 512 bytes, batch 32, baseline 5,000 steps)
            | paper (accelerator: GPT-2 small, d=768, 12 layers, 12 heads, 1,024 bytes, batch 64, 20,000 steps)
    MODEL   one of ARCHITECTURES (the registered names; byt5 and mrt5 train on span corruption)

Matching. Every model gets the preset's width, depth and heads in its paper's layout (below). One
width knob per architecture (its feed-forward size, TokenFormer's feed-forward parameter tokens) is then
set so that its non-embedding parameters come closest to the baseline's (`models.param_counts`), and its
steps so that steps x tokens per step x `flops_per_token` equals the baseline's training FLOPs. Every
model reads the same bytes (WikiText-2 by default; the arena's --corpus overrides data.*), so bits per
byte compare across all of them. Same optimiser and schedule for all: AdamW (0.9, 0.95), weight decay
0.1, clipping 1.0, 5% warm-up, cosine to 10%; no dropout anywhere (a decision: the runs are far
shorter than an epoch, and some papers' dropout would handicap their own row).
"""

from __future__ import annotations

import functools

import ml_collections

from train.config import build_model, default_config
from train.tokenizers import ByteTokenizer

PRESETS = {   # d_model, layers, heads, seq_len, batch, baseline steps, lr, eval batches (0 = whole split)
    'tiny': (128, 4, 4, 256, 8, 300, 2e-3, 20),
    'small': (384, 6, 6, 512, 32, 5000, 1e-3, 0),
    'paper': (768, 12, 12, 1024, 64, 20000, 6e-4, 0),
}
BASELINE = 'transformer'
# llama: the baseline's block in Llama layout (RMSNorm, RoPE, SwiGLU), the recipe HAT, Landmark and MoR build on.
LANGUAGE_MODELS = ('transformer', 'llama', 'grassmann', 'tokenformer', 'mor', 'recursive', 'hat', 'landmark',
                   'lexinvariant')
SPAN_CORRUPTION = ('byt5', 'mrt5')   # their own section: a different task, so a different loss
ARCHITECTURES = LANGUAGE_MODELS + SPAN_CORRUPTION
KNOB = {name: 'd_ff' for name in ARCHITECTURES} | {'tokenformer': 'n_ffn'}   # the width set to match parameters


def shaped(name: str, d: int, depth: int, heads: int, seq_len: int) -> ml_collections.ConfigDict:
  """`name` at the preset's shape, in its paper's layout, before parameter matching."""
  c = default_config(name)
  m = c.model
  m.d_model = d
  if 'num_heads' in m:
    m.num_heads = heads
  if name in ('transformer', 'grassmann', 'landmark', 'lexinvariant'):
    m.update(num_layers=depth, d_ff=4 * d)
  if name == 'grassmann':
    m.rank = d // 8
  elif name == 'tokenformer':
    m.update(num_layers=depth, n_attn=d, n_ffn=4 * d)
  elif name == 'llama':
    m.update(num_layers=depth, d_ff=8 * d // 3)
  elif name in ('mor', 'recursive'):   # Middle-Cycle: unique first and last layers, `depth` unique blocks
    m.update(num_layers=2 + (depth - 2) * 3, num_recursions=3, d_ff=8 * d // 3)
  elif name == 'hat':   # byte modules at half width, 1 layer (tiny) or 2; the word backbone at `depth`
    m.update(num_layers=depth, d_ff=4 * d, byte_width=d // 2, byte_heads=max(1, heads // 2), byte_ff=3 * d // 2,
             encoder_layers=1 if depth <= 4 else 2, decoder_layers=1 if depth <= 4 else 2,
             max_words=seq_len // 4, max_word_bytes=16)
  elif name in SPAN_CORRUPTION:   # ByT5's 3:1 encoder:decoder depth, MrT5's gate after a quarter of the encoder
    decoder = max(1, depth // 4)
    m.update(encoder_layers=depth - decoder, decoder_layers=decoder, gate_layer=max(1, (depth - decoder) // 4),
             d_ff=2 * d)
  if 'max_len' in m:
    m.max_len = seq_len
  if 'dropout' in m:
    m.dropout = 0.0
  return c


def vocab_of(config) -> int:
  from models import model_class
  return ByteTokenizer.vocab_size + model_class(config.model.name).extra_output_symbols


def model_of(config):
  return build_model(config, vocab_size=vocab_of(config))


def non_embedding_params(config) -> int:
  from models import param_counts
  return param_counts(model_of(config))['non_embedding_params']


def match_knob(config, target: int) -> None:
  """Set the architecture's knob (a positive integer) to the value whose non-embedding parameter count
  is closest to `target`. The count grows linearly with every knob here, so two counts give the
  estimate; a walk to the nearest integer optimum makes it exact for any increasing count."""
  key = KNOB[config.model.name]
  count = functools.cache(lambda value: (config.model.update(**{key: value}), non_embedding_params(config))[1])
  step = config.model.d_model
  value = max(1, 1 + round((target - count(1)) * step / (count(1 + step) - count(1))))
  miss = lambda v: abs(count(v) - target)
  while value > 1 and miss(value - 1) <= miss(value):   # ties go to the smaller knob
    value -= 1
  while miss(value + 1) < miss(value):
    value += 1
  config.model.update(**{key: value})


@functools.cache
def baseline(preset: str) -> tuple[int, float]:
  """The baseline's non-embedding parameters and training FLOPs per token."""
  d, depth, heads, seq_len, *_ = PRESETS[preset]
  c = shaped(BASELINE, d, depth, heads, seq_len)
  return non_embedding_params(c), model_of(c).flops_per_token(seq_len)


def matched(preset: str, name: str, seq_len: int | None = None) -> ml_collections.ConfigDict:
  """`name` at the preset's shape (or another sequence length), its knob matched to the baseline's parameters."""
  d, depth, heads, preset_len, *_ = PRESETS[preset]
  c = shaped(name, d, depth, heads, seq_len or preset_len)
  match_knob(c, baseline(preset)[0])
  return c


def get_config(arg='tiny,transformer'):
  preset, name = arg.split(',')
  if preset not in PRESETS or name not in ARCHITECTURES:
    raise ValueError(f'arena config {arg!r}: PRESET must be one of {", ".join(PRESETS)}, MODEL one of '
                     f'{", ".join(ARCHITECTURES)}')
  _, _, _, seq_len, batch, base_steps, lr, eval_batches = PRESETS[preset]
  c = matched(preset, name)
  steps = max(1, round(base_steps * baseline(preset)[1] / model_of(c).flops_per_token(seq_len)))
  c.data.update(corpus='wikitext2', dir='../shared/data/wikitext-2', tokenizer='byte')
  c.train.update(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, min_lr_ratio=0.1,
                 warmup_steps=max(1, steps // 20), weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
                 log_every=max(1, steps // 20), eval_every=steps, eval_batches=eval_batches)
  c.checkpoint.every = steps
  c.wandb.mode = 'disabled'
  c.wandb.name = f'arena-{preset}-{name}'
  return c
