"""Architectures behind one interface: `models.build(config.model)` returns a registered Linen module."""

from models.registry import (LanguageModel, abstract_variables, build, default_config, model_class, names,
                             param_counts, register)
from models import grassmann, hat, landmark, lexinvariant, mor, mrt5, tokenformer, transformer  # noqa: F401  (register the architectures)

__all__ = ['LanguageModel', 'abstract_variables', 'build', 'default_config', 'model_class', 'names',
           'param_counts', 'register']
