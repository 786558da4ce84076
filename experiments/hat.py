"""HAT against a compute-matched BPE Transformer and a flat byte Transformer on WikiText-2, clean and
under perturbation (the spec's §1.5).

  python -m experiments.hat --shape tiny [--eval_batches 40] [--override key=value ...]

1. Trains experiments/configs/hat.py:SHAPE,{hat,bpe,byte} in runs/hat-SHAPE/ROW (a finished run is only
   evaluated). The BPE row's depth is chosen here: the one whose training FLOPs per byte (flops_per_token
   over the measured bytes per token of the train split) come closest to HAT's per real byte, the paper's
   count: every real word of the train split's windows runs the byte modules over its bytes + 1 and the
   backbone once (`HAT.forward_flops_per_real_byte`). As executed, every padded word slot runs too
   (`HAT.forward_flops_per_token`), which costs several times more; both are reported.
2. Writes perturbed copies of the validation text to runs/hat-SHAPE/perturbed/KIND/: in every word
   each character independently with probability 0.1 is swapped with another of the word's characters
   (permute), replaced by a random letter (replace) or deleted (delete); ALL CAPS (upper); each letter's
   case drawn at random (random_case). Whitespace is never touched.
3. Evaluates every model on the first `eval_batches` batches of each copy (a probe of the trained runs):
   bits per byte (of that copy's bytes) and word accuracy, one rule for every model (`WORD_RULE`).
Writes results/hat-SHAPE.{md,json,png}.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import re
import string

import numpy as np

from experiments import run as runner

CONFIG = 'experiments/configs/hat.py'
PERTURBATIONS = ('permute', 'replace', 'delete', 'upper', 'random_case')
SOURCE = pathlib.Path('../shared/data/wikitext-2')
# A scored word: a whitespace run and the non-whitespace run after it, the way byte-level BPE (and the released
# HAT splitter) give a space to the next word, so no BPE token crosses a word's edge.
SCORED_WORD = re.compile(r'\s*\S+|\s+')
WORD_RULE = (
    'Word accuracy scores the same bytes for every model: a word is a whitespace run and the non-whitespace run '
    'after it (" world!", whole however HAT\'s byte cap cuts it), right under teacher forcing when every byte of it '
    'is: for the byte Transformer each byte\'s argmax; for BPE every token overlapping the word (byte-level BPE '
    'gives a space to the next token, so its tokens tile the words exactly); for HAT each byte\'s argmax and, at '
    'the first byte of each of its words, the [W] that closed the word before (a flat model predicts that a word '
    'ended with this byte). End-of-document symbols are not scored.')


def perturb(text: str, kind: str, rng: np.random.Generator, p: float = 0.1) -> str:
  if kind == 'upper':
    return text.upper()
  out = []
  for piece in re.findall(r'\S+|\s+', text):
    chars = list(piece)
    if not piece.isspace():
      if kind == 'random_case':
        chars = [c.upper() if rng.random() < 0.5 else c.lower() for c in chars]
      else:
        picked = np.flatnonzero(rng.random(len(chars)) < p)
        if kind == 'delete':
          dropped = set(picked.tolist())
          chars = [c for i, c in enumerate(chars) if i not in dropped]
        elif kind == 'replace':
          for i in picked:
            chars[i] = string.ascii_lowercase[rng.integers(26)]
        else:   # permute
          for i in picked:
            j = rng.integers(len(chars))
            chars[i], chars[j] = chars[j], chars[i]
    out.append(''.join(chars))
  return ''.join(out)


@functools.cache
def perturbed_dirs(root: str) -> dict[str, str]:
  """Copies of the corpus directory whose valid.txt is perturbed (train and test link to the originals)."""
  dirs = {'clean': str(SOURCE.resolve())}
  text = (SOURCE / 'valid.txt').read_text()
  for i, kind in enumerate(PERTURBATIONS):
    directory = pathlib.Path(root, kind).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for split in ('train', 'test'):
      if not (directory / f'{split}.txt').exists():
        (directory / f'{split}.txt').symlink_to(SOURCE.resolve() / f'{split}.txt')
    (directory / 'valid.txt').write_text(perturb(text, kind, np.random.default_rng(i)))
    dirs[kind] = str(directory)
  return dirs


def bpe_flops_per_byte(workdir: str, shape: str) -> tuple[dict[int, float], float]:
  """The BPE row's training FLOPs per byte at each depth 1-32, and the bytes per token of the train split."""
  from experiments.configs import hat as hat_configs
  from train import config as config_lib, data
  config = hat_configs.get_config(f'{shape},bpe')
  dataset = data.Dataset(config, workdir)   # trains (and saves) the BPE tokenizer the run then uses
  train = dataset.split('train')
  bytes_per_token = train.n_bytes / len(train.stream)
  per_byte = {}
  for layers in range(1, 33):
    config.model.num_layers = layers
    model = config_lib.build_model(config, vocab_size=dataset.tokenizer.vocab_size)
    per_byte[layers] = model.flops_per_token(config.train.seq_len) / bytes_per_token
  return per_byte, bytes_per_token


