"""Architectures behind one interface: `models.build(config.model)` returns a registered Linen module."""

from models import grassmann, hat, landmark, lexinvariant, mor, mrt5, tokenformer, transformer  # noqa: F401  (register the architectures)
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

__all__ = ['InputError', 'LanguageModel', 'abstract_variables', 'build', 'default_config', 'model_class', 'names',
           'param_counts', 'register']
