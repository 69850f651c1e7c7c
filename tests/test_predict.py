"""predict serves the evaluation pipeline's pixels, batched, in three formats, with one-line errors.

The images are the awkward ones a hand-collected folder holds (transparency, EXIF rotation,
16-bit, CMYK, a JPEG large enough to be decoded at reduced scale, odd sizes), and the transform is
tf_efficientnet_b3's (300 px, crop_pct 0.904, bicubic), where a PIL re-implementation resized to
332 px instead of the pipeline's 331.
"""
import csv
import dataclasses
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jtl import data as data_lib
from jtl import export
from jtl.data.preprocess import Preprocess, load_eval_image
from jtl.commands.predict import main
from jtl.models import PretrainedCfg, create_model
from jtl.predict import top_k
from jtl.run_record import RunRecord

B3 = Preprocess(image_size=300, crop_pct=0.904, interpolation="bicubic",
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CLASSES = ("a", "b")


def _photo(height, width):
  """A real photo (skimage's coffee), resized: structure at every scale, unlike a flat colour."""
  from skimage import data
  return np.asarray(Image.fromarray(data.coffee()).resize((width, height), Image.BICUBIC))


def _write_awkward_images(root):
  a, b = root / "a", root / "b"
  a.mkdir(parents=True)
  b.mkdir()
  photo = _photo(64, 96)
  rgba = np.dstack([photo, np.tile(np.linspace(0, 255, 96).astype(np.uint8), (64, 1))])
  Image.fromarray(rgba, "RGBA").save(a / "transparent.png")
  exif = Image.Exif()
  exif[0x0112] = 6  # stored rotated: shown after a 90-degree turn
  Image.fromarray(_photo(48, 80)).save(a / "rotated.jpg", quality=92, exif=exif.tobytes())
  deep = (np.add.outer(np.arange(50), np.arange(37)) * 700).clip(0, 65535).astype(np.uint16)
  Image.fromarray(deep).save(a / "deep.png")  # mode I;16: a 16-bit grey PNG
  Image.fromarray(_photo(333, 517)).save(a / "odd_size.jpg", quality=90)
  # Short side 1100: decoded at 1/2 scale by the pipeline (decode_min_side 512).
  Image.fromarray(_photo(1100, 1350)).save(b / "large.jpg", quality=85)
  Image.fromarray(_photo(70, 50)).convert("CMYK").save(b / "cmyk.jpg")
  palette = Image.fromarray(_photo(40, 40)).convert("P", palette=Image.ADAPTIVE, colors=16)
  palette.save(b / "palette_trns.png", transparency=3)
  Image.fromarray(_photo(41, 90)[..., 1]).save(b / "grey.jpg")
  Image.fromarray(_photo(57, 31)).save(b / "plain.png")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("awkward")
  _write_awkward_images(root)
  return str(root)


@pytest.fixture(scope="module")
def pipeline_inputs(images):
  """{path: float32 [300, 300, 3]} as evaluation feeds the model, through tf.data."""
  ds = data_lib.open_dataset(f"folder:{images}", val_fraction=0.0)
  paths = list(ds.table("train").sources)
  assert len(paths) == 9
  batches = list(data_lib.eval_batches(ds, "train", batch_size=4, preprocess=B3))
  pixels = np.concatenate([b["image"] for b in batches])[np.concatenate([b["mask"] for b in
                                                                         batches])]
  return dict(zip(paths, pixels))


class RecordingModel:
  """What top_k needs of a Model; keeps the batches it is given."""

  def __init__(self, cfg):
    self.pretrained_cfg = cfg
    self.batches = []

  def predict(self, x):
    self.batches.append(np.array(x))
    return np.zeros((len(x), self.pretrained_cfg.num_classes), np.float32)


def test_load_eval_image_is_the_pipelines_transform(pipeline_inputs):
  for path, expected in pipeline_inputs.items():
    got = load_eval_image(path, B3)
    assert got.dtype == np.float32 and got.shape == (300, 300, 3)
    np.testing.assert_array_equal(got, expected, err_msg=path)
  path = next(iter(pipeline_inputs))
  with open(path, "rb") as f:
    np.testing.assert_array_equal(load_eval_image(f.read(), B3), pipeline_inputs[path])


def test_predict_feeds_the_model_the_pipelines_pixels(pipeline_inputs):
  cfg = PretrainedCfg(num_classes=2, image_size=300, crop_pct=0.904, interpolation="bicubic",
                      label_names=CLASSES)
  model = RecordingModel(cfg)
  paths = list(pipeline_inputs)
  results = top_k(model, paths, 2, batch_size=4)
  # 9 images in batches of 4: the last one padded, so one compiled shape serves all.
  assert [b.shape for b in model.batches] == [(4, 300, 300, 3)] * 3
  fed = np.concatenate(model.batches)[:len(paths)]
  for path, x in zip(paths, fed):
    np.testing.assert_array_equal(x, pipeline_inputs[path], err_msg=path)
  assert [r["image"] for r in results] == paths


def _finished_run(root, image_size=32):
  """A workdir as training leaves it (export/model.json + weights), of the tiny test CNN."""
  model = create_model("tiny_cnn", num_classes=len(CLASSES), image_size=image_size)
  model.pretrained_cfg = dataclasses.replace(model.pretrained_cfg, crop_pct=0.904,
                                             interpolation="bicubic")
  record = RunRecord.of_run("tiny_cnn", model, CLASSES, image_size)
  export.export_model(str(root), model.variables, record)
  return str(root)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return _finished_run(tmp_path_factory.mktemp("run"))


def test_cli_json_on_a_folder_matches_the_model_on_eval_inputs(images, workdir, capsys):
  assert main(["--workdir", workdir, "--json", "--batch-size", "3", "--no-progress",
               images]) == 0
  results = json.loads(capsys.readouterr().out)
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(images) for f in files)
  assert [r["image"] for r in results] == paths
  model = export.load_exported(workdir)
  pp = Preprocess.from_pretrained_cfg(model.pretrained_cfg)
  logits = np.asarray(model.predict(np.stack([load_eval_image(p, pp) for p in paths])))
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  for r, p in zip(results, probs):
    assert set(r) == {"image", "top"} and len(r["top"]) == 2  # both classes (k=5 > 2)
    assert [t["class"] for t in r["top"]] == list(np.argsort(-p, kind="stable"))
    assert [t["name"] for t in r["top"]] == [CLASSES[t["class"]] for t in r["top"]]
    np.testing.assert_allclose([t["probability"] for t in r["top"]], np.sort(p)[::-1],
                               rtol=1e-5)


