"""DINOv2 checkpoints of timm, Meta's torch hub and transformers onto `jtl.models.dinov2`.

The position embeddings are loaded as they are (the 37x37 grid of the published weights): the
model resamples them to the input at every forward pass, each source in its own way. What the
layouts disagree on is where the class token's position embedding lives: timm's register models
fold it into the class token (no_embed_class), Meta and transformers keep a slot for it in front
of the grid. The module folds it exactly when it has registers, as timm does, and the converters
bring every layout to that arrangement.

The published checkpoints have no classifier. A missing head becomes a head of no classes, so
that create_model builds a new head for any num_classes asked for, and gives the pooled features
when none is asked for.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

from jtl.weights.mapping import StateMapper, dense_kernel


def _class_and_positions(m: StateMapper, cls: str, posemb: str, module) -> None:
  """The class token and position embeddings in the module's arrangement (see above)."""
  if cls not in m.state or posemb not in m.state:
    return
  cls_token = np.asarray(m.state.pop(cls)).reshape(1, 1, -1)
  positions = np.asarray(m.state.pop(posemb))
  positions = positions.reshape(1, -1, positions.shape[-1])
  # A square count is a grid alone; 1 + a square count is never square.
  has_slot = math.isqrt(positions.shape[1]) ** 2 != positions.shape[1]
  wants_slot = not module.num_registers
  if has_slot and not wants_slot:
    cls_token = cls_token + positions[:, :1]
    positions = positions[:, 1:]
  elif wants_slot and not has_slot:
    positions = np.concatenate([np.zeros_like(positions[:, :1]), positions], axis=1)
  m.out["params/embed/cls"] = cls_token
  m.out["params/embed/pos_embedding"] = positions


def _split_qkv(m: StateMapper, src: str, dst: str) -> None:
  """A fused (3D, D) projection, query then key then value, onto our three Dense layers."""
  for leaf, ours in (("weight", "kernel"), ("bias", "bias")):
    name = f"{src}.{leaf}"
    if name in m.state:
      for part, w in zip(("query", "key", "value"), np.split(np.asarray(m.state.pop(name)), 3)):
        m.out[f"params/{dst}/attn/{part}/{ours}"] = dense_kernel(w) if leaf == "weight" else w


def _head(m: StateMapper, src: str, module) -> None:
  """The classifier at `src`, or a head of no classes when the checkpoint has none."""
  if f"{src}.weight" in m.state:
    m.dense(src, "head")
  elif "params/head/kernel" not in m.out:
    m.out["params/head/kernel"] = np.zeros((module.pooled_width, 0), np.float32)
    m.out["params/head/bias"] = np.zeros((0,), np.float32)


def _timm_blocks(m: StateMapper, module) -> None:
  """Blocks named as timm and Meta name them (blocks.N.norm1, attn.qkv, ls1.gamma, ...)."""
  for i in range(module.depth):
    src, dst = f"blocks.{i}", f"block{i}"
    m.norm(f"{src}.norm1", f"{dst}/norm1")
    _split_qkv(m, f"{src}.attn.qkv", dst)
    m.dense(f"{src}.attn.proj", f"{dst}/attn/out")
    m.take(f"{src}.ls1.gamma", f"params/{dst}/layer_scale1")
    m.norm(f"{src}.norm2", f"{dst}/norm2")
    m.dense(f"{src}.mlp.fc1", f"{dst}/fc1")
    m.dense(f"{src}.mlp.fc2", f"{dst}/fc2")
    m.take(f"{src}.ls2.gamma", f"params/{dst}/layer_scale2")


def convert_timm(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """timm VisionTransformer of a DINOv2 architecture (vit_*_patch14[_reg4]_dinov2)."""
  m = StateMapper(state)
  m.strip_prefix("module.")
  m.conv("patch_embed.proj", "embed/patch")
  _class_and_positions(m, "cls_token", "pos_embed", module)
  m.take("reg_token", "params/embed/registers")
  _timm_blocks(m, module)
  m.norm("norm", "norm")
  _head(m, "head", module)
  return m.result()


def convert_meta(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """Meta's DinoVisionTransformer (torch hub dinov2_vit*14[_reg], *_pretrain.pth)."""
  # Training checkpoints chunk the blocks for FSDP: blocks.<chunk>.<block>. keeps the global
  # block index.
  m = StateMapper({re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v
                   for k, v in state.items()})
  m.strip_prefix("module.")
  m.drop("mask_token")  # masked-image modelling in training only
  m.conv("patch_embed.proj", "embed/patch")
  _class_and_positions(m, "cls_token", "pos_embed", module)
  m.take("register_tokens", "params/embed/registers")
  _timm_blocks(m, module)
  m.norm("norm", "norm")
  _head(m, "head", module)
  return m.result()


# transformers' Dinov2Layer, as its files name it, and as transformers 5 names its modules in
# memory: (file name, in-memory name) -> ours.
_HF_BLOCK_DENSE = (
    ("attention.attention.query", "attention.q_proj", "attn/query"),
    ("attention.attention.key", "attention.k_proj", "attn/key"),
    ("attention.attention.value", "attention.v_proj", "attn/value"),
    ("attention.output.dense", "attention.o_proj", "attn/out"),
    ("mlp.fc1", "mlp.fc1", "fc1"),
    ("mlp.fc2", "mlp.fc2", "fc2"),
)


def convert_hf(state: Mapping[str, np.ndarray], module) -> dict[str, np.ndarray]:
  """transformers Dinov2Model / Dinov2WithRegistersModel, or their ForImageClassification
  (whose head reads the class token and the mean of the patch tokens)."""
  m = StateMapper(state)
  m.strip_prefix("dinov2_with_registers.")
  m.strip_prefix("dinov2.")
  m.drop(r"embeddings\.mask_token")
  m.conv("embeddings.patch_embeddings.projection", "embed/patch")
  _class_and_positions(m, "embeddings.cls_token", "embeddings.position_embeddings", module)
  m.take("embeddings.register_tokens", "params/embed/registers")
  for i in range(module.depth):
    src, dst = f"encoder.layer.{i}", f"block{i}"
    m.norm(f"{src}.norm1", f"{dst}/norm1")
    m.norm(f"{src}.norm2", f"{dst}/norm2")
    for file_name, memory_name, ours in _HF_BLOCK_DENSE:
      m.dense(f"{src}.{file_name}", f"{dst}/{ours}")
      m.dense(f"{src}.{memory_name}", f"{dst}/{ours}")
    m.take(f"{src}.layer_scale1.lambda1", f"params/{dst}/layer_scale1")
    m.take(f"{src}.layer_scale2.lambda1", f"params/{dst}/layer_scale2")
  m.norm("layernorm", "norm")
  _head(m, "classifier", module)
  return m.result()
