"""jtl export writes SavedModel, TFLite (float32, float16, int8) and ONNX files that reproduce
jtl.predict's probabilities on real photos, each run in its own runtime; bad requests fail first
and nothing is ever half-written.

The photos are scikit-image's (astronaut, chelsea, coffee, camera, rocket), written as the files
a user has: JPEG (one large enough to be decoded at 1/2 scale, one with EXIF orientation 6, one
grey), PNG (RGB, grey, RGBA) and WebP, which the SavedModel's own graph cannot decode (the
runtime decodes it on the host and uses the `pixels` signature). The model is the tiny test CNN
at 40 px with a bicubic 0.875 crop, its head scaled so that top-1 margins are wide enough for the
quantised formats' top-1 to be a real check.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from jtl import cli, export
from jtl.commands import export as export_command
from jtl.commands import predict
from jtl.data import decode
from jtl.data.preprocess import Preprocess, load_eval_image, load_eval_pixels
from jtl.data.tf_setup import tf
from jtl.deploy import build, graph_decode, layout, runtime, saved_model, tflite
from jtl.models import create_model
from jtl.run_record import RunRecord

CLASSES = ("cat", "coffee", "rocket", "person")
IMAGE_SIZE = 40
ALL_FORMATS = ",".join(layout.FORMATS)


def _big_endian_exif(orientation: int) -> bytes:
  """An APP1 EXIF block in Motorola byte order ("MM", as many cameras write it; Pillow writes
  "II"): a TIFF header, then IFD0 with a Make tag before the Orientation tag."""
  make = (0x010F).to_bytes(2, "big") + (2).to_bytes(2, "big") + (4).to_bytes(4, "big") + b"jtl\0"
  tag = ((0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big")
         + orientation.to_bytes(2, "big") + b"\0\0")
  return b"Exif\0\0" + b"MM\0*" + (8).to_bytes(4, "big") + (2).to_bytes(2, "big") + make + tag + (
      b"\0\0\0\0")


def _write_photos(root) -> list[str]:
  from skimage import data
  exif = Image.Exif()
  exif[0x0112] = 6  # stored rotated: shown after a 90-degree turn
  big = Image.fromarray(data.astronaut()).resize((1300, 1150), Image.BICUBIC)
  rgba = np.dstack([data.rocket(), np.tile(np.linspace(40, 255, data.rocket().shape[1]),
                                           (data.rocket().shape[0], 1)).astype(np.uint8)])
  files = {
      "astronaut_large.jpg": lambda p: big.save(p, quality=88),
      "chelsea.png": lambda p: Image.fromarray(data.chelsea()).save(p),
      "coffee_rotated.jpg": lambda p: Image.fromarray(data.coffee()).save(
          p, quality=90, exif=exif.tobytes()),
      "chelsea_big_endian_exif.jpg": lambda p: Image.fromarray(data.chelsea()).save(
          p, quality=90, exif=_big_endian_exif(orientation=3)),
      "camera_grey.jpg": lambda p: Image.fromarray(data.camera()).save(p, quality=90),
      "camera_grey.png": lambda p: Image.fromarray(data.camera()[::3, ::2]).save(p),
      "rocket_alpha.png": lambda p: Image.fromarray(rgba, "RGBA").save(p),
      "chelsea.webp": lambda p: Image.fromarray(data.chelsea()).save(p, quality=90),
  }
  paths = []
  for name, write in files.items():
    path = os.path.join(root, name)
    write(path)
    paths.append(path)
  return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  return _write_photos(str(tmp_path_factory.mktemp("photos")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A finished run (export/model.json + weights) of the tiny CNN, as training leaves it."""
  model = create_model("tiny_cnn", num_classes=len(CLASSES), image_size=IMAGE_SIZE, seed=3)
  model.pretrained_cfg = dataclasses.replace(model.pretrained_cfg, crop_pct=0.875,
                                             interpolation="bicubic", mean=(0.5, 0.45, 0.4),
                                             std=(0.25, 0.2, 0.22))
  variables = dict(model.variables)
  head = dict(variables["params"]["head"])
  head["kernel"] = np.asarray(head["kernel"]) * 40.0  # wide margins between classes
  variables["params"] = {**variables["params"], "head": head}
  root = str(tmp_path_factory.mktemp("run"))
  export.export_model(root, variables, RunRecord.of_run("tiny_cnn", model, CLASSES, IMAGE_SIZE))
  return root


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  out = os.path.join(str(tmp_path_factory.mktemp("ship")), "exported")
  assert export_command.main(["--workdir", workdir, "--format", ALL_FORMATS, "--out", out]) == 0
  return out