def test_cli_csv_table_and_progress(images, workdir, capsys):
  photo = os.path.join(images, "a", "odd_size.jpg")
  assert main(["--workdir", workdir, "--csv", "--top-k", "1", "--batch-size", "2", images]) == 0
  out, err = capsys.readouterr()
  rows = list(csv.reader(io.StringIO(out)))
  assert rows[0] == ["image", "rank", "class", "name", "probability"]
  assert len(rows) == 1 + 9 and {r[1] for r in rows[1:]} == {"1"}
  assert photo in [r[0] for r in rows] and all(r[3] in CLASSES for r in rows[1:])
  assert "9/9" in err  # five batches: the progress bar shows
  assert main(["--workdir", workdir, "--top", "2", "--batch-size", "2", "--no-progress",
               photo, photo]) == 0
  out, err = capsys.readouterr()
  lines = out.splitlines()
  assert lines[0].split() == ["image", "rank", "probability", "class", "name"]
  assert len(lines) == 1 + 2 * 2 and lines[1].startswith(photo) and err == ""


def _fails(argv, capsys):
  """main's exit status and its stderr, which must be one error line."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return exit_info.value.code, err


def test_errors_are_one_line_naming_the_culprit(tmp_path, workdir, images, capsys):
  missing = str(tmp_path / "nope.jpg")
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
  empty_run = tmp_path / "unfinished_run"
  empty_run.mkdir()
  code, err = _fails(["--workdir", workdir, "--no-progress", images, missing], capsys)
  assert code == 2 and "nope.jpg" in err
  code, err = _fails(["--workdir", workdir, "--no-progress", str(broken)], capsys)
  assert code == 2 and "broken.jpg" in err
  # The model and the workdir are checked before any image: here the image is missing too.
  code, err = _fails(["--model", "resnet5O", missing], capsys)
  assert code == 2 and "resnet5O" in err and "nope.jpg" not in err
  code, err = _fails(["--workdir", str(empty_run), missing], capsys)
  assert code == 2 and "unfinished_run" in err and "nope.jpg" not in err
  code, err = _fails(["--workdir", str(tmp_path / "no_such_run"), missing], capsys)
  assert code == 2 and "no_such_run" in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="resnet5O"):
    main(["--model", "resnet5O", "--debug", str(tmp_path / "x.jpg")])
  monkeypatch.setenv("JTL_DEBUG", "1")
  with pytest.raises(FileNotFoundError, match="x.jpg"):
    main(["--model", "resnet50", str(tmp_path / "x.jpg")])


@pytest.mark.parametrize("fixture", ["siglip_hf_tiny", "dinov2_hf_tiny"])
def test_a_run_on_a_transformers_checkpoint_exports_its_own_head_and_architecture(
    tmp_path, fixture):
  """The export keeps copies of the checkpoint's config.json: the rebuilt model has the run's
  trained head (not the checkpoint's, not a new random one) and the checkpoint's activation,
  after the original directory is gone."""
  from helpers import FIXTURES
  source = str(tmp_path / fixture)
  shutil.copytree(os.path.join(FIXTURES, fixture), source)
  model = create_model(source, num_classes=3, image_size=28)
  variables = jax.tree_util.tree_map(np.asarray, model.variables)
  head = variables["params"][model.stage_names[-1]]
  head["kernel"] = np.random.default_rng(0).normal(size=head["kernel"].shape).astype(np.float32)
  workdir = str(tmp_path / "run")
  export.export_model(workdir, variables,
                      RunRecord.of_run(source, model, ("a", "b", "c"), 28))
  shutil.rmtree(source)
  rebuilt = export.load_exported(workdir)
  assert rebuilt.module == model.module  # every field, the MLP activation among them
  x = np.random.default_rng(1).normal(size=(2, 28, 28, 3)).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(rebuilt.predict(x)),
      np.asarray(jax.jit(lambda v, x: model.module.apply(v, x, train=False))(variables, x)))
