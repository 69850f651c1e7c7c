"""What a pruned model costs: parameters (all and non-zero), FLOPs of its compiled forward pass,
the size of its export plain and gzip-compressed, and its latency at a batch size.

FLOPs are the "flops" entry of XLA's cost analysis of the jitted eval-mode forward pass (as in
bench/freeze_costs.py); they count dense work, so magnitude pruning leaves them unchanged and
only the zeros' compressibility shows its gain. Latency is the median of a few timed calls after
warm-up on whatever else the machine is doing: indicative, compare rows of one run.
"""
from __future__ import annotations

import functools
import os
import statistics
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jtl import params as P
from jtl.pruning import magnitude

LATENCY_BATCHES = (1, 32)


@functools.lru_cache(maxsize=8)
def _forward(module):
  return jax.jit(lambda variables, x: module.apply(variables, x, train=False))


def compiled_forward(model, image_size: int, batch_size: int = 1):
  """The eval-mode forward pass (variables, images) -> logits, compiled for that batch."""
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
  return _forward(model.module).lower(model.variables, images).compile()


def flops_of(compiled) -> float | None:
  """The "flops" entry of XLA's cost analysis of a compiled program (None if absent)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return float(cost["flops"]) if cost and "flops" in cost else None


def forward_flops(model, image_size: int, batch_size: int = 1) -> float | None:
  """FLOPs of one eval-mode forward pass of `batch_size` images."""
  return flops_of(compiled_forward(model, image_size, batch_size))


def latency_ms(model, image_size: int, batch_size: int, repeats: int = 5,
               warmup: int = 2) -> float:
  """Median milliseconds of an eval-mode forward pass of `batch_size` random images."""
  forward = _forward(model.module)
  x = jnp.asarray(np.random.default_rng(0).normal(
      size=(batch_size, image_size, image_size, 3)).astype(np.float32))
  variables = jax.device_put(model.variables)
  for _ in range(warmup):
    forward(variables, x).block_until_ready()
  times = []
  for _ in range(max(repeats, 1)):
    started = time.perf_counter()
    forward(variables, x).block_until_ready()
    times.append(time.perf_counter() - started)
  return 1000.0 * statistics.median(times)


def gzip_size(path: str, level: int = 6) -> int:
  """Bytes of `path` once gzip-compressed (deflate, as gzip does, streamed)."""
  compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: the gzip container
  size = 0
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      size += len(compressor.compress(chunk))
  return size + len(compressor.flush())


def measure(model, export_file: str, image_size: int, *, repeats: int = 5) -> dict:
  """Every figure of a summary row but the test metrics (those are the run's own)."""
  params = model.variables["params"]
  nonzero = int(sum(np.count_nonzero(np.asarray(v)) for v in jax.tree_util.tree_leaves(params)))
  row = {"params": P.count(params), "nonzero_params": nonzero,
         "kernel_sparsity": round(magnitude.kernel_sparsity(params), 6),
         "flops": forward_flops(model, image_size),
         "export_bytes": os.path.getsize(export_file), "export_gzip_bytes": gzip_size(export_file),
         "inner_widths": list(getattr(model.module, "inner_widths", None) or ())}
  for batch in LATENCY_BATCHES:
    row[f"latency_b{batch}_ms"] = round(latency_ms(model, image_size, batch, repeats), 3)
  return row
