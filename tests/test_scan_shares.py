"""A folder's scan split between hosts: the shares are disjoint, cover every file, and merge
back into the order of a single host's scan (jtl.data.scan)."""
import os

from conftest import write_image_folder
from jtl.data import scan


def test_host_shares_cover_the_files_once_and_merge_back_in_order(tmp_path):
  write_image_folder(str(tmp_path), splits=("train",), per_class=5)
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files)
  (tmp_path / "train" / "class_1" / "bad.png").write_bytes(b"not a png")
  paths.insert(7, str(tmp_path / "train" / "class_1" / "bad.png"))
  single = scan.scan_files(paths)
  for hosts in (2, 3):
    shares = [scan.host_share(paths, h, hosts) for h in range(hosts)]
    assert sorted(p for share in shares for p in share) == sorted(paths)
    # Each host's results cross the wire as json, as distributed.all_gather_json sends them.
    results = [[scan.to_json(r) for r in scan.scan_files(share)] for share in shares]
    merged = [scan.from_json(v) for v in scan.merge_host_shares(results, len(paths))]
    assert merged == single
  assert isinstance(single[7], str) and "not an image" in single[7]
