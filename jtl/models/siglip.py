"""SigLIP and SigLIP 2 image towers (Zhai et al. 2023, Tschannen et al. 2025), as timm,
transformers and big_vision build them.

Layout: a patch convolution with bias and learned position embeddings, no class token, in
"embed"; pre-norm encoder blocks "block0".."blockN-1"; the final LayerNorm over every token in
"norm"; big_vision's MAP head in "pool" (a learned probe attends over the tokens, then
x + mlp(norm(x))), which gives the pooled feature; "head" is a Dense on it. The checkpoints
are features without a classifier: their pretrained configs say num_classes=0 (a head of zero
outputs), so that any number of classes gets a new head; with the frozen prefix ending at the
head, the feature cache keeps the MAP output, one vector per image.

The MLP's GELU is a field (`mlp_activation`): timm evaluates the original SigLIP
architectures with the exact GELU and the architectures introduced with SigLIP 2 with the tanh
form, and transformers and big_vision use the tanh form (config.hidden_act
"gelu_pytorch_tanh", flax's nn.gelu); the two differ by < 1e-3 per activation.

Weights: timm, transformers (SiglipVisionModel, SiglipModel) and big_vision .npz through
`jtl.weights.convert_siglip`, which resamples the position embeddings to the module's grid
as the library that wrote the file does.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jtl.models import common, registry, vit
from jtl.models.registry import INCEPTION_MEAN, INCEPTION_STD, ModelEntry, PretrainedCfg
from jtl.weights import convert_siglip

# The MLP activations of the image towers, by the names timm and transformers give them.
ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),    # torch nn.GELU(): timm, LAION
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),  # big_vision, transformers
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),         # OpenAI CLIP, DFN, MetaCLIP
}

_POSEMB_INIT = nn.initializers.normal(stddev=0.02)


def head_kernel_init(num_classes: int):
  # A feature checkpoint's head has zero outputs, which lecun_normal cannot initialise.
  return nn.initializers.lecun_normal() if num_classes else nn.initializers.zeros


class PatchEmbedding(nn.Module):
  """Patches -> tokens: patch convolution, position embeddings added; no class token."""
  patch_size: int
  width: int
  grid_size: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID", name="patch")(x)
    batch, grid_h, grid_w, width = x.shape
    vit.check_grid(grid_h, grid_w, self.patch_size, self.grid_size)
    posemb = self.param("pos_embedding", _POSEMB_INIT, (1, grid_h * grid_w, width))
    return x.reshape(batch, grid_h * grid_w, width) + posemb.astype(x.dtype)


class EncoderBlock(nn.Module):
  """vit.EncoderBlock with the MLP activation as a field (same parameter names)."""
  num_heads: int
  mlp_dim: int
  layer_norm_epsilon: float
  dropout_rate: float
  activation: str

  @nn.compact
  def __call__(self, x, train: bool):
    drop = nn.Dropout(self.dropout_rate, deterministic=not train)
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm1")(x)
    x = x + drop(vit.SelfAttention(self.num_heads, name="attn")(y))
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm2")(x)
    y = ACTIVATIONS[self.activation](nn.Dense(self.mlp_dim, name="fc1")(y))
    y = nn.Dense(x.shape[-1], name="fc2")(drop(y))
    return x + drop(y)


class ProbeAttention(nn.Module):
  """Multi-head attention of one query (the probe, shared by the batch) over the tokens."""
  num_heads: int

  @nn.compact
  def __call__(self, probe, x):
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    q = nn.Dense(width, name="query")(probe).reshape(1, 1, self.num_heads, head_dim)
    k = nn.Dense(width, name="key")(x).reshape(batch, tokens, self.num_heads, head_dim)
    v = nn.Dense(width, name="value")(x).reshape(batch, tokens, self.num_heads, head_dim)
    q = jnp.broadcast_to(q.astype(x.dtype), (batch, 1, self.num_heads, head_dim))
    y = vit.dot_product_attention(q, k, v)
    return nn.Dense(width, name="out")(y.reshape(batch, 1, width))


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision's MAPHead, timm's AttentionPoolLatent):
  tokens (B, T, D) -> one vector (B, D)."""
  num_heads: int
  mlp_dim: int
  layer_norm_epsilon: float
  activation: str

  @nn.compact
  def __call__(self, x):
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
    x = ProbeAttention(self.num_heads, name="attn")(probe, x)
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm")(x)
    y = ACTIVATIONS[self.activation](nn.Dense(self.mlp_dim, name="fc1")(y))
    x = x + nn.Dense(x.shape[-1], name="fc2")(y)
    return x[:, 0]


