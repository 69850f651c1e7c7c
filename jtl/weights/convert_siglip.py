"""SigLIP image towers of timm, transformers and big_vision onto `jtl.models.siglip`.

When the module's patch grid differs from the checkpoint's, the position embeddings are
resampled as the library that wrote the file resamples them (`RESAMPLING`), so that features
at another resolution equal that library's:
- timm: bicubic with antialiasing (checkpoint_filter_fn -> resample_abs_pos_embed);
- transformers: torch's F.interpolate(mode="bicubic", align_corners=False), no antialiasing,
  as `interpolate_pos_encoding=True` does at run time;
- big_vision: linear, corners aligned (vit.resample_posemb's scipy.ndimage.zoom(order=1)).
The layout a model was loaded from is its PretrainedCfg.layout, which a run records in
model.json; a run's exported weights are already at its resolution.

The checkpoints have no classifier. For a module of zero classes (the registered default),
the converters give an empty head, so that the weights load as they are; with classes, the
head is left out and the loader initialises a new one.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

from jtl.weights import convert_vit
from jtl.weights.mapping import StateMapper, dense_kernel

# torch's bicubic convolution constant (PIL and jax.image use -0.5).
_TORCH_CUBIC_A = -0.75


def _torch_cubic_matrix(old: int, new: int) -> np.ndarray:
  """(new, old) weights of torch's upsample_bicubic2d along one axis, align_corners=False:
  source x = (i + 0.5) * old / new - 0.5, taps clamped at the borders."""
  a = _TORCH_CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1        # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  weights = np.zeros((new, old))
  for i in range(new):
    x = (i + 0.5) * old / new - 0.5
    left = math.floor(x)
    t = x - left
    for tap, w in zip(range(left - 1, left + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      weights[i, min(max(tap, 0), old - 1)] += w
  return weights


def _aligned_linear_matrix(old: int, new: int) -> np.ndarray:
  """(new, old) weights of linear interpolation with the corner samples aligned, as
  scipy.ndimage.zoom(order=1) maps output i to input i * (old - 1) / (new - 1)."""
  weights = np.zeros((new, old))
  for i in range(new):
    x = i * (old - 1) / (new - 1) if new > 1 else 0.0
    left = min(math.floor(x), old - 1)
    t = x - left
    weights[i, left] += 1 - t
    if t > 0:
      weights[i, left + 1] += t
  return weights


def _resample_separable(matrix: Callable[[int, int], np.ndarray]):
  def resample(posemb: np.ndarray, new_grid: tuple[int, int], num_prefix_tokens: int):
    posemb = np.asarray(posemb)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
      raise ValueError(f"position embeddings for {grid.shape[1]} patches: not a square grid")
    new_h, new_w = new_grid
    if (side, side) == (new_h, new_w):
      return posemb
    grid = grid.reshape(side, side, -1).astype(np.float64)
    resized = np.einsum("ih,hwd,jw->ijd", matrix(side, new_h), grid, matrix(side, new_w))
    resized = resized.astype(posemb.dtype).reshape(1, new_h * new_w, -1)
    return np.concatenate([prefix, resized], axis=1)
  return resample


def _resample_timm(posemb, new_grid, num_prefix_tokens):
  return convert_vit.resample_position_embeddings(posemb, new_grid, num_prefix_tokens)


# How each layout's library resamples position embeddings:
# fn((1, prefix + gh*gw, D), new_grid, prefix) -> (1, prefix + new_h*new_w, D).
RESAMPLING = {
    "timm": _resample_timm,
    "open_clip": _resample_timm,  # open_clip's resize_pos_embed: bicubic, antialiased
    "hf": _resample_separable(_torch_cubic_matrix),
    "big_vision": _resample_separable(_aligned_linear_matrix),
}


def fit_grid(posemb: np.ndarray, module, layout: str, num_prefix_tokens: int = 0) -> np.ndarray:
  """Checkpoint position embeddings (any leading shape) -> the module's (1, prefix + gh*gw, D)."""
  posemb = np.asarray(posemb)
  posemb = posemb.reshape(1, -1, posemb.shape[-1])
  return RESAMPLING[layout](posemb, module.grid_size, num_prefix_tokens)


