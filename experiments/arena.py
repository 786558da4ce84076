"""The arena: every registered architecture trained on the same bytes at the baseline Transformer's
non-embedding parameters and training FLOPs (experiments/configs/arena.py says how they are matched).

  python -m experiments.arena --preset tiny|small|paper [--models a,b,c] [--corpus wikitext2|stdlib]
      [--resume] [--override key=value ...]

Each model trains afresh in runs/arena-<preset>-<corpus>/<model> with `python -m train` (--resume continues
an interrupted run there instead, from its last checkpoint), then `python -m train.evaluate`
scores the valid and test splits (the preset's first eval batches of each; all of them at small and paper).
Rows are kept in results/arena-<preset>.json (re-running a model replaces its row) and rendered to
results/arena-<preset>.md, with results/arena-<preset>-notes.md (observations, if present) and plots:
bits per byte, parameters, training FLOPs, tokens/sec, MFU, peak memory, compile time and each row's
command, commit, hardware and date. Rows not yet run are listed as missing with the command that
produces them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import models
from experiments import run
from experiments.configs import arena as arena_config

CONFIG = 'experiments/configs/arena.py'
CORPORA = {   # --corpus: data.corpus and data.dir
    'wikitext2': ('wikitext2', '../shared/data/wikitext-2'),
    'stdlib': ('stdlib', ''),
}
LM_COLUMNS = ('model', 'knob', 'non_embedding_params', 'params', 'steps', 'train_tokens', 'train_flops',
              'valid_bpb', 'test_bpb', 'tokens_per_sec', 'mfu', 'peak_memory_mb', 'compile_time_s', 'train_time_s')


def train_row(preset: str, model: str, corpus: str, runs: str, extra: list[str], resume: bool) -> dict:
  corpus_name, corpus_dir = CORPORA[corpus]
  config_path = f'{CONFIG}:{preset},{model}'
  config = arena_config.get_config(f'{preset},{model}')
  overrides = [f'data.corpus={corpus_name}', f'data.dir={corpus_dir}', *extra]
  workdir = os.path.join(runs, f'arena-{preset}-{corpus}', model)
  if not resume and os.path.exists(workdir):   # a fresh run: its row's commit and speed are this code's
    shutil.rmtree(workdir)
  row = run.train_and_evaluate(config_path, workdir, overrides, name=model, max_batches=config.train.eval_batches)
  knob = models.model_class(model).arena_knob
  row.update(knob=f'{knob}={config.model[knob]}', corpus=corpus)
  return row


def cell(row: dict, column: str):
  if column == 'peak_memory_mb':
    mb = row.get('peak_memory_bytes') and row['peak_memory_bytes'] / 2**20
    return None if mb is None else f'{mb:,.0f}' + ('' if row.get('peak_memory_measured') else ' (XLA est.)')
  if column == 'mfu' and row.get('mfu') is not None:
    return f'{100 * row["mfu"]:.2f}%'
  return row.get(column)


def render(preset: str, corpus: str, rows: list[dict], plots: list[str], notes: str = '') -> str:
  by_name = {r['name']: r for r in rows}
  done = lambda names: [by_name[n] for n in names if n in by_name]
  missing = [n for n in arena_config.ARCHITECTURES if n not in by_name]
  p = arena_config.PRESETS[preset]
  d, depth, heads, seq_len, batch, steps, eval_batches = (p[k] for k in ('d_model', 'depth', 'heads', 'seq_len',
                                                                         'batch', 'steps', 'eval_batches'))
  target_params, target_flops = arena_config.baseline(preset)
  evaluated = 'whole splits' if eval_batches == 0 else f'the first {eval_batches} batches of each split'
  lines = [
      f'# Arena, preset `{preset}`, corpus `{corpus}`', '',
      f'Produced by `python -m experiments.arena --preset {preset} --corpus {corpus}`. Every architecture at '
      f'd={d}, {depth} layers, {heads} heads, windows of {seq_len} bytes, batch {batch}; its width knob set so its '
      f'non-embedding parameters come closest to the baseline Transformer\'s ({target_params:,}), its steps so its '
      f'training FLOPs (steps x tokens x the model\'s analytic `flops_per_token`) equal the baseline\'s '
      f'{steps} steps x {batch * seq_len:,} tokens x {target_flops:,.0f}. Bits per byte are total NLL over the '
      f'scored UTF-8 bytes, on {evaluated}. tokens/sec and MFU are medians over logged windows (compilation '
      'excluded; MFU against the device\'s dense peak, on CPU this host\'s float32 matmul rate through XLA, '
      'measured at the start: each row\'s train.peak_flops_per_device); peak memory is '
      'the device\'s measured peak where it reports one, else XLA\'s estimate for the train step (arguments + '
      'temporaries); train_time_s is compile plus steps.', '',
      '## Language models (next byte)', '',
      *run.table(list(LM_COLUMNS), [[cell(r, c) for c in LM_COLUMNS] for r in done(arena_config.LANGUAGE_MODELS)]),
      '', '## Span corruption (ByT5 and MrT5)', '',
      'A different task (T5 span corruption, noise density 0.15, mean span 20 bytes): bits per *target* byte, not '
      'comparable with the table above. MrT5 deletes encoder bytes with its learned gate (PI controller toward a '
      '50% deletion rate); its eval runs with hard deletion. Both train from scratch for the same FLOPs '
      '(soft deletion saves none in training).', '',
  ]
  span_columns = [*LM_COLUMNS, 'deletion_rate']
  span_rows = [[cell(r, c) for c in LM_COLUMNS] + [r.get('model_metrics', {}).get('mrt5/deletion_rate')]
               for r in done(arena_config.SPAN_CORRUPTION)]
  lines += run.table(span_columns, span_rows)
  lines += ['', '## Provenance', '', *run.table(
      ['model', 'command', 'commit', 'hardware', 'date'],
      [[r['name'], f'`{r["command"]}`', r['commit'], r['hardware'], r['date']] for r in rows])]
  if missing:
    lines += ['', '## Missing rows', '', *[f'- `{n}`: not run yet (`python -m experiments.arena --preset {preset} '
                                          f'--corpus {corpus} --models {n}`)' for n in missing]]
  if notes:
    lines += ['', '## Notes', '', notes.strip()]
  lines += ['', *[f'![{os.path.basename(p)}]({os.path.basename(p)})' for p in plots]]
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path_prefix: str) -> list[str]:
  """Valid bits per byte per language model, and their training loss against training FLOPs."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  lm = [r for r in rows if r['name'] in arena_config.LANGUAGE_MODELS]
  if not lm:
    return []
  fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
  bars.barh([r['name'] for r in lm], [r['valid_bpb'] for r in lm], color='tab:blue')
  bars.set_xlabel('valid bits per byte (lower is better)')
  bars.invert_yaxis()
  for r in lm:
    records = run.read_metrics(run.workdir_of(r)) if os.path.exists(run.workdir_of(r)) else []
    flops_per_step = r['train_flops'] / r['steps']
    curve = [(x['step'] * flops_per_step, x['loss']) for x in records if 'loss' in x]
    if curve:
      curves.plot(*zip(*curve), label=r['name'])
  curves.set_xlabel('training FLOPs')
  curves.set_ylabel('training loss (nats per predicted symbol)')
  curves.legend(fontsize=8)
  fig.tight_layout()
  path = f'{path_prefix}.png'
  fig.savefig(path, dpi=110)
  return [path]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--preset', choices=sorted(arena_config.PRESETS), default='tiny')
  parser.add_argument('--models', default=','.join(arena_config.ARCHITECTURES),
                      help='comma-separated subset of ' + ','.join(arena_config.ARCHITECTURES))
  parser.add_argument('--corpus', choices=sorted(CORPORA), default='wikitext2')
  parser.add_argument('--runs', default='runs', help='parent of the run directories')
  parser.add_argument('--results', default='results')
  parser.add_argument('--override', nargs='*', default=[], help='key=value applied to every model (smoke runs)')
  parser.add_argument('--resume', action='store_true',
                      help='continue (or reuse) existing run directories instead of training afresh')
  parser.add_argument('--render', action='store_true', help='only re-render the table from its JSON')
  args = parser.parse_args()
  models = [m for m in args.models.split(',') if m]
  unknown = sorted(set(models) - set(arena_config.ARCHITECTURES))
  if unknown:
    parser.error(f'unknown model {unknown[0]!r}: choose from {", ".join(arena_config.ARCHITECTURES)}')
  name = f'arena-{args.preset}' + ('' if args.corpus == 'wikitext2' else f'-{args.corpus}')
  import jax
  measure_peak = not args.render and not any(o.startswith('train.peak_flops_per_device=') for o in args.override)
  if measure_peak and jax.default_backend() == 'cpu':
    from experiments.bench import host_matmul_flops  # MFU against this host's matmul rate, as in the benchmark
    args.override.append(f'train.peak_flops_per_device={host_matmul_flops():.4g}')
  os.makedirs(args.results, exist_ok=True)
  table_path = os.path.join(args.results, f'{name}.json')
  rows = json.load(open(table_path)) if os.path.exists(table_path) else []
  for model in ([] if args.render else models):
    row = train_row(args.preset, model, args.corpus, args.runs, args.override, args.resume)
    rows = [r for r in rows if r['name'] != model] + [row]
    rows.sort(key=lambda r: arena_config.ARCHITECTURES.index(r['name']))
    with open(table_path, 'w') as f:
      json.dump(rows, f, indent=1)
  plots = plot(rows, os.path.join(args.results, name))
  notes_path = os.path.join(args.results, f'{name}-notes.md')   # observations written by hand, kept on re-render
  notes = open(notes_path).read() if os.path.exists(notes_path) else ''
  with open(os.path.join(args.results, f'{name}.md'), 'w') as f:
    f.write(render(args.preset, args.corpus, rows, plots, notes))
  print(open(os.path.join(args.results, f'{name}.md')).read())


if __name__ == '__main__':
  main()
