"""The suite every registered model runs (`models.names()`): a new architecture is covered by registering it
and adding its tiny shape to `conftest.TINY_MODELS`. What a model cannot do is declared on the model
(`cached_decoding`, `batch_format`), and the suite reads it there.

Model-specific behaviour stays in each model's own test file."""

import json
import pathlib

import numpy as np
import pytest

import models
from golden.record import GOLDEN, twenty_step_losses

NAMES = models.names()


@pytest.mark.parametrize('name', NAMES)
def test_twenty_step_losses_are_unchanged(name, cache_dir):
  """The guard of every restructure: the first 20 training losses at the tiny config, seeded init, equal
  the ones recorded before it (tests/golden/losses.json; rerun tests/golden/record.py only for a change
  that is meant to alter training, and say so in its commit)."""
  golden = json.loads(GOLDEN.read_text())
  np.testing.assert_allclose(twenty_step_losses(name, cache_dir), golden[name], rtol=0, atol=1e-6)


def test_every_registered_model_has_a_tiny_shape_and_a_golden_record():
  from conftest import TINY_MODELS
  assert set(TINY_MODELS) == set(NAMES)
  assert set(json.loads(pathlib.Path(GOLDEN).read_text())) == set(NAMES)
