"""The lexinvariant paper's three findings at small scale, in one command:

  python -m experiments.lexinvariant --shape tiny [--stages train,curves,ciphered,cipher,tasks] [--bpe]
                                     [--rows ROW,...] [--override key=value ...]

train     the standard (learned embeddings) and the lexinvariant (random tables) model on WikiText-2 and on
          Python source (the stdlib corpus), character level (`--bpe` adds the 8k BPE pair on WikiText-2);
          results/lexinvariant-<shape>.md holds their perplexity and bits per byte (one table draw).
curves    per-position perplexity, averaged over 4 table draws, smoothed: does the gap close with context?
ciphered  the same on validation text under a fresh substitution cipher of the lowercase letters per
          sequence: to the standard model it is text it never saw, to the lexinvariant model plain text
          again. Its loss should fall with context while the standard model's stays high.
cipher    freeze the WikiText-2 lexinvariant model, train a 2-layer MLP probe with a learned output
          embedding to name the true character at each position, then decode letter-substitution ciphers:
          precision of the key recovered by majority vote in each window, against the window's position.
tasks     LookUp ("A->2 C->4 G->5 C->" gives 4) and Permutation ("abcd->cadb efgh->gehf ijkl->" gives
          "kilj") with random symbols and no task training: accuracy of the greedy tokens, both models.
The probes read the trained runs: leaving `train` out of --stages runs them on the runs already in the
results. Everything lands in results/lexinvariant-<shape>.{json,md} and the plots beside it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import string

import numpy as np

from experiments import run as runner

CONFIG = 'experiments/configs/lexinvariant.py'
MODELS = ('learned', 'random')
LABELS = {'learned': 'standard', 'random': 'lexinvariant'}
COLORS = {'learned': 'C0', 'random': 'C1'}
POSITIONS = (0, 3, 15, 63, 127, 255, 511)   # the positions (0-based) the tables show
SYMBOLS = string.ascii_letters + string.digits   # the random symbols of the synthetic tasks
CIPHER_ROW = 'wikitext2-char-random'
STAGES = ('train', 'curves', 'ciphered', 'cipher', 'tasks')
TABLE_DRAWS = 4   # random tables averaged over by the per-position probes


def run_names(shape: str, bpe: bool) -> list[tuple[str, str]]:
  """(row name, config arg) of every training run."""
  pairs = [(corpus, 'char') for corpus in ('wikitext2', 'stdlib')] + ([('wikitext2', 'bpe')] if bpe else [])
  return [(f'{corpus}-{tok}-{model}', f'{shape},{corpus},{tok},{model}') for corpus, tok in pairs for model in MODELS]


def smooth(values: np.ndarray, width: int) -> np.ndarray:
  return np.convolve(values, np.ones(width) / width, mode='valid')


def per_position_nll(row: dict, batches: int) -> list[float]:
  """Mean NLL at each position of the window, averaged over TABLE_DRAWS table draws."""
  return runner.evaluate(row['workdir'], max_batches=batches, options=['--per_position', '--draws', str(TABLE_DRAWS)])[
      'nll_by_position']


def lowercase_ids(tokenizer) -> np.ndarray:
  letters = np.asarray(tokenizer.encode_prompt(string.ascii_lowercase))
  if len(letters) != 26:
    raise SystemExit('the character vocabulary lacks some lowercase letter')
  return letters


def letter_cipher(rng, vocab: int, letters: np.ndarray) -> np.ndarray:
  """A random substitution cipher of `letters` as a map of every id (the other ids map to themselves)."""
  key_map = np.arange(vocab)
  key_map[letters] = rng.permutation(letters)
  return key_map


def encipher(batch: dict, index: int, *, letters: np.ndarray, vocab: int) -> dict:
  """An 'lm' batch with a fresh cipher of `letters` per sequence (targets ciphered with their inputs), a fixed
  function of the batch index, so every model meets the same text."""
  rng = np.random.default_rng(index)
  keys = np.stack([letter_cipher(rng, vocab, letters) for _ in batch['tokens']])
  cipher = lambda ids: np.take_along_axis(keys, ids, axis=1)
  return {**batch, 'tokens': cipher(batch['tokens']), 'targets': cipher(batch['targets'])}


def ciphered_nll(row: dict, batches: int, draws: int) -> list[float]:
  """Mean NLL at each window position on validation text under a fresh cipher of the lowercase letters per
  sequence, averaged over `draws` table draws."""
  setup, state = runner.load_run(row['workdir'])
  transform = functools.partial(encipher, letters=lowercase_ids(setup.dataset.tokenizer),
                                vocab=setup.model.vocab_size)
  eval_step = setup.make_eval_step()
  return np.mean([setup.evaluate(eval_step, state['params'], state['model_state'], 'valid', batches, draw=draw,
                                 per_position=True, transform=transform)['nll_by_position']
                  for draw in range(draws)], axis=0).tolist()


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
  letters = lowercase_ids(setup.dataset.tokenizer)
  rng = np.random.default_rng(0)
  correct = np.zeros(setup.config.train.seq_len // window)
  total = np.zeros_like(correct)
  plain_accuracy = []
  for i, batch in enumerate(setup.dataset.eval_batches('valid', batches)):
    plain = batch['tokens']
    cipher = plain.copy()
    for row in range(len(plain)):   # a fresh key per sequence: letter -> letter
      cipher[row] = letter_cipher(rng, vocab, letters)[plain[row]]
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
  curves, ciphered = runner.probed(rows, 'curves'), runner.probed(rows, 'ciphered')
  groups = corpus_groups({**curves, **ciphered})
  if not groups:
    return None
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
  for ax, group in zip(axes[0], groups):
    for (text, probe), model in itertools.product((('plain', curves), ('ciphered', ciphered)), MODELS):
      if f'{group}-{model}' in probe:
        nll = smooth(np.asarray(probe[f'{group}-{model}']), 16)
        ax.plot(np.arange(len(nll)) + 8, np.exp(nll), '-' if text == 'plain' else '--', color=COLORS[model],
                label=f'{LABELS[model]}, {text} text')
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
    positions = [p for p in POSITIONS if p < len(next(iter(curves.values())))]
    lines += [f'## 1. Perplexity against position (mean over {TABLE_DRAWS} table draws; the plot smooths over 16 positions)', '']
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
  ciphered = runner.probed(rows, 'ciphered')
  if ciphered:
    positions = [p for p in POSITIONS if p < len(next(iter(ciphered.values())))]
    lines += ['## 2. On ciphered text (validation windows, the lowercase letters under a fresh substitution cipher '
              f'per sequence; mean over {TABLE_DRAWS} table draws)', '']
    lines += runner.table(['run', 'text', *(f'pos {p + 1}' for p in positions)],
                          [[n, text, *(f'{np.exp(probe[n][p]):.2f}' for p in positions)]
                           for n in ciphered for text, probe in (('plain', curves), ('ciphered', ciphered)) if n in probe])
    for group in corpus_groups(ciphered):
      if not all(f'{group}-{m}' in ciphered and f'{group}-{m}' in curves for m in MODELS):
        continue
      last = {(m, text): np.exp(np.mean(probe[f'{group}-{m}'][-32:]))
              for m in MODELS for text, probe in (('plain', curves), ('ciphered', ciphered))}
      first = {m: np.exp(np.mean(ciphered[f'{group}-{m}'][:8])) for m in MODELS}
      lines.append(f'\n{group}, ciphered text: the lexinvariant model goes from perplexity {first["random"]:.2f} '
                   f'(first 8 positions) to {last["random", "ciphered"]:.2f} (last 32), the standard one from '
                   f'{first["learned"]:.2f} to {last["learned", "ciphered"]:.2f}. Over the last 32 positions the '
                   f'standard model reads ciphered text at {last["learned", "ciphered"] / last["learned", "plain"]:.2f}x'
                   f' its plain-text perplexity, the lexinvariant one at '
                   f'{last["random", "ciphered"] / last["random", "plain"]:.2f}x.')
    lines.append('')
  cipher = runner.probed(rows, 'cipher').get(CIPHER_ROW)
  if cipher:
    precision = cipher['precision_by_window']
    lines += ['## 3. Substitution-cipher probe (WikiText-2 chars, lexinvariant model frozen)', '',
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
    lines += [f'## 4. In-context tasks with random symbols ({next(iter(tasks.values()))["prompts"]} prompts each, '
              'greedy, accuracy per generated character)', '']
    lines += runner.table(['run', 'LookUp', 'Permutation'],
                          [[name, *(f'{t[task]:.3f}' for task in ('lookup', 'permutation'))]
                           for name, t in tasks.items()])
  return lines


def declare(args) -> runner.Experiment:
  rows = []
  for row, arg in run_names(args.shape, args.bpe):
    probes = {'curves': functools.partial(per_position_nll, batches=args.curve_batches)}
    if '-char-' in row:
      probes['ciphered'] = functools.partial(ciphered_nll, batches=args.curve_batches, draws=TABLE_DRAWS)
      probes['tasks'] = functools.partial(task_accuracy, examples=args.task_examples)
    if row == CIPHER_ROW:
      probes['cipher'] = functools.partial(cipher_precision, probe_steps=args.probe_steps, window=args.cipher_window,
                                           batches=args.cipher_batches)
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
  parser.add_argument('--rows', default=None, help='comma-separated rows to train and probe (default: all); the '
                      'others keep their earlier results')
  runner.add_arguments(parser)
  args = parser.parse_args()
  rows = [r for r in args.rows.split(',') if r] if args.rows is not None else None
  stages = [s for s in args.stages.split(',') if s]
  if set(stages) - set(STAGES):
    parser.error(f'unknown stage {sorted(set(stages) - set(STAGES))[0]!r} (stages: {", ".join(STAGES)})')
  runner.run_experiment(declare(args), runs=args.runs, results=args.results, rows=rows,
                        train='train' in stages, probes=set(stages) - {'train'}, overrides=args.override)


if __name__ == '__main__':
  main()
