"""jtl: transfer learning for image classification, in JAX."""
from jtl.models import Model, PretrainedCfg, create_model, list_models

__all__ = ["Model", "PretrainedCfg", "create_model", "list_models"]
