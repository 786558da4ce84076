"""The arena's parameter and FLOP matching, its CLI end to end on two steps, and one benchmark case."""

import json
import math

import pytest
from conftest import run_module

from experiments import bench
from experiments.configs import arena


def test_every_architecture_matches_the_baselines_parameters_and_training_flops():
  target_params, target_flops_per_token = arena.baseline('tiny')
  tiny = arena.PRESETS['tiny']
  d, seq_len, batch, steps = tiny['d_model'], tiny['seq_len'], tiny['batch'], tiny['steps']
  for name in arena.ARCHITECTURES:
    c = arena.get_config(f'tiny,{name}')
    assert (c.model.d_model, c.train.seq_len, c.train.batch_size) == (d, seq_len, batch)
    assert arena.non_embedding_params(c) == pytest.approx(target_params, rel=0.005), name
    flops = c.train.steps * arena.model_of(c).flops_per_token(seq_len)
    assert flops == pytest.approx(steps * target_flops_per_token, rel=0.5 / c.train.steps), name
  assert arena.get_config('tiny,mor').train.steps < steps < arena.get_config('tiny,hat').train.steps
  # Compared causally: MoR's default evaluation ranks the whole window by its training top-k.
  assert arena.get_config('tiny,mor').model.eval_routing == 'threshold'


def test_arena_cli_writes_the_row_and_lists_the_missing(tmp_path):
  out = run_module('experiments.arena', '--preset', 'tiny', '--models', 'transformer', '--runs', str(tmp_path / 'runs'),
                   '--results', str(tmp_path), '--override', 'train.steps=2', 'train.log_every=1')
  assert out.returncode == 0, out.stderr
  [row] = json.load(open(tmp_path / 'arena-tiny.json'))
  assert row['name'] == 'transformer' and row['steps'] == 2 and row['knob'] == 'd_ff=512'
  assert row['train_flops'] == 2 * 8 * 256 * arena.baseline('tiny')[1]
  assert 0 < row['valid_bpb'] < 10 and 0 < row['test_bpb'] < 10 and row['tokens_per_sec'] > 0
  assert row['peak_memory_bytes'] > 0 and row['compile_time_s'] > 0 and row['commit'] and row['hardware']
  table = open(tmp_path / 'arena-tiny.md').read()
  assert '| transformer | d_ff=512 |' in table and (tmp_path / 'arena-tiny.png').exists()
  missing = table.split('## Missing rows')[1]
  assert all(f'`{name}`' in missing for name in arena.ARCHITECTURES if name != 'transformer')


def test_bench_case_measures_the_trainers_step(cache_dir):
  row = bench.run_case('hat', 'tiny', 64, tokens_per_step=256, repeats=2, steps_per_repeat=1, cache_dir=cache_dir)
  assert row['status'] == 'ok' and row['batch'] == 4 and row['seq_len'] == 64
  assert row['tokens_per_sec'] == pytest.approx(256 / row['step_time_s'])
  assert 0 < row['mfu'] < 1 and row['peak_memory_mb'] > 0 and not row['memory_measured']
  assert math.isclose(row['non_embedding_params'], arena.baseline('tiny')[0], rel_tol=0.005)


def test_generation_benchmark_case_runs_every_token(cache_dir):
  """One case of experiments.gen_bench: the seq2seq model, whose uncached step is its decoder over the buffer."""
  from experiments import gen_bench
  row = gen_bench.run_case('mrt5', 'tiny', 16, 8, 2, cache_dir)   # asserts each row generated all 8 tokens
  assert row['status'] == 'ok' and row['batch'] == 2
  assert row['speedup'] == pytest.approx(row['cached_tokens_per_sec'] / row['uncached_tokens_per_sec'])
