"""Checkpoint locations: a local directory or a Hugging Face hub repo id, resolved to a local dir.

`resolve_checkpoint(p)`: an existing local directory (relative, `~/…` or absolute) wins; else
`ORG/NAME` (optionally `ORG/NAME@REVISION`) is fetched with `huggingface_hub.snapshot_download`
(only weights, config.json and tokenizer files; its cache, `HF_HOME`/`HF_HUB_CACHE` and
`HF_HUB_OFFLINE=1` honoured) and the local snapshot directory returned. Used by
`egspo.model.from_pretrained`, `egspo.tokenizer.load_tokenizer`, `egspo.convert`,
`egspo.generate` and `egspo.eval`. This module imports nothing heavy (`huggingface_hub` only
when a repo id is resolved).
"""

from __future__ import annotations

import os
import pathlib
import re

from egspo.paths import is_remote  # noqa: F401  (re-exported)

# Files of a Hugging Face tokenizer directory (copied beside converted/exported weights, and
# fetched from the hub with the weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")
CONFIG_FILES = ("config.json",)
# LLaDA's modeling code, which a checkpoint's config.json names in `auto_map` for
# `transformers.AutoModel.from_pretrained(..., trust_remote_code=True)`; kept with the config.
REMOTE_CODE_FILES = ("configuration_llada.py", "modeling_llada.py")

# A hub model repo id: ORG/NAME, each part [A-Za-z0-9_.-], no '--' or '..' (the hub's rules),
# optionally @REVISION (branch, tag or commit).
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9_](?:[\w.-]*[\w])?)"
                      r"(?:@(?P<rev>[\w./-]+))?")


class CheckpointError(ValueError):
  """A model or training checkpoint that cannot be read or written; the message is one line
  naming the file or directory and the cause (`egspo.main` prints it as `error: …`)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """Neither an existing local directory nor a hub repo id that resolves."""


def parse_repo_id(value: str) -> tuple[str, str | None] | None:
  """(repo_id, revision or None) if `value` has the form ORG/NAME[@REVISION], else None."""
  m = _REPO_ID.fullmatch(value)
  if m is None or "--" in m["repo"] or ".." in m["repo"]:
    return None
  return m["repo"], m["rev"]


def resolve_checkpoint(path_or_id: str | os.PathLike, *, what: str = "checkpoint",
                       weights: bool = True) -> pathlib.Path:
  """The local directory of a checkpoint given as a directory or a hub repo id.

  Args:
    path_or_id: a local directory (relative, `~/…` or absolute; used when it exists) or a hub
      model repo id `ORG/NAME[@REVISION]`.
    what: the name used in error messages (e.g. "checkpoint", "tokenizer").
    weights: fetch the weights (`*.safetensors` + index) as well as config.json and the
      tokenizer files; False fetches only the latter (a tokenizer needs no weights).

  Returns the absolute local directory (for a repo id, its snapshot in the hub cache).
  Raises CheckpointNotFoundError (a ValueError and a FileNotFoundError) with one line naming the
  value, and for a repo id the cache directory and whether the hub was offline.
  """
  s = os.fspath(path_or_id)
  if not s:
    raise CheckpointNotFoundError(f"{what} is empty: give a local directory or a hub repo id "
                                  "(ORG/NAME)")
  if is_remote(s):
    raise CheckpointNotFoundError(f"{what} {s!r} is a URL; a local directory or a hub repo id is "
                                  "needed here (orbax checkpoints load from URLs through "
                                  "egspo.model.from_pretrained)")
  local = pathlib.Path(s).expanduser()
  if local.is_dir():
    return local.absolute()
  parsed = None if s.startswith(("/", ".", "~")) else parse_repo_id(s)
  if local.exists():
    raise CheckpointNotFoundError(f"{what} {s!r} is a file, not a checkpoint directory")
  if parsed is None:
    raise CheckpointNotFoundError(f"{what} directory {local.absolute()} does not exist (and "
                                  f"{s!r} is not a hub repo id of the form ORG/NAME)")
  return _snapshot(s, *parsed, what=what, weights=weights)


def _snapshot(value: str, repo_id: str, revision: str | None, *, what: str,
              weights: bool) -> pathlib.Path:
  try:
    import huggingface_hub
    from huggingface_hub import constants, errors
  except ImportError as e:
    raise CheckpointNotFoundError(f"{what} {value!r} is not a local directory, and resolving it "
                                  "as a hub repo id needs huggingface_hub (pip install "
                                  "huggingface_hub)") from e
  cache, offline = constants.HF_HUB_CACHE, bool(constants.HF_HUB_OFFLINE)
  patterns = list(CONFIG_FILES + REMOTE_CODE_FILES + TOKENIZER_FILES
                  + (WEIGHT_FILES if weights else ()))
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                          allow_patterns=patterns))
  except Exception as e:  # the hub raises many types (HTTP, offline, cache, validation)
    rev = f" at revision {revision!r}" if revision else ""
    not_cached = tuple(getattr(errors, n) for n in ("LocalEntryNotFoundError",
                                                    "IncompleteSnapshotError") if hasattr(errors, n))
    if isinstance(e, not_cached):
      why = (f"not (completely) in the hub cache {cache} and HF_HUB_OFFLINE=1" if offline else
             f"not (completely) in the hub cache {cache} and the hub cannot be reached")
    elif isinstance(e, errors.RevisionNotFoundError):
      why = f"the hub repo has no revision {revision!r}"
    elif isinstance(e, (errors.RepositoryNotFoundError, errors.GatedRepoError)):
      why = ("no such hub repo, or it is private/gated: log in (`hf auth login` or HF_TOKEN) "
             "with access to it")
    else:
      line = str(e).strip().splitlines()
      why = f"{type(e).__name__}: {line[0] if line else ''} (cache {cache}" + (
          ", HF_HUB_OFFLINE=1)" if offline else ")")
    raise CheckpointNotFoundError(f"{what} {value!r} is not a local directory, and hub repo "
                                  f"{repo_id}{rev} cannot be resolved: {why}") from e
