"""DINOv2 (Oquab et al. 2023) and DINOv2 with registers (Darcet et al. 2024): self-supervised
ViTs with layer scale, patch 14 and position embeddings learned at 518 px.

Layout: "embed" holds the patch convolution, the class token, the register tokens and the
position embeddings of the 37x37 grid the weights were trained on; "block0".."blockN-1" are
pre-norm blocks whose two residual branches are scaled per channel (layer scale); "norm" is the
final LayerNorm and the pooling, so that a frozen prefix ending there gives the pooled vector
the head reads (the feature cache stores it, as for the ViT); "head" is a Dense on it.

Two things differ between the sources and are fixed per source, by `Conventions`:
- pooling: timm reads the class token; transformers' Dinov2ForImageClassification and Meta's
  linear heads read the class token concatenated with the mean of the patch tokens (registers
  left out);
- how the position embeddings are resampled to the input's patch grid (done at every forward
  pass, from the stored 37x37 grid, as transformers and Meta do): see `resample_matrix`.
The timm names (vit_small_patch14_dinov2, ...) follow timm; the torch hub names (dinov2_vits14,
...) follow Meta's hub models; a transformers checkpoint (model_type dinov2 or
dinov2_with_registers) follows transformers. The pretrained config records both conventions, so
model.json says which were used.

The published checkpoints have no classifier: their pretrained config has num_classes=0, for
which the model gives the pooled features (timm's num_classes=0), and any other num_classes
gets a new head.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl.models import common, registry, vit
from jtl.models.registry import ModelEntry, PretrainedCfg
from jtl.weights import convert_dinov2

PATCH_SIZE = 14
NATIVE_IMAGE_SIZE = 518             # the weights' training resolution: a 37x37 patch grid
DEFAULT_IMAGE_SIZE = 224            # what a run trains at unless config.image_size says otherwise
POOLINGS = ("class", "class_mean")
RESAMPLINGS = ("bicubic_antialias", "bicubic", "bicubic_offset")

_POSEMB_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class Conventions:
  """What a source does beyond its weights: how it pools and how it resamples positions."""
  pooling: str        # "class" or "class_mean" (class token, mean of the patch tokens)
  pos_resample: str   # one of RESAMPLINGS


# timm (resample_abs_pos_embed's defaults); Meta's hub models (interpolate_offset=0.1 without,
# antialiasing and no offset with registers); transformers 5 (Dinov2: size-based bicubic,
# Dinov2WithRegisters: the same with antialiasing).
TIMM = Conventions("class", "bicubic_antialias")
META = Conventions("class_mean", "bicubic_offset")
META_REGISTERS = Conventions("class_mean", "bicubic_antialias")
TRANSFORMERS = Conventions("class_mean", "bicubic")
TRANSFORMERS_REGISTERS = Conventions("class_mean", "bicubic_antialias")


@dataclasses.dataclass(frozen=True)
class Dinov2PretrainedCfg(PretrainedCfg):
  """A PretrainedCfg that also records the source's conventions (into model.json)."""
  pooling: str = TIMM.pooling
  pos_resample: str = TIMM.pos_resample


# --- position embeddings resampled as torch's F.interpolate(mode="bicubic") ------------------

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(old: int, new: int, scale: float) -> np.ndarray:
  """torch's bicubic without antialiasing (a = -0.75, border taps repeated); `scale` is input
  pixels per output pixel."""
  weights = np.zeros((new, old))
  for i in range(new):
    source = scale * (i + 0.5) - 0.5
    first = math.floor(source)
    t = source - first
    for tap, w in zip(range(first - 1, first + 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]),
                                                          -0.75)):
      weights[i, min(max(tap, 0), old - 1)] += w
  return weights


def _antialiased_bicubic_matrix(old: int, new: int) -> np.ndarray:
  """torch's bicubic with antialias=True (PIL's filter: a = -0.5, widened by the scale when
  shrinking, normalised weights, no taps outside the grid)."""
  scale = old / new
  support = 2.0 * max(scale, 1.0)
  stretch = 1.0 / max(scale, 1.0)
  weights = np.zeros((new, old))
  for i in range(new):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), old)
    taps = np.arange(lo, hi)
    w = _cubic((taps - center + 0.5) * stretch, -0.5)
    weights[i, lo:hi] = w / w.sum()
  return weights


