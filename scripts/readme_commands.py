"""The shell commands the README documents, taken from README.md itself (so CI cannot drift).

    python scripts/readme_commands.py setup 0     # the README's first command (install + tiny run)
    python scripts/readme_commands.py setup 1     # the README's test command
    python scripts/readme_commands.py usage       # every `python -m egspo.*` line of "Using it"

`.ci/run` executes the set-up commands literally; `tests/test_readme.py` runs the "Using it"
examples that need no checkpoint (`--preset`, `--generations`).
"""

from __future__ import annotations

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _bash_blocks(section: str, text: str) -> list[str]:
  """The ```bash blocks under the `## section` heading (up to the next `## `)."""
  m = re.search(rf"^## {re.escape(section)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
  if not m:
    raise ValueError(f"README.md has no '## {section}' section")
  return re.findall(r"^```bash\n(.*?)^```", m.group(1), re.M | re.S)


def _commands(block: str) -> list[str]:
  """Logical command lines: comments dropped, backslash continuations joined."""
  out, cur = [], ""
  for line in block.splitlines():
    stripped = line.strip()
    if not cur and (not stripped or stripped.startswith("#")):
      continue
    if stripped.endswith("\\"):
      cur += stripped[:-1].rstrip() + " "
      continue
    cur += stripped
    out.append(re.sub(r"\s+#\s.*$", "", cur).strip())
    cur = ""
  return out


def setup_commands(text: str | None = None) -> list[str]:
  text = README.read_text(encoding="utf-8") if text is None else text
  blocks = _bash_blocks("Set-up", text)
  if not blocks:
    raise ValueError("README.md's Set-up section has no bash block")
  return _commands(blocks[0])


def usage_commands(text: str | None = None) -> list[str]:
  text = README.read_text(encoding="utf-8") if text is None else text
  return [c for b in _bash_blocks("Using it", text) for c in _commands(b)
          if c.startswith("python -m egspo.")]


def main(argv: list[str]) -> int:
  if len(argv) >= 2 and argv[1] == "setup":
    cmds = setup_commands()
    print(cmds[int(argv[2])] if len(argv) > 2 else "\n".join(cmds))
    return 0
  if len(argv) == 2 and argv[1] == "usage":
    print("\n".join(usage_commands()))
    return 0
  print(__doc__, file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv))
