"""Every registered model with its parameter count, stages, default weights and their licence
(`jtl models`); counts from jax.eval_shape: nothing is initialised or downloaded."""
import functools

import jax
import jax.numpy as jnp

from jtl import params as P
from jtl.models import registry


def describe(pattern: str = "*") -> list[dict]:
  rows = []
  for name in registry.list_models(pattern):
    entry = registry.get_entry(name)
    cfg = entry.default_cfg
    module = entry.build(num_classes=cfg.num_classes)
    size = getattr(module, "image_size", None) or cfg.image_size
    shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    source = cfg.pypi and f"pypi:{cfg.pypi.split(':')[0]}" or cfg.hf_hub_id or "-"
    rows.append({"name": name, "params": P.count(shapes["params"]), "input": size,
                 "stages": list(module.stage_names), "default_weights": source,
                 "license": cfg.weights_license})
  return rows
