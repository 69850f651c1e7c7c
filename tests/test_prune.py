"""jtl prune: magnitude masks that hold exactly, channel-pruned models that compute what the full
model computes without those channels, and the command's runs, summaries and refusals."""
import csv
import dataclasses
import functools
import json
import os
import re
import types

import jax
import numpy as np
import optax
from flax import linen as nn
import pytest
from safetensors.numpy import load_file

from conftest import tiny_config, write_image_folder
from jtl import config as config_lib
from jtl import export, train
from jtl import params as P
from jtl.commands import export as export_command
from jtl.commands import predict, prune
from jtl.models import factory, registry, resnet
from jtl.run_record import RunRecord
from jtl.pruning import channels, magnitude, measure

SIZE = 16
TINY_RESNET = dict(depths=(1, 1), widths=(16, 32), block="bottleneck", stem_width=8)


def random_variables(module, seed=0):
  """Random weights and BatchNorm statistics (no init compiled), so that rankings and
  BatchNorm both matter."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in P.flatten(factory.abstract_variables(module, SIZE)).items():
    low_high = (0.5, 2.0) if name.endswith("/var") else (-1.0, 1.0)
    flat[name] = rng.uniform(*low_high, shape.shape).astype(np.float32)
  return P.unflatten(flat)


def random_model(name, **kwargs):
  module = registry.get_entry(name).build(num_classes=3, image_size=SIZE, **kwargs)
  return factory.Model(name, module, random_variables(module), registry.PretrainedCfg())


def kernels_of(params):
  flat = P.flatten(params)
  return {n: np.asarray(flat[n]) for n in magnitude.prunable_names(params)}


def _toy_params(seed=0):
  """A stem conv, a depthwise conv, a dense layer, BatchNorm and a head."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {"stem": {"conv": {"kernel": normal(3, 3, 4, 8), "bias": normal(8)},
                   "bn": {"scale": normal(8), "bias": normal(8)}},
          "stage1": {"dw_conv": {"kernel": normal(3, 3, 1, 8)}, "fc": {"kernel": normal(8, 16)}},
          "head": {"kernel": normal(16, 3), "bias": normal(3)}}


# ---------------------------------------------------------------------------------------------
# Magnitude masks.

def test_global_pruning_zeroes_exactly_the_smallest_weights():
  params = _toy_params()
  pruned, masks = magnitude.prune(params, 0.5, "global")
  before, after = kernels_of(params), kernels_of(pruned)
  assert set(before) == {"stem/conv/kernel", "stage1/dw_conv/kernel",
                         "stage1/fc/kernel"}  # not the head's, nor biases and scales
  total = sum(v.size for v in before.values())
  zeros = sum(int(np.sum(v == 0)) for v in after.values())
  assert zeros == round(0.5 * total)
  dropped = np.concatenate([np.abs(before[n][~masks[n]]) for n in before])
  kept = np.concatenate([np.abs(before[n][masks[n]]) for n in before])
  assert dropped.max() <= kept.min()
  for n in before:
    np.testing.assert_array_equal(after[n][masks[n]], before[n][masks[n]])
  for name, value in P.flatten(params).items():
    if name not in before:
      np.testing.assert_array_equal(P.flatten(pruned)[name], value)


def test_per_layer_pruning_gives_every_layer_the_sparsity():
  params = _toy_params()
  pruned, _ = magnitude.prune(params, 0.7, "per_layer")
  for name, value in kernels_of(pruned).items():
    assert int(np.sum(value == 0)) == round(0.7 * value.size), name
    original = np.abs(kernels_of(params)[name])
    assert original[value == 0].max() <= original[value != 0].min()


def _train(tx, params, steps, seed=1):
  """`steps` updates of `tx` on random gradients; returns the params."""
  state = tx.init(params)
  rng = np.random.default_rng(seed)
  update = jax.jit(tx.update)
  for _ in range(steps):
    grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(p.dtype), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree_util.tree_map(np.asarray, params)


