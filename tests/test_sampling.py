"""The next-token rule (`models.sampling.Sampling`) and the lock-step loop, on hand-made logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import sampling


def draws(rule: sampling.Sampling, logits, n: int = 400) -> set[int]:
  keys = jax.random.split(jax.random.key(0), n)
  return set(np.asarray(jax.jit(rule.pick)(jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1)), keys)).tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = np.log([0.5, 0.3, 0.15, 0.05])
  assert draws(sampling.Sampling(top_p=0.4), logits) == {0}
  assert draws(sampling.Sampling(top_p=0.7), logits) == {0, 1}
  assert draws(sampling.Sampling(top_p=0.9), logits) == {0, 1, 2}
  assert draws(sampling.Sampling(), logits) == {0, 1, 2, 3}


def test_top_k_temperature_and_vocab_limit():
  logits = np.log([0.1, 0.2, 0.3, 0.4])
  assert draws(sampling.Sampling(top_k=2), logits) == {2, 3}
  assert draws(sampling.Sampling(temperature=0), logits) == {3}
  assert draws(sampling.Sampling(vocab_limit=2), logits) == {0, 1}
  assert draws(sampling.Sampling(temperature=0, vocab_limit=3), logits) == {2}


@pytest.mark.parametrize('bad', [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)])
def test_bad_settings_are_refused(bad):
  with pytest.raises(ValueError, match='sampling needs'):
    sampling.Sampling(**bad)


def test_lockstep_feeds_each_row_its_prompt_then_its_samples():
  """A fake model that predicts (last token fed + 1): each row continues from its own prompt's end."""
  fed = []

  def advance(tokens, position):
    fed.append((position, np.asarray(tokens).tolist()))
    return jax.nn.one_hot(tokens + 1, 50)

  prompts = [np.asarray([3]), np.asarray([10, 11, 12])]
  out = sampling.lockstep(prompts, 3, start=lambda prefix: jax.nn.one_hot(prefix[:, -1] + 1, 50), advance=advance,
                          pick=lambda logits, rows, steps: jnp.argmax(logits, -1))
  assert [o.tolist() for o in out] == [[4, 5, 6], [13, 14, 15]]
  assert fed[:2] == [(1, [4, 11]), (2, [5, 12])]   # row 1 still reads its prompt while row 0 samples
