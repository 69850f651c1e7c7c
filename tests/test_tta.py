"""Test-time augmentation: the views are crops and mirrors of the eval transform's own resize,
one definition serves the final evaluation and predict --tta, a mirror-symmetric image scores as
without TTA, and a model that leaves no room to crop is refused before any work."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, write_image_folder
from jtl import config as config_lib
from jtl import data as data_lib
from jtl import distributed, evaluation, predict, steps, train
from jtl.commands import predict as predict_command
from jtl.data import tta
from jtl.data.preprocess import eval_pixels, eval_resize, to_pixels
from jtl.data.tf_setup import tf
from jtl.models import create_model

CROPPABLE = data_lib.Preprocess(image_size=16, crop_pct=0.8)  # resize to 20, crop 16


@pytest.fixture(scope="module")
def model():
  return create_model("tiny_cnn", num_classes=3)


@pytest.mark.fast
def test_the_views_are_crops_and_mirrors_of_the_eval_resize():
  image = np.random.default_rng(0).integers(0, 256, (30, 39, 3)).astype(np.uint8)
  views = tta.view_pixels(tf.constant(image), CROPPABLE, "flip+crops").numpy()
  resized = to_pixels(eval_resize(tf.constant(image), CROPPABLE)).numpy()
  assert resized.shape == (20, 26, 3) and views.shape == (10, 16, 16, 3)
  np.testing.assert_array_equal(views[0], eval_pixels(tf.constant(image), CROPPABLE).numpy())
  for view, (top, left) in zip(views[:5], [(2, 5), (0, 0), (0, 10), (4, 0), (4, 10)]):
    np.testing.assert_array_equal(view, resized[top:top + 16, left:left + 16])
  np.testing.assert_array_equal(views[5:], views[:5, :, ::-1])
  flip = tta.view_pixels(tf.constant(image), CROPPABLE, "flip").numpy()
  np.testing.assert_array_equal(flip, views[[0, 5]])
  assert tta.num_views("crops") == 5 and tta.num_views("none") == 1


@pytest.mark.fast
def test_crops_need_room_in_the_resize():
  assert tta.crop_problem("crops", CROPPABLE) is None
  assert tta.crop_problem("flip", data_lib.Preprocess(image_size=16, crop_pct=1.0)) is None
  for crop_pct in (1.0, 0.9):  # resize side 16 and 17: the corners fall within a pixel
    problem = tta.crop_problem("flip+crops", data_lib.Preprocess(16, crop_pct=crop_pct))
    assert problem is not None and "at least 2 pixels" in problem


def _write(root, images):
  for name, image in images.items():
    os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
    Image.fromarray(image).save(os.path.join(root, name))


@pytest.mark.fast
def test_a_mirror_symmetric_image_scores_as_without_tta(tmp_path, model):
  rng = np.random.default_rng(1)
  half = rng.integers(0, 256, (4, 16, 8, 3)).astype(np.uint8)
  symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
  lopsided = rng.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
  root = str(tmp_path / "data")
  _write(root, {f"{split}/{kind}/{i}.png": img[i] for kind, img in
                (("a_symmetric", symmetric), ("b_lopsided", lopsided)) for i in range(4)
                for split in ("train", "test")})
  ds = data_lib.open_dataset(f"folder:{root}", val_fraction=0)
  pp = data_lib.Preprocess.from_pretrained_cfg(model.pretrained_cfg)
  eval_fn = steps.make_eval_step(model, distributed.make_mesh(), num_classes=3)
  weights = SimpleNamespace(params=model.variables["params"],
                            batch_stats=model.variables["batch_stats"])

  def logits(mode):
    batches = data_lib.eval_batches(ds, "test", batch_size=4, preprocess=pp, tta=mode)
    out = evaluation.predictions(eval_fn, weights, batches, distributed.make_mesh())
    return out["logits"], out["label"]
  plain, labels = logits("")
  flipped, _ = logits("flip")
  symmetric = labels == 0
  np.testing.assert_allclose(flipped[symmetric], plain[symmetric], atol=1e-6, rtol=0)
  assert np.abs(flipped[~symmetric] - plain[~symmetric]).max(axis=1).min() > 1e-4


@pytest.mark.fast
def test_predict_reads_the_very_views_the_final_evaluation_scores(tmp_path):
  rng = np.random.default_rng(2)
  root = str(tmp_path / "data")
  _write(root, {f"{split}/c{i % 2}/{i}.png":
                rng.integers(0, 256, (24 + i, 31, 3)).astype(np.uint8)
                for i in range(5) for split in ("train", "test")})
  ds = data_lib.open_dataset(f"folder:{root}", val_fraction=0)
  for mode in ("flip", "crops", "flip+crops"):
    images = np.concatenate([b["image"][b["mask"]] for b in data_lib.eval_batches(
        ds, "test", batch_size=4, preprocess=CROPPABLE, tta=mode)])
    assert images.shape == (5, tta.num_views(mode), 16, 16, 3)
    for path, from_pipeline in zip(ds.table("test").sources, images):
      np.testing.assert_array_equal(tta.load_views(path, CROPPABLE, mode), from_pipeline)


def test_crops_on_a_model_without_room_are_refused_before_any_work(image_folder, tmp_path,
                                                                   model):
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match=r"config.tta='crops': crops need"):
    train.train_and_evaluate(tiny_config(image_folder, tta="crops"), str(workdir))
  assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()
  image = os.path.join(image_folder, "test", "class_0", "0.png")
  with pytest.raises(predict.TTAError, match="--tta flip\\+crops: crops need"):
    predict.top_k(model, [image], tta="flip+crops")
  config = config_lib.default_config()
  config.tta = "mirror"
  with pytest.raises(config_lib.ConfigError, match="config.tta='mirror'"):
    config_lib.validate(config)


def test_the_final_evaluation_and_predict_agree_with_tta(tmp_path, capsys):
  root = str(tmp_path / "data")
  write_image_folder(root, per_class=10)
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(
      tiny_config(root, strategy="feature_extraction", tta="flip", num_epochs=3), workdir)
  assert final["feature_cache"] and final["tta"] == "flip" and final["tta_views"] == 2
  test_dir = os.path.join(root, "test")

  def predicted_accuracy(*flags):
    capsys.readouterr()
    assert predict_command.main(["--workdir", workdir, "--json", "--top", "1", "--no-progress",
                                 *flags, test_dir]) == 0
    rows = json.loads(capsys.readouterr().out)
    truth = [os.path.basename(os.path.dirname(r["image"])) for r in rows]
    return np.mean([r["top"][0]["name"] == t for r, t in zip(rows, truth)])
  assert predicted_accuracy("--tta", "flip") == pytest.approx(final["tta_test_accuracy"])
  assert predicted_accuracy() == pytest.approx(final["test_accuracy"])
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    saved = json.load(f)
  assert {"tta", "tta_test_accuracy", "test_accuracy", "tta_test_balanced_accuracy"} <= set(saved)
