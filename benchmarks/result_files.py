"""The benchmarks' result files: `benchmarks/results/NAME.json` and `NAME.md`.

A script rewrites its JSON and the part of its markdown above `NOTES`; what a
person wrote below that line (side-by-side runs, what was tried and dropped)
stays. A markdown file without the line keeps all of its old text below it.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / 'results'
NOTES = ('<!-- Notes by hand below this line: the script that writes this file keeps them '
         'when it rewrites the part above. -->')


def read_json(name: str, default=None):
  """NAME.json's content, or `default` where there is none yet."""
  path = RESULTS / f'{name}.json'
  return json.loads(path.read_text()) if path.is_file() else default


def write_json(name: str, data) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f'{name}.json'
  path.write_text(json.dumps(data, indent=1) + '\n')
  return path


def write_markdown(name: str, lines: list[str]) -> str:
  """NAME.md: `lines`, then `NOTES` and the notes the file held. Returns the new text."""
  path = RESULTS / f'{name}.md'
  old = path.read_text() if path.is_file() else ''
  notes = old.split(NOTES, 1)[1].lstrip('\n') if NOTES in old else old
  text = '\n'.join(lines).rstrip('\n') + '\n\n' + NOTES + '\n' + (f'\n{notes}' if notes else '')
  RESULTS.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return text