@pytest.fixture(scope="module")
def expected(workdir, photos):
  """jtl's own probabilities: the run's model on load_eval_image's inputs."""
  model = export.load_exported(workdir)
  pp = Preprocess.from_pretrained_cfg(model.pretrained_cfg)
  logits = np.asarray(model.predict(np.stack([load_eval_image(p, pp) for p in photos])))
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  return probs / probs.sum(axis=1, keepdims=True)


@pytest.mark.fast
def test_graph_probe_makes_the_pillow_scans_decisions(photos):
  for path in photos:
    with open(path, "rb") as f:
      data = f.read()
    info = decode.probe_bytes(data)
    downscale = (decode.jpeg_downscale(info.height, info.width, decode.DEFAULT_DECODE_MIN_SIDE)
                 if info.kind == decode.KIND_JPEG else 1)
    got = [int(t) for t in graph_decode.probe_graph(tf.constant(data))]
    want = [info.kind, info.orientation, downscale]
    if info.kind == decode.KIND_PIL:
      want[1] = 1  # the graph reads no orientation from formats it cannot decode
    assert got == want, path
  kinds = {os.path.basename(p): decode.probe_file(p) for p in photos}
  assert kinds["astronaut_large.jpg"].kind == decode.KIND_JPEG
  assert kinds["coffee_rotated.jpg"].orientation == 6
  assert kinds["chelsea_big_endian_exif.jpg"].orientation == 3
  assert kinds["rocket_alpha.png"].kind == decode.KIND_PNG_ALPHA
  assert kinds["chelsea.webp"].kind == decode.KIND_PIL


@pytest.mark.fast
def test_graph_jpeg_downscale_is_the_scans_rule():
  sides = [1, 511, 512, 1023, 1024, 1025, 2047, 2048, 4095, 4096, 4097, 9000]
  for min_side in (0, 300, 512):
    for h in sides:
      for w in (h, 3000):
        got = int(graph_decode.jpeg_downscale_graph(tf.constant(h), tf.constant(w), min_side))
        assert got == decode.jpeg_downscale(h, w, min_side), (h, w, min_side)


def test_saved_model_decodes_like_the_pipeline(exported, photos):
  """Its serving_default (bytes in) sees the very crops jtl evaluates: the crops signature fed
  load_eval_pixels' output returns the same probabilities as the encoded files."""
  model = runtime.open_exported(exported, "saved_model")
  decodable = [p for p in photos if not p.endswith(".webp")]
  encoded = [open(p, "rb").read() for p in decodable]
  from_bytes = model.call_signature("serving_default", encoded)
  crops = np.stack([load_eval_pixels(p, model.preprocess) for p in decodable])
  np.testing.assert_allclose(from_bytes, model.crops_probabilities(crops), atol=1e-6, rtol=0)
  webp = [p for p in photos if p.endswith(".webp")]
  with pytest.raises(tf.errors.InvalidArgumentError, match="only JPEG .* and PNG"):
    model.call_signature("serving_default", [open(webp[0], "rb").read()])


@pytest.mark.parametrize("fmt", layout.FORMATS)
def test_each_format_reproduces_jtls_probabilities(exported, photos, expected, fmt):
  got = runtime.open_exported(exported, fmt).probabilities(photos)
  assert got.shape == expected.shape
  top2 = np.sort(expected, axis=1)[:, -2:]
  assert (top2[:, 1] - top2[:, 0]).min() > 0.05  # margins a quantised model must keep
  if fmt in layout.QUANTISED:
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    assert np.abs(got - expected).max() < 0.1
  else:
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def _predict_json(capsys, *args) -> list[dict]:
  capsys.readouterr()
  assert predict.main([*args, "--json", "--no-progress", "--batch-size", "3"]) == 0
  return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", [None, "tflite_int8", "onnx"])
def test_predict_exported_prints_what_predict_workdir_prints(exported, workdir, photos, capsys,
                                                             fmt):
  want = _predict_json(capsys, "--workdir", workdir, *photos)
  got = _predict_json(capsys, "--exported", exported, *(["--format", fmt] if fmt else []),
                      *photos)
  assert [r["image"] for r in got] == [r["image"] for r in want] == photos
  for g, w in zip(got, want):
    assert [set(t) for t in g["top"]] == [set(t) for t in w["top"]]
    if fmt in layout.QUANTISED:
      assert g["top"][0]["class"] == w["top"][0]["class"]
      continue
    assert [(t["class"], t["name"]) for t in g["top"]] == [(t["class"], t["name"])
                                                          for t in w["top"]]
    np.testing.assert_allclose([t["probability"] for t in g["top"]],
                               [t["probability"] for t in w["top"]], atol=1e-4, rtol=0)