class SigLIP(nn.Module):
  """SigLIP image tower with a classifier on its MAP-pooled feature; NHWC input of
  image_size x image_size."""
  num_classes: int = 0                   # 0: the checkpoints' features, no classifier
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None             # None: 4 * width
  image_size: int = 224
  layer_norm_epsilon: float = 1e-6       # timm, transformers and big_vision alike
  mlp_activation: str = "gelu"           # a key of ACTIVATIONS
  dropout_rate: float = 0.0              # after attention and in the MLP, while training

  @property
  def grid_size(self) -> tuple[int, int]:
    # Pixels past the last whole patch are dropped, as timm and transformers drop them: the
    # so400m/14 towers at 384 px see 27 x 14 = 378 of them.
    return vit.patch_grid(self.image_size, self.patch_size, drop_remainder=True)

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ("embed", *(f"block{i}" for i in range(self.depth)), "norm", "pool", "head")

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_stages: int = 0, start_stage: int = 0,
               stop_stage: int | None = None):
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"mlp_activation {self.mlp_activation!r}; one of {sorted(ACTIVATIONS)}")
    mlp_dim = self.mlp_dim or 4 * self.width
    embed = PatchEmbedding(self.patch_size, self.width, self.grid_size, name="embed")
    stages = [("embed", lambda h, _: embed(h))]
    for i in range(self.depth):
      block = EncoderBlock(self.num_heads, mlp_dim, self.layer_norm_epsilon, self.dropout_rate,
                           self.mlp_activation, name=f"block{i}")
      stages.append((f"block{i}", block))
    norm = nn.LayerNorm(epsilon=self.layer_norm_epsilon, name="norm")
    stages.append(("norm", lambda h, _: norm(h)))
    pool = MAPHead(self.num_heads, mlp_dim, self.layer_norm_epsilon, self.mlp_activation,
                   name="pool")
    stages.append(("pool", lambda h, _: pool(h)))
    head = nn.Dense(self.num_classes, kernel_init=head_kernel_init(self.num_classes),
                    name="head")
    stages.append(("head", lambda h, _: head(h)))
    return common.apply_stages(stages, x, train=train, frozen_stages=frozen_stages,
                               start_stage=start_stage, stop_stage=stop_stage)


_SIZES = {  # width, depth, heads, MLP width (big_vision's decode_variant)
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "so400m": (1152, 27, 16, 4304),
}

# Exact parameter counts of the feature towers (no classifier): the sum of parameter sizes of
# timm.create_model(name, num_classes=0), timm 1.0.31, whose MAP head (attn_pool) is included.
# Our head then has zero outputs and no parameters, so these are the counts test_models.py
# compares (it builds each model with its default tag's num_classes, 0 here).
_PUBLISHED_PARAMS = {
    "vit_base_patch16_siglip_224": 92_884_224,
    "vit_base_patch16_siglip_256": 92_930_304,
    "vit_base_patch16_siglip_384": 93_176_064,
    "vit_base_patch16_siglip_512": 93_520_128,
    "vit_large_patch16_siglip_256": 315_956_224,
    "vit_large_patch16_siglip_384": 316_283_904,
    "vit_large_patch16_siglip_512": 316_742_656,
    "vit_so400m_patch14_siglip_224": 427_680_704,
    "vit_so400m_patch14_siglip_378": 428_225_600,
    "vit_so400m_patch14_siglip_384": 428_225_600,
    "vit_so400m_patch16_siglip_256": 427_888_064,
    "vit_so400m_patch16_siglip_384": 428_256_704,
    "vit_so400m_patch16_siglip_512": 428_772_800,
}