def test_masks_hold_pruned_weights_at_exactly_zero_through_adamw():
  start, masks = magnitude.prune(_toy_params(), 0.5)
  names = magnitude.prunable_names(start)
  tx = optax.chain(optax.adamw(0.1, weight_decay=0.5),
                   magnitude.hold_sparsity(names, lambda step: 0.5))
  after = _train(tx, start, steps=5)
  kernel, first = after["stem"]["conv"]["kernel"], start["stem"]["conv"]["kernel"]
  mask = masks["stem/conv/kernel"]
  assert np.all(kernel[~mask] == 0.0) and np.all(first[~mask] == 0.0)
  assert np.all(kernel[mask] != first[mask])
  assert np.all(after["head"]["kernel"] != start["head"]["kernel"])  # not pruned, trained


def test_unpruned_weights_are_pruned_at_the_first_update():
  params = _toy_params()
  names = magnitude.prunable_names(params)
  tx = optax.chain(optax.sgd(0.1), magnitude.hold_sparsity(names, lambda step: 0.25,
                                                           scope="per_layer"))
  kernel = _train(tx, params, steps=1)["stem"]["conv"]["kernel"]
  original = np.abs(params["stem"]["conv"]["kernel"])
  assert int(np.sum(kernel == 0)) == round(0.25 * kernel.size)
  assert original[kernel == 0].max() <= original[kernel != 0].min()


def test_polynomial_schedule_rises_to_the_target_and_holds():
  schedule = magnitude.polynomial_sparsity(0.8, 2, 10)
  assert [float(schedule(t)) for t in (0, 2, 6, 10, 20)] == pytest.approx(
      [0.0, 0.0, 0.8 * (1 - 0.5 ** 3), 0.8, 0.8])
  config = config_lib.default_config().pruning
  config.sparsity, config.schedule, config.begin_step, config.end_step = 0.8, "polynomial", 0, 6
  config.update_every, config.scope = 2, "per_layer"
  params = _toy_params()
  names = magnitude.prunable_names(params)
  tx = optax.chain(optax.adam(0.01), magnitude.from_config(config, names))
  sparsity = [float(np.mean(_train(tx, params, steps=t)["stem"]["conv"]["kernel"] == 0))
              for t in (1, 2, 4, 6, 9)]
  size = params["stem"]["conv"]["kernel"].size
  expected = [0.0] + [round(0.8 * (1 - (1 - t / 6) ** 3) * size) / size for t in (2, 4, 6, 6)]
  assert sparsity == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Channel pruning.

CHANNEL_CASES = {
    "resnet50": dict(TINY_RESNET),
    "vgg11_bn": dict(stage_channels=((8,), (16, 16)), fc_width=16, pool_size=2),
    "efficientnet_b0": dict(stages=((1, 3, 1, 1, 8), (2, 3, 2, 6, 16)), stem_channels=8,
                            top_channels=32),
}


def tiny_resnet_params(a, b, c, d, classes=3):
  """Parameters of the tiny bottleneck ResNet with inner widths (a, b) and (c, d), by hand."""
  stem = 7 * 7 * 3 * 8 + 2 * 8
  stage1 = 8 * a + 2 * a + 9 * a * b + 2 * b + b * 16 + 2 * 16 + 8 * 16 + 2 * 16
  stage2 = 16 * c + 2 * c + 9 * c * d + 2 * d + d * 32 + 2 * 32 + 16 * 32 + 2 * 32
  return stem + stage1 + stage2 + 32 * classes + classes


