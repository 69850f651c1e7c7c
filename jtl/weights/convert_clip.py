"""CLIP image towers of timm, open_clip and transformers onto `jtl.models.clip`.

Position embeddings are resampled to the module's grid as the library that wrote the file
resamples them (convert_siglip.RESAMPLING), the class token's embedding untouched: timm and
open_clip bicubic with antialiasing, transformers torch's bicubic without it.

The towers have no classifier; their projection goes to "proj". For a module of zero classes
(the registered default) the converters give an empty head (convert_siglip.empty_head).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from jtl.weights.convert_siglip import (empty_head, fit_grid, keep_tower, split_fused,
                                        take_hf_blocks, take_timm_blocks)
from jtl.weights.mapping import StateMapper, dense_kernel


def _projection_width(module) -> int:
  return module.projection_dim or module.width


def convert_timm(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """timm VisionTransformer with pre_norm=True (vit_*_clip_*), whose head is CLIP's projection
  with a zero bias (timm's _convert_openai_clip adds it). An open_clip file is converted as
  open_clip's, as timm's checkpoint_filter_fn does."""
  if "visual.class_embedding" in state or "class_embedding" in state:
    return convert_open_clip(state, module)
  m = StateMapper(state)
  m.strip_prefix("module.")
  m.conv("patch_embed.proj", "embed/patch")
  m.take("cls_token", "params/embed/cls")
  m.take("pos_embed", "params/embed/pos_embedding",
         lambda p: fit_grid(p, module, "timm", num_prefix_tokens=1))
  m.norm("norm_pre", "embed/norm")
  take_timm_blocks(m, module.depth)
  m.norm("norm", "norm")
  if module.projection_dim:
    m.take("head.weight", "params/proj/kernel", dense_kernel)
    bias = m.state.pop("head.bias", None)
    if bias is not None and np.any(np.asarray(bias)):
      # Left among the names the model does not have, saying why, for the merge error.
      m.state["head.bias (not zero: a classifier on CLIP features, not CLIP's bias-free "
              "projection)"] = bias
  empty_head(m, module, _projection_width(module))
  return m.result()


def convert_open_clip(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """open_clip's VisionTransformer ("visual." in a whole CLIP model's file)."""
  m = StateMapper(state)
  keep_tower(m, "visual.")
  m.conv("conv1", "embed/patch")
  m.take("class_embedding", "params/embed/cls", lambda c: np.asarray(c).reshape(1, 1, -1))
  m.take("positional_embedding", "params/embed/pos_embedding",
         lambda p: fit_grid(p, module, "open_clip", num_prefix_tokens=1))
  m.norm("ln_pre", "embed/norm")
  for i in range(module.depth):
    src, dst = f"transformer.resblocks.{i}", f"block{i}"
    m.norm(f"{src}.ln_1", f"{dst}/norm1")
    split_fused(m, f"{src}.attn.in_proj_weight", f"{src}.attn.in_proj_bias", f"{dst}/attn")
    m.dense(f"{src}.attn.out_proj", f"{dst}/attn/out")
    m.norm(f"{src}.ln_2", f"{dst}/norm2")
    m.dense(f"{src}.mlp.c_fc", f"{dst}/fc1")
    m.dense(f"{src}.mlp.c_proj", f"{dst}/fc2")
  m.norm("ln_post", "norm")
  m.take("proj", "params/proj/kernel")  # (width, projection), used as x @ proj: already ours
  empty_head(m, module, _projection_width(module))
  return m.result()


def convert_hf(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """transformers CLIPVisionModel(WithProjection), or the image side of a CLIPModel.
  transformers 4 stored the tower under "vision_model." even alone; transformers 5 stores a
  CLIPVisionModel unprefixed."""
  m = StateMapper(state)
  projection = m.state.pop("visual_projection.weight", None)
  keep_tower(m, "vision_model.")
  if projection is not None:
    m.out["params/proj/kernel"] = dense_kernel(np.asarray(projection))
  m.conv("embeddings.patch_embedding", "embed/patch")
  m.take("embeddings.class_embedding", "params/embed/cls",
         lambda c: np.asarray(c).reshape(1, 1, -1))
  m.take("embeddings.position_embedding.weight", "params/embed/pos_embedding",
         lambda p: fit_grid(p, module, "hf", num_prefix_tokens=1))
  m.norm("pre_layrnorm", "embed/norm")  # sic: transformers' name
  take_hf_blocks(m, module.depth)
  m.norm("post_layernorm", "norm")
  empty_head(m, module, _projection_width(module))
  return m.result()


CONVERTERS = {"timm": convert_timm, "open_clip": convert_open_clip, "hf": convert_hf}