def hat_flops_per_byte(workdir: str, shape: str) -> tuple[float, float]:
  """HAT's training FLOPs per byte (real, as executed), the real count over every window of the train split."""
  from experiments.configs import hat as hat_configs
  from models import formats
  from train import config as config_lib, data
  config = hat_configs.get_config(f'{shape},hat')
  model = config_lib.build_model(config, vocab_size=258)
  train = data.Dataset(config, workdir, formats.get(model.batch_format)).split('train')
  lengths = np.concatenate([train.batch(range(start, min(start + 1024, train.n_windows)))['word_lengths']
                            for start in range(0, train.n_windows, 1024)])
  return 3 * model.forward_flops_per_real_byte(lengths), model.flops_per_token(config.train.seq_len)


def closest_depth(per_byte: dict[int, float], target: float) -> int:
  return min(per_byte, key=lambda n: abs(per_byte[n] / target - 1))


def token_bytes(tokenizer) -> list[bytes]:
  """The UTF-8 bytes each id stands for (eos: none)."""
  if tokenizer.kind == 'byte':
    return [bytes([i]) for i in range(256)] + [b'']
  # Byte-level BPE writes byte b as one printable character: b itself for printable Latin-1, else 256 + n.
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  others = [b for b in range(256) if b not in printable]
  char_to_byte = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
  vocab = tokenizer.tokenizer
  return [b'' if i == tokenizer.eos_id else bytes(char_to_byte[c] for c in vocab.id_to_token(i))
          for i in range(tokenizer.vocab_size)]


def words_right(data: bytes, right: np.ndarray) -> tuple[int, int]:
  """(words right, words) of a stretch of text whose byte i was predicted right iff right[i] (`WORD_RULE`)."""
  lengths = np.asarray([len(w.encode('utf-8', errors='surrogateescape'))
                        for w in SCORED_WORD.findall(data.decode('utf-8', errors='surrogateescape'))], int)
  ends = np.cumsum(lengths)
  wrong = np.concatenate([[0], np.cumsum(~right)])
  return int((wrong[ends] == wrong[ends - lengths]).sum()), len(lengths)


def token_stretches(targets: np.ndarray, right: np.ndarray, pieces: list[bytes], eos_id: int
                    ) -> list[tuple[bytes, np.ndarray]]:
  """A flat model's scored targets as the stretches of text between end-of-document ids: their bytes, and for
  each byte whether its token was predicted right."""
  stretches, start = [], 0
  for end in [*np.flatnonzero(targets == eos_id), len(targets)]:
    ids = targets[start:end]
    stretches.append((b''.join(pieces[t] for t in ids), np.repeat(right[start:end], [len(pieces[t]) for t in ids])))
    start = end + 1
  return stretches


def hat_stretches(word_bytes: np.ndarray, word_lengths: np.ndarray, targets: np.ndarray, predicted: np.ndarray
                  ) -> list[tuple[bytes, np.ndarray]]:
  """One window's HAT words (word_bytes [words, bytes], targets and argmax [words, bytes + 1]) as the stretches
  of text between [S] words: their bytes, and for each byte whether it was predicted right (a word's first byte
  only if the [W] closing the word before it was too)."""
  from models.hat import END_OF_DOCUMENT
  stretches, data, right = [], [], []
  closed = True   # the [W] before the word (none before a stretch's first)
  for n, symbols, wanted, got in zip(word_lengths, word_bytes, targets, predicted):
    if n == 0:   # padding slots come after the real words
      break
    if n == 1 and symbols[0] == END_OF_DOCUMENT:
      stretches.append((bytes(data), np.asarray(right, bool)))
      data, right, closed = [], [], True
      continue
    ok = got[:n] == wanted[:n]
    ok[0] &= closed
    data += symbols[:n].tolist()
    right += ok.tolist()
    closed = got[n] == wanted[n]
  return stretches + [(bytes(data), np.asarray(right, bool))]