@pytest.mark.parametrize("name", sorted(CHANNEL_CASES))
def test_channel_pruned_model_computes_the_full_model_without_those_channels(name):
  kwargs = CHANNEL_CASES[name]
  full = random_model(name, **kwargs)
  groups = channels.channel_groups(full)
  kept = channels.choose_channels(full, 0.5)
  widths, variables = channels.prune_channels(full, 0.5)
  scores = np.abs(np.asarray(P.flatten(full.variables)[f"params/{groups[0].norm}/scale"]))
  assert set(kept[0]) == set(np.argsort(-scores)[:len(kept[0])])  # the largest |scale|
  module = registry.get_entry(name).build(num_classes=3, image_size=SIZE, inner_widths=widths,
                                          **kwargs)
  shapes = jax.tree_util.tree_map(lambda s: s.shape, factory.abstract_variables(module, SIZE))
  assert jax.tree_util.tree_map(np.shape, variables) == shapes
  small = dataclasses.replace(full, module=module, variables=variables)
  if name == "resnet50":
    assert widths == (2, 2, 4, 4)
    assert small.num_params == tiny_resnet_params(*widths)
    assert full.num_params == tiny_resnet_params(4, 4, 8, 8)
  assert small.num_params < full.num_params

  x = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  full_fn, small_fn = (measure.compiled_forward(m, SIZE, 2) for m in (full, small))
  zeroed = channels.zero_dropped(full, groups, kept)
  expected = np.asarray(full_fn(zeroed, x))
  np.testing.assert_allclose(np.asarray(small_fn(small.variables, x)), expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())
  assert not np.allclose(np.asarray(full_fn(full.variables, x)), expected)  # channels mattered
  assert measure.flops_of(small_fn) < measure.flops_of(full_fn)


def test_default_widths_build_the_same_modules():
  """inner_widths=None is the architecture as it was: same variables, same shapes."""
  for name, kwargs in CHANNEL_CASES.items():
    build = registry.get_entry(name).build
    shapes = lambda m: jax.tree_util.tree_map(lambda s: s.shape,
                                              factory.abstract_variables(m, SIZE))
    assert shapes(build(num_classes=3, **kwargs)) == shapes(build(num_classes=3,
                                                                  inner_widths=None, **kwargs))


def test_unsupported_family_is_named_with_the_supported_ones():
  with pytest.raises(channels.UnsupportedModelError, match="tiny_cnn.*resnet, vgg, efficientnet"):
    channels.check_supported("tiny_cnn")


# ---------------------------------------------------------------------------------------------
# The command.

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("prune_data"))
  write_image_folder(root)
  return root


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, data_root):
  entry = registry.ModelEntry(
      name="prune_resnet", family="resnet",
      build=functools.partial(resnet.ResNet, image_size=SIZE, **TINY_RESNET),
      pretrained={"": registry.PretrainedCfg(image_size=SIZE, crop_pct=1.0)}, default_tag=None,
      converters={})
  with registry.registered(entry):
    workdir = str(tmp_path_factory.mktemp("resnet_run"))
    train.train_and_evaluate(tiny_config(data_root, model="prune_resnet", num_epochs=1), workdir)
    yield workdir


def files_under(root):
  """Every file under `root` with its size and modification time."""
  return sorted((os.path.relpath(os.path.join(d, f), root), os.stat(os.path.join(d, f)).st_size,
                 os.stat(os.path.join(d, f)).st_mtime_ns)
                for d, _, names in os.walk(root) for f in names)


def read_summary(workdir):
  with open(os.path.join(workdir, "prune", "summary.csv")) as f:
    return list(csv.DictReader(f))


def read_json(path):
  with open(path) as f:
    return json.load(f)


