"""The three strategies are one mechanism: labels from parameter paths and optax.multi_transform."""
import jax
import numpy as np
import optax
import pytest

from jtl import distributed, optim
from jtl import params as P
from jtl.config import default_config
from jtl.models import create_model
from jtl.steps import make_train_step


def _run_two_steps(strategy, freeze_depth=0, trainable=(), model="tiny_cnn", **overrides):
  config = default_config()
  config.strategy, config.freeze_depth = strategy, freeze_depth
  config.optimizer.lr = 1e-2
  model = create_model(model, num_classes=3, **overrides)
  params, batch_stats = model.variables["params"], model.variables["batch_stats"]
  rules = optim.freeze_rules(strategy, model.stage_names, freeze_depth, trainable)
  plan = optim.make_freeze_plan(params, model.stage_names, rules)
  mesh = distributed.make_mesh()
  step = make_train_step(model, plan, config, mesh, schedule=optax.constant_schedule(1e-2),
                         num_classes=3)
  state = step.init_state(params, batch_stats, seed=0)
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = {"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 3, 4).astype(np.int32)}
    state, _ = step(state, distributed.global_batch(batch, mesh))
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
  state = jax.tree_util.tree_map(lambda x: x + 1 if np.issubdtype(x.dtype, np.floating) else x,
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


def _first_step_loss(rules, bn_mode, images, labels):
  config = default_config()
  config.bn_mode = bn_mode
  model = create_model("tiny_cnn", num_classes=3, seed=1)
  plan = optim.make_freeze_plan(model.variables["params"], model.stage_names, rules)
  mesh = distributed.make_mesh()
  step = make_train_step(model, plan, config, mesh, schedule=optax.constant_schedule(1e-2),
                         num_classes=3)
  state = step.init_state(model.variables["params"], model.variables["batch_stats"], seed=0)
  _, metrics = step(state, distributed.global_batch({"image": images, "label": labels}, mesh))
  return float(metrics["loss"]), model


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  # Far from the initial running statistics (mean 0, var 1), so the two BatchNorm modes differ.
  images = (3.0 + 2.0 * rng.normal(size=(8, 16, 16, 3))).astype(np.float32)
  return images, rng.integers(0, 3, 8).astype(np.int32)


def test_a_layer_frozen_outside_the_prefix_normalises_with_its_running_statistics():
  # stem frozen (the prefix), stage1 trains, stage2 frozen by a rule outside the prefix.
  rules = [("stem/.*", "freeze"), ("stage1/.*", "train"), ("stage2/.*", "freeze"),
           (".*", "train")]
  images, labels = _batch()
  loss, model = _first_step_loss(rules, "frozen_only", images, labels)
  # The same forward pass stage by stage: only stage1 with batch statistics.
  apply, v = model.module.apply, model.variables
  x = apply(v, images, train=False, stop_stage=1)
  x, _ = apply(v, x, train=True, start_stage=1, stop_stage=2, mutable=["batch_stats"])
  x = apply(v, x, train=False, start_stage=2, stop_stage=3)
  logits = apply(v, x, train=False, start_stage=3)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  np.testing.assert_allclose(loss, float(expected), rtol=1e-5)
  # With batch statistics in stage2 (what a frozen layer must not see) the loss differs.
  x2, _ = apply(v, apply(v, images, train=False, stop_stage=1), train=True, start_stage=1,
                stop_stage=3, mutable=["batch_stats"])
  wrong = optax.softmax_cross_entropy_with_integer_labels(
      apply(v, x2, train=False, start_stage=3), labels).mean()
  assert abs(float(wrong) - loss) > 1e-3


def test_bn_mode_eval_everywhere_trains_with_running_statistics_in_every_layer():
  images, labels = _batch(1)
  loss, model = _first_step_loss([(".*", "train")], "eval_everywhere", images, labels)
  logits = model.module.apply(model.variables, images, train=False)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  np.testing.assert_allclose(loss, float(expected), rtol=1e-5)
  batch_stats_loss, _ = _first_step_loss([(".*", "train")], "frozen_only", images, labels)
  assert abs(batch_stats_loss - loss) > 1e-3
