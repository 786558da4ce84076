"""Print the parameter PartitionSpecs each model's tiny config resolves to (run with 8 forced CPU devices):
argv = mesh overrides (JSON), a scratch directory, comma-separated model names."""
import json, os, sys
import jax
from conftest import tiny_config
from train import trainer
assert jax.device_count() == 8
specs = {}
for model in sys.argv[3].split(','):
  setup = trainer.Setup(tiny_config(model, **json.loads(sys.argv[1])), os.path.join(sys.argv[2], model))
  specs[model] = {jax.tree_util.keystr(path): str(s.spec) for path, s in
                  jax.tree_util.tree_leaves_with_path(setup.state_shardings['params'])}
print(json.dumps(specs))