# timm's tags of each architecture (webli: SigLIP, v2_webli: SigLIP 2), the first the default.
_TAGS = {
    "vit_base_patch16_siglip_224": ("v2_webli", "webli"),
    "vit_base_patch16_siglip_256": ("v2_webli", "webli", "webli_i18n"),
    "vit_base_patch16_siglip_384": ("v2_webli", "webli"),
    "vit_base_patch16_siglip_512": ("v2_webli", "webli"),
    "vit_large_patch16_siglip_256": ("v2_webli", "webli"),
    "vit_large_patch16_siglip_384": ("v2_webli", "webli"),
    "vit_large_patch16_siglip_512": ("v2_webli",),
    "vit_so400m_patch14_siglip_224": ("v2_webli", "webli"),
    "vit_so400m_patch14_siglip_378": ("v2_webli", "webli"),
    "vit_so400m_patch14_siglip_384": ("webli",),
    "vit_so400m_patch16_siglip_256": ("v2_webli", "webli_i18n"),
    "vit_so400m_patch16_siglip_384": ("v2_webli",),
    "vit_so400m_patch16_siglip_512": ("v2_webli",),
}

# The architectures timm builds with the tanh GELU: those introduced with SigLIP 2. Every other
# one (v2_webli weights on an original architecture included) runs the exact GELU in timm.
_TANH_GELU = {"vit_large_patch16_siglip_512", "vit_so400m_patch16_siglip_256",
              "vit_so400m_patch16_siglip_384", "vit_so400m_patch16_siglip_512"}


def _pretrained_cfg(tag: str, layout: str, image_size: int, hf_hub_id: str | None
                    ) -> PretrainedCfg:
  # transformers' SiglipImageProcessor and big_vision: the whole image straight to the square
  # whatever its aspect (no crop), bicubic, mean = std = 0.5.
  return PretrainedCfg(tag=tag, layout=layout, hf_hub_id=hf_hub_id, num_classes=0,
                       image_size=image_size, crop_pct=1.0, interpolation="bicubic",
                       crop_mode="squash",
                       mean=INCEPTION_MEAN, std=INCEPTION_STD)


def _register() -> None:
  for arch, published in _PUBLISHED_PARAMS.items():
    _, size, patch, _, side = arch.split("_")
    width, depth, heads, mlp_dim = _SIZES[size]
    image_size = int(side)
    tags = _TAGS[arch]
    registry.register_model(ModelEntry(
        name=arch,
        family="siglip",
        build=functools.partial(
            SigLIP, patch_size=int(patch[len("patch"):]), width=width, depth=depth,
            num_heads=heads, mlp_dim=mlp_dim, image_size=image_size,
            mlp_activation="gelu_tanh" if arch in _TANH_GELU else "gelu"),
        pretrained={tag: _pretrained_cfg(tag, "timm", image_size, f"timm/{arch}.{tag}")
                    for tag in tags},
        default_tag=tags[0],
        converters=convert_siglip.CONVERTERS,
        published_params=published,
    ))


_HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                   "gelu": "gelu", "quick_gelu": "quick_gelu"}


def hf_activation(hidden_act: str, family: str) -> str:
  """Our ACTIVATIONS key for a transformers config.hidden_act."""
  if hidden_act not in _HF_ACTIVATIONS:
    raise ValueError(f"{family} config with hidden_act={hidden_act!r}; supported: "
                     f"{sorted(_HF_ACTIVATIONS)}")
  return _HF_ACTIVATIONS[hidden_act]


def from_hf_config(config, image_size: int | None = None):
  """(build, PretrainedCfg, converter) for a transformers SiglipVisionConfig, or a SiglipConfig
  (model_type "siglip", whose vision_config is the tower)."""
  config = getattr(config, "vision_config", None) or config
  if getattr(config, "num_channels", 3) != 3:
    raise ValueError(f"SigLIP config with num_channels={config.num_channels}; only RGB is "
                     "supported")
  if not getattr(config, "vision_use_head", True):
    raise ValueError("SigLIP config with vision_use_head=False (no MAP head) is not supported")
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                     f"num_attention_heads {config.num_attention_heads}")
  side = int(image_size or config.image_size)
  build = functools.partial(
      SigLIP, patch_size=int(config.patch_size), width=int(config.hidden_size),
      depth=int(config.num_hidden_layers), num_heads=int(config.num_attention_heads),
      mlp_dim=int(config.intermediate_size), image_size=side,
      layer_norm_epsilon=float(config.layer_norm_eps),
      mlp_activation=hf_activation(config.hidden_act, "SigLIP"))
  return build, _pretrained_cfg("hf", "hf", side, None), convert_siglip.convert_hf


_register()
registry.register_hf_arch("siglip_vision_model", from_hf_config)
registry.register_hf_arch("siglip", from_hf_config)
