"""Grassmann LM against its size-matched Transformer on WikiText-2 (paper Tables 1 and 2).

  --config experiments/configs/grassmann_wikitext2.py:SHAPE,MODEL,TOKENIZER
    SHAPE      tiny (CPU minutes: d=128, 4 layers, r=16, L=128) | paper6 (6 layers, L=128, batch 32)
               | paper12 (12 layers, L=256, batch 16, the per-layer offset schedule)
    MODEL      grassmann | transformer (4 heads, same width, FFN, learned positions, tying, post-LN)
    TOKENIZER  wordpiece (30,522 entries trained on the train split; tiny: 8,192) | word (33,278 types)

The paper trains 30 epochs and reports the best validation perplexity (evaluated every epoch here).
AdamW lr 1e-3 with cosine decay, dropout 0.1, weight decay 0.01 (the reproduction that matched the
paper's Transformer); the paper's own optimizer settings are not published.
Example (one row of the tiny table):
  python -m experiments.run --name grassmann-tiny \\
      --configs experiments/configs/grassmann_wikitext2.py:tiny,grassmann,wordpiece
"""

from train.config import default_config

TRAIN_TOKENS = 2_088_628   # WikiText-2 train split, word level; the WordPiece split is of similar size


def get_config(arg='tiny,grassmann,wordpiece'):
  shape, model, tokenizer = arg.split(',')
  c = default_config(model)
  depth, length, batch, epochs = {'tiny': (4, 128, 16, 1), 'paper6': (6, 128, 32, 30), 'paper12': (12, 256, 16, 30)}[shape]
  width, rank = (128, 16) if shape == 'tiny' else (256, 32)
  c.model.update(d_model=width, num_layers=depth, d_ff=4 * width, max_len=length, dropout=0.1)
  if model == 'grassmann':
    c.model.rank = rank
    if shape == 'paper12':
      c.model.update(offsets=(1, 1, 2, 2, 4, 4, 8, 8, 12, 12, 16, 16), schedule='per_layer')
  else:
    c.model.update(num_heads=4, prenorm=False)
  vocab = 8192 if shape == 'tiny' else 30522
  c.data.update(corpus='wikitext2', dir='../shared/data/wikitext-2', tokenizer=tokenizer,
                vocab_size=vocab if tokenizer == 'wordpiece' else 0)
  steps_per_epoch = TRAIN_TOKENS // (batch * length)
  c.train.update(steps=epochs * steps_per_epoch, batch_size=batch, seq_len=length, lr=1e-3, warmup_steps=100,
                 weight_decay=0.01, grad_clip=0.0 if shape != 'tiny' else 1.0, log_every=50,
                 eval_every=steps_per_epoch, eval_batches=0)
  c.checkpoint.every = steps_per_epoch
  c.wandb.mode = 'disabled'
  c.wandb.name = f'{shape}-{model}-{tokenizer}'
  return c
