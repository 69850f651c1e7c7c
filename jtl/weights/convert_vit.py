"""ViT checkpoints of timm, transformers, torchvision and big_vision / vit_jax onto `jtl.models.vit`.

Every converter takes the position embeddings to the module's patch grid: when the checkpoint
was trained at another resolution, the grid part is resized (bicubic with antialiasing, as
timm's `resample_abs_pos_embed` does by default, so loading at 384 px gives timm's numbers)
and the class token's embedding is kept as it is.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import jax
import numpy as np

from jtl.weights.errors import CheckpointMismatchError
from jtl.weights.mapping import StateMapper, dense_kernel

# Prefixes under which big_vision and vit_jax .npz files keep the image tower, most specific
# first: "params/img/" for two-tower models (LiT, SigLIP: whose MAP-head towers load into
# jtl.models.siglip, not here), "opt/target/" for old vit_jax training checkpoints.
BIG_VISION_PREFIXES = ("params/img/", "params/", "img/", "opt/target/", "")


def resample_position_embeddings(posemb: np.ndarray, new_grid: tuple[int, int],
                                 num_prefix_tokens: int = 1) -> np.ndarray:
  """(1, prefix + gh*gw, D) -> (1, prefix + new_h*new_w, D), the prefix tokens untouched.

  The old grid is taken to be square. Bicubic with antialiasing matches torch's
  F.interpolate(mode="bicubic", antialias=True, align_corners=False), timm's default.
  """
  posemb = np.asarray(posemb)
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
  side = math.isqrt(grid.shape[1])
  if side * side != grid.shape[1]:
    raise ValueError(f"position embeddings for {grid.shape[1]} patches: not a square grid")
  new_h, new_w = new_grid
  if (side, side) == (new_h, new_w):
    return posemb
  width = grid.shape[-1]
  grid = grid.reshape(1, side, side, width).astype(np.float32)
  resized = jax.image.resize(grid, (1, new_h, new_w, width), method="bicubic", antialias=True)
  resized = np.asarray(resized, dtype=posemb.dtype).reshape(1, new_h * new_w, width)
  return np.concatenate([prefix, resized], axis=1)


def fit_position_embeddings(posemb: np.ndarray, module, has_class_token: bool = True):
  """Checkpoint position embeddings -> the module's (1, 1 + gh*gw, D).

  has_class_token=False: the checkpoint adds position embeddings before prepending the class
  token (big_vision), which equals a zero embedding for the class token.
  """
  posemb = np.asarray(posemb)
  posemb = posemb.reshape(1, -1, posemb.shape[-1])
  if not has_class_token:
    posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  return resample_position_embeddings(posemb, module.grid_size, num_prefix_tokens=1)


def _split_fused(m: StateMapper, weight: str, bias: str, dst: str):
  """A fused (3D, D) projection, query then key then value, onto our three Dense layers."""
  parts = ("query", "key", "value")
  if weight in m.state:
    for part, w in zip(parts, np.split(np.asarray(m.state.pop(weight)), 3, axis=0)):
      m.out[f"params/{dst}/attn/{part}/kernel"] = dense_kernel(w)
  if bias in m.state:
    for part, b in zip(parts, np.split(np.asarray(m.state.pop(bias)), 3, axis=0)):
      m.out[f"params/{dst}/attn/{part}/bias"] = b


def convert_timm(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """timm VisionTransformer (class-token pooling, no fc_norm)."""
  m = StateMapper(state)
  m.strip_prefix("module.")
  m.conv("patch_embed.proj", "embed/patch")
  m.take("cls_token", "params/embed/cls")
  m.take("pos_embed", "params/embed/pos_embedding", lambda p: fit_position_embeddings(p, module))
  for i in range(module.depth):
    src, dst = f"blocks.{i}", f"block{i}"
    m.norm(f"{src}.norm1", f"{dst}/norm1")
    _split_fused(m, f"{src}.attn.qkv.weight", f"{src}.attn.qkv.bias", dst)
    m.dense(f"{src}.attn.proj", f"{dst}/attn/out")
    m.norm(f"{src}.norm2", f"{dst}/norm2")
    m.dense(f"{src}.mlp.fc1", f"{dst}/fc1")
    m.dense(f"{src}.mlp.fc2", f"{dst}/fc2")
  m.norm("norm", "norm")
  m.dense("head", "head")
  return m.result()


def convert_torchvision(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """torchvision VisionTransformer (vit_b_16 ... vit_l_32)."""
  m = StateMapper(state)
  m.conv("conv_proj", "embed/patch")
  m.take("class_token", "params/embed/cls")
  m.take("encoder.pos_embedding", "params/embed/pos_embedding",
         lambda p: fit_position_embeddings(p, module))
  for i in range(module.depth):
    src, dst = f"encoder.layers.encoder_layer_{i}", f"block{i}"
    m.norm(f"{src}.ln_1", f"{dst}/norm1")
    _split_fused(m, f"{src}.self_attention.in_proj_weight", f"{src}.self_attention.in_proj_bias",
                 dst)
    m.dense(f"{src}.self_attention.out_proj", f"{dst}/attn/out")
    m.norm(f"{src}.ln_2", f"{dst}/norm2")
    # torchvision renamed mlp.linear_1/linear_2 to mlp.0/mlp.3 (nn.Sequential); both exist.
    for old, new, dst_fc in (("linear_1", "0", "fc1"), ("linear_2", "3", "fc2")):
      m.dense(f"{src}.mlp.{new}", f"{dst}/{dst_fc}")
      m.dense(f"{src}.mlp.{old}", f"{dst}/{dst_fc}")
  m.norm("encoder.ln", "norm")
  m.dense("heads.head", "head")
  return m.result()


# transformers ViT, as its files store it (and as transformers 4 named the modules), and as
# transformers 5 names the modules in memory: (file name, in-memory name) -> ours.
_HF_BLOCK_NAMES = (
    ("attention.attention.query", "attention.q_proj", "attn/query"),
    ("attention.attention.key", "attention.k_proj", "attn/key"),
    ("attention.attention.value", "attention.v_proj", "attn/value"),
    ("attention.output.dense", "attention.o_proj", "attn/out"),
    ("intermediate.dense", "mlp.fc1", "fc1"),
    ("output.dense", "mlp.fc2", "fc2"),
)


def convert_hf(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """transformers ViTForImageClassification (or ViTModel, whose pooler is not used)."""
  m = StateMapper(state)
  m.strip_prefix("vit.")
  m.conv("embeddings.patch_embeddings.projection", "embed/patch")
  m.take("embeddings.cls_token", "params/embed/cls")
  m.take("embeddings.position_embeddings", "params/embed/pos_embedding",
         lambda p: fit_position_embeddings(p, module))
  for i in range(module.depth):
    dst = f"block{i}"
    for file_layer in (f"encoder.layer.{i}", f"layers.{i}"):
      m.norm(f"{file_layer}.layernorm_before", f"{dst}/norm1")
      m.norm(f"{file_layer}.layernorm_after", f"{dst}/norm2")
    for file_name, memory_name, ours in _HF_BLOCK_NAMES:
      m.dense(f"encoder.layer.{i}.{file_name}", f"{dst}/{ours}")
      m.dense(f"layers.{i}.{memory_name}", f"{dst}/{ours}")
  m.norm("layernorm", "norm")
  m.dense("classifier", "head")
  # ViTModel's pooler (dense + tanh on the class token) is not part of the classifier that
  # ViTForImageClassification builds, so it is deliberately not loaded.
  m.drop(r"pooler\.dense\.(weight|bias)")
  return m.result()


def _big_vision_prefix(state: Mapping[str, np.ndarray]) -> str:
  for prefix in BIG_VISION_PREFIXES:
    if f"{prefix}embedding/kernel" in state:
      return prefix
  return ""


def _unstack_scanned_blocks(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision with scan=True stores all blocks stacked under "Transformer/encoderblock/"."""
  scanned = "Transformer/encoderblock/"
  out = {}
  for name, value in state.items():
    if name.startswith(scanned):
      rest = name[len(scanned):]
      for i, layer in enumerate(np.asarray(value)):
        out[f"Transformer/encoderblock_{i}/{rest}"] = layer
    else:
      out[name] = value
  return out


