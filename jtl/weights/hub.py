"""Downloads through huggingface_hub, so its cache (and HF_HUB_OFFLINE=1) just work."""
from __future__ import annotations

import os


def hub_file(repo_id: str, filename: str) -> str:
  """Local path of `filename` in hub repository `repo_id`, from the cache or the network."""
  import huggingface_hub
  from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
  try:
    return huggingface_hub.hf_hub_download(repo_id, filename)
  except (LocalEntryNotFoundError, EntryNotFoundError) as e:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    hint = (" (HF_HUB_OFFLINE is set and the file is not in the cache)" if offline
            else " (no network, or the file is not in that repository)")
    raise FileNotFoundError(f"hf-hub:{repo_id}/{filename}: cannot get it{hint}: {e}") from None


def hub_weights_file(repo_id: str, filename: str | None = None) -> str:
  """The weights file of a hub repository: `filename`, else model.safetensors, else
  pytorch_model.bin (older transformers and timm uploads have only the latter)."""
  if filename:
    return hub_file(repo_id, filename)
  try:
    return hub_file(repo_id, "model.safetensors")
  except FileNotFoundError:
    return hub_file(repo_id, "pytorch_model.bin")
