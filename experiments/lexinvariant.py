"""The lexinvariant paper's three findings at small scale, in one command:

  python -m experiments.lexinvariant --shape tiny [--stages train,curves,cipher,tasks] [--bpe]
                                     [--override key=value ...]

train   the standard (learned embeddings) and the lexinvariant (random tables) model on WikiText-2 and on
        Python source (the stdlib corpus), character level (`--bpe` adds the 8k BPE pair on WikiText-2);
        results/lexinvariant-<shape>.md holds their perplexity and bits per byte (one table draw).
curves  per-position perplexity, averaged over 4 table draws, smoothed: does the gap close with context?
cipher  freeze the WikiText-2 lexinvariant model, train a 2-layer MLP probe with a learned output
        embedding to name the true character at each position, then decode letter-substitution ciphers:
        precision of the key recovered by majority vote in each window, against the window's position.
tasks   LookUp ("A->2 C->4 G->5 C->" gives 4) and Permutation ("abcd->cadb efgh->gehf ijkl->" gives
        "kilj") with random symbols and no task training: accuracy of the greedy tokens, both models.
curves, cipher and tasks are probes of the trained runs: leaving `train` out of --stages runs them on the
runs already in the results. Everything lands in results/lexinvariant-<shape>.{json,md} and the plots
beside it.
"""

from __future__ import annotations

import argparse
import functools
import string

import numpy as np

from experiments import run as runner

CONFIG = 'experiments/configs/lexinvariant.py'
MODELS = ('learned', 'random')
LABELS = {'learned': 'standard', 'random': 'lexinvariant'}
SYMBOLS = string.ascii_letters + string.digits   # the random symbols of the synthetic tasks
CIPHER_ROW = 'wikitext2-char-random'
STAGES = ('train', 'curves', 'cipher', 'tasks')


def run_names(shape: str, bpe: bool) -> list[tuple[str, str]]:
  """(row name, config arg) of every training run."""
  pairs = [(corpus, 'char') for corpus in ('wikitext2', 'stdlib')] + ([('wikitext2', 'bpe')] if bpe else [])
  return [(f'{corpus}-{tok}-{model}', f'{shape},{corpus},{tok},{model}') for corpus, tok in pairs for model in MODELS]


def smooth(values: np.ndarray, width: int) -> np.ndarray:
  return np.convolve(values, np.ones(width) / width, mode='valid')


def per_position_nll(row: dict, batches: int) -> list[float]:
  """Mean NLL at each position of the window, averaged over 4 table draws."""
  return runner.evaluate(row['workdir'], max_batches=batches, options=['--per_position', '--draws', '4'])[
      'nll_by_position']


def hidden_states(setup, params, tokens, key):
  _, state = setup.model.apply({'params': params}, tokens, rngs=setup.model.stream_keys(key),
                               mutable=['intermediates'])
  return state['intermediates']['hidden'][0]