def split_fused(m: StateMapper, weight: str, bias: str, dst: str,
                parts=("query", "key", "value")):
  """A torch projection whose outputs stack `parts` (timm's qkv and kv, torch's in_proj) onto
  one Dense per part at `dst`/part."""
  if weight in m.state:
    for part, w in zip(parts, np.split(np.asarray(m.state.pop(weight)), len(parts), axis=0)):
      m.out[f"params/{dst}/{part}/kernel"] = dense_kernel(w)
  if bias in m.state:
    for part, b in zip(parts, np.split(np.asarray(m.state.pop(bias)), len(parts), axis=0)):
      m.out[f"params/{dst}/{part}/bias"] = b


def take_timm_blocks(m: StateMapper, depth: int):
  """timm's blocks.i (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) onto block{i}."""
  for i in range(depth):
    src, dst = f"blocks.{i}", f"block{i}"
    m.norm(f"{src}.norm1", f"{dst}/norm1")
    split_fused(m, f"{src}.attn.qkv.weight", f"{src}.attn.qkv.bias", f"{dst}/attn")
    m.dense(f"{src}.attn.proj", f"{dst}/attn/out")
    m.norm(f"{src}.norm2", f"{dst}/norm2")
    m.dense(f"{src}.mlp.fc1", f"{dst}/fc1")
    m.dense(f"{src}.mlp.fc2", f"{dst}/fc2")


def take_hf_blocks(m: StateMapper, depth: int):
  """transformers' encoder.layers.i of SigLIP and CLIP (same names) onto block{i}."""
  for i in range(depth):
    src, dst = f"encoder.layers.{i}", f"block{i}"
    m.norm(f"{src}.layer_norm1", f"{dst}/norm1")
    for theirs, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                         ("out_proj", "out")):
      m.dense(f"{src}.self_attn.{theirs}", f"{dst}/attn/{ours}")
    m.norm(f"{src}.layer_norm2", f"{dst}/norm2")
    m.dense(f"{src}.mlp.fc1", f"{dst}/fc1")
    m.dense(f"{src}.mlp.fc2", f"{dst}/fc2")


def keep_tower(m: StateMapper, prefix: str):
  """Of a two-tower file (the tower's names under `prefix`), only the image tower, unprefixed:
  the text tower and the temperature are not ours to load."""
  if any(k.startswith(prefix) for k in m.state):
    m.state = {k[len(prefix):]: v for k, v in m.state.items() if k.startswith(prefix)}


def empty_head(m: StateMapper, module, features: int):
  """The zero-output head of a feature checkpoint, for a module of zero classes. A checkpoint
  with a head of its own (a tower fine-tuned as a classifier) keeps it."""
  if module.num_classes == 0 and "params/head/kernel" not in m.out:
    m.out["params/head/kernel"] = np.zeros((features, 0), np.float32)
    m.out["params/head/bias"] = np.zeros((0,), np.float32)


def refuse_class_token(m: StateMapper, module, token: str, posemb: str):
  """A class token has no place in the module: it stays among the names the model does not
  have, under a name that says why, so that the merge error (which names the file) explains
  the misfit. The position embeddings lose the class token's entry, so that they convert and
  the class token is the one thing reported."""
  if token not in m.state:
    return
  model = type(module).__name__
  m.state[f"{token} (a class token: the {model} image tower has none, it pools with a MAP "
          "head; a CLIP or ViT checkpoint?)"] = m.state.pop(token)
  if posemb in m.state:
    p = np.asarray(m.state[posemb])
    p = p.reshape(1, -1, p.shape[-1])
    if math.isqrt(p.shape[1] - 1) ** 2 == p.shape[1] - 1:
      m.state[posemb] = p[:, 1:]


