"""Print the parameter PartitionSpecs a config resolves to (run with 8 forced CPU devices)."""
import json, sys
import jax
from conftest import tiny_config
from train import trainer
config = tiny_config(sys.argv[3], **json.loads(sys.argv[1]))
assert jax.device_count() == 8
setup = trainer.Setup(config, sys.argv[2])
specs = {jax.tree_util.keystr(path): str(s.spec) for path, s in
         jax.tree_util.tree_leaves_with_path(setup.state_shardings['params'])}
print(json.dumps(specs))