def word_accuracy(setup, state, max_batches: int) -> float:
  """Share of the words (`WORD_RULE`) of the first `max_batches` validation batches the model gets right."""
  import jax

  from models.formats import mask_padded_vocab
  model, params = setup.model, state['params']
  predict = jax.jit(lambda inputs: mask_padded_vocab(model.apply({'params': params}, **inputs)[0],
                                                     setup.vocab_limit).argmax(-1))
  pieces = token_bytes(setup.dataset.tokenizer)
  right = total = 0
  for batch in setup.dataset.eval_batches('valid', max_batches):
    predicted = np.asarray(predict(setup.format.model_inputs(batch)))
    for row in range(len(predicted)):
      if model.batch_format == 'words':
        stretches = hat_stretches(batch['word_bytes'][row], batch['word_lengths'][row], batch['targets'][row],
                                  predicted[row])
      else:
        scored = batch['weights'][row] > 0
        stretches = token_stretches(batch['targets'][row][scored], (predicted[row] == batch['targets'][row])[scored],
                                    pieces, setup.dataset.tokenizer.eos_id)
      for data, ok in stretches:
        r, n = words_right(data, ok)
        right, total = right + r, total + n
  return right / max(total, 1)


def perturbed_eval(row: dict, root: str, max_batches: int) -> dict:
  """Condition (clean or a perturbation) -> bits per byte and word accuracy on that copy of the validation text."""
  results = {}
  for condition, directory in perturbed_dirs(root).items():
    setup, state = runner.load_run(row['workdir'], data={'dir': directory})
    ev = setup.evaluate(setup.make_eval_step(), state['params'], state['model_state'], 'valid', max_batches)
    accuracy = word_accuracy(setup, state, max_batches)
    results[condition] = {'bpb': ev['bpb'], 'word_accuracy': accuracy}
    print(f'{row["name"]} {condition}: bpb {ev["bpb"]:.3f}, word accuracy {accuracy:.3f}', flush=True)
  return results


def flops_per_byte(row: dict, bytes_per_token: float, real_flops_per_byte: float | None = None) -> dict:
  """Training FLOPs per byte of text: as executed, per token over the row's bytes per token (1 for byte-level
  rows); and per real byte (HAT's padded word slots left out; the same for the flat rows)."""
  executed = row['train_flops'] / row['train_tokens'] / bytes_per_token
  return {'flops_per_byte': executed, 'real_flops_per_byte': real_flops_per_byte or executed,
          'bytes_per_token': bytes_per_token}


def plot(rows: list[dict]):
  import matplotlib.pyplot as plt
  results = runner.probed(rows, 'perturbed')
  if not results:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  width = 0.8 / len(results)
  for k, (name, e) in enumerate(results.items()):
    xs = np.arange(len(PERTURBATIONS)) + k * width
    axes[0].bar(xs, [e[p]['bpb'] / e['clean']['bpb'] - 1 for p in PERTURBATIONS], width, label=name)
    axes[1].bar(xs, [e[p]['word_accuracy'] / e['clean']['word_accuracy'] - 1 for p in PERTURBATIONS], width,
                label=name)
  for ax, label in zip(axes, ('relative bpb increase', 'relative word accuracy change')):
    ax.set_xticks(np.arange(len(PERTURBATIONS)) + 0.4 - width / 2, PERTURBATIONS)
    ax.set(ylabel=label)
    ax.legend()
  return fig


def sections(rows: list[dict], eval_batches: int) -> list[str]:
  lines = ['## Training FLOPs per byte', '', 'Per real byte is the paper\'s count, the one the BPE row is matched at; '
           'as executed, HAT also runs its padded word slots.', '']
  lines += runner.table(['row', 'bytes per token', 'GFLOPs per real byte (train)', 'GFLOPs per byte as executed (train)'],
                        [[name, round(f['bytes_per_token'], 3), round(f['real_flops_per_byte'] / 1e9, 4),
                          round(f['flops_per_byte'] / 1e9, 4)]
                         for name, f in runner.probed(rows, 'flops_per_byte').items()])
  results = runner.probed(rows, 'perturbed')
  conditions = ['clean', *PERTURBATIONS]
  for metric, title in (('bpb', 'Bits per byte'), ('word_accuracy', 'Word accuracy')) if results else ():
    lines += ['', f'## {title} on the validation text, clean and perturbed (first {eval_batches} batches)', '']
    lines += [WORD_RULE, ''] if metric == 'word_accuracy' else []
    lines += runner.table(['row', *conditions],
                          [[name, *(round(e[c][metric], 4) for c in conditions)] for name, e in results.items()])
  if results:
    lines += ['', '## Relative change from clean (bpb up, word accuracy down)', '']
    lines += runner.table(['row', *(f'{p} bpb' for p in PERTURBATIONS), *(f'{p} acc' for p in PERTURBATIONS)],
                          [[name, *(f'{e[p]["bpb"] / e["clean"]["bpb"] - 1:+.1%}' for p in PERTURBATIONS),
                            *(f'{e[p]["word_accuracy"] / max(e["clean"]["word_accuracy"], 1e-9) - 1:+.1%}'
                              for p in PERTURBATIONS)]
                           for name, e in results.items()])
    lines += ['', *verdict(results)]
  return lines


