"""Lexinvariant LMs against the standard model with the same decoder (paper §3, at small scale).

  --config experiments/configs/lexinvariant.py:SHAPE,CORPUS,TOKENIZER,MODEL
    SHAPE      tiny (CPU: d=128, 4 layers, seq 256, batch 16, 800 steps)
               | tiny-long (tiny at 1,600 steps: the lexinvariant model learns in-context decoding slowly)
               | small (accelerator, the spec's §4.5: d=256, 6 layers, seq 512, batch 64, 10k steps)
    CORPUS     wikitext2 | stdlib (Python source: the "code" corpus)
    TOKENIZER  char (the 128 most frequent characters, the paper's ASCII-128 in spirit) | bpe (8,192 entries)
    MODEL      random (lexinvariant) | learned (standard)
               | regularised (learned; a normal LM on its windows permuted with p = 0.2, targets included: App. G)

Both models share the decoder: pre-LN blocks, GELU MLP, T5 relative position bias (32 buckets, max
distance 128), no absolute positions. AdamW with cosine decay instead of the paper's Adafactor.
"""

from train.config import default_config

SHAPES = {
    'tiny': dict(d_model=128, depth=4, heads=4, seq_len=256, batch=16, steps=800),
    'tiny-long': dict(d_model=128, depth=4, heads=4, seq_len=256, batch=16, steps=1600),
    'small': dict(d_model=256, depth=6, heads=4, seq_len=512, batch=64, steps=10000),
}


def get_config(arg='tiny,wikitext2,char,random'):
  shape, corpus, tokenizer, model = arg.split(',')
  d, depth, heads, seq_len, batch, steps = (SHAPES[shape][key] for key in ('d_model', 'depth', 'heads', 'seq_len', 'batch', 'steps'))
  c = default_config('lexinvariant')
  c.model.update(d_model=d, num_layers=depth, num_heads=heads, d_ff=4 * d, max_len=seq_len,
                 embedding='random' if model == 'random' else 'learned',
                 permute_prob=0.2 if model == 'regularised' else 0.0)
  c.data.update(corpus=corpus, dir='../shared/data/wikitext-2' if corpus == 'wikitext2' else '', tokenizer=tokenizer,
                vocab_size=128 if tokenizer == 'char' else 8192)
  c.train.update(steps=steps, batch_size=batch, seq_len=seq_len, lr=2e-3 if shape.startswith('tiny') else 1e-3,
                 warmup_steps=steps // 20, weight_decay=0.1, grad_clip=1.0, log_every=50, eval_every=steps // 3,
                 eval_batches=40)
  c.checkpoint.every = steps // 3
  c.wandb.mode = 'disabled'
  c.wandb.name = f'lexinvariant-{arg.replace(",", "-")}'
  return c