def resample_matrix(old: int, new: int, method: str) -> np.ndarray:
  """(new, old) weights taking `old` grid positions to `new` along one axis.

  bicubic_antialias: F.interpolate(size=new, mode="bicubic", antialias=True), what timm's
    resample_abs_pos_embed, transformers' Dinov2WithRegisters and Meta's register models do;
  bicubic: the same without antialiasing, transformers' Dinov2;
  bicubic_offset: F.interpolate(scale_factor=(new + 0.1) / old, mode="bicubic"), Meta's models
    without registers: the offset makes torch place the samples by that factor rather than by
    old / new, which moves every sample slightly.
  """
  if method == "bicubic_antialias":
    return _antialiased_bicubic_matrix(old, new)
  if method == "bicubic":
    return _bicubic_matrix(old, new, old / new)
  if method == "bicubic_offset":  # torch's output side, floor(old * factor), is `new`
    return _bicubic_matrix(old, new, old / (new + 0.1))
  raise ValueError(f"pos_resample must be one of {RESAMPLINGS}, got {method!r}")


def resample_grid(grid, new_grid: tuple[int, int], method: str):
  """(old, old, D) position embeddings -> (new_h, new_w, D); differentiable, so training at
  any size updates the stored grid."""
  old = grid.shape[0]
  if (old, old) == tuple(new_grid):  # every source uses the stored grid as it is
    return grid
  rows = jnp.asarray(resample_matrix(old, new_grid[0], method), grid.dtype)
  cols = jnp.asarray(resample_matrix(old, new_grid[1], method), grid.dtype)
  return jnp.einsum("hi,wj,ijc->hwc", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)


# --- the network -----------------------------------------------------------------------------

class Embedding(nn.Module):
  """Patches -> tokens [class, registers, patches]: position embeddings added to the class and
  patch tokens only (the registers carry none), resampled to the input's patch grid."""
  patch_size: int
  width: int
  pos_grid_size: int
  num_registers: int
  pos_resample: str

  @nn.compact
  def __call__(self, x):
    height, width_px = x.shape[1:3]
    if height % self.patch_size or width_px % self.patch_size:
      raise ValueError(f"input of {height}x{width_px} px is not a multiple of the patch size "
                       f"{self.patch_size}")
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID", name="patch")(x)
    batch, grid_h, grid_w, width = x.shape
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
    # With registers the class token's own position embedding is folded into the class token
    # (timm's no_embed_class): exact, since it is never resampled.
    class_slot = 0 if self.num_registers else 1
    posemb = self.param("pos_embedding", _POSEMB_INIT,
                        (1, class_slot + self.pos_grid_size ** 2, width))
    grid = posemb[0, class_slot:].reshape(self.pos_grid_size, self.pos_grid_size, width)
    grid = resample_grid(grid, (grid_h, grid_w), self.pos_resample)
    x = x.reshape(batch, grid_h * grid_w, width) + grid.reshape(1, -1, width).astype(x.dtype)
    cls = (cls + posemb[:, :class_slot]) if class_slot else cls
    tokens = [jnp.broadcast_to(cls, (batch, 1, width)).astype(x.dtype)]
    if self.num_registers:
      registers = self.param("registers", nn.initializers.zeros,
                             (1, self.num_registers, width))
      tokens.append(jnp.broadcast_to(registers, (batch, self.num_registers, width))
                    .astype(x.dtype))
    return jnp.concatenate([*tokens, x], axis=1)


class LayerScaleBlock(nn.Module):
  """Pre-norm block with layer scale: x + g1 * attn(norm1(x)), then x + g2 * mlp(norm2(x))."""
  num_heads: int
  mlp_dim: int
  layer_norm_epsilon: float
  layer_scale_init: float
  dropout_rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    width = x.shape[-1]
    drop = nn.Dropout(self.dropout_rate, deterministic=not train)
    scale_init = nn.initializers.constant(self.layer_scale_init)
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm1")(x)
    y = vit.SelfAttention(self.num_heads, name="attn")(y)
    x = x + drop(y * self.param("layer_scale1", scale_init, (width,)).astype(y.dtype))
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm2")(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(y), approximate=False)  # exact, as all three
    y = nn.Dense(width, name="fc2")(drop(y))
    return x + drop(y * self.param("layer_scale2", scale_init, (width,)).astype(y.dtype))


def _head_init(key, shape, dtype=jnp.float32):
  # lecun_normal divides by the output width; a headless model's head has none.
  if 0 in shape:
    return jnp.zeros(shape, dtype)
  return nn.initializers.lecun_normal()(key, shape, dtype)