def verdict(results: dict) -> list[str]:
  """Whether the paper's two directions show: HAT about as good as BPE on clean text at matched compute,
  and hurt less than BPE by the perturbations (the mean relative bits-per-byte increase)."""
  if not {'hat', 'bpe'} <= set(results):
    return []
  clean = {name: results[name]['clean']['bpb'] for name in ('hat', 'bpe')}
  hurt = {name: float(np.mean([results[name][p]['bpb'] / clean[name] - 1 for p in PERTURBATIONS]))
          for name in ('hat', 'bpe')}
  parity = clean['hat'] <= 1.02 * clean['bpe']
  robust = hurt['hat'] < hurt['bpe']
  why = ''
  if not parity and 'byte' in results:   # byte-level models must first learn the spelling a BPE vocabulary holds
    why = (f" The flat byte Transformer is behind BPE as well ({results['byte']['clean']['bpb']:.3f}): at this "
           'scale and length of training, spelling is still being learned by every byte-level model, while the '
           "paper's parity is at 1B+ parameters after hundreds of billions of bytes.")
  return [f"Clean text: {'shows' if parity else 'does not show'} (HAT {clean['hat']:.3f} bits per byte, BPE "
          f"{clean['bpe']:.3f}; the paper has HAT at or below BPE at equal compute).{why}",
          f"Robustness: {'shows' if robust else 'does not show'} (mean bits-per-byte increase over the perturbations: "
          f"HAT {hurt['hat']:+.1%}, BPE {hurt['bpe']:+.1%})."]


def declare(shape: str, runs: str, eval_batches: int) -> runner.Experiment:
  """The rows, with the BPE row's depth matched to HAT's FLOPs per real byte (this trains the BPE tokenizer)."""
  experiment = f'hat-{shape}'
  hat_real, hat_executed = hat_flops_per_byte(runner.row_workdir(runs, experiment, 'hat'), shape)
  bpe_per_byte, bytes_per_token = bpe_flops_per_byte(runner.row_workdir(runs, experiment, 'bpe'), shape)
  layers, layers_executed = closest_depth(bpe_per_byte, hat_real), closest_depth(bpe_per_byte, hat_executed)
  depth = lambda n: f'{n} layer{"s" * (n > 1)}'
  print(f'HAT: {hat_real / 1e9:.4f} GFLOPs per real byte (train), {hat_executed / 1e9:.4f} as executed; matched BPE '
        f'depth {depth(layers)} ({bpe_per_byte[layers] / 1e9:.4f}), {depth(layers_executed)} if matched as executed',
        flush=True)
  root = os.path.abspath(runner.row_workdir(runs, experiment, 'perturbed'))

  def row(name: str, bytes_per_token: float, overrides: tuple[str, ...] = (), real: float | None = None) -> runner.Row:
    probes = {'flops_per_byte': functools.partial(flops_per_byte, bytes_per_token=bytes_per_token,
                                                  real_flops_per_byte=real),
              'perturbed': functools.partial(perturbed_eval, root=root, max_batches=eval_batches)}
    return runner.Row(name, f'{CONFIG}:{shape},{name}', overrides, probes=probes)

  rows = [row('hat', 1.0, real=hat_real), row('bpe', bytes_per_token, (f'model.num_layers={layers}',)),
          row('byte', 1.0)]
  description = (
      'WikiText-2 (`../shared/data/wikitext-2`), every row on windows of the same text (512 bytes, or 128 BPE tokens '
      f'of {bytes_per_token:.2f} bytes each on average). The BPE row\'s depth ({depth(layers)}) is the one closest to '
      f'HAT\'s training FLOPs per real byte ({hat_real / 1e9:.4f} GFLOPs: each real word of the train split\'s windows '
      'runs the byte modules over its bytes + 1 and the backbone once, the paper\'s count); as executed, with every '
      f'padded word slot, HAT costs {hat_executed / 1e9:.4f} GFLOPs per byte, which would have matched '
      f'{depth(layers_executed)}. The byte row is a flat byte Transformer of the backbone\'s width and depth. The '
      'perturbed copies of the validation text: ' + ', '.join(PERTURBATIONS) + ' (see experiments/hat.py).')
  return runner.Experiment(experiment, rows, title=f'HAT against BPE and byte Transformers under perturbation, {shape}',
                           description=description, eval_batches=eval_batches,
                           sections=functools.partial(sections, eval_batches=eval_batches), plots={'': plot})


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', default='tiny')
  parser.add_argument('--eval_batches', type=int, default=40)
  runner.add_arguments(parser)
  args = parser.parse_args()
  runner.run_experiment(declare(args.shape, args.runs, args.eval_batches), runs=args.runs, results=args.results,
                        overrides=args.override)


if __name__ == '__main__':
  main()