def convert_timm(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """timm VisionTransformer with class_token=False, global_pool="map" (vit_*_siglip_*), alone
  or as open_clip's image tower ("visual.trunk." beside a text tower)."""
  m = StateMapper(state)
  m.strip_prefix("module.")
  keep_tower(m, "visual.trunk.")
  refuse_class_token(m, module, "cls_token", "pos_embed")
  m.conv("patch_embed.proj", "embed/patch")
  m.take("pos_embed", "params/embed/pos_embedding", lambda p: fit_grid(p, module, "timm"))
  take_timm_blocks(m, module.depth)
  m.norm("norm", "norm")
  m.take("attn_pool.latent", "params/pool/probe")
  m.dense("attn_pool.q", "pool/attn/query")
  split_fused(m, "attn_pool.kv.weight", "attn_pool.kv.bias", "pool/attn", ("key", "value"))
  m.dense("attn_pool.proj", "pool/attn/out")
  m.norm("attn_pool.norm", "pool/norm")
  m.dense("attn_pool.mlp.fc1", "pool/fc1")
  m.dense("attn_pool.mlp.fc2", "pool/fc2")
  m.dense("head", "head")
  empty_head(m, module, module.width)
  return m.result()


def convert_hf(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """transformers SiglipVisionModel, or the vision_model of a SiglipModel. transformers 4
  stored the tower under "vision_model." even alone; transformers 5 stores it unprefixed."""
  m = StateMapper(state)
  keep_tower(m, "vision_model.")
  refuse_class_token(m, module, "embeddings.class_embedding",
                     "embeddings.position_embedding.weight")
  m.conv("embeddings.patch_embedding", "embed/patch")
  m.take("embeddings.position_embedding.weight", "params/embed/pos_embedding",
         lambda p: fit_grid(p, module, "hf"))
  take_hf_blocks(m, module.depth)
  m.norm("post_layernorm", "norm")
  m.take("head.probe", "params/pool/probe")
  # torch.nn.MultiheadAttention: query, key and value projections fused in in_proj_.
  split_fused(m, "head.attention.in_proj_weight", "head.attention.in_proj_bias",
              "pool/attn")
  m.dense("head.attention.out_proj", "pool/attn/out")
  m.norm("head.layernorm", "pool/norm")
  m.dense("head.mlp.fc1", "pool/fc1")
  m.dense("head.mlp.fc2", "pool/fc2")
  empty_head(m, module, module.width)
  return m.result()


def convert_big_vision(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """big_vision .npz of a SigLIP image tower ("params/img/..." in a two-tower file), blocks
  scanned or not."""
  m = StateMapper(convert_vit.big_vision_tower(state))
  refuse_class_token(m, module, "cls", "pos_embedding")
  m.take("embedding/kernel", "params/embed/patch/kernel")
  m.take("embedding/bias", "params/embed/patch/bias")
  m.take("pos_embedding", "params/embed/pos_embedding",
         lambda p: fit_grid(p, module, "big_vision"))
  convert_vit.take_big_vision_blocks(m, module.depth)
  m.take("Transformer/encoder_norm/scale", "params/norm/scale")
  m.take("Transformer/encoder_norm/bias", "params/norm/bias")
  m.take("MAPHead_0/probe", "params/pool/probe")
  convert_vit.take_big_vision_attention(m, "MAPHead_0/MultiHeadDotProductAttention_0",
                                        "pool/attn")
  m.take("MAPHead_0/LayerNorm_0/scale", "params/pool/norm/scale")
  m.take("MAPHead_0/LayerNorm_0/bias", "params/pool/norm/bias")
  convert_vit.take_big_vision_mlp(m, "MAPHead_0/MlpBlock_0", "pool")
  m.take("head/kernel", "params/head/kernel")
  m.take("head/bias", "params/head/bias")
  empty_head(m, module, module.width)
  return m.result()


CONVERTERS = {"timm": convert_timm, "hf": convert_hf, "big_vision": convert_big_vision}
