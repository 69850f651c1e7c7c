"""Vision Transformer (Dosovitskiy et al. 2020) with a class token, as in timm and big_vision.

Layout: a patch convolution, a class token and learned position embeddings (one per patch and
one for the class token) in "embed"; pre-norm encoder blocks "block0".."blockN-1"; the final
LayerNorm in its own stage "norm" (so that "freeze everything but the head" still fine-tunes
nothing of the encoder, and "freeze all blocks" can leave the final norm trainable); "head" is
a Dense on the class token.

Weights: timm, transformers and big_vision/vit_jax checkpoints through
`jtl.weights.convert_vit`; the converter resamples the position embeddings when the module's
patch grid differs from the checkpoint's, so `image_size` may be chosen freely (a multiple of
the patch size).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtl.models import common, registry
from jtl.models.registry import INCEPTION_MEAN, INCEPTION_STD, ModelEntry, PretrainedCfg
from jtl.weights import convert_vit

# big_vision's initialiser for learned position embeddings; it only matters when training
# from scratch, since pretrained weights replace it.
_POSEMB_INIT = nn.initializers.normal(stddev=0.02)


def patch_grid(image_size: int, patch_size: int, *, drop_remainder: bool = False
               ) -> tuple[int, int]:
  """The patch grid of an image_size square. A side that is not a multiple of the patch is an
  error, unless drop_remainder: the pixels past the last whole patch are then dropped."""
  if image_size % patch_size and not drop_remainder:
    raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
  side = image_size // patch_size
  return side, side


def check_grid(grid_h: int, grid_w: int, patch_size: int, grid_size: tuple[int, int]) -> None:
  """The patch grid of an input must be the one the position embeddings were built for."""
  if (grid_h, grid_w) != tuple(grid_size):
    raise ValueError(
        f"input of {grid_h * patch_size}x{grid_w * patch_size} px gives a {grid_h}x{grid_w} "
        f"patch grid, but the position embeddings are for {grid_size[0]}x{grid_size[1]}; "
        "build the model with that image_size")


class Embedding(nn.Module):
  """Patches -> tokens: patch convolution, class token prepended, position embeddings added."""
  patch_size: int
  width: int
  grid_size: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID", name="patch")(x)
    batch, grid_h, grid_w, width = x.shape
    check_grid(grid_h, grid_w, self.patch_size, self.grid_size)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
    num_tokens = 1 + grid_h * grid_w
    posemb = self.param("pos_embedding", _POSEMB_INIT, (1, num_tokens, width))
    x = x.reshape(batch, grid_h * grid_w, width)
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)).astype(x.dtype), x], axis=1)
    return x + posemb.astype(x.dtype)


# On a CPU, attention runs over groups of (example, head) pairs whose score matrices fit in
# about this many bytes (a core's L2 share on the development machine's EPYC).
_CPU_SCORES_BYTES = 512 * 1024


def dot_product_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v per head; q [B, Tq, N, D], k and v [B, Tk, N, D] -> [B, Tq, N, D].

  On accelerators, jax.nn.dot_product_attention. On a CPU its XLA path materialises every
  [Tq, Tk] score matrix of the batch at once (ViT-S/14, 224 px, batch 32: 50 MB per block) and
  runs 5x slower than PyTorch's fused kernel; here the (example, head) pairs go through a
  lax.map in groups whose scores stay in cache, with the softmax spelt out (XLA fuses it into
  two passes; jax.nn.softmax took twice as long): 0.085 instead of 0.20-0.22 s per block on 2
  EPYC cores, the same numbers bit for bit. The scores are float32 whatever the inputs' dtype."""
  if jax.default_backend() != "cpu":
    return jax.nn.dot_product_attention(q, k, v)
  batch, tq, heads, dim = q.shape
  tk = k.shape[1]
  pairs = batch * heads
  group = max(1, min(pairs, _CPU_SCORES_BYTES // (4 * tq * tk)))
  while pairs % group:
    group -= 1
  grouped = lambda t, n: t.transpose(0, 2, 1, 3).reshape(pairs // group, group, n, dim)

  def attend(qkv):
    q, k, v = qkv
    scores = jnp.matmul(q, k.transpose(0, 2, 1), preferred_element_type=jnp.float32)
    e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    return jnp.matmul((e / e.sum(axis=-1, keepdims=True)).astype(v.dtype), v)

  q = q * jnp.asarray(dim ** -0.5, q.dtype)
  out = jax.lax.map(attend, (grouped(q, tq), grouped(k, tk), grouped(v, tk)))
  return out.reshape(batch, heads, tq, dim).transpose(0, 2, 1, 3)


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate query/key/value projections (width -> width)."""
  num_heads: int

  @nn.compact
  def __call__(self, x):
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    split = lambda t: t.reshape(batch, tokens, self.num_heads, head_dim)
    q = split(nn.Dense(width, name="query")(x))
    k = split(nn.Dense(width, name="key")(x))
    v = split(nn.Dense(width, name="value")(x))
    y = dot_product_attention(q, k, v)
    return nn.Dense(width, name="out")(y.reshape(batch, tokens, width))


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  num_heads: int
  mlp_dim: int
  layer_norm_epsilon: float
  dropout_rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    drop = nn.Dropout(self.dropout_rate, deterministic=not train)
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm1")(x)
    x = x + drop(SelfAttention(self.num_heads, name="attn")(y))
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm2")(x)
    # Exact GELU as in timm, torchvision and transformers (big_vision trains with the tanh
    # approximation; the two differ by < 1e-3 per activation).
    y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(y), approximate=False)
    y = nn.Dense(x.shape[-1], name="fc2")(drop(y))
    return x + drop(y)


class ViT(nn.Module):
  """ViT classifier on the class token; NHWC input of image_size x image_size."""
  num_classes: int = 1000
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None             # None: 4 * width
  image_size: int = 224
  layer_norm_epsilon: float = 1e-6       # timm, big_vision, torchvision; transformers: 1e-12
  dropout_rate: float = 0.0              # after attention and in the MLP, while training

  @property
  def grid_size(self) -> tuple[int, int]:
    return patch_grid(self.image_size, self.patch_size)

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ("embed", *(f"block{i}" for i in range(self.depth)), "norm", "head")

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    embed = Embedding(self.patch_size, self.width, self.grid_size, name="embed")
    stages = [("embed", lambda h, _: embed(h))]
    for i in range(self.depth):
      block = EncoderBlock(self.num_heads, self.mlp_dim or 4 * self.width,
                           self.layer_norm_epsilon, self.dropout_rate, name=f"block{i}")
      stages.append((f"block{i}", block))
    # LayerNorm acts per token, so normalising the class token alone equals timm's
    # "normalise every token, then take the class token".
    norm = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm")
    stages.append(("norm", lambda h, _: norm(h[:, 0])))
    head = nn.Dense(self.num_classes, name="head")
    stages.append(("head", lambda h, _: head(h)))
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


_SIZES = {  # width, depth, heads (Dosovitskiy et al. table 1; Ti and S from DeiT / augreg)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

# Exact parameter counts with a 1000-class head. Base and large: torchvision's docs
# (vit_b_16, vit_b_32, vit_l_16, vit_l_32, same layout as timm's). Tiny and small: timm
# (sum of parameter sizes of timm.create_model(name), timm 1.0). vit_tiny_patch32_224 exists in
# neither, so it is not registered.
_PUBLISHED_PARAMS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_small_patch32_224": 22_878_952,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "vit_large_patch32_224": 306_535_400,
}

# timm's tags for each architecture that has 1000-class ImageNet weights at 224 px, the
# first one the default (timm's own order). vit_large_patch32_224 has none at 224 px with a
# 1000-class head on the hub (only in21k features), hence no default weights.
_TAGS = {
    "vit_tiny_patch16_224": ("augreg_in21k_ft_in1k",),
    "vit_small_patch16_224": ("augreg_in21k_ft_in1k", "augreg_in1k"),
    "vit_small_patch32_224": ("augreg_in21k_ft_in1k",),
    "vit_base_patch16_224": ("augreg2_in21k_ft_in1k", "augreg_in21k_ft_in1k",
                             "orig_in21k_ft_in1k", "augreg_in1k"),
    "vit_base_patch32_224": ("augreg_in21k_ft_in1k", "augreg_in1k"),
    "vit_large_patch16_224": ("augreg_in21k_ft_in1k",),
    "vit_large_patch32_224": (),
}


def _pretrained_cfg(arch: str, tag: str) -> PretrainedCfg:
  # timm's vision_transformer _cfg: 224 px, crop 0.9, bicubic, mean = std = 0.5.
  return PretrainedCfg(tag=tag, layout="timm", hf_hub_id=f"timm/{arch}.{tag}", image_size=224,
                       crop_pct=0.9, interpolation="bicubic", mean=INCEPTION_MEAN,
                       std=INCEPTION_STD)


_CONVERTERS = {
    "timm": convert_vit.convert_timm,
    "hf": convert_vit.convert_hf,
    "big_vision": convert_vit.convert_big_vision,
    "torchvision": convert_vit.convert_torchvision,
}


def _register() -> None:
  for arch, published in _PUBLISHED_PARAMS.items():
    size, patch = arch.split("_")[1], int(arch.split("_")[2][len("patch"):])
    width, depth, heads = _SIZES[size]
    tags = _TAGS[arch]
    registry.register_model(ModelEntry(
        name=arch,
        family="vit",
        build=functools.partial(ViT, patch_size=patch, width=width, depth=depth,
                                num_heads=heads),
        pretrained={tag: _pretrained_cfg(arch, tag) for tag in tags},
        default_tag=tags[0] if tags else None,
        converters=_CONVERTERS,
        published_params=published,
    ))


def from_hf_config(config, image_size: int | None = None):
  """(build, PretrainedCfg, converter) for a transformers ViTConfig (model_type "vit")."""
  if getattr(config, "num_channels", 3) != 3:
    raise ValueError(f"ViT config with num_channels={config.num_channels}; only RGB is supported")
  if getattr(config, "hidden_act", "gelu") != "gelu":
    raise ValueError(f"ViT config with hidden_act={config.hidden_act!r}; only 'gelu' is supported")
  if not getattr(config, "qkv_bias", True):
    raise ValueError("ViT config with qkv_bias=False is not supported")
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                     f"num_attention_heads {config.num_attention_heads}")
  id2label = {int(k): v for k, v in (config.id2label or {}).items()}
  label_names = tuple(id2label[i] for i in range(len(id2label))) if id2label else None
  side = int(image_size or config.image_size)
  build = functools.partial(
      ViT, patch_size=int(config.patch_size), width=int(config.hidden_size),
      depth=int(config.num_hidden_layers), num_heads=int(config.num_attention_heads),
      mlp_dim=int(config.intermediate_size), image_size=side,
      layer_norm_epsilon=float(config.layer_norm_eps))
  # ViTImageProcessor: resize straight to the square size (no crop), bilinear, mean=std=0.5;
  # a preprocessor_config.json beside the weights overrides mean and std.
  cfg = PretrainedCfg(tag="hf", layout="hf", num_classes=len(id2label) or 1000, image_size=side,
                      crop_pct=1.0, interpolation="bilinear", mean=INCEPTION_MEAN,
                      std=INCEPTION_STD, label_names=label_names)
  return build, cfg, convert_vit.convert_hf


_register()
registry.register_hf_arch("vit", from_hf_config)