class DINOv2(nn.Module):
  """DINOv2 classifier on the pooled tokens; NHWC input whose sides are multiples of 14.

  num_classes=0: the pooled features come out (the head has no weights).
  """
  num_classes: int = 0
  patch_size: int = PATCH_SIZE
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None             # None: 4 * width
  num_registers: int = 0
  image_size: int = DEFAULT_IMAGE_SIZE   # the input side the model is built and checked for
  pos_grid_size: int = NATIVE_IMAGE_SIZE // PATCH_SIZE  # the stored position-embedding grid
  pos_resample: str = TIMM.pos_resample
  pooling: str = TIMM.pooling
  layer_norm_epsilon: float = 1e-6
  layer_scale_init: float = 1e-5         # timm's init_values; only matters from scratch
  dropout_rate: float = 0.0

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ("embed", *(f"block{i}" for i in range(self.depth)), "norm", "head")

  @property
  def pooled_width(self) -> int:
    return self.width * (2 if self.pooling == "class_mean" else 1)

  def fields_for_checkpoint(self, converted: dict) -> dict:
    """The fields that make this module fit a converted checkpoint: its position grid when it
    was saved from another grid than 37x37 (a model fine-tuned at 224 px by a library that
    stores the resampled 16x16 grid). Keeping that grid and resampling it per forward pass is
    what the saving library does, so its outputs are reproduced; resampling at load would be a
    second, different interpolation."""
    positions = converted.get("params/embed/pos_embedding")
    if positions is None:
      return {}
    count = np.shape(positions)[1] - (0 if self.num_registers else 1)
    side = math.isqrt(count)
    return {"pos_grid_size": side} if side * side == count and side != self.pos_grid_size else {}

  def pool(self, tokens):
    """Normalised tokens [class, registers, patches] -> the vector the head reads."""
    if self.pooling == "class":
      return tokens[:, 0]
    if self.pooling == "class_mean":
      patches = tokens[:, 1 + self.num_registers:]
      return jnp.concatenate([tokens[:, 0], patches.mean(axis=1)], axis=-1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    embed = Embedding(self.patch_size, self.width, self.pos_grid_size, self.num_registers,
                      self.pos_resample, name="embed")
    stages = [("embed", lambda h, _: embed(h))]
    for i in range(self.depth):
      block = LayerScaleBlock(self.num_heads, self.mlp_dim or 4 * self.width,
                              self.layer_norm_epsilon, self.layer_scale_init, self.dropout_rate,
                              name=f"block{i}")
      stages.append((f"block{i}", block))
    norm = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm")
    stages.append(("norm", lambda h, _: self.pool(norm(h))))
    head = nn.Dense(self.num_classes, kernel_init=_head_init, name="head")

    def classify(h, _):
      logits = head(h)  # also when headless, so that every model has the same stages
      return logits if self.num_classes else h

    stages.append(("head", classify))
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


# --- registry --------------------------------------------------------------------------------

def check_image_size(model: str, image_size: int, patch_size: int = PATCH_SIZE) -> None:
  """A clear error for an input side that the patches do not tile."""
  if image_size % patch_size:
    below = image_size // patch_size * patch_size
    raise ValueError(f"{model}: image_size {image_size} is not a multiple of the patch size "
                     f"{patch_size}; {below or patch_size} or {below + patch_size} is")


def _builder(model: str, **fields):
  """build(num_classes=..., **overrides) for `model`, checking the image size first."""
  def build(num_classes: int, **overrides):
    settings = {**fields, **overrides}
    check_image_size(model, int(settings.get("image_size", DEFAULT_IMAGE_SIZE)),
                     int(settings.get("patch_size", PATCH_SIZE)))
    return DINOv2(num_classes=num_classes, **settings)
  return build


_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}

# Exact parameter counts without a head: sum of parameter sizes of
# timm.create_model(f"{name}", num_classes=0) at its default 518 px (timm 1.0.31), whose
# pretrained configs have num_classes=0 as ours do. The torch hub models are the same networks
# (Meta's files add a mask token, used only in training, which we drop).
_PUBLISHED_PARAMS = {
    ("small", 0): 22_056_192, ("base", 0): 86_579_712, ("large", 0): 304_367_616,
    ("small", 4): 22_057_344, ("base", 4): 86_582_016, ("large", 4): 304_370_688,
}
_META_LETTER = {"small": "s", "base": "b", "large": "l"}
_META_URL = "https://dl.fbaipublicfiles.com/dinov2"


def timm_name(size: str, registers: int) -> str:
  return f"vit_{size}_patch14_{'reg4_' if registers else ''}dinov2"


def meta_name(size: str, registers: int) -> str:
  return f"dinov2_vit{_META_LETTER[size]}14{'_reg' if registers else ''}"


