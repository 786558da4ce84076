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
shorter than an epoch, and some papers' dropout would handicap their own row). Every row is evaluated
causally (each model's `causal_evaluation` keys: MoR routes by σ > 0.5, not by its training top-k,
which ranks the whole window; experiments/mor.py reports both).
"""

from __future__ import annotations

import functools

import ml_collections

import models
from train.config import build_model, default_config
from train.tokenizers import ByteTokenizer

# The shape every model gets (d_model, depth, heads, seq_len), and the baseline's run: batch, steps, lr and
# evaluation batches (0 = the whole split).
PRESETS = {
    'tiny': dict(d_model=128, depth=4, heads=4, seq_len=256, batch=8, steps=300, lr=2e-3, eval_batches=20),
    'small': dict(d_model=384, depth=6, heads=6, seq_len=512, batch=32, steps=5000, lr=1e-3, eval_batches=0),
    'paper': dict(d_model=768, depth=12, heads=12, seq_len=1024, batch=64, steps=20000, lr=6e-4, eval_batches=0),
}
BASELINE = 'transformer'
# Every registered model; the encoder-decoders get their own section (a different task, so a different loss).
# llama is the baseline's block in Llama layout (RMSNorm, RoPE, SwiGLU), the recipe HAT, Landmark and MoR build on.
SPAN_CORRUPTION = tuple(name for name in models.names() if models.model_class(name).batch_format == 'seq2seq')
LANGUAGE_MODELS = (BASELINE, *(name for name in models.names() if name not in (BASELINE, *SPAN_CORRUPTION)))
ARCHITECTURES = LANGUAGE_MODELS + SPAN_CORRUPTION


def shaped(name: str, *, d_model: int, depth: int, heads: int, seq_len: int) -> ml_collections.ConfigDict:
  """`name` at the preset's shape, in its paper's layout, before parameter matching."""
  c = default_config(name)
  m = c.model
  model_class = models.model_class(name)
  m.update(d_model=d_model, **model_class.arena_layout(d_model=d_model, depth=depth, heads=heads),
           **model_class.causal_evaluation)   # every row evaluated causally (MoR: σ > 0.5, not its top-k)
  for key, value in (('max_len', seq_len), ('max_words', seq_len // 4), ('dropout', 0.0)):
    if key in m:   # positions up to the window, HAT's words at 4 bytes each on average, no dropout anywhere
      m[key] = value
  return c


def vocab_of(config) -> int:
  return ByteTokenizer.vocab_size + models.model_class(config.model.name).extra_output_symbols


def model_of(config):
  return build_model(config, vocab_size=vocab_of(config))


def non_embedding_params(config) -> int:
  return models.param_counts(model_of(config))['non_embedding_params']


def match_knob(config, target: int) -> None:
  """Set the architecture's knob (a positive integer) to the value whose non-embedding parameter count
  is closest to `target`. The count grows linearly with every knob here, so two counts give the
  estimate; a walk to the nearest integer optimum makes it exact for any increasing count."""
  key = models.model_class(config.model.name).arena_knob
  count = functools.cache(lambda value: (config.model.update(**{key: value}), non_embedding_params(config))[1])
  step = config.model.d_model
  value = max(1, 1 + round((target - count(1)) * step / (count(1 + step) - count(1))))
  miss = lambda v: abs(count(v) - target)
  while value > 1 and miss(value - 1) <= miss(value):   # ties go to the smaller knob
    value -= 1
  while miss(value + 1) < miss(value):
    value += 1
  config.model.update(**{key: value})


def shape_of(preset: str) -> dict:
  """The model shape of a preset, as `shaped` takes it."""
  return {key: PRESETS[preset][key] for key in ('d_model', 'depth', 'heads', 'seq_len')}


@functools.cache
def baseline(preset: str) -> tuple[int, float]:
  """The baseline's non-embedding parameters and training FLOPs per token."""
  c = shaped(BASELINE, **shape_of(preset))
  return non_embedding_params(c), model_of(c).flops_per_token(PRESETS[preset]['seq_len'])


def matched(preset: str, name: str, seq_len: int | None = None) -> ml_collections.ConfigDict:
  """`name` at the preset's shape (or another sequence length), its knob matched to the baseline's parameters."""
  c = shaped(name, **{**shape_of(preset), 'seq_len': seq_len or PRESETS[preset]['seq_len']})
  match_knob(c, baseline(preset)[0])
  return c


def get_config(arg='tiny,transformer'):
  preset, name = arg.split(',')
  if preset not in PRESETS or name not in ARCHITECTURES:
    raise ValueError(f'arena config {arg!r}: PRESET must be one of {", ".join(PRESETS)}, MODEL one of '
                     f'{", ".join(ARCHITECTURES)}')
  p = PRESETS[preset]
  seq_len, batch, lr, eval_batches = p['seq_len'], p['batch'], p['lr'], p['eval_batches']
  c = matched(preset, name)
  steps = max(1, round(p['steps'] * baseline(preset)[1] / model_of(c).flops_per_token(seq_len)))
  c.data.update(corpus='wikitext2', dir='../shared/data/wikitext-2', tokenizer='byte')
  c.train.update(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, min_lr_ratio=0.1,
                 warmup_steps=max(1, steps // 20), weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
                 log_every=max(1, steps // 20), eval_every=steps, eval_batches=eval_batches)
  c.checkpoint.every = steps
  c.wandb.mode = 'disabled'
  c.wandb.name = f'arena-{preset}-{name}'
  return c
