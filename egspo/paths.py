"""Paths a user gives to an entry point that writes, resolved once there (`egspo.main --workdir`,
`egspo.convert --output`, `egspo.eval --output`, the Checkpointer, scripts' `--out`): orbax refuses
relative paths, and `~` is not expanded by anything below.

    workdir = paths.resolve_path("runs/tiny")   # '/cwd/runs/tiny'; '~/x' → '/home/u/x'
    workdir = paths.resolve_path("gs://b/run")  # unchanged
"""

from __future__ import annotations

import os
import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path) -> bool:
  """A `scheme://...` location (gs://, s3://, ...), not a local file system path."""
  return isinstance(path, (str, os.PathLike)) and bool(_SCHEME.match(os.fspath(path)))


def resolve_path(path: str | os.PathLike) -> str:
  """A local path with `~` expanded, made absolute against the current directory (normalised,
  symlinks kept); a `scheme://…` URL (gs://, s3://) unchanged."""
  p = os.fspath(path)
  if not p.strip():
    raise ValueError("empty path")
  if is_remote(p):
    return p
  return os.path.abspath(os.path.expanduser(p))