def cipher_precision(row: dict, probe_steps: int, window: int, batches: int) -> dict:
  """Key-recovery precision per window position on letter-substitution ciphers of validation text."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  setup, state = runner.load_run(row['workdir'])
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

  for step in range(probe_steps):   # plain training text: to the frozen model every text is a cipher
    tokens = jnp.asarray(setup.dataset.train_batch(step)['tokens'])
    probe_params, opt_state, loss = train_step(probe_params, opt_state, tokens, jax.random.key(10_000 + step))
  decode = jax.jit(lambda tokens, key: jnp.argmax(probe.apply(probe_params, hidden_states(setup, params, tokens, key)),
                                                  -1))
  letters = setup.dataset.tokenizer.encode_prompt(string.ascii_lowercase)
  if len(letters) != 26:
    raise SystemExit('the character vocabulary lacks some lowercase letter')
  rng = np.random.default_rng(0)
  correct = np.zeros(setup.config.train.seq_len // window)
  total = np.zeros_like(correct)
  plain_accuracy = []
  for i, batch in enumerate(setup.dataset.eval_batches('valid', batches)):
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
  return {'window': window, 'precision_by_window': (correct / np.maximum(total, 1)).tolist(),
          'probe_final_loss': float(loss), 'character_accuracy': float(np.mean(plain_accuracy)),
          'sequences': len(plain_accuracy), 'probe_steps': probe_steps}


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


def task_accuracy(row: dict, examples: int) -> dict:
  """Greedy accuracy per generated character over `examples` prompts of each task."""
  import jax
  import jax.numpy as jnp

  from models.formats import mask_padded_vocab
  setup, state = runner.load_run(row['workdir'])
  tokenizer = setup.dataset.tokenizer
  forward = jax.jit(lambda tokens, key: setup.model.apply({'params': state['params']}, tokens,
                                                          rngs=setup.model.stream_keys(key))[0])
  result = {'prompts': examples}
  for task in ('lookup', 'permutation'):
    hits = count = 0
    for i, (prompt, answer) in enumerate(task_prompts(task, np.random.default_rng(1), examples)):
      tokens = list(tokenizer.encode_prompt(prompt))
      key = jax.random.key(i)   # one table for the whole answer
      for expected in tokenizer.encode_prompt(answer):
        logits = mask_padded_vocab(forward(jnp.asarray([tokens]), key)[0, -1], setup.vocab_limit)
        token = int(jnp.argmax(logits))
        hits, count = hits + (token == expected), count + 1
        tokens.append(token)
    result[task] = hits / count
  return result


def corpus_groups(names) -> list[str]:
  """The corpus-tokenizer groups of row names (a group's rows differ in the model)."""
  return sorted({name.rsplit('-', 1)[0] for name in names})


def plot_per_position(rows: list[dict]):
  import matplotlib.pyplot as plt
  curves = runner.probed(rows, 'curves')
  groups = corpus_groups(curves)
  if not groups:
    return None
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
  for ax, group in zip(axes[0], groups):
    for model in (m for m in MODELS if f'{group}-{m}' in curves):
      nll = smooth(np.asarray(curves[f'{group}-{model}']), 16)
      ax.plot(np.arange(len(nll)) + 8, np.exp(nll), label=LABELS[model])
    ax.set(title=group, xlabel='position in context', ylabel='perplexity (16-token moving average)', yscale='log')
    ax.legend()
  return fig


def plot_cipher(rows: list[dict]):
  import matplotlib.pyplot as plt
  cipher = runner.probed(rows, 'cipher').get(CIPHER_ROW)
  if not cipher:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  precision, window = cipher['precision_by_window'], cipher['window']
  ax.plot([(w + 0.5) * window for w in range(len(precision))], precision, 'o-')
  ax.set(xlabel=f'window centre ({window}-character windows)', ylabel='precision of the recovered key',
         ylim=(0, 1), title='substitution-cipher decoding (lexinvariant, WikiText-2 chars)')
  return fig


def sections(rows: list[dict]) -> list[str]:
  lines = []
  curves = runner.probed(rows, 'curves')
  if curves:
    positions = [p for p in (0, 3, 15, 63, 127, 255, 511) if p < len(next(iter(curves.values())))]
    lines += ['## 1. Perplexity against position (mean over 4 table draws; the plot smooths over 16 positions)', '']
    lines += runner.table(['run', *(f'pos {p + 1}' for p in positions)],
                          [[n, *(f'{np.exp(nll[p]):.2f}' for p in positions)] for n, nll in curves.items()])
    for group in corpus_groups(curves):
      if not all(f'{group}-{m}' in curves for m in MODELS):
        continue
      last, first = ([np.exp(np.mean(curves[f'{group}-{m}'][span])) for m in MODELS]
                     for span in (slice(-32, None), slice(None, 8)))
      lines.append(f'\n{group}: lexinvariant/standard perplexity ratio {first[1] / first[0]:.2f} over the first 8 '
                   f'positions, {last[1] / last[0]:.2f} over the last 32.')
    lines.append('')
  cipher = runner.probed(rows, 'cipher').get(CIPHER_ROW)
  if cipher:
    precision = cipher['precision_by_window']
    lines += ['## 2. Substitution-cipher probe (WikiText-2 chars, lexinvariant model frozen)', '',
              f'Probe: 2-layer MLP (d -> 4d -> d) with a learned output embedding, {cipher["probe_steps"]} Adam steps '
              f'on plain training text (final loss {cipher["probe_final_loss"]:.3f}). Test: {cipher["sequences"]} '
              'validation windows, lowercase letters permuted by a fresh key per sequence; per-character accuracy of '
              f'the probe {cipher["character_accuracy"]:.3f}. Key precision by majority vote within each '
              f'{cipher["window"]}-character window:', '',
              *runner.table(['window', *(str(i + 1) for i in range(len(precision)))],
                            [['precision', *(f'{p:.3f}' for p in precision)]]),
              '']
  tasks = runner.probed(rows, 'tasks')
  if tasks:
    lines += [f'## 3. In-context tasks with random symbols ({next(iter(tasks.values()))["prompts"]} prompts each, '
              'greedy, accuracy per generated character)', '']
    lines += runner.table(['run', 'LookUp', 'Permutation'],
                          [[name, *(f'{t[task]:.3f}' for task in ('lookup', 'permutation'))]
                           for name, t in tasks.items()])
  return lines


def declare(args) -> runner.Experiment:
  rows = []
  for row, arg in run_names(args.shape, args.bpe):
    probes = {'curves': functools.partial(per_position_nll, batches=args.curve_batches)}
    if row == CIPHER_ROW:
      probes['cipher'] = functools.partial(cipher_precision, probe_steps=args.probe_steps, window=args.cipher_window,
                                           batches=args.cipher_batches)
    if '-char-' in row:
      probes['tasks'] = functools.partial(task_accuracy, examples=args.task_examples)
    rows.append(runner.Row(row, f'{CONFIG}:{arg}', probes=probes))
  description = ('`learned` is the standard model, `random` the lexinvariant one; both share the decoder (pre-LN, T5 '
                 'relative position bias, no absolute positions). Perplexity is per character (per BPE token for bpe '
                 'rows) with one table draw.')
  return runner.Experiment(f'lexinvariant-{args.shape}', rows, description=description, eval_batches=args.eval_batches,
                           sections=sections,
                           plots={'': runner.plot_curves, '-curves': plot_per_position, '-cipher': plot_cipher})


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', default='tiny')
  parser.add_argument('--stages', default=','.join(STAGES))
  parser.add_argument('--bpe', action='store_true', help='also the 8k BPE pair on WikiText-2')
  parser.add_argument('--eval_batches', type=int, default=100, help='batches of each split for the table')
  parser.add_argument('--curve_batches', type=int, default=60)
  parser.add_argument('--probe_steps', type=int, default=1000)
  parser.add_argument('--cipher_window', type=int, default=32)
  parser.add_argument('--cipher_batches', type=int, default=4)
  parser.add_argument('--task_examples', type=int, default=300)
  runner.add_arguments(parser)
  args = parser.parse_args()
  stages = [s for s in args.stages.split(',') if s]
  if set(stages) - set(STAGES):
    parser.error(f'unknown stage {sorted(set(stages) - set(STAGES))[0]!r} (stages: {", ".join(STAGES)})')
  runner.run_experiment(declare(args), runs=args.runs, results=args.results, train='train' in stages,
                        probes=set(stages) - {'train'}, overrides=args.override)


if __name__ == '__main__':
  main()
