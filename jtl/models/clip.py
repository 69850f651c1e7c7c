"""CLIP image towers (Radford et al. 2021) of OpenAI, OpenCLIP / LAION, DFN and MetaCLIP, as
open_clip, timm and transformers build them.

Layout: a patch convolution without bias, a class token, learned position embeddings and
CLIP's pre-norm (ln_pre) in "embed"; pre-norm encoder blocks "block0".."blockN-1"; ln_post on
the class token in "norm"; CLIP's projection to the joint image-text space, a Dense without
bias, in "proj"; "head" is a Dense on the projected feature (the CLIP image embedding). The
checkpoints are features without a classifier: their pretrained configs say num_classes=0 (a
head of zero outputs), so that any number of classes gets a new head; with the frozen prefix
ending at the head, the feature cache keeps the projected class token, one vector per image.

The MLP activation is a field (`mlp_activation`): QuickGELU for the OpenAI, DFN and MetaCLIP
weights (the *_clip_quickgelu_* architectures, as timm names them), the exact GELU for LAION's
and DataComp's. LayerNorm epsilon 1e-5 (torch's default, which CLIP used).

Weights: timm, open_clip and transformers (CLIPVisionModel, CLIPVisionModelWithProjection,
CLIPModel) through `jtl.weights.convert_clip`, which resamples the position embeddings to the
module's grid as the library that wrote the file does.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jtl.models import common, registry, siglip, vit
from jtl.models.registry import INCEPTION_MEAN, INCEPTION_STD, ModelEntry, PretrainedCfg
from jtl.weights import convert_clip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_POSEMB_INIT = nn.initializers.normal(stddev=0.02)


class Embedding(nn.Module):
  """Patches -> tokens: patch convolution (no bias), class token prepended, position
  embeddings added, then LayerNorm (CLIP's ln_pre)."""
  patch_size: int
  width: int
  grid_size: tuple[int, int]
  layer_norm_epsilon: float

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID", use_bias=False,
                name="patch")(x)
    batch, grid_h, grid_w, width = x.shape
    vit.check_grid(grid_h, grid_w, self.patch_size, self.grid_size)
    cls = self.param("cls", _POSEMB_INIT, (1, 1, width))
    posemb = self.param("pos_embedding", _POSEMB_INIT, (1, 1 + grid_h * grid_w, width))
    x = x.reshape(batch, grid_h * grid_w, width)
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)).astype(x.dtype), x], axis=1)
    x = x + posemb.astype(x.dtype)
    return nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm")(x)


class CLIP(nn.Module):
  """CLIP image tower with a classifier on its projected class token; NHWC input of
  image_size x image_size."""
  num_classes: int = 0                   # 0: the checkpoints' features, no classifier
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None             # None: 4 * width
  projection_dim: int | None = 512       # None: no projection (transformers' CLIPVisionModel)
  image_size: int = 224
  layer_norm_epsilon: float = 1e-5
  mlp_activation: str = "quick_gelu"     # a key of siglip.ACTIVATIONS
  dropout_rate: float = 0.0              # after attention and in the MLP, while training

  @property
  def grid_size(self) -> tuple[int, int]:
    return vit.patch_grid(self.image_size, self.patch_size)

  @property
  def stage_names(self) -> tuple[str, ...]:
    proj = ("proj",) if self.projection_dim else ()
    return ("embed", *(f"block{i}" for i in range(self.depth)), "norm", *proj, "head")

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    if self.mlp_activation not in siglip.ACTIVATIONS:
      raise ValueError(f"mlp_activation {self.mlp_activation!r}; one of "
                       f"{sorted(siglip.ACTIVATIONS)}")
    embed = Embedding(self.patch_size, self.width, self.grid_size, self.layer_norm_epsilon,
                      name="embed")
    stages = [("embed", lambda h, _: embed(h))]
    for i in range(self.depth):
      block = siglip.EncoderBlock(self.num_heads, self.mlp_dim or 4 * self.width,
                                  self.layer_norm_epsilon, self.dropout_rate,
                                  self.mlp_activation, name=f"block{i}")
      stages.append((f"block{i}", block))
    # LayerNorm acts per token: ln_post on the class token alone is CLIP's ln_post(x[:, 0]).
    norm = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm")
    stages.append(("norm", lambda h, _: norm(h[:, 0])))
    if self.projection_dim:
      proj = nn.Dense(self.projection_dim, use_bias=False, name="proj")
      stages.append(("proj", lambda h, _: proj(h)))
    head = nn.Dense(self.num_classes, kernel_init=siglip.head_kernel_init(self.num_classes),
                    name="head")
    stages.append(("head", lambda h, _: head(h)))
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


_SIZES = {  # width, depth, heads, projection width (open_clip's ViT-B, ViT-L, ViT-H configs)
    "base": (768, 12, 12, 512),
    "large": (1024, 24, 16, 768),
    "huge": (1280, 32, 16, 1024),
}

# Exact parameter counts of the image towers with their projection and no classifier: the sum
# of parameter sizes of open_clip.create_model(name).visual (open_clip 3.3: ViT-B-32, ViT-B-16,
# ViT-L-14, ViT-L-14-336, ViT-H-14, ViT-H-14-378), which equals timm's
# create_model(name, num_classes=0) (timm 1.0.31) plus the width x projection matrix. Our head
# then has zero outputs and no parameters, so these are the counts test_models.py compares.
_PUBLISHED_PARAMS = {
    "vit_base_patch32_clip_224": 87_849_216,
    "vit_base_patch16_clip_224": 86_192_640,
    "vit_large_patch14_clip_224": 303_966_208,
    "vit_huge_patch14_clip_224": 632_076_800,
    "vit_base_patch32_clip_quickgelu_224": 87_849_216,
    "vit_base_patch16_clip_quickgelu_224": 86_192_640,
    "vit_large_patch14_clip_quickgelu_224": 303_966_208,
    "vit_large_patch14_clip_quickgelu_336": 304_293_888,
    "vit_huge_patch14_clip_quickgelu_224": 632_076_800,
    "vit_huge_patch14_clip_quickgelu_378": 632_682_240,
}

