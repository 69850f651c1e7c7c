"""The CPU depthwise path equals XLA's grouped convolution, for every padding and stride used."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtl.models.common import DepthwiseConv, depthwise_conv_taps


@pytest.mark.parametrize("size", [7, 8, 15])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("same", [True, False])
def test_taps_equal_grouped_convolution(size, kernel, stride, same):
  rng = np.random.default_rng(size * kernel + stride)
  x = jnp.asarray(rng.normal(size=(2, size, size, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)
  padding = "SAME" if same else [(kernel // 2, kernel // 2)] * 2
  reference = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                           feature_group_count=6)
  got = depthwise_conv_taps(x, w, (stride, stride), padding)
  assert got.shape == reference.shape
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,padding", [(7, ((3, 3), (3, 3))), (3, "SAME"), (5, ((2, 2), (2, 2))),
                                            (3, ((0, 2), (1, 0))), (3, "VALID")])
@pytest.mark.parametrize("batch", [1, 6, 64])
def test_stride1_gradients_equal_grouped_convolution(kernel, padding, batch):
  """Stride 1 has its own gradient (the kernel's taken a group of examples at a time)."""
  rng = np.random.default_rng(kernel * batch)
  x = jnp.asarray(rng.normal(size=(batch, 9, 8, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 5)), jnp.float32)

  def reference(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=5)

  ours, our_vjp = jax.vjp(lambda x, w: depthwise_conv_taps(x, w, (1, 1), padding), x, w)
  theirs, their_vjp = jax.vjp(reference, x, w)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(rng.normal(size=theirs.shape), jnp.float32)
  for got, want in zip(our_vjp(cotangent), their_vjp(cotangent), strict=True):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * batch)


def test_module_has_nn_conv_parameter_layout_and_gradients():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 4)), jnp.float32)
  ours = DepthwiseConv((3, 3), strides=(2, 2), use_bias=True)
  theirs = nn.Conv(4, (3, 3), strides=(2, 2), feature_group_count=4, use_bias=True)
  variables = theirs.init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == \
      jax.tree_util.tree_map(jnp.shape, variables)
  np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5,
                             atol=1e-5)
  g_ours = jax.grad(lambda v: ours.apply(v, x).sum())(variables)
  g_theirs = jax.grad(lambda v: theirs.apply(v, x).sum())(variables)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                         g_ours, g_theirs)
