"""The same-run rule (config.same_run_differences) across jtl versions: a run saved before a key
existed continues when the new config leaves that key at its default, and not otherwise."""
from jtl import config as config_lib


def _saved_without(config, *dotted):
  saved = config_lib.to_jsonable(config)
  for key in dotted:
    *parents, leaf = key.split(".")
    target = saved
    for part in parents:
      target = target[part]
    del target[leaf]
  return saved


def test_a_key_newer_than_the_saved_run_counts_as_its_default():
  config = config_lib.default_config()
  saved = _saved_without(config, "ema_decay", "pruning.sparsity", "class_weights")
  assert config_lib.same_run_differences(saved, config) == []


def test_a_newer_key_set_away_from_its_default_is_a_difference():
  config = config_lib.default_config()
  saved = _saved_without(config, "ema_decay", "class_weights")
  config.ema_decay = 0.99
  config.class_weights = "auto"
  assert config_lib.same_run_differences(saved, config) == [
      "class_weights: saved 'none', now 'auto'", "ema_decay: saved 0.0, now 0.99"]


def test_a_changed_value_of_a_key_both_have_is_still_a_difference():
  config = config_lib.default_config()
  saved = config_lib.to_jsonable(config)
  config.label_smoothing = 0.1
  assert config_lib.same_run_differences(saved, config) == [
      "label_smoothing: saved 0.0, now 0.1"]
