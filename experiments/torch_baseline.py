"""The baseline Transformer's training step in plain PyTorch, timed the way experiments.bench times ours,
and set beside our figures from results/<bench>.csv.

  pip install torch==2.13.0      # not a dependency of the project: only this comparison needs it
  python -m experiments.torch_baseline [--size tiny] [--seq_lens 128,512,2048] [--tokens_per_step 8192]
      [--bench bench-cpu] [--compile]

The model is the `transformer` of the arena at that size, written out in PyTorch: learned positions,
pre-LayerNorm (eps 1e-5), q/k/v/out projections and a GELU (exact) MLP with biases, final LayerNorm,
readout tied to the embedding; `scaled_dot_product_attention` with the causal flag (PyTorch's fused
kernel). The step is ours too: float32, cross-entropy, global-norm clipping at 1.0, AdamW (0.9, 0.95)
with weight decay on matrices only. Eager mode by default ("plain PyTorch"); --compile adds
torch.compile. Same protocol as the benchmark: two warm-up steps, then the median of `repeats` runs of
`steps_per_repeat` steps. PyTorch uses every host core (torch.set_num_threads(os.cpu_count())).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time

from experiments.configs import arena as arena_config


def build(vocab: int, d: int, depth: int, heads: int, d_ff: int, max_len: int):
  import torch
  from torch import nn
  from torch.nn import functional as F

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
      self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
      x = x + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
      return x + self.down(F.gelu(self.up(self.norm2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
      self.blocks = nn.ModuleList(Block() for _ in range(depth))
      self.final_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, tokens):
      x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
      for block in self.blocks:
        x = block(x)
      return self.final_norm(x) @ self.embed.weight.T

  return GPT()


def measure(size: str, seq_len: int, tokens_per_step: int, repeats: int, steps_per_repeat: int,
            compile_: bool) -> dict:
  import torch
  from torch.nn import functional as F
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  shape = {**arena_config.shape_of(size), 'seq_len': seq_len}
  d, depth, heads = shape['d_model'], shape['depth'], shape['heads']
  config = arena_config.shaped('transformer', **shape)
  vocab = arena_config.vocab_of(config)
  model = build(vocab, d, depth, heads, config.model.d_ff, seq_len)
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, 'weight_decay': 0.0}],
                                lr=1e-3, betas=(0.9, 0.95))
  batch = max(1, tokens_per_step // seq_len)
  tokens = torch.randint(0, vocab, (batch, seq_len + 1))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs).reshape(-1, vocab), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss

  if compile_:
    step = torch.compile(step)
  for _ in range(2):
    step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps_per_repeat):
      loss = step()
    loss.item()
    times.append((time.perf_counter() - start) / steps_per_repeat)
  return {'seq_len': seq_len, 'batch': batch, 'params': sum(p.numel() for p in model.parameters()),
          'tokens_per_sec': batch * seq_len / statistics.median(times)}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--size', default='tiny', choices=sorted(arena_config.PRESETS))
  parser.add_argument('--seq_lens', default='128,512,2048')
  parser.add_argument('--tokens_per_step', type=int, default=8192)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--steps_per_repeat', type=int, default=3)
  parser.add_argument('--compile', action='store_true', help='also time torch.compile')
  parser.add_argument('--bench', default='bench-cpu', help='results/<bench>.csv with our transformer rows')
  parser.add_argument('--results', default='results')
  args = parser.parse_args()
  import sys

  import torch

  from experiments import run
  ours = {}
  bench_path = os.path.join(args.results, f'{args.bench}.csv')
  if os.path.exists(bench_path):
    for r in csv.DictReader(open(bench_path)):
      if r['model'] == 'transformer' and r['size'] == args.size and r['status'] == 'ok':
        ours[int(r['seq_len'])] = (float(r['tokens_per_sec']), int(r['batch']), r['commit'])
  rows = []
  for seq_len in map(int, args.seq_lens.split(',')):
    eager = measure(args.size, seq_len, args.tokens_per_step, args.repeats, args.steps_per_repeat, False)
    compiled = (measure(args.size, seq_len, args.tokens_per_step, args.repeats, args.steps_per_repeat, True)
                if args.compile else None)
    jax_tps = ours.get(seq_len, (None,))[0]
    rows.append([seq_len, eager['batch'], eager['params'], eager['tokens_per_sec'],
                 compiled and compiled['tokens_per_sec'], jax_tps,
                 jax_tps and jax_tps / eager['tokens_per_sec'], ours.get(seq_len, (0, 0, None))[2]])
    print(rows[-1], flush=True)
  header = ['seq_len', 'batch', 'torch_params', 'torch_eager_tokens_per_sec', 'torch_compile_tokens_per_sec',
            'jax_tokens_per_sec', 'jax_over_torch_eager', 'jax_commit']
  hardware = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}'
  text = '\n'.join([
      f'# Baseline Transformer: our JAX train step against plain PyTorch ({args.size})', '',
      __doc__.split('\n\n')[2].replace('\n', ' '), '',
      f'Command: `python -m experiments.torch_baseline {" ".join(sys.argv[1:])}` (JAX figures: results/{args.bench}.csv, '
      f'its own command and commit)  ', f'Commit: {run.git_commit()}  ', f'Hardware: {hardware}  ',
      f'Date: {datetime.date.today().isoformat()}', '', *run.table(header, rows), ''])
  path = os.path.join(args.results, f'torch-baseline-{args.bench.removeprefix("bench-")}.md')
  with open(path, 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
