import pytest
from conftest import run_module

QUICK = ['--config', 'experiments/configs/quickstart.py', '--workdir', '/tmp/seqarch-never-created']

CASES = {
    'unknown key': (['--config.train.stepz=3'], "unknown config key --config.train.stepz (did you mean 'steps'?)"),
    'unknown model key': (['--config.model.heads=3'], 'unknown config key --config.model.heads'),
    'heads do not divide width': (['--config.model.num_heads=3'], 'model.num_heads=3 does not divide model.d_model=128'),
    'mesh does not match devices': (['--config.mesh.data=3'], "mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices"),
    'missing data directory': (['--config.data.corpus=text', '--config.data.dir=/no/such/dir'],
                               "data.dir='/no/such/dir' is not a directory"),
    'unknown corpus': (['--config.data.corpus=wiki'], "data.corpus='wiki' is not one of"),
    'seq_len beyond positions': (['--config.train.seq_len=512'], 'train.seq_len=512 exceeds model.max_len=128'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_fails_with_one_line_before_compiling(case):
  args, message = CASES[case]
  out = run_module('train', *QUICK, *args)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert lines[0].startswith('error: ') and message in lines[0]


def test_missing_config_file_and_workdir():
  out = run_module('train', '--config', 'experiments/configs/nope.py', '--workdir', '/tmp/x')
  assert out.returncode == 2 and out.stderr.strip() == (
      "error: --config=experiments/configs/nope.py could not be loaded: [Errno 2] No such file or directory: "
      "'experiments/configs/nope.py'")
  out = run_module('train.evaluate', '--workdir', '/no/such/run')
  assert out.returncode == 2 and out.stderr.strip().startswith('error: /no/such/run/config.json not found')


def test_landmark_passkey_variant_changes_only_the_passkey_recipe():
  from experiments.configs import landmark
  plain, recipe = landmark.get_config('tiny,landmark'), landmark.get_config('tiny,landmark,passkey')
  assert (plain.data.passkey_fraction, recipe.data.passkey_fraction) == (0.1, 0.9)
  assert recipe.train.steps == 6 * plain.train.steps
  assert recipe.model.to_dict() == plain.model.to_dict()
  with pytest.raises(ValueError, match='must be passkey'):
    landmark.get_config('tiny,landmark,pass')
