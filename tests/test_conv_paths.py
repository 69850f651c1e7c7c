"""The CPU paths of common.Conv (1x1 convolutions as dots) and common.max_pool equal XLA's
convolution and reduce_window, alone and in a whole ResNet: outputs and gradients, parameters
laid out as nn.Conv lays them out."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtl
from jtl.models import common

# bfloat16 keeps 8 bits of mantissa: the two paths round their partial sums differently.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def assert_close(got, want, tol):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1e-30))


def output_and_grads(module, variables, x, use_dot: bool):
  """y, d(sum y*w)/d(variables), d/dx, with the CPU path forced on or off while tracing."""
  with common.cpu_paths(use_dot):
    y = module.apply(variables, x)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), y.dtype)
    loss = lambda v, x: (module.apply(v, x).astype(jnp.float32) * weights).sum()
    grads = jax.grad(loss, argnums=(0, 1))(variables, x)
  return y, grads


def primitives(fn, *args) -> set[str]:
  return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).eqns}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size,padding", [(8, "SAME"), (7, "SAME"), (7, "VALID"),
                                          (9, ((0, 0), (0, 0)))])
def test_pointwise_dot_equals_convolution(dtype, use_bias, stride, size, padding):
  rng = np.random.default_rng(size + 10 * stride + use_bias)
  x = jnp.asarray(rng.normal(size=(2, size, size, 24)), dtype)
  module = common.Conv(40, (1, 1), strides=(stride, stride), padding=padding, use_bias=use_bias)
  variables = module.init(jax.random.PRNGKey(0), x)
  if use_bias:  # zero-initialised: make it count
    variables = {"params": {**variables["params"],
                            "bias": jnp.asarray(rng.normal(size=(40,)), jnp.float32)}}
  # As the bf16 training step runs: parameters cast to the input's dtype.
  variables = jax.tree_util.tree_map(lambda v: v.astype(dtype), variables)
  y_dot, g_dot = output_and_grads(module, variables, x, use_dot=True)
  y_conv, g_conv = output_and_grads(module, variables, x, use_dot=False)
  assert y_dot.dtype == y_conv.dtype == dtype
  assert y_dot.shape == (2, -(-size // stride), -(-size // stride), 40)
  tol = TOLERANCE[dtype]
  assert_close(y_dot, y_conv, tol)
  jax.tree_util.tree_map(lambda a, b: assert_close(a, b, tol), g_dot, g_conv)


def test_parameters_and_outputs_match_nn_conv():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 6)), jnp.float32)
  for kernel, stride, groups in [(1, 2, 1), (3, 1, 1), (3, 2, 2)]:
    theirs = nn.Conv(8, (kernel, kernel), strides=(stride, stride), feature_group_count=groups)
    ours = common.Conv(8, (kernel, kernel), strides=(stride, stride), feature_group_count=groups)
    variables = theirs.init(jax.random.PRNGKey(0), x)
    ours_init = ours.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(lambda v: (v.shape, v.dtype), ours_init) == \
        jax.tree_util.tree_map(lambda v: (v.shape, v.dtype), variables)
    for use_dot in (True, False):
      with common.cpu_paths(use_dot):
        assert_close(ours.apply(variables, x), theirs.apply(variables, x), 1e-5)


def test_only_unpadded_dense_1x1_convolutions_become_dots():
  x = jnp.zeros((1, 8, 8, 4), jnp.float32)
  cases = [(common.Conv(4, (1, 1), strides=2, padding="VALID"), "dot_general"),
           (common.Conv(4, (1, 1), padding=((1, 1), (1, 1))), "conv_general_dilated"),
           (common.Conv(4, (1, 1), feature_group_count=2), "conv_general_dilated"),
           (common.Conv(4, (3, 3)), "conv_general_dilated")]
  for module, expected in cases:
    variables = module.init(jax.random.PRNGKey(0), x)
    with common.cpu_paths(True):
      on = primitives(module.apply, variables, x)
    with common.cpu_paths(False):
      off = primitives(module.apply, variables, x)
    assert expected in on and "conv_general_dilated" in off and "dot_general" not in off


@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {}),
    # A narrow ResNet-50: bottlenecks, whose 1x1 convolutions are most of ResNet-50's work.
    ("resnet50", dict(depths=(1, 1, 1, 1), widths=(32, 32, 64, 64), stem_width=16)),
])
def test_whole_resnet_same_logits_and_gradients_with_and_without_dots(name, kwargs):
  model = jtl.create_model(name, num_classes=5, image_size=64, **kwargs)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  labels = jnp.asarray([1, 3])

  def loss(params, batch_stats):
    logits, _ = model.module.apply({"params": params, "batch_stats": batch_stats}, x,
                                   train=True, mutable=["batch_stats"])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean(), logits

  results, convolutions = {}, {}
  params, batch_stats = model.variables["params"], model.variables["batch_stats"]
  for use_dot in (True, False):
    with common.cpu_paths(use_dot):  # the path is chosen while tracing, in lower()
      lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, batch_stats)
    convolutions[use_dot] = lowered.as_text().count("stablehlo.convolution")
    results[use_dot] = lowered.compile()(params, batch_stats)
  assert convolutions[True] < convolutions[False]
  (loss_dot, logits_dot), grads_dot = results[True]
  (loss_conv, logits_conv), grads_conv = results[False]
  assert_close(logits_dot, logits_conv, 1e-5)
  assert_close(loss_dot, loss_conv, 1e-5)
  # Batch-statistics BatchNorm divides by small variances: rounding differences grow a little.
  jax.tree_util.tree_map(lambda a, b: assert_close(a, b, 1e-4), grads_dot, grads_conv)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("size,window,strides,padding", [
    (16, (3, 3), (2, 2), ((1, 1), (1, 1))),   # ResNet's stem
    (15, (3, 3), (2, 2), "VALID"),            # Inception's reductions
    (16, (2, 2), (2, 2), "VALID"),            # VGG's stages
    (9, (3, 3), (2, 2), "SAME"),
])
def test_max_pool_equals_reduce_window_and_routes_ties_alike(dtype, size, window, strides,
                                                            padding):
  rng = np.random.default_rng(size)
  # Small integers tie often (as post-ReLU zeros do); integer cotangents make every sum exact,
  # so the gradients are bitwise equal exactly when each window picks the same element.
  x = jnp.asarray(rng.integers(0, 3, size=(2, size, size, 5)), dtype)
  reference = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
  pool = lambda x: common.max_pool(x, window, strides, padding)
  with common.cpu_paths(True):
    y, vjp = jax.vjp(pool, x)
  y_ref, vjp_ref = jax.vjp(reference, x)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  g = jnp.asarray(rng.integers(-4, 5, size=y.shape), dtype)
  np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float32),
                                np.asarray(vjp_ref(g)[0], np.float32))
  # Real-valued cotangents: equal up to the rounding of overlapping windows' sums.
  x = jnp.asarray(np.maximum(rng.normal(size=x.shape), 0), dtype)
  g = jnp.asarray(rng.normal(size=y.shape), dtype)
  with common.cpu_paths(True):
    grad = jax.vjp(pool, x)[1](g)[0]
  assert_close(grad, jax.vjp(reference, x)[1](g)[0], TOLERANCE[dtype])