def _numbered(state: Mapping[str, np.ndarray], block: str, kind: str) -> list[str]:
  """Flax auto-names of `kind` inside `block`, by index: vit_jax numbers the submodules of a
  block across kinds (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3),
  big_vision per kind (LayerNorm_0, LayerNorm_1, MultiHeadDotProductAttention_0, MlpBlock_0)."""
  regex = re.compile(re.escape(block) + "/" + kind + r"_(\d+)/")
  found = {int(match.group(1)) for k in state if (match := regex.match(k))}
  return [f"{block}/{kind}_{n}" for n in sorted(found)]


def big_vision_tower(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The image tower of a big_vision / vit_jax .npz under names without prefix, blocks unstacked.

  With a prefix, only the names under it are kept: the rest of a two-tower file (the text
  tower, the temperature) or of a training checkpoint (optimizer state) is not ours to load.
  """
  prefix = _big_vision_prefix(state)
  tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  return _unstack_scanned_blocks(tower)


def take_big_vision_attention(m: StateMapper, src: str, dst: str):
  """A flax MultiHeadDotProductAttention at `src` onto Dense layers query/key/value/out at `dst`."""
  for part in ("query", "key", "value"):
    # (D, heads, head_dim) and (heads, head_dim) -> a Dense of D outputs.
    m.take(f"{src}/{part}/kernel", f"params/{dst}/{part}/kernel",
           lambda k: np.asarray(k).reshape(k.shape[0], -1))
    m.take(f"{src}/{part}/bias", f"params/{dst}/{part}/bias", lambda b: np.asarray(b).reshape(-1))
  m.take(f"{src}/out/kernel", f"params/{dst}/out/kernel",
         lambda k: np.asarray(k).reshape(-1, k.shape[-1]))
  m.take(f"{src}/out/bias", f"params/{dst}/out/bias")


def take_big_vision_mlp(m: StateMapper, src: str, dst: str):
  """A big_vision MlpBlock at `src` onto Dense layers fc1/fc2 at `dst`."""
  for dense, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
    m.take(f"{src}/{dense}/kernel", f"params/{dst}/{ours}/kernel")
    m.take(f"{src}/{dense}/bias", f"params/{dst}/{ours}/bias")


def take_big_vision_blocks(m: StateMapper, depth: int):
  """Encoder blocks Transformer/encoderblock_i onto block{i}/(norm1, attn, norm2, fc1, fc2)."""
  for i in range(depth):
    src, dst = f"Transformer/encoderblock_{i}", f"block{i}"
    for norm, ours in zip(_numbered(m.state, src, "LayerNorm"), ("norm1", "norm2")):
      m.take(f"{norm}/scale", f"params/{dst}/{ours}/scale")
      m.take(f"{norm}/bias", f"params/{dst}/{ours}/bias")
    for attn in _numbered(m.state, src, "MultiHeadDotProductAttention")[:1]:
      take_big_vision_attention(m, attn, f"{dst}/attn")
    for mlp in _numbered(m.state, src, "MlpBlock")[:1]:
      take_big_vision_mlp(m, mlp, dst)


def convert_big_vision(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """big_vision / vit_jax .npz (flax names joined with "/"), optionally under a prefix.

  A SigLIP image tower (a MAP head, no class token) is refused here with a pointer to the
  SigLIP models (`jtl.models.siglip`), which load it.
  """
  m = StateMapper(big_vision_tower(state))
  if "MAPHead_0/probe" in m.state and "cls" not in m.state:
    raise CheckpointMismatchError(
        "a big_vision image tower with a MAP head (MAPHead_0) and no class token is a SigLIP "
        "tower; the ViT pools its class token and has no MAP head: load it with a SigLIP "
        "model (vit_base_patch16_siglip_224, ...; jtl.list_models('*siglip*'))")
  m.take("embedding/kernel", "params/embed/patch/kernel")
  m.take("embedding/bias", "params/embed/patch/bias")
  m.take("cls", "params/embed/cls", lambda c: np.asarray(c).reshape(1, 1, -1))
  m.take("Transformer/posembed_input/pos_embedding", "params/embed/pos_embedding",
         lambda p: fit_position_embeddings(p, module))
  m.take("pos_embedding", "params/embed/pos_embedding",
         lambda p: fit_position_embeddings(p, module, has_class_token=False))
  take_big_vision_blocks(m, module.depth)
  m.take("Transformer/encoder_norm/scale", "params/norm/scale")
  m.take("Transformer/encoder_norm/bias", "params/norm/bias")
  m.take("head/kernel", "params/head/kernel")
  m.take("head/bias", "params/head/bias")
  return m.result()
