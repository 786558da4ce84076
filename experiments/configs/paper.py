"""Every architecture at its paper's main shape, with the paper's window, global batch, token budget and
optimiser, for an accelerator slice: the shapes of results/tpu-aot.md.

  python -m train.aot --config experiments/configs/paper.py:NAME --topology v5e:4x4 [--config.train.grad_accum=K]
  python -m train --config experiments/configs/paper.py:NAME --workdir DIR --config.data.corpus=... --config.data.dir=...

NAME is a registered model with a `paper` preset (`LanguageModel.presets['paper']`, which cites its spec).
The mesh is FSDP over every chip (mesh.fsdp=-1); `train.grad_accum` keeps the per-chip micro-batch small
enough to fit, and depends on the slice (results/tpu-aot.md gives the value used for each row). The
tokenizers are trained locally at the paper's vocabulary size (GPT-2's 50,257 padded to 50,304, SmolLM's
49,152, BERT's WordPiece 30,522); the corpus defaults to the embedded one and is the user's to set.
"""

from __future__ import annotations

import models
from train.config import default_config

# name -> data, train and the run's total tokens (bytes for byte-level models), from the spec named in the preset.
RUNS = {
    # GPT-2 small at TokenFormer's 124M budget (Table 7: 60B tokens)
    'transformer': dict(tokenizer='bpe', vocab_size=50304, seq_len=1024, batch_size=512, tokens=60e9,
                        lr=6e-4, warmup_steps=2000),
    # the 354M stage, 30B tokens (Table 6)
    'tokenformer': dict(tokenizer='bpe', vocab_size=50304, seq_len=1024, batch_size=512, tokens=30e9,
                        lr=6e-4, warmup_steps=2000),
    # Table 2's 12-layer model: 30 epochs of WikiText-2 (2.42M WordPiece tokens an epoch)
    'grassmann': dict(tokenizer='wordpiece', vocab_size=30522, seq_len=256, batch_size=16, tokens=72.6e6,
                      lr=1e-3, warmup_steps=0, weight_decay=0.01, grad_clip=0.0),
    # 360M, N_r = 3: 14,161 steps of 1,024 x 2,048 tokens, trapezoid schedule
    'mor': dict(tokenizer='bpe', vocab_size=49152, seq_len=2048, batch_size=1024, tokens=29.7e9,
                lr=3e-3, warmup_steps=86, schedule='wsd', decay_fraction=0.2),
    'llama': dict(tokenizer='bpe', vocab_size=49152, seq_len=2048, batch_size=1024, tokens=19.8e9,
                  lr=3e-3, warmup_steps=86, schedule='wsd', decay_fraction=0.2),
    # HAT 1B: 72k steps of 1,024 windows of 16,384 bytes
    'hat': dict(tokenizer='byte', seq_len=16384, batch_size=1024, tokens=1.208e12, lr=5.3e-4, warmup_steps=500),
    # MrT5 continued pre-training: 5,000 steps of 1,024 x 1,024 bytes at δ = 0.5
    'mrt5': dict(tokenizer='byte', seq_len=1024, batch_size=1024, tokens=5.24e9, lr=1e-4, warmup_steps=0,
                 schedule='wsd', decay_fraction=1.0),
    # PG-19: 240k steps of 128 windows of 500 tokens (+ 10 landmarks)
    'landmark': dict(tokenizer='bpe', vocab_size=50304, seq_len=500, batch_size=128, tokens=15.4e9,
                     lr=2e-3, warmup_steps=4800, weight_decay=1e-3, min_lr_ratio=0.2),
    # 250k steps of 64 x 512 characters (ASCII)
    'lexinvariant': dict(tokenizer='char', vocab_size=128, seq_len=512, batch_size=64, tokens=8.19e9,
                         lr=1e-2, warmup_steps=1000),
}

DATA_KEYS = ('tokenizer', 'vocab_size')


def get_config(name='transformer'):
  run = dict(RUNS[name])
  c = default_config(name)
  c.model.update(**models.model_class(name).presets['paper'])
  if 'scan_layers' in c.model and c.model.get('schedule', 'all') == 'all':
    c.model.scan_layers = True   # one compiled layer: compile time independent of depth
  c.data.update(**{k: run.pop(k) for k in DATA_KEYS if k in run})
  tokens = run.pop('tokens')
  c.train.update(**run, steps=round(tokens / (run['batch_size'] * run['seq_len'])), log_every=100,
                 eval_every=2000, eval_batches=50)
  c.checkpoint.every = 2000
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
