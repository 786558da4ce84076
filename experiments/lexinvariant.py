"""The lexinvariant paper's three findings at small scale, in one command:

  python -m experiments.lexinvariant --shape tiny [--stages train,curves,cipher,tasks] [--bpe]

train   the standard (learned embeddings) and the lexinvariant (random tables) model on WikiText-2 and on
        Python source (the stdlib corpus), character level (`--bpe` adds the 8k BPE pair on WikiText-2);
        results/lexinvariant-<shape>.md holds their perplexity and bits per byte (one table draw).
curves  per-position perplexity, averaged over 4 table draws, smoothed: does the gap close with context?
cipher  freeze the WikiText-2 lexinvariant model, train a 2-layer MLP probe with a learned output
        embedding to name the true character at each position, then decode letter-substitution ciphers:
        precision of the key recovered by majority vote in each window, against the window's position.
tasks   LookUp ("A->2 C->4 G->5 C->" gives 4) and Permutation ("abcd->cadb efgh->gehf ijkl->" gives
        "kilj") with random symbols and no task training: accuracy of the greedy tokens, both models.
Everything lands in results/lexinvariant-<shape>.{json,md} and the plots beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys

import numpy as np

from experiments import run as runner

CONFIG = 'experiments/configs/lexinvariant.py'
MODELS = ('learned', 'random')
SYMBOLS = string.ascii_letters + string.digits   # the random symbols of the synthetic tasks


def run_names(shape: str, bpe: bool) -> list[tuple[str, str]]:
  """(row name, config arg) of every training run."""
  pairs = [(corpus, 'char') for corpus in ('wikitext2', 'stdlib')] + ([('wikitext2', 'bpe')] if bpe else [])
  return [(f'{corpus}-{tok}-{model}', f'{shape},{corpus},{tok},{model}') for corpus, tok in pairs for model in MODELS]


def smooth(values: np.ndarray, width: int) -> np.ndarray:
  return np.convolve(values, np.ones(width) / width, mode='valid')


def stage_curves(rows: dict, workdir, args) -> dict:
  """Per-position NLL (mean over `--draws` tables) of every run, and the plot."""
  curves = {}
  for name in rows:
    out = runner.run([sys.executable, '-m', 'train.evaluate', '--workdir', workdir(name), '--per_position',
                      '--draws', '4', '--max_batches', str(args.curve_batches)])
    curves[name] = json.loads(out.strip().splitlines()[-1])['nll_by_position']
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  groups = sorted({name.rsplit('-', 1)[0] for name in curves})
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
  for ax, group in zip(axes[0], groups):
    for model in MODELS:
      if f'{group}-{model}' in curves:
        nll = np.asarray(curves[f'{group}-{model}'])
        ax.plot(np.arange(len(smooth(nll, 16))) + 8, np.exp(smooth(nll, 16)),
                label={'learned': 'standard', 'random': 'lexinvariant'}[model])
    ax.set(title=group, xlabel='position in context', ylabel='perplexity (16-token moving average)', yscale='log')
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.results, f'lexinvariant-{args.shape}-curves.png'), dpi=120)
  return curves


def load(workdir: str):
  from train import config as config_lib, restore
  return restore.load_run(config_lib.load_workdir_config(workdir), workdir)


def hidden_states(setup, params, tokens, key):
  _, state = setup.model.apply({'params': params}, tokens, rngs=setup.model.stream_keys(key),
                               mutable=['intermediates'])
  return state['intermediates']['hidden'][0]


def stage_cipher(workdir: str, args) -> dict:
  """Key-recovery precision per window position on letter-substitution ciphers of validation text."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  setup, state = load(workdir)
  params, d, vocab = state['params'], setup.model.d_model, setup.model.vocab_size

  class Probe(nn.Module):
    @nn.compact
    def __call__(self, h):
      h = nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(h)))
      return h @ self.param('output_embedding', nn.initializers.normal(0.02), (vocab, d)).T

  probe = Probe()
  probe_params = probe.init(jax.random.key(0), jnp.zeros((1, d)))
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(probe_params)

  @jax.jit
  def train_step(probe_params, opt_state, tokens, key):
    h = jax.lax.stop_gradient(hidden_states(setup, params, tokens, key))
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(probe.apply(p, h), tokens).mean()
    loss, grads = jax.value_and_grad(loss_fn)(probe_params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(probe_params, updates), opt_state, loss

  for step in range(args.probe_steps):   # plain training text: to the frozen model every text is a cipher
    tokens = jnp.asarray(setup.dataset.train_batch(step)['tokens'])
    probe_params, opt_state, loss = train_step(probe_params, opt_state, tokens, jax.random.key(10_000 + step))
  decode = jax.jit(lambda tokens, key: jnp.argmax(probe.apply(probe_params, hidden_states(setup, params, tokens, key)),
                                                  -1))
  letters = setup.dataset.tokenizer.encode_prompt(string.ascii_lowercase)
  if len(letters) != 26:
    raise SystemExit('the character vocabulary lacks some lowercase letter')
  window, rng = args.cipher_window, np.random.default_rng(0)
  correct = np.zeros(setup.config.train.seq_len // window)
  total = np.zeros_like(correct)
  plain_accuracy = []
  for i, batch in enumerate(setup.dataset.eval_batches('valid', args.cipher_batches)):
    plain = batch['tokens']
    cipher = plain.copy()
    for row in range(len(plain)):   # a fresh key per sequence: letter -> letter
      key_map = np.arange(vocab)
      key_map[letters] = rng.permutation(letters)
      cipher[row] = key_map[plain[row]]
      decoded = np.asarray(decode(jnp.asarray(cipher[row:row + 1]), jax.random.key(i * 1000 + row)))[0]
      plain_accuracy.append(np.mean(decoded == plain[row]))
      for w in range(len(correct)):
        span = slice(w * window, (w + 1) * window)
        for symbol in set(cipher[row, span]) & set(letters.tolist()):
          where = cipher[row, span] == symbol
          vote = np.bincount(decoded[span][where], minlength=vocab).argmax()
          correct[w] += vote == plain[row, span][where][0]
          total[w] += 1
  precision = (correct / np.maximum(total, 1)).tolist()
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([(w + 0.5) * window for w in range(len(precision))], precision, 'o-')
  ax.set(xlabel=f'window centre ({window}-character windows)', ylabel='precision of the recovered key',
         ylim=(0, 1), title='substitution-cipher decoding (lexinvariant, WikiText-2 chars)')
  fig.tight_layout()
  fig.savefig(os.path.join(args.results, f'lexinvariant-{args.shape}-cipher.png'), dpi=120)
  return {'window': window, 'precision_by_window': precision, 'probe_final_loss': float(loss),
          'character_accuracy': float(np.mean(plain_accuracy)), 'sequences': len(plain_accuracy),
          'probe_steps': args.probe_steps}


def task_prompts(task: str, rng, n: int) -> list[tuple[str, str]]:
  """(prompt, answer) pairs over random distinct symbols."""
  out = []
  for _ in range(n):
    if task == 'lookup':
      keys = rng.choice(list(SYMBOLS), 6, replace=False)
      values = rng.choice(list(SYMBOLS), 6)
      query = rng.integers(6)
      prompt = ' '.join(f'{k}->{v}' for k, v in zip(keys, values)) + f' {keys[query]}->'
      out.append((prompt, values[query]))
    else:
      order = rng.permutation(4)
      words = [''.join(rng.choice(list(SYMBOLS), 4, replace=False)) for _ in range(4)]
      shown = [f'{w}->{"".join(w[j] for j in order)}' for w in words[:3]]
      out.append((' '.join(shown) + f' {words[3]}->', ''.join(words[3][j] for j in order)))
  return out


def stage_tasks(workdirs: dict, args) -> dict:
  """Greedy accuracy per generated character, over `--task_examples` prompts of each task."""
  import jax
  import jax.numpy as jnp

  from models.formats import mask_padded_vocab
  results = {}
  for name, workdir in workdirs.items():
    setup, state = load(workdir)
    tokenizer = setup.dataset.tokenizer
    forward = jax.jit(lambda tokens, key: setup.model.apply({'params': state['params']}, tokens,
                                                            rngs=setup.model.stream_keys(key))[0])
    for task in ('lookup', 'permutation'):
      hits = count = 0
      for i, (prompt, answer) in enumerate(task_prompts(task, np.random.default_rng(1), args.task_examples)):
        tokens = list(tokenizer.encode_prompt(prompt))
        target = tokenizer.encode_prompt(answer)
        key = jax.random.key(i)   # one table for the whole answer
        for expected in target:
          logits = mask_padded_vocab(forward(jnp.asarray([tokens]), key)[0, -1], setup.vocab_limit)
          token = int(jnp.argmax(logits))
          hits, count = hits + (token == expected), count + 1
          tokens.append(token)
      results[f'{name}/{task}'] = hits / count
  return results


def render(report: dict, args) -> str:
  lines = [f'# lexinvariant-{args.shape}', '',
           'Produced by `python -m experiments.lexinvariant --shape ' + args.shape + '` (rows below give each training '
           'command). `learned` is the standard model, `random` the lexinvariant one; both share the decoder '
           '(pre-LN, T5 relative position bias, no absolute positions). Perplexity is per character (per BPE token '
           f'for bpe rows) with one table draw, on the first {args.eval_batches} batches of each split (0 = all); '
           'bits per byte are comparable across tokenizers.', '',
           '| run | params | steps | valid ppl | test ppl | valid bpb | test bpb | tokens/sec |',
           '|---|---|---|---|---|---|---|---|']
  for name, r in report['rows'].items():
    lines.append(f'| {name} | {r["params"]:,} | {r["steps"]} | {r["valid_ppl"]:.3f} | {r["test_ppl"]:.3f} | '
                 f'{r["valid_bpb"]:.3f} | {r["test_bpb"]:.3f} | {r["tokens_per_sec"]:,.0f} |')
  if report.get('curves'):
    positions = [p for p in (0, 3, 15, 63, 127, 255, 511) if p < len(next(iter(report['curves'].values())))]
    lines += ['', '## 1. Perplexity against position (mean over 4 table draws; the plot smooths over 16 positions)',
              '', '| run | ' + ' | '.join(f'pos {p + 1}' for p in positions) + ' |',
              '|---|' + '---|' * len(positions)]
    for name, nll in report['curves'].items():
      lines.append(f'| {name} | ' + ' | '.join(f'{np.exp(nll[p]):.2f}' for p in positions) + ' |')
    for group in sorted({n.rsplit('-', 1)[0] for n in report['curves']}):
      if not all(f'{group}-{m}' in report['curves'] for m in MODELS):
        continue
      std, li = (np.exp(np.mean(report['curves'][f'{group}-{m}'][-32:])) for m in MODELS)
      first = [np.exp(np.mean(report['curves'][f'{group}-{m}'][:8])) for m in MODELS]
      lines.append(f'\n{group}: lexinvariant/standard perplexity ratio {first[1] / first[0]:.2f} over the first 8 '
                   f'positions, {li / std:.2f} over the last 32.')
    lines += ['', f'![per-position perplexity](lexinvariant-{args.shape}-curves.png)']
  if report.get('cipher'):
    c = report['cipher']
    lines += ['', '## 2. Substitution-cipher probe (WikiText-2 chars, lexinvariant model frozen)', '',
              f'Probe: 2-layer MLP (d -> 4d -> d) with a learned output embedding, {c["probe_steps"]} Adam steps on '
              f'plain training text (final loss {c["probe_final_loss"]:.3f}). Test: {c["sequences"]} validation '
              f'windows, lowercase letters permuted by a fresh key per sequence; per-character accuracy of the probe '
              f'{c["character_accuracy"]:.3f}. Key precision by majority vote within each {c["window"]}-character '
              'window:', '', '| window | ' + ' | '.join(str(i + 1) for i in range(len(c['precision_by_window']))) + ' |',
              '|---|' + '---|' * len(c['precision_by_window']),
              '| precision | ' + ' | '.join(f'{p:.3f}' for p in c['precision_by_window']) + ' |', '',
              f'![cipher](lexinvariant-{args.shape}-cipher.png)']
  if report.get('tasks'):
    lines += ['', f'## 3. In-context tasks with random symbols ({args.task_examples} prompts each, greedy, '
              'accuracy per generated character)', '', '| run | LookUp | Permutation |', '|---|---|---|']
    for name in report['rows']:
      if f'{name}/lookup' in report['tasks']:
        lines.append(f'| {name} | {report["tasks"][f"{name}/lookup"]:.3f} | {report["tasks"][f"{name}/permutation"]:.3f} |')
  lines += ['', '## Runs', '', '| run | command | commit | hardware | date |', '|---|---|---|---|---|']
  for name, r in report['rows'].items():
    lines.append(f'| {name} | `{r["command"]}` | {r["commit"]} | {r["hardware"]} | {r["date"]} |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', default='tiny')
  parser.add_argument('--stages', default='train,curves,cipher,tasks')
  parser.add_argument('--bpe', action='store_true', help='also the 8k BPE pair on WikiText-2')
  parser.add_argument('--eval_batches', type=int, default=100, help='batches of each split for the table')
  parser.add_argument('--curve_batches', type=int, default=60)
  parser.add_argument('--probe_steps', type=int, default=1000)
  parser.add_argument('--cipher_window', type=int, default=32)
  parser.add_argument('--cipher_batches', type=int, default=4)
  parser.add_argument('--task_examples', type=int, default=300)
  parser.add_argument('--override', nargs='*', default=[], help='key=value for every training run')
  parser.add_argument('--runs', default='runs')
  parser.add_argument('--results', default='results')
  args = parser.parse_args()
  os.makedirs(args.results, exist_ok=True)
  path = os.path.join(args.results, f'lexinvariant-{args.shape}.json')
  report = json.load(open(path)) if os.path.exists(path) else {'rows': {}}
  workdir = lambda name: os.path.join(args.runs, f'lexinvariant-{args.shape}', name)
  stages = args.stages.split(',')

  def save():
    with open(path, 'w') as f:
      json.dump(report, f, indent=1)
    with open(os.path.join(args.results, f'lexinvariant-{args.shape}.md'), 'w') as f:
      f.write(render(report, args))

  if 'train' in stages:
    for name, arg in run_names(args.shape, args.bpe):
      report['rows'][name] = runner.train_and_evaluate(f'{CONFIG}:{arg}', workdir(name), args.override, name=name,
                                                       max_batches=args.eval_batches)
      save()
  if 'curves' in stages:
    report['curves'] = stage_curves(report['rows'], workdir, args)
    save()
  if 'cipher' in stages:
    report['cipher'] = stage_cipher(workdir('wikitext2-char-random'), args)
    save()
  if 'tasks' in stages:
    report['tasks'] = stage_tasks({n: workdir(n) for n in report['rows'] if '-char-' in n}, args)
    save()
  print(open(os.path.join(args.results, f'lexinvariant-{args.shape}.md')).read())


if __name__ == '__main__':
  main()
