"""Frozen work done once: the frozen prefix's outputs, computed once per split and reused.

When the first K stages are frozen and see fixed inputs, running them again at every step only
repeats the same forward pass. The cache runs them once per split in inference mode (exactly
what the training step's frozen prefix computes), keeps their outputs and trains stages K.. on
them. Inputs are fixed when there is no random augmentation (one view), when horizontal flip is
the only one (two views, identity and flip, picked per epoch by the very draw the uncached
pipeline makes, so the run is the same run), or when `feature_cache.views=N` asks for N fixed
augmented views drawn once.

The cache lives outside the workdir, keyed by everything its contents depend on (model, the
frozen variables' digest, preprocessing, views, frozen depth, each split's files), so a second
run, an ablation point or a learning-rate sweep on the same data reuses it. Arrays are .npy
files, loaded into memory when they fit and memory-mapped otherwise.

Several hosts: when the cache directory is on storage every host sees, host p computes and
writes only its own rows ({split}.part-p-of-P.npy: the examples p, p + P, ... its evaluation
shard holds), a barrier, then host 0 marks the cache complete; a reader with any number of
processes maps example i to (part i % P, row i // P) (PartedFeatures). On storage private to
each host, every host gathers all rows and keeps a full copy, as one host does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Iterator

import jax
import numpy as np

from jtl import distributed, steps
from jtl import params as P
from jtl import data as data_lib

log = logging.getLogger(__name__)

_VIEW_CHOICE_STREAM = 0x5E1


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """How the prefix's inputs are fixed: `views` per training image, `augmented` when they are
  drawn from the training augmentation (else identity and, with two, its flip)."""
  stop_stage: int
  views: int
  augmented: bool


def _random_augmentations(a) -> list[str]:
  names = []
  if a.random_resized_crop:
    names.append("random_resized_crop")
  if a.rotation_degrees:
    names.append("rotation_degrees")
  if a.color_jitter:
    names.append("color_jitter")
  if a.randaugment_ops:
    names.append("randaugment_ops")
  return names


def plan_cache(config, frozen_stages: int) -> tuple[CachePlan | None, str]:
  """(the plan, why) when the cache applies; (None, why not) otherwise."""
  fc, a = config.feature_cache, config.augment
  if fc.mode == "off":
    return None, "feature_cache.mode=off"
  if frozen_stages == 0:
    return None, "no stage is frozen ahead of the trained ones"
  if config.unfreeze_every_epochs:
    return None, "gradual unfreezing (unfreeze_every_epochs) moves the frozen prefix"
  if a.mixup_alpha or a.cutmix_alpha:
    return None, "mixup/cutmix blend images before the frozen prefix"
  random = _random_augmentations(a)
  if fc.views:
    return CachePlan(frozen_stages, int(fc.views), augmented=bool(random)), (
        f"{fc.views} fixed views" + (f" of {', '.join(random)}" if random else ""))
  if random:
    return None, (f"random augmentation ({', '.join(random)}) changes the prefix's inputs "
                  "every epoch; set feature_cache.views=N for N fixed views")
  views = 2 if a.hflip else 1
  return CachePlan(frozen_stages, views, augmented=False), (
      "identity and flipped views" if views == 2 else "one view")


def pools_features(model, stop_stage: int) -> bool:
  """Whether the cache may hold pooled features: only the head is left to run and it begins
  with a global average pool (EfficientNet, ResNet, Inception; not VGG's flattening classifier
  nor ViT's tokens). 16x smaller at 128 px for EfficientNet, 49x at 224 px for ResNet-50, and
  the same head outputs."""
  return (tuple(model.stage_names[stop_stage:]) == ("head",)
          and getattr(model.module, "head_pools_globally", False))


def cache_root(config) -> str:
  return os.path.expanduser(config.feature_cache.dir or os.environ.get("JTL_CACHE_DIR")
                            or os.path.join("~", ".cache", "jtl", "features"))


def variables_digest(variables) -> str:
  """sha256 over every array's name, dtype, shape and bytes."""
  h = hashlib.sha256()
  for name, value in sorted(P.flatten(variables).items()):
    array = np.ascontiguousarray(np.asarray(value))
    h.update(f"{name}:{array.dtype}:{array.shape}".encode())
    h.update(array.tobytes())
  return h.hexdigest()


def split_fingerprint(table) -> str:
  """The files of a split as they are now: path, size and modification time of each (content
  for in-memory records; the conversion and record ids for records read by index), with
  labels and order; an edited image changes it."""
  h = hashlib.sha256()
  h.update(np.asarray(table.labels, np.int32).tobytes())
  if table.reader is not None:  # records: the conversion (its shards are checked at open)
    h.update(table.reader.identity.encode())
    h.update(np.asarray(table.sources, np.int64).tobytes())
    return h.hexdigest()
  for source in table.sources:
    if table.from_files:
      st = os.stat(source)
      h.update(f"{source}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
      h.update(hashlib.sha256(source).digest())
  return h.hexdigest()


def _prefix_variables(model, stop_stage: int) -> dict:
  prefix = set(model.stage_names[:stop_stage])
  return {collection: {k: v for k, v in tree.items() if k in prefix}
          for collection, tree in model.variables.items()}


def cache_key(config, model, dataset, preprocess, plan: CachePlan) -> str:
  module = model.module
  if hasattr(module, "num_classes"):  # the head is not part of the prefix
    module = module.clone(num_classes=0)
  spec = {
      "version": 1, "module": repr(module), "stop_stage": plan.stop_stage,
      "pooled": pools_features(model, plan.stop_stage),
      "weights": variables_digest(_prefix_variables(model, plan.stop_stage)),
      "preprocess": repr(preprocess), "views": plan.views, "augmented": plan.augmented,
      "augment": config.augment.to_dict() if plan.augmented else None,
      "seed": config.seed if plan.augmented else None, "dtype": config.feature_cache.dtype,
      "backend": jax.default_backend(),
      "splits": {s: split_fingerprint(dataset.table(s)) for s in ("train", "val", "test")
                 if dataset.has_split(s)},
  }
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


class FeatureCache:
  """The cached prefix outputs of every split: features[split] is [views, N, ...]."""

  def __init__(self, plan: CachePlan, features: dict[str, np.ndarray],
               labels: dict[str, np.ndarray], directory: str):
    self.plan = plan
    self.features = features
    self.labels = labels
    self.directory = directory

  def num_examples(self, split: str) -> int:
    return len(self.labels[split])


def open_cache(config, model, dataset, preprocess, plan: CachePlan, mesh) -> FeatureCache:
  """The cache for this run: reused when its key is on disk, built (and stored) otherwise."""
  directory = os.path.join(cache_root(config), cache_key(config, model, dataset, preprocess,
                                                         plan))
  splits = [s for s in ("train", "val", "test") if dataset.has_split(s)]
  if os.path.isfile(os.path.join(directory, "done.json")):
    log.info("feature cache reused: %s (the first %d stages' outputs)", directory,
             plan.stop_stage)
  else:
    _Builder(config, model, dataset, preprocess, plan, mesh).build(directory, splits)
  features = {s: load_split(directory, s) for s in splits}
  labels = {s: np.asarray(dataset.table(s).labels, np.int32) for s in splits}
  return FeatureCache(plan, features, labels, directory)


def part_name(split: str, part: int, parts: int) -> str:
  return f"{split}.part-{part:05d}-of-{parts:05d}.npy"


class PartedFeatures:
  """A split's features written in parts by P hosts, read as one [views, N, ...] array: example
  i is row i // P of part i % P. Indexing takes (view, example indices), as CachedBatches does."""

  def __init__(self, parts: list[np.ndarray]):
    self.parts = parts
    views, first = parts[0].shape[0], parts[0].shape[2:]
    self.shape = (views, sum(p.shape[1] for p in parts), *first)
    self.dtype = parts[0].dtype

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key):
    view, index = key
    index = np.asarray(index)
    view = np.broadcast_to(np.asarray(view), index.shape)
    out = np.empty(index.shape + self.shape[2:], self.dtype)
    count = len(self.parts)
    part, row = index % count, index // count
    for p in np.unique(part):
      mine = part == p
      out[mine] = self.parts[p][view[mine], row[mine]]
    return out


def load_split(directory: str, split: str, budget_bytes: int | None = None):
  """A split's features: one array (in memory or memory-mapped), or the parts several hosts
  wrote, interleaved back into one array when they fit in memory (PartedFeatures otherwise)."""
  whole = os.path.join(directory, f"{split}.npy")
  if os.path.exists(whole):
    return load_features(whole, budget_bytes)
  with open(os.path.join(directory, "done.json")) as f:
    count = json.load(f)["parts"]
  paths = [os.path.join(directory, part_name(split, p, count)) for p in range(count)]
  parts = [np.load(p, mmap_mode="r") for p in paths]
  if budget_bytes is None:
    budget_bytes = data_lib.dataset.default_cache_budget_bytes()
  if sum(os.path.getsize(p) for p in paths) > budget_bytes:
    return PartedFeatures(parts)
  merged = np.empty(PartedFeatures(parts).shape, parts[0].dtype)
  for p, part in enumerate(parts):
    merged[:, p::count] = part
  return merged


def load_features(path: str, budget_bytes: int | None = None) -> np.ndarray:
  """In memory when it fits the budget (that of decoded images by default); memory-mapped,
  read through the page cache, otherwise."""
  if budget_bytes is None:
    budget_bytes = data_lib.dataset.default_cache_budget_bytes()
  return np.load(path, mmap_mode="r" if os.path.getsize(path) > budget_bytes else None)


@dataclasses.dataclass
class _Builder:
  """Runs the frozen prefix over every split once, into .npy files."""
  config: object
  model: object
  dataset: object
  preprocess: object
  plan: CachePlan
  mesh: object

  def build(self, directory: str, splits) -> None:
    plan = self.plan
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    parted = jax.process_count() > 1 and _seen_by_every_host(parent)
    log.info("feature cache built: running the first %d stages once over %s (%d view%s of "
             "train) into %s%s", plan.stop_stage, "/".join(splits), plan.views,
             "s" if plan.views > 1 else "", directory,
             f" ({jax.process_count()} hosts, a part each)" if parted else "")
    dtype = np.float32 if self.config.feature_cache.dtype == "float32" else jax.numpy.bfloat16
    self.features_fn = steps.make_features_fn(
        self.model, self.mesh, stop_stage=plan.stop_stage, dtype=dtype,
        pool=pools_features(self.model, plan.stop_stage), gather=not parted)
    if parted:
      self._build_parts(directory, splits)
      return
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
      for split in splits:
        self.write_split(split, plan.views if split == "train" else 1,
                         os.path.join(tmp, f"{split}.npy"))
      self._finish(tmp, directory, parts=1)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise

  def _finish(self, tmp: str, directory: str, parts: int) -> None:
    with open(os.path.join(tmp, "done.json"), "w") as f:
      json.dump({"stop_stage": self.plan.stop_stage, "views": self.plan.views,
                 "model": self.config.model, "parts": parts}, f)
    try:
      os.rename(tmp, directory)
    except OSError:  # another process (a host of the same run, a parallel sweep) was first
      shutil.rmtree(tmp, ignore_errors=True)

  def _build_parts(self, directory: str, splits) -> None:
    """Each host writes its part into one shared temporary directory; host 0 completes it."""
    tmp = os.path.join(os.path.dirname(directory), f".building-{os.path.basename(directory)}-"
                       f"{distributed.shared_run_id()[:16]}")
    os.makedirs(tmp, exist_ok=True)
    hosts, me = jax.process_count(), jax.process_index()
    for split in splits:
      self.write_split(split, self.plan.views if split == "train" else 1,
                       os.path.join(tmp, part_name(split, me, hosts)), part=(me, hosts))
    distributed.sync("feature cache parts written")
    if distributed.is_host0():
      self._finish(tmp, directory, parts=hosts)
    distributed.sync("feature cache complete")

  def write_split(self, split: str, views: int, path: str, part: tuple[int, int] | None = None
                  ) -> None:
    """The split's features into `path`: all rows, or with part=(p, P) the rows of host p's
    examples p, p + P, ... (row r holds example p + r * P)."""
    config, n = self.config, self.dataset.num_examples(split)
    hosts = jax.process_count()
    local = config.eval_batch_size // hosts
    variables = distributed.replicate(
        (self.model.variables["params"], self.model.variables.get("batch_stats", {})),
        self.mesh)
    augment = data_lib.Augment.from_config(config.augment) if self.plan.augmented else None
    # Host p's slot i of local batch j holds example eval_example_indices(p)[j * B + i]; the
    # replicated output concatenates the hosts' local batches in process order.
    slots = np.stack([data_lib.eval_example_indices(n, local, p, hosts) for p in range(hosts)])
    rows = n if part is None else len(range(part[0], n, part[1]))
    out = None
    for view in range(views):
      for j, batch in enumerate(data_lib.eval_batches(
          self.dataset, split, batch_size=local, preprocess=self.preprocess,
          shard=data_lib.Shard(jax.process_index(), hosts), view=view, augment=augment,
          seed=config.seed)):
        images = distributed.global_batch({"image": batch["image"]}, self.mesh)["image"]
        output = self.features_fn(*variables, images)
        if part is None:
          feats = np.asarray(jax.device_get(output))
          index = slots[:, j * local:(j + 1) * local].reshape(-1)
        else:  # this host's rows only, in its local batch's order
          shards = sorted(output.addressable_shards, key=lambda s: s.index[0].start or 0)
          feats = np.concatenate([np.asarray(s.data) for s in shards])
          index = slots[part[0], j * local:(j + 1) * local] // part[1]
        if out is None:
          out = np.lib.format.open_memmap(path, mode="w+", dtype=feats.dtype,
                                          shape=(views, rows, *feats.shape[1:]))
        keep = index >= 0
        out[view, index[keep]] = feats[keep]
    if out is None:  # a host with no example of this split still leaves its (empty) part
      np.save(path, np.zeros((views, 0), np.float32))
      return
    out.flush()


def _seen_by_every_host(directory: str) -> bool:
  """Whether a file host 0 writes into `directory` is visible to every host (shared storage)."""
  marker = os.path.join(directory, f".hosts-see-{distributed.shared_run_id()[:16]}")
  if distributed.is_host0():
    with open(marker, "w") as f:
      f.write("host 0\n")
  distributed.sync("feature cache storage probe")
  seen = all(distributed.all_gather_json(os.path.exists(marker)))
  distributed.sync("feature cache storage probed")
  if distributed.is_host0():
    os.remove(marker)
  return seen


class CachedBatches:
  """Batches of cached features, in the order and shards of the image pipeline."""

  def __init__(self, cache: FeatureCache, *, seed: int, balanced: bool = False):
    self.cache = cache
    self.seed = seed
    self.balanced = balanced  # class-balanced epochs (config.balanced_sampling)

  def train_epoch(self, *, batch_size: int, epoch: int, start_step: int = 0,
                  shard: data_lib.Shard = data_lib.Shard()) -> Iterator[dict]:
    """The batches `data.train_batches` would give this process, as features."""
    features, labels = self.cache.features["train"], self.cache.labels["train"]
    mine = data_lib.epoch_batches(len(labels), batch_size, self.seed, epoch, start_step, shard,
                                  labels if self.balanced else None)
    views = self._views(epoch, mine.reshape(-1)).reshape(mine.shape)
    for indices, view in zip(mine, views):
      yield {"image": np.asarray(features[view, indices]), "label": labels[indices]}

  def _views(self, epoch: int, indices: np.ndarray) -> np.ndarray:
    plan = self.cache.plan
    if plan.views == 1:
      return np.zeros(len(indices), np.int64)
    if not plan.augmented:  # identity / flip, as the uncached pipeline draws it
      return data_lib.hflip_decisions(self.seed, epoch, indices).astype(np.int64)
    # One view per example and epoch, drawn for the whole split so a resumed epoch agrees.
    rng = np.random.default_rng([self.seed, epoch, _VIEW_CHOICE_STREAM])
    return rng.integers(plan.views, size=self.cache.num_examples("train"))[indices]

  def eval_split(self, split: str, *, batch_size: int,
                 shard: data_lib.Shard = data_lib.Shard()) -> Iterator[dict]:
    """The batches `data.eval_batches` would give, as features (view 0), padding masked."""
    features, labels = self.cache.features[split], self.cache.labels[split]
    indices = data_lib.eval_example_indices(len(labels), batch_size, shard.index, shard.count)
    for start in range(0, len(indices), batch_size):
      index = indices[start:start + batch_size]
      mask = index >= 0
      safe = np.where(mask, index, 0)
      image = np.asarray(features[0, safe])
      image[~mask] = 0
      yield {"image": image, "label": np.where(mask, labels[safe], 0).astype(np.int32),
             "mask": mask}
