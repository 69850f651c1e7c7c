"""Damage done to checkpoints on disk, as a failing disk or an interrupted copy would."""
import glob
import os


def largest_data_file(workdir, which, step):
  """The largest file TensorStore wrote for the state of checkpoint `step` of `which`."""
  files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", which, str(step), "state",
                                             "**", "*"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def data_files(workdir, which, step):
  """The data files of checkpoint `step`'s state (TensorStore's OCDBT d/ directories)."""
  return sorted(f for f in glob.glob(os.path.join(workdir, "checkpoints", which, str(step), "state",
                                                  "**", "d", "*"), recursive=True)
                if os.path.isfile(f))


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
