"""What jtl's environment must be able to do beyond importing: prepare a tfds dataset."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jtl.data  # noqa: F401,E402  (TensorFlow configured for CPU first)


def test_a_tfds_dataset_can_be_prepared_in_jtls_environment(tmp_path):
  # download_and_prepare (what `tfds build` runs, and what jtl's error message for an unprepared
  # dataset tells users to run) needs importlib_resources, which tensorflow-datasets uses
  # without declaring it. DummyDataset generates its examples: no network.
  import tensorflow_datasets as tfds
  builder = tfds.testing.DummyDataset(data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert builder.info.splits["train"].num_examples > 0
