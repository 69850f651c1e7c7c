"""End-to-end runs of the engine on a tiny CNN and tiny generated image folders."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import tiny_config
from helpers import CrashAtBatch
from jtl import config as config_lib
from jtl import params as P
from jtl import train
from jtl.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_leaves_the_documented_outputs(image_folder, tmp_path):
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(tiny_config(image_folder), workdir)
  for name in ("config.json", "metrics.jsonl", "final_metrics.json", "confusion_matrix.png",
               "curves.png", "export/model.safetensors", "export/model.json"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    saved = json.load(f)
  for key in ("test_accuracy", "test_top5", "test_macro_precision", "test_macro_recall",
              "test_macro_f1", "per_class", "confusion_matrix", "trainable_params",
              "total_params", "train_seconds"):
    assert key in saved, key
  assert saved == json.loads(json.dumps(final))
  cm = np.asarray(saved["confusion_matrix"])
  assert cm.shape == (3, 3) and cm.sum() == saved["num_test_examples"] == 36
  assert np.trace(cm) / cm.sum() == pytest.approx(saved["test_accuracy"])
  assert set(saved["per_class"]) == {"class_0", "class_1", "class_2"}
  assert saved["test_accuracy"] > 0.9  # one colour per class: learnable in a few steps
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [(r["epoch"], r["split"]) for r in records] == [(1, "train"), (1, "val"),
                                                         (2, "train"), (2, "val")]
  for r in records:
    for key in ("step", "epoch", "split", "loss", "accuracy", "learning_rate"):
      assert key in r
  assert "top5" in records[1]


def test_predict_uses_the_runs_head_and_labels(image_folder, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(image_folder, num_epochs=3), workdir)
  from jtl.commands.predict import main
  image = os.path.join(image_folder, "test", "class_2", "0.png")
  capsys.readouterr()
  assert main(["--workdir", workdir, "--json", "--top", "2", image]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result[0]["top"][0]["name"] == "class_2"
  assert len(result[0]["top"]) == 2


def test_restart_after_a_crash_reaches_the_same_parameters(image_folder, tmp_path):
  config = tiny_config(image_folder, num_epochs=3, checkpoint_every_steps=2)
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)

  crashed = str(tmp_path / "crashed")
  # 3 steps per epoch; the 6th batch is mid-epoch 2, after the step-4 checkpoint there.
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, crashed, extra_hooks=[CrashAtBatch(6)])
  assert not os.path.exists(os.path.join(crashed, "final_metrics.json"))
  train.train_and_evaluate(config, crashed)

  a = load_file(os.path.join(straight, "export", "model.safetensors"))
  b = load_file(os.path.join(crashed, "export", "model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  with open(os.path.join(straight, "metrics.jsonl")) as f1, \
       open(os.path.join(crashed, "metrics.jsonl")) as f2:
    assert [json.loads(l)["loss"] for l in f1] == [json.loads(l)["loss"] for l in f2]


def test_freeze_depth_beyond_the_stages_stops_before_any_work(image_folder, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match="freeze_depth=4.*4 stages"):
    train.train_and_evaluate(tiny_config(image_folder, freeze_depth=4), str(workdir))
  assert not (workdir / "checkpoints").exists()


def test_num_classes_that_disagrees_with_the_data(image_folder, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="num_classes=5.*3 classes"):
    train.train_and_evaluate(tiny_config(image_folder, num_classes=5), str(tmp_path / "r"))


@pytest.mark.parametrize("key,value,message", [
    ("strategy", "half", "config.strategy='half'"),
    ("optimizer.name", "lamb", "config.optimizer.name='lamb'"),
    ("batch_size", 0, "config.batch_size=0"),
    ("freeze_depth", 2, "freeze_depth=2 only applies to strategy='partial'"),
    ("dataset", "imagenet", "config.dataset='imagenet'"),
])
def test_bad_config_values_name_the_key(image_folder, key, value, message):
  config = tiny_config(image_folder, strategy="full")
  target, *rest = key.split(".")
  if rest:
    config[target][rest[0]] = value
  else:
    config[key] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(
      ")", r"\)").replace(".", r"\.")):
    config_lib.validate(config)


def test_command_line_rejects_unknown_keys_and_wrong_types(tmp_path):
  base = [sys.executable, "-m", "jtl.main", "--config", "configs/partial_ft.py",
          "--workdir", str(tmp_path / "w")]
  typo = subprocess.run(base + ["--config.optimiser.lr=0.1"], capture_output=True, text=True,
                        cwd=REPO)
  assert typo.returncode != 0 and "optimiser" in typo.stderr
  wrong = subprocess.run(base + ["--config.num_epochs=many"], capture_output=True, text=True,
                         cwd=REPO)
  assert wrong.returncode != 0 and "num_epochs" in wrong.stderr
  assert not (tmp_path / "w").exists()


def test_tfds_dataset_through_the_engine(tmp_path):
  import tensorflow_datasets as tfds
  config = tiny_config("unused", dataset="tfds:mnist", val_fraction=0.2, num_epochs=1)
  with tfds.testing.mock_data(num_examples=40):
    final = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert final["num_test_examples"] == 40
  assert len(final["per_class"]) == 10


def test_lp_ft_probes_the_head_then_fine_tunes_from_it(image_folder, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(image_folder, strategy="lp_ft", freeze_depth=1, num_epochs=2,
                       **{"probe.steps": 6, "probe.lr": 0.05})
  final = train.train_and_evaluate(config, workdir)
  probe = json.load(open(os.path.join(workdir, "probe", "final_metrics.json")))
  assert probe["feature_cache"] and probe["steps"] == 6  # the head alone, on cached features
  assert final["probe_test_accuracy"] == probe["test_accuracy"]
  assert final["probe_steps"] == 6 and 0 <= final["probe_val_accuracy"] <= 1
  # The fine-tuning phase started from the probe's head, not from a fresh one.
  from safetensors.numpy import load_file
  probe_head = load_file(os.path.join(workdir, "probe", "export", "model.safetensors"))
  fresh = create_model("tiny_cnn", num_classes=3, seed=0).variables["params"]["head"]["kernel"]
  assert not np.allclose(probe_head["params/head/kernel"], fresh)
  assert final["trainable_params"] > probe["trainable_params"]


def test_adam_state_holds_twice_the_trainable_bytes(image_folder):
  from jtl import distributed, optim, steps
  for strategy, depth in (("feature_extraction", 0), ("partial", 2), ("full", 0)):
    config = tiny_config(image_folder, strategy=strategy, freeze_depth=depth,
                         **{"optimizer.name": "adam"})
    model = create_model("tiny_cnn", num_classes=3)
    params = model.variables["params"]
    plan = optim.make_freeze_plan(params, model.stage_names, optim.freeze_rules(
        strategy, model.stage_names, depth))
    step = steps.make_train_step(model, plan, config, distributed.make_mesh(),
                                 schedule=optim.make_schedule(config, 1), num_classes=3)
    opt_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(step.tx.init(params))
                    if np.ndim(x) > 0)
    trainable = sum(np.asarray(v).nbytes for k, v in P.flatten(params).items()
                    if plan.labels[k] != optim.FROZEN)
    assert opt_bytes == 2 * trainable, strategy
