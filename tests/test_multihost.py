"""Two CPU processes on 127.0.0.1 train like one process and write one shared checkpoint."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, config_flags

from train import checkpoint, trainer


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(make_config, tmp_path):
  config = make_config(**{'train.steps': 4, 'mesh.data': -1})
  single = trainer.Trainer(make_config(**{'train.steps': 4}), str(tmp_path / 'one')).run()
  port = free_port()
  procs = []
  for pid in range(2):
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu',
           'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(pid)}
    procs.append(subprocess.Popen([sys.executable, '-m', 'train', *config_flags(config), '--workdir',
                                   str(tmp_path / 'two')], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  result = json.loads(outs[0][0].strip().splitlines()[-1])   # process 0 reports
  assert not any(line.startswith('{') for line in outs[1][0].splitlines())   # only process 0 reports
  assert result['loss'] == pytest.approx(single['loss'], rel=1e-5)
  assert result['eval_loss'] == pytest.approx(single['eval_loss'], rel=1e-5)
  assert checkpoint.Checkpointer(str(tmp_path / 'two'), keep=5, async_save=False).latest_step() == 4
  assert sorted(os.listdir(tmp_path / 'two' / 'checkpoints')) == ['3', '4']