def _meta_file(size: str, registers: int) -> str:
  base = f"dinov2_vit{_META_LETTER[size]}14"
  return f"{_META_URL}/{base}/{base}{'_reg4' if registers else ''}_pretrain.pth"


_CONVERTERS = {
    "timm": convert_dinov2.convert_timm,
    "meta": convert_dinov2.convert_meta,
    "hf": convert_dinov2.convert_hf,
}


def _register() -> None:
  for (size, registers), published in _PUBLISHED_PARAMS.items():
    width, depth, heads = _SIZES[size]
    meta = META_REGISTERS if registers else META
    # timm: its pretrained cfg (518 px native, crop 1.0, bicubic, ImageNet statistics), at the
    # default training size. Meta's hub models: its evaluation transform (resize 256, crop 224,
    # bicubic), the same weights from timm's hub.
    for name, conventions, crop_pct in ((timm_name(size, registers), TIMM, 1.0),
                                        (meta_name(size, registers), meta, 0.875)):
      cfg = Dinov2PretrainedCfg(
          tag="lvd142m", layout="timm", hf_hub_id=f"timm/{timm_name(size, registers)}.lvd142m",
          url=_meta_file(size, registers), num_classes=0, image_size=DEFAULT_IMAGE_SIZE,
          crop_pct=crop_pct, interpolation="bicubic", pooling=conventions.pooling,
          pos_resample=conventions.pos_resample,
          license="Apache-2.0")  # Meta's DINOv2 weights (github.com/facebookresearch/dinov2)
      registry.register_model(ModelEntry(
          name=name, family="dinov2",
          build=_builder(name, width=width, depth=depth, num_heads=heads,
                         num_registers=registers, pooling=conventions.pooling,
                         pos_resample=conventions.pos_resample),
          pretrained={"lvd142m": cfg}, default_tag="lvd142m", converters=_CONVERTERS,
          published_params=published))


def from_hf_config(config, image_size: int | None = None):
  """(build, PretrainedCfg, converter) for a transformers Dinov2Config or
  Dinov2WithRegistersConfig (model_type "dinov2" / "dinov2_with_registers")."""
  kind = f"transformers {config.model_type}"
  if getattr(config, "num_channels", 3) != 3:
    raise ValueError(f"{kind} config with num_channels={config.num_channels}; only RGB")
  if getattr(config, "hidden_act", "gelu") != "gelu":
    raise ValueError(f"{kind} config with hidden_act={config.hidden_act!r}; only 'gelu'")
  if getattr(config, "use_swiglu_ffn", False):
    raise ValueError(f"{kind} config with use_swiglu_ffn=True (ViT-g/14) is not supported")
  if not getattr(config, "qkv_bias", True):
    raise ValueError(f"{kind} config with qkv_bias=False is not supported")
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"{kind}: hidden_size {config.hidden_size} is not divisible by "
                     f"num_attention_heads {config.num_attention_heads}")
  registers = int(getattr(config, "num_register_tokens", 0))
  conventions = TRANSFORMERS_REGISTERS if registers else TRANSFORMERS
  classifier = any(a.endswith("ForImageClassification") for a in config.architectures or ())
  id2label = {int(k): v for k, v in (config.id2label or {}).items()} if classifier else {}
  # config.image_size (518) is the position grid's; a run defaults to 224 px as for the
  # registered names.
  patch, side = int(config.patch_size), int(image_size or DEFAULT_IMAGE_SIZE)
  build = _builder(
      kind, patch_size=patch, width=int(config.hidden_size),
      depth=int(config.num_hidden_layers), num_heads=int(config.num_attention_heads),
      mlp_dim=int(config.hidden_size * config.mlp_ratio), num_registers=registers,
      image_size=side, pos_grid_size=int(config.image_size) // patch,
      layer_norm_epsilon=float(config.layer_norm_eps),
      layer_scale_init=float(config.layerscale_value), pooling=conventions.pooling,
      pos_resample=conventions.pos_resample)
  check_image_size(kind, side, patch)
  # BitImageProcessor: resize the short side to 256, crop 224, bicubic, ImageNet statistics.
  cfg = Dinov2PretrainedCfg(
      tag="hf", layout="hf", num_classes=len(id2label), image_size=side, crop_pct=0.875,
      interpolation="bicubic",
      label_names=tuple(id2label[i] for i in range(len(id2label))) or None,
      pooling=conventions.pooling, pos_resample=conventions.pos_resample)
  return build, cfg, convert_dinov2.convert_hf


_register()
registry.register_hf_arch("dinov2", from_hf_config)
registry.register_hf_arch("dinov2_with_registers", from_hf_config)