def test_magnitude_run_holds_its_zeros_and_summarises(resnet_run):
  assert prune.main(["--workdir", resnet_run, "--sparsity", "0.5", "--steps", "3",
                     "--latency-repeats", "1"]) == 0
  run = os.path.join(resnet_run, "prune", "magnitude-0.5")
  start = load_file(os.path.join(resnet_run, "prune", "start", "magnitude-0.5.safetensors"))
  end = load_file(os.path.join(run, "export", "model.safetensors"))
  names = [n for n in start
           if n.startswith("params/") and magnitude.is_prunable(n[len("params/"):], start[n])]
  total = sum(start[n].size for n in names)
  assert sum(int(np.sum(start[n] == 0)) for n in names) == round(0.5 * total)
  for n in names:  # after the fine-tune: the same zeros, every other weight moved
    assert np.all(end[n][start[n] == 0] == 0.0)
    assert np.all(end[n][start[n] != 0] != start[n][start[n] != 0])
  final = read_json(os.path.join(run, "final_metrics.json"))
  assert final["steps"] >= 3
  rows = {r["run"]: r for r in read_summary(resnet_run)}
  assert set(rows) == {"..", "magnitude-0.5"}
  for run_name, workdir in (("magnitude-0.5", run), ("..", resnet_run)):
    metrics = read_json(os.path.join(workdir, "final_metrics.json"))
    for key in ("test_accuracy", "test_macro_f1", "steps"):
      assert float(rows[run_name][key]) == pytest.approx(metrics[key])
  pruned, unpruned = rows["magnitude-0.5"], rows[".."]
  assert float(pruned["kernel_sparsity"]) == pytest.approx(0.5, abs=1e-3)
  assert int(pruned["export_gzip_bytes"]) < int(unpruned["export_gzip_bytes"])
  assert int(pruned["export_gzip_bytes"]) == measure.gzip_size(
      os.path.join(run, "export", "model.safetensors"))
  assert os.path.isfile(os.path.join(resnet_run, "prune", "pruning.png"))
  assert not [n for n in os.listdir(os.path.join(resnet_run, "prune")) if n.startswith(".")]


def test_channel_run_is_a_smaller_model_that_loads_and_predicts(resnet_run, data_root, capsys):
  # A magnitude run with no fine-tune (evaluated as pruned): its row, and the one of the
  # magnitude test, survive the channels run's summary.
  assert prune.main(["--workdir", resnet_run, "--sparsity", "0.7", "--steps", "0",
                     "--latency-repeats", "1"]) == 0
  assert prune.main(["--workdir", resnet_run, "--sparsity", "0.5", "--method", "channels",
                     "--steps", "2", "--latency-repeats", "1"]) == 0
  run = os.path.join(resnet_run, "prune", "channels-0.5")
  original = os.path.join(resnet_run, "export", "model.safetensors")
  assert os.path.getsize(os.path.join(run, "export", "model.safetensors")) < os.path.getsize(
      original)
  model = export.load_exported(run)
  assert model.module.inner_widths == (2, 2, 4, 4)
  assert model.num_params == tiny_resnet_params(2, 2, 4, 4)
  rows = {r["run"]: r for r in read_summary(resnet_run)}
  assert {"..", "magnitude-0.7", "channels-0.5"} <= set(rows)
  assert int(rows["channels-0.5"]["params"]) == tiny_resnet_params(2, 2, 4, 4)
  assert float(rows["channels-0.5"]["flops"]) < float(rows[".."]["flops"])
  assert rows["magnitude-0.7"]["steps"] == "0"
  assert float(rows["magnitude-0.7"]["kernel_sparsity"]) == pytest.approx(0.7, abs=1e-3)
  capsys.readouterr()
  image = os.path.join(data_root, "test", "class_0", "0.png")
  assert predict.main(["--workdir", run, "--json", "--no-progress", image]) == 0
  (result,) = json.loads(capsys.readouterr().out)
  assert result["top"][0]["name"].startswith("class_")

  # Shipped, the pruned model keeps its smaller size: the TFLite file of the narrow run is
  # smaller than the full run's, and both were checked against jtl's probabilities on export.
  sizes = {}
  for name, workdir in (("full", resnet_run), ("pruned", run)):
    out = os.path.join(os.path.dirname(resnet_run), f"shipped-{name}")
    assert export_command.main(["--workdir", workdir, "--format", "tflite", "--out", out]) == 0
    with open(os.path.join(out, "export.json")) as f:
      (entry,) = json.load(f)["formats"].values()
    assert entry["max_abs_diff_vs_jtl"] < 1e-4
    sizes[name] = os.path.getsize(os.path.join(out, entry["path"]))
  assert sizes["pruned"] < sizes["full"]


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.0"], "--sparsity 1.0: each sparsity must be in \\[0, 1\\)"),
    (["--sparsity", "0.5,-0.1"], "--sparsity -0.1: each sparsity must be in \\[0, 1\\)"),
    (["--sparsity", "0.5", "--method", "magnitude", "--steps", "-1"], "--steps -1: must be >= 0"),
    (["--sparsity", "0.5", "--schedule", "polynomial", "--steps", "0"], "--steps > 0"),
])
def test_bad_arguments_fail_before_any_work(resnet_run, capsys, argv, message):
  before = files_under(resnet_run)
  with pytest.raises(SystemExit) as exit_info:
    prune.main(["--workdir", resnet_run, *argv])
  assert exit_info.value.code == 2
  assert re.search(message, capsys.readouterr().err)
  assert files_under(resnet_run) == before


