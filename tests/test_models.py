"""Every registered model: exact published parameter count and stage coverage."""
import functools

import jax
import jax.numpy as jnp
import pytest

from jtl import params as P
from jtl.models import registry

ENTRIES = {n: e for n, e in registry.entries().items() if e.family != "test"}


def _shapes(entry, num_classes=None, image_size=None):
  module = entry.build(num_classes=num_classes or entry.default_cfg.num_classes)
  size = image_size or getattr(module, "image_size", None) or entry.default_cfg.image_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  init = functools.partial(module.init, train=False)
  return module, jax.eval_shape(init, jax.random.PRNGKey(0), x)


def test_every_family_is_registered():
  families = {e.family for e in ENTRIES.values()}
  assert {"resnet", "vgg", "inception", "efficientnet", "vit"} <= families
  for name in ("resnet50", "vgg16_bn", "inception_v3", "efficientnet_b0", "efficientnet_lite0",
               "vit_base_patch16_224"):
    assert name in ENTRIES


def test_every_registered_model_has_a_published_count():
  missing = [n for n, e in ENTRIES.items() if not e.published_params]
  assert not missing, f"registered models without a published parameter count: {missing}"


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_parameter_count_and_stages(name):
  entry = ENTRIES[name]
  module, variables = _shapes(entry)
  assert P.count(variables["params"]) == entry.published_params
  stage_names = tuple(module.stage_names)
  assert stage_names[-1] == "head"
  top = list(variables["params"].keys())
  assert set(top) == set(stage_names), (top, stage_names)
  assert set(variables.get("batch_stats", {})) <= set(stage_names)


def test_list_models():
  names = registry.list_models()
  assert "resnet50" in names and "tiny_cnn" in names
  assert registry.list_models("resnet*") == sorted(n for n in names if n.startswith("resnet"))
  assert "efficientnet_lite0.pypi" in registry.list_models("efficientnet_lite0*", pretrained=True)


def test_unknown_model_suggests_close_names():
  with pytest.raises(ValueError, match="did you mean.*resnet50"):
    registry.get_entry("resnet5O")


def test_a_temporary_architecture_is_registered_only_inside_the_with_block():
  base = registry.get_entry("resnet18")
  entry = registry.ModelEntry(name="tmp_resnet18", family="test", build=base.build,
                              pretrained={"": registry.PretrainedCfg()}, default_tag=None,
                              converters={})
  with registry.registered(entry) as got:
    assert got is entry and registry.get_entry("tmp_resnet18") is entry
    assert registry.is_registered("tmp_resnet18") and "tmp_resnet18" in registry.list_models()
    with pytest.raises(ValueError, match="registered twice"):
      registry.register_model(entry)
  assert not registry.is_registered("tmp_resnet18")
  with pytest.raises(ValueError, match="not registered"):
    registry.unregister_model("tmp_resnet18")
