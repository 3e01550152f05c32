"""Where an iteration's time goes, before and after a change, side by side in one run.

Runs the contract's command, `python -m model train --tasks T --out O
--max-images N`, in this checkout and in a git worktree of `--before` (a
commit), alternating so both see the same machine, and reads each run's
metrics.json: stage times (`wall_time_s`), the whole command's wall time, and
mAP@0.5 of the float .tflite on the test split.

  .venv/bin/python benchmarks/stage_times.py --before 0b3210a --images 10 --repeats 2
  .venv/bin/python benchmarks/stage_times.py --before 82f41a1 --repeats 1 \
      --note 'against 82f41a1, main when issue 17 was filed'

With `--enlarge SIDE` the training images are copies enlarged to SIDE pixels
on their longer side (JPEG), as a phone's photos are; the test images stay.

Results: benchmarks/results/stage_times.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import result_files

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared' / 'datasets'
STAGES = ('load_examples', 'build_model', 'make_views', 'start_class_head', 'train', 'export',
          'evaluate')


def worktree(ref: str, folder: Path) -> Path:
  """A checkout of `ref` sharing this one's virtual environments and base weights."""
  subprocess.run(['git', 'worktree', 'add', '--detach', str(folder), ref], cwd=REPO, check=True,
                 capture_output=True)
  # The export finds MediaPipe's metadata writer beside the code: without it the
  # older checkout would skip writing metadata and look 3 s faster than it is.
  if (REPO / '.venv-mediapipe').is_dir():
    (folder / '.venv-mediapipe').symlink_to(REPO / '.venv-mediapipe')
  return folder


def enlarged_copy(root: Path, images: int, side: int, folder: Path) -> Path:
  """A task set of `root`'s first `images` training tasks, their images enlarged to
  `side` pixels on the longer side, and its test tasks as they are."""
  from PIL import Image
  tasks = json.loads((root / 'tasks.json').read_text())
  train = [t for t in tasks if (t.get('meta') or {}).get('split') == 'train'][:images]
  test = [t for t in tasks if (t.get('meta') or {}).get('split') == 'test']
  for task in train + test:
    source, target = root / task['data']['image'], folder / task['data']['image']
    target.parent.mkdir(parents=True, exist_ok=True)
    if task in test:
      target.symlink_to(source)
      continue
    with Image.open(source) as image:
      scale = side / max(image.size)
      image.convert('RGB').resize((round(image.width * scale), round(image.height * scale)),
                                  Image.Resampling.BICUBIC).save(target, quality=90)
  (folder / 'tasks.json').write_text(json.dumps(train + test))
  return folder / 'tasks.json'


def train_once(checkout: Path, tasks: Path, images: int, work: Path) -> dict:
  out = Path(tempfile.mkdtemp(dir=work)) / 'run'
  env = dict(os.environ, MODEL_DIR=str(REPO / 'models'), PYTHONPATH=str(checkout))
  started = time.monotonic()
  subprocess.run([sys.executable, '-m', 'model', 'train', '--tasks', str(tasks), '--out', str(out),
                  '--max-images', str(images)], cwd=checkout, env=env, check=True,
                 capture_output=True)
  command_s = time.monotonic() - started
  evaluation = subprocess.run(
      [sys.executable, '-m', 'model', 'eval', '--run', str(out), '--tasks', str(tasks),
       '--tflite', 'float'], cwd=REPO, env=env, check=True, capture_output=True, text=True)
  wall = json.loads((out / 'metrics.json').read_text())['wall_time_s']
  return {'command_s': round(command_s, 1),
          'map50': json.loads(evaluation.stdout.strip().splitlines()[-1])['map50'],
          **{stage: wall.get(f'{stage}_s', 0.0) for stage in STAGES}}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--before', required=True, help='git commit to compare with')
  parser.add_argument('--dataset', default='raccoon')
  parser.add_argument('--images', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--note', default='',
                      help='kept with the data set\'s name, so a second comparison keeps its own table')
  parser.add_argument('--enlarge', type=int, metavar='SIDE',
                      help='train on copies of the images enlarged to SIDE px (longer side)')
  args = parser.parse_args()
  tasks = SHARED / args.dataset / 'tasks.json'
  with tempfile.TemporaryDirectory() as temp:
    work = Path(temp)
    if args.enlarge:
      tasks = enlarged_copy(SHARED / args.dataset, args.images, args.enlarge, work / 'enlarged')
    checkouts = {'before': worktree(args.before, work / 'before'), 'after': REPO}
    runs = {name: [] for name in checkouts}
    try:
      for _ in range(args.repeats):
        for name, checkout in checkouts.items():
          runs[name].append(train_once(checkout, tasks, args.images, work))
          print(name, runs[name][-1], flush=True)
    finally:
      subprocess.run(['git', 'worktree', 'remove', '--force', str(work / 'before')], cwd=REPO,
                     capture_output=True)
  mean = {name: {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
          for name, rows in runs.items()}
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                        text=True).stdout.strip()
  results = result_files.read_json('stage_times', {})  # data set -> its latest comparison
  results = results if 'before' not in results else {results['dataset']: results}
  key = (args.dataset + (f', enlarged to {args.enlarge} px' if args.enlarge else '')
         + (f' ({args.note})' if args.note else ''))
  results[key] = {'before': args.before, 'after': head, 'dataset': key,
                  'images': args.images, 'repeats': args.repeats, 'runs': runs, 'mean': mean}
  result_files.write_json('stage_times', results)
  lines = [line for result in results.values() for line in table(result)]
  result_files.write_markdown('stage_times', lines)
  print('\n'.join(lines))


def table(result: dict) -> list[str]:
  """One comparison as markdown: stage seconds before and after, and their ratio."""
  mean = result['mean']
  lines = [f'# Stage times: `python -m model train` on {result["images"]} images of '
           f'{result["dataset"]}',
           '', f'{os.cpu_count()} cores, {result.get("repeats", 2)} runs each, alternating. '
           f'Before: {result["before"]}; after: {result["after"]} (with its uncommitted changes). '
           'Seconds; `benchmarks/stage_times.py`.',
           '', '| | ' + ' | '.join(STAGES) + ' | whole command | mAP@0.5 (float) |',
           '|---|' + '---|' * (len(STAGES) + 2)]
  for name in ('before', 'after'):
    m = mean[name]
    lines.append(f'| {name} | ' + ' | '.join(f'{m[s]:.1f}' for s in STAGES) +
                 f' | {m["command_s"]:.1f} | {m["map50"]:.3f} |')
  ratio = {s: mean['after'][s] / mean['before'][s] if mean['before'][s] else 1.0
           for s in (*STAGES, 'command_s')}
  lines.append('| after / before | ' + ' | '.join(f'{ratio[s]:.2f}' for s in STAGES) +
               f' | {ratio["command_s"]:.2f} | |')
  return [*lines, '']


if __name__ == '__main__':
  main()
