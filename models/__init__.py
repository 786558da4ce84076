"""Architectures behind one interface: `models.build(config.model)` returns a registered Linen module.

Every module of this package other than the shared ones (`SHARED`) is an architecture: importing the
package imports it, which registers it. A new architecture is one new file here."""

import importlib
import pkgutil

from models.registry import (
  InputError,
  LanguageModel,
  abstract_variables,
  build,
  default_config,
  model_class,
  names,
  param_counts,
  register,
)

SHARED = ('formats', 'layers', 'registry', 'sampling', 'stack')
for _module in pkgutil.iter_modules(__path__):
  if _module.name not in SHARED:
    importlib.import_module(f'models.{_module.name}')

__all__ = ['InputError', 'LanguageModel', 'abstract_variables', 'build', 'default_config', 'model_class', 'names',
           'param_counts', 'register']
