"""Where the work runs: the device mesh, how a host's data becomes a global array, and joining
the other processes of a multi-host run.

Data parallel over every device JAX sees (a 1-D `jax.sharding.Mesh` named "data": the batch is
split over it, the state replicated), on one host or many (each host feeds its own shard of
every global batch).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec("data"))


def is_host0() -> bool:
  return jax.process_index() == 0


def global_batch(local: dict, mesh: Mesh) -> dict:
  """This host's part of a batch -> one global array per key, split over the mesh."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def replicate(tree, mesh: Mesh):
  """Host values (the same on every host) -> arrays replicated on every device."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def host_copy(tree):
  """Host copies of a replicated tree, on every host (each holds every value; jax.device_get
  refuses an array that spans hosts)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def initialize(config) -> None:
  """Joins the other processes of a multi-host run (TPU VM pods, multi-GPU nodes, CPU tests)."""
  kwargs = {}
  if config.coordinator_address:
    kwargs["coordinator_address"] = config.coordinator_address
  if config.num_processes:
    kwargs["num_processes"] = config.num_processes
  if config.process_id >= 0:
    kwargs["process_id"] = config.process_id
  # CPU processes exchange gradients through gloo (the CPU backend has no collectives of its
  # own); the setting does not affect GPU or TPU devices.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def sync(name: str) -> None:
  """A barrier across hosts (nothing on one host)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def shared_run_id() -> str:
  """An id that every host of this run agrees on (host 0's random draw, broadcast)."""
  token = np.frombuffer(os.urandom(16), np.uint32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
  return "".join(f"{int(x):08x}" for x in token)


def all_gather_json(value) -> list:
  """Every host's `value` (anything json can write), in process order, on every host."""
  import json  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  payload = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int64(len(payload))))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(payload)] = payload
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]
