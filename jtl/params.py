"""Parameter-path helpers: "/"-joined names, regex labelling, counting.

Every tool in jtl that talks about parameters (freezing, loading, layer decay, reports) uses the
same spelling: the path through the variables tree joined with "/", for example
"stage3/block0/conv1/kernel" inside the "params" collection.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import flax.traverse_util as traverse_util
import jax
import numpy as np


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  return traverse_util.flatten_dict(_unfreeze(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b": x} -> {"a": {"b": x}}."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def _unfreeze(tree):
  if hasattr(tree, "unfreeze"):
    return tree.unfreeze()
  return tree


def count(tree: Mapping[str, Any]) -> int:
  """Number of scalars in a tree of arrays."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))


def label_by_regex(names: Iterable[str], rules: Sequence[tuple[str, str]],
                   *, what: str = "rule") -> dict[str, str]:
  """Label each name with the label of the first regex that fully matches it.

  Raises ValueError naming the patterns that match nothing and the names that no pattern
  covers, since either is almost always a typo in a config.
  """
  names = list(names)
  compiled = []
  for pattern, label in rules:
    try:
      compiled.append((re.compile(pattern), label, pattern))
    except re.error as e:
      raise ValueError(f"{what} {pattern!r} is not a valid regex: {e}") from None
  labels, used = {}, set()
  for name in names:
    for regex, label, pattern in compiled:
      if regex.fullmatch(name):
        labels[name] = label
        used.add(pattern)
        break
  unused = [p for _, _, p in compiled if p not in used]
  uncovered = [n for n in names if n not in labels]
  problems = []
  if unused:
    problems.append(f"{what}s matching no parameter: {unused}")
  if uncovered:
    problems.append(f"parameters covered by no {what} ({len(uncovered)}): {uncovered[:10]}"
                    + (" ..." if len(uncovered) > 10 else ""))
  if problems:
    raise ValueError("; ".join(problems))
  return labels