def test_export_directory_holds_each_format_its_names_and_sizes(exported):
  manifest = layout.Manifest.read(exported)
  assert sorted(os.listdir(exported)) == sorted([layout.MANIFEST, *layout.FILES.values()])
  assert manifest.class_names == CLASSES
  assert saved_model.read_class_names(os.path.join(exported, "saved_model")) == CLASSES
  assert manifest.preprocess == {"image_size": IMAGE_SIZE, "crop_pct": 0.875,
                                 "interpolation": "bicubic", "mean": [0.5, 0.45, 0.4],
                                 "std": [0.25, 0.2, 0.22],
                                 "crop_mode": "center"}
  for fmt, entry in manifest.formats.items():
    assert entry["bytes"] == layout.directory_size(os.path.join(exported, entry["path"])) > 0
  loaded = tf.saved_model.load(os.path.join(exported, "saved_model"))
  assert set(loaded.signatures) == set(saved_model.SIGNATURES)
  sizes = {f: e["bytes"] for f, e in manifest.formats.items()}
  assert sizes["tflite_int8"] < sizes["tflite_float16"] < sizes["tflite"]
  details = tflite.interpreter(os.path.join(exported, "model.tflite")).get_input_details()[0]
  assert list(details["shape_signature"]) == [-1, IMAGE_SIZE, IMAGE_SIZE, 3]
  assert details["dtype"] == np.uint8


def _fails(capsys, argv, *fragments):
  with pytest.raises(SystemExit) as e:
    export_command.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
  for fragment in fragments:
    assert fragment in err, err


def test_bad_requests_fail_before_any_work(workdir, tmp_path, capsys):
  out = str(tmp_path / "out")
  _fails(capsys, ["--workdir", workdir, "--format", "saved_model,tflite8,pb", "--out", out],
         "'tflite8', 'pb'", "choose from saved_model, tflite")
  _fails(capsys, ["--workdir", str(tmp_path), "--format", "tflite", "--out", out],
         str(tmp_path), "no finished jtl run", "export/model.json")
  _fails(capsys, ["--workdir", str(tmp_path / "nope"), "--out", out], "no such workdir")
  with pytest.raises(SystemExit) as e:  # the same command as `jtl export`
    cli.main(["export", "--workdir", workdir, "--format", "pb", "--out", out])
  assert e.value.code == 2 and "unknown format 'pb'" in capsys.readouterr().err
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("x")
  _fails(capsys, ["--workdir", workdir, "--out", str(tmp_path / "taken")], "already exists")
  assert sorted(os.listdir(tmp_path)) == ["taken"]
  assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_a_failure_midway_leaves_no_output_directory(workdir, tmp_path, monkeypatch):
  def broken(saved_model_dir, variant):
    assert os.path.isfile(os.path.join(saved_model_dir, "saved_model.pb"))  # got this far
    raise RuntimeError("converter crashed")
  monkeypatch.setattr(tflite, "convert", broken)
  with pytest.raises(RuntimeError, match="converter crashed"):
    build.write_export(export.load_exported(workdir), ("saved_model", "tflite"),
                       str(tmp_path / "out"), workdir)
  assert os.listdir(tmp_path) == []


def test_predict_exported_errors_name_the_directory_and_format(exported, photos, tmp_path,
                                                               capsys):
  for argv, fragments in [
      (["--exported", str(tmp_path), photos[0]], [str(tmp_path), layout.MANIFEST]),
      (["--exported", exported, "--format", "coreml", photos[0]], ["'coreml'", "tflite_int8"]),
      (["--format", "onnx", photos[0]], ["--exported"]),
  ]:
    with pytest.raises(SystemExit) as e:
      predict.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
      assert fragment in err, err
  partial = str(tmp_path / "partial")
  os.makedirs(partial)
  layout.Manifest("tiny_cnn", "", CLASSES, {}, {"tflite": {"path": "model.tflite"}}).write(partial)
  with pytest.raises(layout.NotAnExportError, match="holds no onnx export .* has tflite"):
    runtime.check_exported(partial, "onnx")