# timm's tags, each on the architecture whose activation the weights were trained with (timm's
# "natively QuickGELU" notes), the first the default. Their hub repositories are named after
# the architecture without "_quickgelu", as timm names them.
_TAGS = {
    "vit_base_patch32_clip_224": ("laion2b", "datacompxl"),
    "vit_base_patch16_clip_224": ("laion2b", "datacompxl", "dfn2b", "laion400m_e32"),
    "vit_large_patch14_clip_224": ("laion2b", "datacompxl", "dfn2b_s39b", "laion400m_e32"),
    "vit_huge_patch14_clip_224": ("laion2b", "metaclip_altogether"),
    "vit_base_patch32_clip_quickgelu_224": ("openai", "laion400m_e32", "metaclip_2pt5b",
                                            "metaclip_400m"),
    "vit_base_patch16_clip_quickgelu_224": ("openai", "metaclip_2pt5b", "metaclip_400m"),
    "vit_large_patch14_clip_quickgelu_224": ("openai", "dfn2b", "metaclip_2pt5b",
                                             "metaclip_400m"),
    "vit_large_patch14_clip_quickgelu_336": ("openai",),
    "vit_huge_patch14_clip_quickgelu_224": ("dfn5b", "metaclip_2pt5b", "metaclip2_worldwide"),
    "vit_huge_patch14_clip_quickgelu_378": ("dfn5b",),
}

# The one set of weights trained on [-1, 1] pixels rather than CLIP's statistics (timm and
# open_clip agree).
_INCEPTION_NORMALISED = {("vit_large_patch14_clip_224", "laion2b")}


def pretrained_cfg(tag: str, layout: str, image_size: int, hf_hub_id: str | None = None,
                   inception: bool = False) -> PretrainedCfg:
  # open_clip's and transformers' eval transform: short side to the input size (bicubic),
  # then the central square, so crop_pct 1.0 (timm's configs say 0.9 for a few tags).
  return PretrainedCfg(tag=tag, layout=layout, hf_hub_id=hf_hub_id, num_classes=0,
                       image_size=image_size, crop_pct=1.0, interpolation="bicubic",
                       mean=INCEPTION_MEAN if inception else CLIP_MEAN,
                       std=INCEPTION_STD if inception else CLIP_STD)


def _register() -> None:
  for arch, published in _PUBLISHED_PARAMS.items():
    parts = arch.split("_")
    size, patch, side = parts[1], int(parts[2][len("patch"):]), int(parts[-1])
    width, depth, heads, projection_dim = _SIZES[size]
    quick = "quickgelu" in parts
    hub_arch = arch.replace("_quickgelu", "")
    tags = _TAGS[arch]
    registry.register_model(ModelEntry(
        name=arch,
        family="clip",
        build=functools.partial(CLIP, patch_size=patch, width=width, depth=depth,
                                num_heads=heads, projection_dim=projection_dim,
                                image_size=side,
                                mlp_activation="quick_gelu" if quick else "gelu"),
        pretrained={tag: pretrained_cfg(tag, "timm", side, f"timm/{hub_arch}.{tag}",
                                        (hub_arch, tag) in _INCEPTION_NORMALISED)
                    for tag in tags},
        default_tag=tags[0],
        converters=convert_clip.CONVERTERS,
        published_params=published,
    ))


def from_hf_config(config, image_size: int | None = None):
  """(build, PretrainedCfg, converter) for a transformers CLIPVisionConfig (model_type
  "clip_vision_model"; projected when the file is a CLIPVisionModelWithProjection) or a
  CLIPConfig (model_type "clip", whose vision_config is the tower and whose visual_projection
  is the projection)."""
  vision = getattr(config, "vision_config", None)
  if vision is not None:
    projection_dim = int(config.projection_dim)
  else:
    vision = config
    projected = "CLIPVisionModelWithProjection" in (getattr(config, "architectures", None) or ())
    projection_dim = int(config.projection_dim) if projected else None
  if getattr(vision, "num_channels", 3) != 3:
    raise ValueError(f"CLIP config with num_channels={vision.num_channels}; only RGB is "
                     "supported")
  if vision.hidden_size % vision.num_attention_heads:
    raise ValueError(f"hidden_size {vision.hidden_size} is not divisible by "
                     f"num_attention_heads {vision.num_attention_heads}")
  side = int(image_size or vision.image_size)
  build = functools.partial(
      CLIP, patch_size=int(vision.patch_size), width=int(vision.hidden_size),
      depth=int(vision.num_hidden_layers), num_heads=int(vision.num_attention_heads),
      mlp_dim=int(vision.intermediate_size), projection_dim=projection_dim, image_size=side,
      layer_norm_epsilon=float(vision.layer_norm_eps),
      mlp_activation=siglip.hf_activation(vision.hidden_act, "CLIP"))
  return build, pretrained_cfg("hf", "hf", side), convert_clip.convert_hf


_register()
registry.register_hf_arch("clip_vision_model", from_hf_config)
registry.register_hf_arch("clip", from_hf_config)
