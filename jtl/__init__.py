"""jtl: transfer learning for image classification, in JAX."""

__all__ = ["Model", "PretrainedCfg", "create_model", "list_models"]


def __getattr__(name: str):
  # Loaded on first use, not on `import jtl`: every command imports this package first, and
  # `jtl --help` must not wait seconds for jax and flax (jtl.models) to load.
  if name in __all__:
    from jtl import models
    return getattr(models, name)
  raise AttributeError(f"module 'jtl' has no attribute {name!r}")