def test_channels_of_an_unsupported_family_fail_naming_the_supported_ones(
    resnet_run, tmp_path, capsys):
  vit_run = tmp_path / "vit_run"  # the files of a finished run, the model a ViT
  (vit_run / "export").mkdir(parents=True)
  for name in ("config.json", "final_metrics.json", "export/model.safetensors"):
    (vit_run / name).write_bytes((open(os.path.join(resnet_run, name), "rb")).read())
  record = RunRecord.read(os.path.join(resnet_run, "export", "model.json"))
  dataclasses.replace(record, model="vit_tiny_patch16_224").write(
      str(vit_run / "export" / "model.json"))
  before = files_under(str(vit_run))
  with pytest.raises(SystemExit):
    prune.main(["--workdir", str(vit_run), "--sparsity", "0.5", "--method", "channels"])
  err = capsys.readouterr().err
  assert re.search("model 'vit_tiny_patch16_224' \\(family 'vit'\\).*supports the resnet, vgg, "
                   "efficientnet families", err), err
  assert files_under(str(vit_run)) == before


def test_a_workdir_without_a_finished_run_is_named(tmp_path, capsys):
  workdir = tmp_path / "unfinished"
  workdir.mkdir()
  (workdir / "config.json").write_text("{}")
  with pytest.raises(SystemExit):
    prune.main(["--workdir", str(workdir), "--sparsity", "0.5"])
  err = capsys.readouterr().err
  assert f"--workdir {workdir}: no finished jtl run" in err and "final_metrics.json" in err
  assert sorted(os.listdir(workdir)) == ["config.json"]


class _BatchNormFirst(nn.Module):
  """A BatchNorm on the images themselves: its statistics are the pixels' own."""
  momentum: float

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name="bn")(x)
    return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_recalibrated_statistics_are_the_average_batch_statistics(tmp_path, momentum):
  from jtl import data as data_lib
  from jtl.pruning import recalibrate
  root = str(tmp_path / "images")
  write_image_folder(root, num_classes=2, per_class=10, size=12)
  dataset = data_lib.open_dataset(f"folder:{root}", val_fraction=0.0, seed=0)
  pp = data_lib.Preprocess(image_size=8, crop_pct=1.0)
  module = _BatchNormFirst(momentum)
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))
  stale = {"bn": {"mean": np.full(3, 5.0, np.float32), "var": np.full(3, 9.0, np.float32)}}
  model = types.SimpleNamespace(module=module, variables={**variables, "batch_stats": stale})
  got = recalibrate.recalibrated(model, dataset, pp, batch_size=8, num_batches=10)

  # Two full batches of 8 (the padded third one is left out), each batch's own statistics.
  batches = [b["image"] for b in data_lib.eval_batches(dataset, "train", batch_size=8,
                                                        preprocess=pp) if b["mask"].all()]
  assert len(batches) == 2
  means = [b.mean(axis=(0, 1, 2)) for b in batches]
  variances = [b.var(axis=(0, 1, 2)) for b in batches]
  np.testing.assert_allclose(got["batch_stats"]["bn"]["mean"], np.mean(means, 0), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(got["batch_stats"]["bn"]["var"], np.mean(variances, 0), rtol=1e-3,
                             atol=1e-5)
  assert got["params"] is variables["params"]
