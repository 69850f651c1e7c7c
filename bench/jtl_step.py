"""jtl's side of a step measurement: the engine's own training step, compiled and timed.

The step comes from `jtl.steps.make_train_step`, the factory the engine and the feature cache
call, so what is timed is what a run executes (freeze plan, optimizer, BatchNorm modes,
shardings, donated state); nothing is rebuilt here.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere: jtl from this checkout

from jtl import config as config_lib  # noqa: E402
from jtl import distributed, optim, steps  # noqa: E402
from jtl import params as P  # noqa: E402

NUM_CLASSES = 10
WARMUP_STEPS = 2  # the yardstick also drops its first two steps
STRATEGIES = ("feature", "last", "full")


def freeze_depth_of(strategy: str, stage_names) -> int:
  """The yardstick's strategies as frozen leading stages: feature = all but the head, last =
  all but the last backbone stage and the head (torchvision's layer4 / features[-1])."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  return {"feature": len(stage_names) - 1, "last": len(stage_names) - 2, "full": 0}[strategy]


def engine_config(freeze_depth: int, stage_names, bf16: bool = False):
  """The engine's config freezing the first `freeze_depth` stages, with the yardstick's
  optimizer (Adam at a constant 1e-3); bf16: compute in bfloat16 (config.bf16)."""
  c = config_lib.default_config()
  c.bf16 = bf16
  if freeze_depth == len(stage_names) - 1:
    c.strategy = "feature_extraction"
  elif freeze_depth == 0:
    c.strategy = "full"
  else:
    c.strategy, c.freeze_depth = "partial", freeze_depth
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.schedule.name = "constant"
  c.schedule.warmup_epochs = 0.0
  config_lib.validate(c)
  return c


def input_struct(model, mesh, start_stage: int, batch_size: int, res: int):
  """Shape and dtype of the step's "image" input: images, or the first start_stage stages'
  outputs (what the feature cache feeds the step), found without running anything."""
  images = jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32)
  if start_stage == 0:
    return images
  features = steps.make_features_fn(model, mesh, stop_stage=start_stage)
  variables = model.variables
  return jax.eval_shape(features, variables["params"], variables.get("batch_stats", {}), images)


def flops_of(compiled) -> float | None:
  """The "flops" entry of XLA's cost analysis of a compiled program (None if absent)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return None if not cost or "flops" not in cost else float(cost["flops"])


class JtlStep:
  """The engine's training step for one model, freeze depth and input, compiled once."""

  def __init__(self, model, freeze_depth: int, res: int, batch_size: int, start_stage: int = 0,
               bf16: bool = False):
    config = engine_config(freeze_depth, model.stage_names, bf16)
    params = model.variables["params"]
    batch_stats = model.variables.get("batch_stats", {})
    rules = optim.freeze_rules(config.strategy, model.stage_names, config.freeze_depth,
                               config.trainable)
    plan = optim.make_freeze_plan(params, model.stage_names, rules)
    mesh = distributed.make_mesh()
    step = steps.make_train_step(model, plan, config, mesh,
                                 schedule=optim.make_schedule(config, 1),
                                 num_classes=NUM_CLASSES, start_stage=start_stage)
    self.state = step.init_state(params, batch_stats, seed=0)
    self.batch = self._batch(model, mesh, start_stage, batch_size, res)
    start = time.perf_counter()
    self.compiled = step.fn.lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.flops = flops_of(self.compiled)
    self.input_shape = tuple(self.batch["image"].shape)
    self.trainable_params = int(P.count({k: v for k, v in P.flatten(params).items()
                                         if plan.labels[k] != optim.FROZEN}))
    self.total_params = int(P.count(params))
    self.name = f"{model.name} depth {freeze_depth} from stage {start_stage}"

  @staticmethod
  def _batch(model, mesh, start_stage: int, batch_size: int, res: int) -> dict:
    struct = input_struct(model, mesh, start_stage, batch_size, res)
    rng = np.random.default_rng(0)  # values do not change the step time
    local = {"image": rng.standard_normal(struct.shape).astype(struct.dtype),
             "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)}
    return distributed.global_batch(local, mesh)

  def seconds_per_step(self, steps: int, warmup: int = WARMUP_STEPS) -> float:
    """Median over `steps` steps after `warmup` untimed ones (caches, allocator)."""
    times = []
    for _ in range(warmup + steps):
      start = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    if not bool(metrics["finite"]):
      raise FloatingPointError(f"{self.name}: non-finite loss in the timed steps")
    return statistics.median(times[warmup:])
