"""The three strategies are one mechanism: labels from parameter paths and optax.multi_transform."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtl import optim
from jtl import params as P
from jtl.config import default_config
from jtl.models import create_model
from jtl.train import TrainState, train_step


def _run_two_steps(strategy, freeze_depth=0, trainable=(), model="tiny_cnn", **overrides):
  config = default_config()
  config.strategy, config.freeze_depth = strategy, freeze_depth
  config.optimizer.lr = 1e-2
  model = create_model(model, num_classes=3, **overrides)
  params, batch_stats = model.variables["params"], model.variables["batch_stats"]
  rules = optim.freeze_rules(strategy, model.stage_names, freeze_depth, trainable)
  plan = optim.make_freeze_plan(params, model.stage_names, rules)
  tx = optim.make_optimizer(config, plan, params, optax.constant_schedule(1e-2))
  state = TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params), rng=jax.random.key_data(jax.random.PRNGKey(0)))
  step = jax.jit(functools.partial(train_step, module=model.module, tx=tx,
                                   frozen_stages=plan.frozen_stages, num_classes=3,
                                   label_smoothing=0.0, bf16=False, skip_nonfinite=False,
                                   frozen_stats=plan.frozen_stats_mask(batch_stats)))
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 3, 4).astype(np.int32)}
    state, _ = step(state, batch)
  return plan, {"params": params, "batch_stats": batch_stats}, state


def _changed(before, after):
  b, a = P.flatten(before), P.flatten(jax.device_get(after))
  return {k: not np.array_equal(np.asarray(b[k]), np.asarray(a[k])) for k in b}


@pytest.mark.parametrize("strategy,depth,frozen_prefix", [
    ("feature_extraction", 0, ("stem", "stage1", "stage2")),
    ("partial", 2, ("stem", "stage1")),
    ("full", 0, ()),
])
def test_frozen_bit_identical_trainable_changed(strategy, depth, frozen_prefix):
  plan, before, state = _run_two_steps(strategy, depth)
  assert plan.frozen_stages == len(frozen_prefix)
  changed = _changed(before["params"], state.params)
  for name, did_change in changed.items():
    frozen = name.split("/")[0] in frozen_prefix
    assert did_change != frozen, (name, did_change)
  # BatchNorm statistics of frozen stages stay as loaded; trainable stages update theirs.
  stats_changed = _changed(before["batch_stats"], state.batch_stats)
  for name, did_change in stats_changed.items():
    assert did_change != (name.split("/")[0] in frozen_prefix), name


def test_optimizer_state_holds_nothing_for_frozen_params():
  plan, before, state = _run_two_steps("partial", 2)
  frozen = {k for k, l in plan.labels.items() if l == optim.FROZEN}
  assert frozen
  leaves = jax.tree_util.tree_leaves(state.opt_state)
  sizes = sorted(int(np.size(x)) for x in leaves if np.ndim(x) > 0)
  trainable_sizes = sorted(int(np.size(v)) for k, v in P.flatten(before["params"]).items()
                           if k not in frozen)
  # adamw keeps mu and nu for each trainable parameter and nothing for frozen ones.
  assert sizes == sorted(trainable_sizes * 2)


def test_regex_rules_first_match_wins_and_non_prefix_freeze():
  rules = [("stage1/.*", "freeze"), ("stage.*", "train"), ("stem/.*", "train"), (".*", "freeze")]
  plan, before, state = _run_two_steps("partial", trainable=rules)
  assert plan.frozen_stages == 0  # stem trains, so there is no frozen prefix
  for name, did_change in _changed(before["params"], state.params).items():
    # "head" falls through to the last rule and is frozen; stage1 matches the first rule.
    frozen = name.startswith(("stage1/", "head/"))
    assert did_change != frozen, name
  for name, did_change in _changed(before["batch_stats"], state.batch_stats).items():
    assert did_change != name.startswith("stage1/"), name


def test_regex_pattern_matching_nothing_is_an_error():
  model = create_model("tiny_cnn", num_classes=3)
  with pytest.raises(ValueError, match=r"stage9/\.\*"):
    optim.make_freeze_plan(model.variables["params"], model.stage_names,
                           [("stage9/.*", "freeze"), (".*", "train")])


def test_parameter_covered_by_no_rule_is_an_error():
  model = create_model("tiny_cnn", num_classes=3)
  with pytest.raises(ValueError, match="covered by no trainable pattern"):
    optim.make_freeze_plan(model.variables["params"], model.stage_names,
                           [("stem/.*", "freeze")])


def test_gradual_unfreezing_keeps_state_of_training_stages():
  config = default_config()
  model = create_model("tiny_cnn", num_classes=3)
  params = model.variables["params"]
  plan = optim.make_freeze_plan(params, model.stage_names,
                                optim.freeze_rules("feature_extraction", model.stage_names, 0))
  tx = optim.make_optimizer(config, plan, params, optax.constant_schedule(1e-3))
  state = tx.init(params)
  state = jax.tree_util.tree_map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                 state)
  thawed = optim.unfreeze_stages(plan, 1)
  assert thawed.frozen_stages == plan.frozen_stages - 1
  assert {l for l in thawed.labels.values()} == {"frozen", "stage2", "head"}
  new_tx = optim.make_optimizer(config, thawed, params, optax.constant_schedule(1e-3))
  carried = optim.carry_opt_state(state, new_tx.init(params))
  inner = carried[-1].inner_states
  head_mu = jax.tree_util.tree_leaves(inner["head"])
  assert all(np.all(np.asarray(x) >= 1) for x in head_mu if np.ndim(x) > 0)  # kept
  stage2 = [x for x in jax.tree_util.tree_leaves(inner["stage2"]) if np.ndim(x) > 0]
  assert stage2 and all(np.all(np.asarray(x) == 0) for x in stage2)  # fresh
