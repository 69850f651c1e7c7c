"""Hub downloads from a cache the test writes (no network), and the predict CLI on real photos."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from helpers import FIXTURES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_hub_cache(root, repo_id, files):
  """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>/<file>}."""
  revision = "0123456789abcdef0123456789abcdef01234567"
  repo_dir = os.path.join(root, "models--" + repo_id.replace("/", "--"))
  snapshot = os.path.join(repo_dir, "snapshots", revision)
  os.makedirs(snapshot)
  os.makedirs(os.path.join(repo_dir, "refs"))
  with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
    f.write(revision)
  for name, source in files.items():
    shutil.copy(source, os.path.join(snapshot, name))


def _run(code, cache):
  env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=300)


@pytest.mark.subprocess  # a child Python; the rest of this file is in the fast tier
def test_hf_hub_names_load_from_the_cache_offline(tmp_path):
  tiny = os.path.join(FIXTURES, "resnet_hf_tiny")
  _fake_hub_cache(tmp_path, "test-org/resnet-tiny",
                  {"config.json": os.path.join(tiny, "config.json"),
                   "model.safetensors": os.path.join(tiny, "model.safetensors")})
  code = f"""
import numpy as np, jtl
x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
hub = jtl.create_model("hf-hub:test-org/resnet-tiny", image_size=32)
local = jtl.create_model({tiny!r}, image_size=32)
np.testing.assert_array_equal(np.asarray(hub.predict(x)), np.asarray(local.predict(x)))
print("labels", hub.pretrained_cfg.label_names[:2])
try:
  jtl.create_model("hf-hub:test-org/not-cached")
except FileNotFoundError as e:
  print("missing:", e)
"""
  out = _run(code, tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "labels ('class_0', 'class_1')" in out.stdout
  assert "missing: hf-hub:test-org/not-cached/config.json" in out.stdout
  assert "HF_HUB_OFFLINE" in out.stdout


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  from skimage import data
  root = tmp_path_factory.mktemp("photos")
  paths = {}
  for name in ("chelsea", "coffee"):
    paths[name] = str(root / f"{name}.jpg")
    Image.fromarray(getattr(data, name)()).save(paths[name], quality=95)
  return paths


def test_predict_cli_top5_on_real_photos(photos):
  from jtl.commands.predict import main
  import contextlib
  import io
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert main(["--model", "efficientnet_lite0", "--json", photos["chelsea"],
                 photos["coffee"]]) == 0
  results = json.loads(out.getvalue())
  cat, coffee = results
  assert 281 <= cat["top"][0]["class"] <= 285, cat["top"][0]
  assert coffee["top"][0]["class"] == 967 and coffee["top"][0]["name"] == "espresso"
  probs = [t["probability"] for t in cat["top"]]
  assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6


def test_predict_cli_names_a_missing_image(tmp_path, capsys):
  from jtl.commands.predict import main
  with pytest.raises(SystemExit):
    main([str(tmp_path / "nope.jpg")])
  assert "nope.jpg" in capsys.readouterr().err
