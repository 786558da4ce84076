"""Train a list of configs and write a results table (and loss curves) under results/.

  python -m experiments.run --name wikitext2-baseline \\
      --configs experiments/configs/wikitext2_transformer.py [more configs, FILE:ARG allowed] \\
      [--override train.steps=100 ...]

Run from the repository root. For each config: `python -m train` in runs/<name>/<config>, then
`python -m train.evaluate` on the valid and test splits. Rows are kept in results/<name>.json (re-running a config replaces its row)
and rendered to results/<name>.md with the command, commit, hardware and date of every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys

from train import metrics as metrics_lib

COLUMNS = ('model', 'params', 'non_embedding_params', 'steps', 'train_tokens', 'train_flops', 'best_valid_ppl',
           'valid_ppl', 'test_ppl', 'ratio_to_first', 'valid_bpb', 'test_bpb', 'tokens_per_sec', 'train_time_s')


def run_name(config_path: str) -> str:
  """experiments/configs/x.py:tiny,a -> x-tiny-a"""
  file, _, arg = config_path.partition(':')
  return '-'.join([pathlib.Path(file).stem, *[a for a in arg.split(',') if a]])


def git_commit() -> str:
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                            check=True).stdout.strip()
    # Results tables are outputs, rewritten while an experiment runs: only code makes a commit dirty.
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '.', ':!results'],
                           capture_output=True, text=True).stdout.strip()
    return commit + ('-dirty' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def hardware() -> str:
  import jax
  device = jax.devices()[0]
  return f'{jax.device_count()}x {device.device_kind} ({device.platform}), {os.cpu_count()} host cores, {platform.machine()}'


def run(cmd: list[str]) -> str:
  print('$', ' '.join(cmd), flush=True)
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    sys.stderr.write(out.stderr[-3000:])
    raise SystemExit(f'command failed ({out.returncode}): {" ".join(cmd)}')
  return out.stdout


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def train_time_s(records: list[dict]) -> float:
  """Seconds a run spent compiling and stepping, summed over every invocation that trained it (evaluation
  and checkpointing excluded), from its own metrics: the same number however often it was resumed."""
  total, previous = 0.0, 0
  for r in records:
    if 'compile_time_s' in r:   # an invocation starts at this step
      total, previous = total + r['compile_time_s'], r['step']
    elif 'step_time_s' in r:
      total, previous = total + r['step_time_s'] * (r['step'] - previous), r['step']
  return total


def train_and_evaluate(config_path: str | None, workdir: str, overrides: list[str], name: str | None = None,
                       max_batches: int = 0) -> dict:
  """Train (config_path None: the config already in `workdir`), evaluate on valid and test (the first
  `max_batches` batches; 0 = whole splits), return the row."""
  flags = [f'--config.{o}' for o in overrides]
  config_flag = ['--config', config_path] if config_path else []
  train_cmd = [sys.executable, '-m', 'train', *config_flag, '--workdir', workdir, *flags]
  commit = git_commit()   # the code the run starts from
  run(train_cmd)
  evals = {}
  for split in ('valid', 'test'):
    line = run([sys.executable, '-m', 'train.evaluate', '--workdir', workdir, '--split', split,
                '--max_batches', str(max_batches)]).strip().splitlines()[-1]
    evals[split] = json.loads(line)
  records = read_metrics(workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  first = records[0]
  speeds = [r['tokens_per_sec'] for r in records if 'tokens_per_sec' in r]
  mfus = [r['mfu'] for r in records if 'mfu' in r and not math.isnan(r['mfu'])]   # NaN: the device's peak is unknown
  peak_memory, peak_measured = metrics_lib.peak_memory(
      max((r['peak_memory_bytes'] for r in records if 'peak_memory_bytes' in r), default=None), first)
  t = config['train']
  train_tokens = evals['valid']['step'] * t['batch_size'] * t['seq_len']
  return {
      'name': name or run_name(config_path), 'model': config['model']['name'],
      'params': first.get('params'), 'non_embedding_params': first.get('non_embedding_params'),
      'steps': evals['valid']['step'], 'train_tokens': train_tokens,
      'train_flops': first['flops_per_token'] * train_tokens if 'flops_per_token' in first else None,
      'valid_ppl': evals['valid']['ppl'], 'test_ppl': evals['test']['ppl'], 'valid_tokens': evals['valid']['tokens'],
      'valid_bpb': evals['valid']['bpb'], 'test_bpb': evals['test']['bpb'],
      'tokens_per_sec': statistics.median(speeds) if speeds else None, 'train_time_s': round(train_time_s(records)),
      'mfu': statistics.median(mfus) if mfus else None, 'compile_time_s': first.get('compile_time_s'),
      'peak_memory_bytes': peak_memory, 'peak_memory_measured': peak_measured,
      'model_metrics': {k: v for k, v in evals['valid'].items() if '/' in k},
      'command': ' '.join(['python -m train', *config_flag, '--workdir', workdir, *flags]),
      'commit': commit, 'hardware': hardware(), 'date': datetime.date.today().isoformat(),
  }


def fmt(value) -> str:
  if isinstance(value, float):
    return f'{value:.4g}' if abs(value) < 1e4 else f'{value:,.0f}'
  if isinstance(value, int):
    return f'{value:,}'
  return '' if value is None else str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
  """Markdown table lines."""
  return (['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
          + ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows])


def workdir_of(row: dict) -> str:
  return row['command'].split('--workdir ')[1].split()[0]


def best_valid_ppl(row: dict) -> float:
  """The lowest whole-validation-split perplexity: the final evaluation, or any during training that
  covered as many tokens (eval_batches=0)."""
  candidates = [row['valid_ppl']]
  path = os.path.join(workdir_of(row), 'metrics.jsonl')
  if row.get('valid_tokens') and os.path.exists(path):
    candidates += [r['eval_ppl'] for r in read_metrics(workdir_of(row))
                   if 'eval_ppl' in r and r['eval_tokens'] >= row['valid_tokens']]
  return min(candidates)


def render(name: str, rows: list[dict], plot: str | None, producer: str = 'python -m experiments.run') -> str:
  for r in rows:
    r['best_valid_ppl'] = best_valid_ppl(r)
    r['ratio_to_first'] = r['best_valid_ppl'] / rows[0]['best_valid_ppl']
  lines = [f'# {name}', '', f'Produced by `{producer}` (see each row\'s command). Perplexity is per '
           'token of the run\'s tokenizer; bits per byte is total NLL over the split\'s UTF-8 bytes '
           '(comparable across tokenizers). best_valid_ppl is the lowest whole-validation-split perplexity among '
           'the evaluations during training (the final checkpoint gives valid_ppl/test_ppl); ratio_to_first is '
           'best_valid_ppl over the first row\'s. tokens/sec is the median over logged windows, compilation '
           'excluded.', '',
           '| config | ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * (len(COLUMNS) + 1)]
  for r in rows:
    lines.append(f'| {r["name"]} | ' + ' | '.join(fmt(r.get(c)) for c in COLUMNS) + ' |')
  lines += ['', '| config | command | commit | hardware | date | note |', '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["name"]} | `{r["command"]}` | {r["commit"]} | {r["hardware"]} | {r["date"]} | '
                 f'{r.get("note", "")} |')
  if plot:
    lines += ['', f'![training loss]({os.path.basename(plot)})']
  return '\n'.join(lines) + '\n'


def plot_curves(rows: list[dict], path: str) -> str | None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for r in rows:
    workdir = workdir_of(r)
    if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
      continue
    records = read_metrics(workdir)
    train = [(x['step'], x['loss']) for x in records if 'loss' in x]
    evals = [(x['step'], x['eval_loss']) for x in records if 'eval_loss' in x]
    line, = ax.plot(*zip(*train), label=f'{r["name"]} train')
    if evals:
      ax.plot(*zip(*evals), 'o--', color=line.get_color(), label=f'{r["name"]} valid')
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--name', required=True, help='results/<name>.md')
  parser.add_argument('--configs', nargs='*', default=[], help='config files (FILE or FILE:ARG)')
  parser.add_argument('--override', nargs='*', default=[], help='key=value applied to every config')
  parser.add_argument('--runs', default='runs', help='parent of the run directories')
  parser.add_argument('--results', default='results')
  parser.add_argument('--render', action='store_true', help='only re-render results/<name>.md from its JSON')
  args = parser.parse_args()
  os.makedirs(args.results, exist_ok=True)
  table = os.path.join(args.results, f'{args.name}.json')
  rows = json.load(open(table)) if os.path.exists(table) else []
  for config_path in ([] if args.render else args.configs):
    workdir = os.path.join(args.runs, args.name, run_name(config_path))   # relative: commands stay portable
    row = train_and_evaluate(config_path, workdir, args.override)
    rows = [r for r in rows if r['name'] != row['name']] + [row]
    with open(table, 'w') as f:
      json.dump(rows, f, indent=1)
  plot = plot_curves(rows, os.path.join(args.results, f'{args.name}.png'))
  with open(os.path.join(args.results, f'{args.name}.md'), 'w') as f:
    f.write(render(args.name, rows, plot))
  print(open(os.path.join(args.results, f'{args.name}.md')).read())


if __name__ == '__main__':
  main()
