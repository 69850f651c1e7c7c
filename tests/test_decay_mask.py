"""Weight decay as timm applies it: on kernels, not on biases, norm scales, layer scales, learned
tokens, position embeddings or a MAP head's probe."""
import jax
import numpy as np
import optax

from helpers import variable_shapes, zeros_of
from jtl import optim
from jtl import params as P
from jtl.config import default_config
from jtl.models import registry


def _params(arch, **overrides):
  module = registry.get_entry(arch).build(num_classes=3, **overrides)
  return zeros_of(variable_shapes(module, module.image_size))["params"]


def _decayed(params) -> set[str]:
  return {name for name, decays in P.flatten(optim._decay_mask(params)).items() if decays}


def _kernels(params) -> set[str]:
  return {name for name in P.flatten(params) if name.endswith("/kernel")}


def test_vit_decays_its_kernels_only():
  params = _params("vit_tiny_patch16_224", image_size=32, patch_size=8, width=8, depth=2,
                   num_heads=2, mlp_dim=16)
  assert _decayed(params) == _kernels(params)
  assert {"embed/pos_embedding", "embed/cls"}.isdisjoint(_decayed(params))


def test_dinov2_keeps_tokens_layer_scales_and_positions_out_of_decay():
  params = _params("dinov2_vits14_reg", image_size=28, width=8, depth=2, num_heads=2,
                   mlp_dim=16, pos_grid_size=2)
  names = set(P.flatten(params))
  assert {"embed/registers", "embed/cls", "embed/pos_embedding", "block0/layer_scale1"} <= names
  assert _decayed(params) == _kernels(params)


def test_named_tokens_and_probes_are_excluded_wherever_they_sit():
  width = 4
  params = {"pool": {"probe": np.ones((1, 1, width)), "kernel": np.ones((width, width))},
            "tokens": {"dist_token": np.ones((1, 1, width)), "mask_token": np.ones((1, width)),
                       "reg_token": np.ones((1, 2, width)), "table": np.ones((9, width))},
            "norm": {"scale": np.ones((width,))}}
  assert _decayed(params) == {"pool/kernel", "tokens/table"}


def test_adamw_leaves_position_embeddings_and_tokens_to_their_gradients():
  """Zero gradients and weight decay 0.5: kernels shrink, position embeddings, the class token
  and the biases stay exactly as they were."""
  config = default_config()
  config.optimizer.name, config.optimizer.weight_decay = "adamw", 0.5
  rng = np.random.default_rng(0)
  module = registry.get_entry("vit_tiny_patch16_224").build(
      num_classes=3, image_size=16, patch_size=8, width=8, depth=1, num_heads=2, mlp_dim=16)
  params = P.unflatten({k[len("params/"):]: rng.standard_normal(v.shape).astype(np.float32)
                        for k, v in variable_shapes(module, 16).items()})
  plan = optim.make_freeze_plan(params, module.stage_names, [(".*", "train")])
  tx = optim.make_optimizer(config, plan, params, optax.constant_schedule(0.1))
  grads = jax.tree_util.tree_map(np.zeros_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  after = P.flatten(optax.apply_updates(params, updates))
  for name, before in P.flatten(params).items():
    if name.endswith("/kernel"):
      assert np.abs(after[name]).sum() < np.abs(before).sum(), name
    else:
      np.testing.assert_array_equal(after[name], before, err_msg=name)
