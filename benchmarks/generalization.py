"""Does few-shot detection hold on data it was not tuned on?

Every data set in ../shared/datasets that has a test split (raccoon, bccd)
plus synthetic scenes made here, at 1 / 5 / 10 / all training images (several
seeds where subsets are small), scored by COCO mAP@0.5 on the test split for
the TF checkpoint, the float .tflite and the int8 .tflite. Variants of
`TrainConfig` run side by side on the same subsets, so a choice measured on one
data set shows what it does to the others.

  .venv/bin/python benchmarks/generalization.py --datasets raccoon bccd crowd \\
      --shots 10 all --variant 'at 300:input.size=300,views.zoom_out=0.5'

`--draws K` trains each subset K times, each under its own seed (its random
views, fresh class columns and batches; the subset stays): the spread between
draws ("draws ±" beside the mean) is what a choice must beat on that data set.

With all images there is one subset; `--all-seeds N` trains it N times with
different seeds, which tells a choice's effect from the training's own spread
(0.03-0.05 mAP@0.5 on small-many). Over 10 images (`--shots 50`) the same
option draws N subsets.

Synthetic scenes (made once under --work, deterministic):
  crowd    3 classes of shapes, 12 per 640x480 image, 30-60 px (14-28 px at 300)
  small    3 classes, 4 per image, 12-28 px (6-13 px at 300)
  partial  like crowd, but a third of the training boxes left unlabeled
  small-many  like small, with 150 training images (many images of small objects)
  crowd-many  like crowd, with 150 training images
  mixed    3 classes, 4 per image, 16-240 px (8-113 px at 300), every scale as
           common: everyday photos with near and far objects
  large    3 classes, 2 per image, 120-300 px (56-141 px at 300): large objects
           no base class fits
  classes  9 classes (disc, square, triangle, each in three colours), 6 per
           image, 30-80 px: many labels, each with few boxes
Derived from a shared set (made once under --work, same tasks and splits):
  raccoon-faded  raccoon in grey, at a third of its contrast and blurred: a
           label whose base class ("Dog") fits it, but less well
  raccoon-fog    the same at a seventh of the contrast, blurred more: base
           classes fit weakly (scores 0.12-0.16) or not at all
  raccoon-fog-stretched  raccoon-fog as decoded, its contrast stretched 4x:
           what a contrast stretch inside the model would see (int8's loss
           on low-contrast images, choices.md)
  raccoon-shapes raccoon with a square and a triangle drawn on each photo
           (10-22 % of its shorter side), labeled: one label a base class
           fits ("Dog" + "Cat") beside two that start fresh, as in a project
           of everyday objects
  fruit    raccoon's photos with apples, oranges and bananas drawn on them
           (benchmarks/fruit.py) instead of its labels: one large, a few or a
           pile per image, shaded; apples and oranges told apart by colour and
           texture alone (the unshared everyday-objects set's mix-up)

Results: benchmarks/results/generalization.{json,md}; rows measured before
and not re-run keep their last result. The markdown holds means; `--rows`
prints each subset's and draw's scores from the JSON, side by side, without
training:

  .venv/bin/python benchmarks/generalization.py --rows --datasets fruit --shots 10 \
      --variant 'mosaics where crops hold the boxes (2026-12-07)' --variant 'most'
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import fruit  # noqa: E402
import result_files  # noqa: E402
from model import pipeline, tasks as tasks_lib  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.evaluate import evaluate_run  # noqa: E402

log = logging.getLogger('generalization')
SHARED = REPO.parent / 'shared' / 'datasets'
ALL = 'all'
# The synthetic sets' test split; export settings want more (`add_test_images_argument`).
TEST_IMAGES = 20


# kind -> (shape sides in px, shapes per image, training images)
SYNTHETIC = {'crowd': ((30, 60), 12, 60), 'small': ((12, 28), 4, 60),
             'partial': ((30, 60), 12, 60), 'small-many': ((12, 28), 4, 150),
             'crowd-many': ((30, 60), 12, 150), 'mixed': ((16, 240), 4, 60),
             'large': ((120, 300), 2, 60), 'classes': ((30, 80), 6, 60)}
MANY_LABELS = {'classes'}  # every shape of tests.synthetic, the others disc, square, triangle
LOG_SIDES = {'mixed'}  # sides drawn uniform in their logarithm
# name -> (the shared set it is made from, what each image and its task go
# through); -0.118 is raccoon-fog's mean pixel in [-1, 1].
DERIVED = {'raccoon-faded': ('raccoon', lambda image, _: faded(image, contrast=0.35, blur=3.0)),
           'raccoon-fog': ('raccoon', lambda image, _: faded(image, contrast=0.15, blur=6.0)),
           'raccoon-fog-stretched': ('raccoon', lambda image, _: stretched(
               faded(image, contrast=0.15, blur=6.0), gain=4.0, centre=-0.118)),
           'raccoon-shapes': ('raccoon', lambda image, task: planted(
               image, task, ('square', 'triangle'), sides=(0.1, 0.22))),
           'fruit': ('raccoon', lambda image, task: fruit.scene(image, task))}


def synthetic(kind: str, folder: Path, test_images: int = TEST_IMAGES) -> Path:
  """Makes (once) a synthetic task set of `kind` in `folder`; returns the folder."""
  from tests.synthetic import SHAPES, make_task_set
  tasks_file = folder / 'tasks.json'
  if tasks_file.is_file():
    return folder
  shapes = tuple(SHAPES) if kind in MANY_LABELS else ('disc', 'square', 'triangle')
  sides, per_image, images = SYNTHETIC[kind]
  common = dict(shapes=shapes, width=640, height=480, sides=sides, per_image=per_image,
                log_sides=kind in LOG_SIDES)
  train = make_task_set(folder, images, split='train', seed=11, **common)
  test = make_task_set(folder, test_images, split='test', seed=12, start_id=1000, **common)
  if kind == 'partial':  # every third box of the training images goes unlabeled
    for task in train:
      result = task['annotations'][0]['result']
      task['annotations'][0]['result'] = [r for i, r in enumerate(result) if i % 3 != 2]
  tasks_file.write_text(json.dumps(train + test))
  return folder


def faded(image, contrast: float, blur: float):
  """`image` in grey, at `contrast` of its contrast, blurred by `blur` px."""
  from PIL import ImageEnhance, ImageFilter, ImageOps
  grey = ImageOps.grayscale(image).convert('RGB')
  return ImageEnhance.Contrast(grey).enhance(contrast).filter(ImageFilter.GaussianBlur(blur))


def stretched(image, gain: float, centre: float):
  """`image` as a JPEG decodes it, its pixels in [-1, 1] moved `gain` times as far
  from `centre`, clipped."""
  import io
  import numpy as np
  from PIL import Image
  encoded = io.BytesIO()
  image.save(encoded, 'JPEG', quality=92)
  pixels = np.asarray(Image.open(encoded).convert('RGB'), np.float32) / 127.5 - 1
  pixels = np.clip((pixels - centre) * gain + centre, -1, 1)
  return Image.fromarray(np.round((pixels + 1) * 127.5).astype(np.uint8))


def planted(image, task: dict, shapes: tuple[str, ...], sides: tuple[float, float]):
  """`image` with one of each of `shapes` drawn on it (sides a share of its shorter
  side), labeled in `task`: a label no base class knows beside one that fits.
  Each shape goes where it overlaps no box if there is such a spot, else where it
  overlaps no other shape."""
  import numpy as np
  from PIL import Image
  from tests.synthetic import draw_shape
  rng = np.random.default_rng(task['id'])
  pixels = np.array(image)
  height, width = pixels.shape[:2]
  result = task['annotations'][0]['result']
  scale = np.array([width, height, width, height]) / 100  # percent -> pixels
  boxes = [tuple(scale * [v['x'], v['y'], v['x'] + v['width'], v['y'] + v['height']])
           for v in (r['value'] for r in result)]
  placed = []
  for shape in shapes:
    side = int(rng.uniform(*sides) * min(width, height))
    spots = [(x, y, x + side, y + side) for x, y in zip(rng.integers(0, width - side, 200),
                                                        rng.integers(0, height - side, 200))]
    free = [b for b in spots if not any(_overlap(b, o) for o in boxes + placed)]
    spot = (free or [b for b in spots if not any(_overlap(b, o) for o in placed)] or spots)[0]
    draw_shape(pixels, shape, spot)
    placed.append(spot)
    x1, y1, x2, y2 = spot
    result.append({**result[0], 'id': f'{shape}-{task["id"]}', 'value': {
        'x': 100 * x1 / width, 'y': 100 * y1 / height, 'width': 100 * (x2 - x1) / width,
        'height': 100 * (y2 - y1) / height, 'rotation': 0, 'rectanglelabels': [shape]}})
  return Image.fromarray(pixels)


def _overlap(a, b) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def derived(name: str, folder: Path) -> Path:
  """Makes (once) `DERIVED[name]` in `folder`: the shared set's tasks, each image transformed."""
  from PIL import Image
  tasks_file = folder / 'tasks.json'
  if tasks_file.is_file():
    return folder
  source, transform = DERIVED[name]
  tasks = json.loads((SHARED / source / 'tasks.json').read_text())
  for task in tasks:
    image = Path(task['data']['image'])
    (folder / image.parent).mkdir(parents=True, exist_ok=True)
    with Image.open(SHARED / source / image) as original:
      transform(original.convert('RGB'), task).save(folder / image, quality=92)
  tasks_file.write_text(json.dumps(tasks))
  return folder


def dataset_folder(name: str, work: Path, test_images: int = TEST_IMAGES) -> Path:
  """A shared data set's folder, a derived one's, or a synthetic one's with
  `test_images` test images (the same training images whatever that count)."""
  if name in SYNTHETIC:
    suffix = '' if test_images == TEST_IMAGES else f'-test{test_images}'
    return synthetic(name, work / f'synthetic-{name}{suffix}', test_images)
  if name in DERIVED:
    return derived(name, work / name)
  return SHARED / name


def last_results(name: str) -> dict:
  """benchmarks/results/<name>.json as the last run left it ({'datasets': {}} at first):
  the data sets a run does not measure keep their last result."""
  return result_files.read_json(name, {'datasets': {}})


def set_up_logging() -> None:
  """A benchmark's own progress at INFO; the model's and TensorFlow's logs from WARNING."""
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
  for noisy in ('model', 'tensorflow', 'absl'):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_assignments(text: str) -> tuple[str, dict]:
  """'name:key=value,...' -> (name, {key: value}); values are JSON or words
  (a list's commas stay inside it: 'views.zoom_out_scale=[0.25,0.9]')."""
  name, _, assignments = text.partition(':')
  values = {}
  for assignment in filter(None, re.split(r',(?![^\[]*\])', assignments)):
    key, value = assignment.split('=', 1)
    try:
      values[key] = json.loads(value)
    except ValueError:
      values[key] = value  # a word: 'top', 'fresh', ...
  return name, values


def parse_variant(text: str) -> tuple[str, dict]:
  """'name:stage.field=value,...' -> (name, TrainConfig overrides)."""
  name, overrides = parse_assignments(text)
  try:
    TrainConfig().with_overrides(overrides)
  except ValueError as error:
    raise SystemExit(f'--variant {text!r}: {error}') from None
  return name, overrides


def load_dataset(name: str, work: Path, test_images: int = TEST_IMAGES) -> tuple[Path, list, tuple]:
  """(its folder, its tasks, its test split's (examples, images)) of a data set by name."""
  root = dataset_folder(name, work, test_images)
  tasks = tasks_lib.load_tasks_file(root / 'tasks.json')
  examples, _ = tasks_lib.parse_tasks(tasks)
  return root, tasks, tasks_lib.load_example_images(tasks_lib.evaluation_examples(examples), root)


def subset_count(shots: str) -> int | str:
  """'10' -> 10, 'all' -> ALL."""
  return ALL if shots == ALL else int(shots)


def seeds_for(count, seeds: int, all_seeds: int = 1, first: int = 0) -> range:
  """`seeds` subsets where they are small (10 images or fewer), `all_seeds`
  otherwise: with all images those runs differ in their training's seed only,
  with more than 10 in the subset drawn too. Seeds count from `first`."""
  if count != ALL and count <= 10:
    return range(first, first + seeds)
  return range(first, first + all_seeds)


def add_dataset_arguments(parser: argparse.ArgumentParser, shots: list[str]) -> None:
  """--datasets, --shots, --seeds, --seed-from, --model-dir, --work: which subsets, and where."""
  parser.add_argument('--datasets', nargs='+', default=['raccoon', 'bccd', 'crowd', 'small',
                                                        'partial'])
  parser.add_argument('--shots', nargs='+', default=shots)
  parser.add_argument('--seeds', type=int, default=3, help='subsets for 10 images or fewer')
  parser.add_argument('--all-seeds', type=int, default=1,
                      help='runs with all images, or more than 10, each with its own seed')
  parser.add_argument('--seed-from', type=int, default=0,
                      help='the first seed: 3 with --seeds 3 runs subsets 3-5 (generalization.py '
                           "joins them to the row's earlier subsets 0-2; the others keep the new "
                           'ones alone)')
  parser.add_argument('--model-dir', type=Path,
                      default=Path(os.environ.get('MODEL_DIR', REPO / 'models')))
  parser.add_argument('--work', type=Path, default=Path(tempfile.gettempdir()) / 'generalization')


def add_test_images_argument(parser: argparse.ArgumentParser) -> None:
  """--test-images: the synthetic sets' test split, for the export benchmarks."""
  parser.add_argument('--test-images', type=int, default=TEST_IMAGES,
                      help=f"the synthetic sets' test split: {TEST_IMAGES} images (80-240 boxes) "
                           'swing int8 mAP@0.5 by several points; 200 tell export settings apart')


# Draw k > 0 of a subset trains under seed + DRAW_STRIDE * k (`--draws`).
DRAW_STRIDE = 1000


def run_one(tasks, root: Path, model_dir: Path, work: Path, shots, seed: int, overrides: dict,
            test, draw: int = 0) -> dict:
  """Trains subset `seed` of `shots` images (`draw` > 0: under another training seed)
  and scores it."""
  out = Path(tempfile.mkdtemp(dir=work)) / 'run'
  started = time.monotonic()
  config = TrainConfig(seed=seed + DRAW_STRIDE * draw).with_overrides(overrides)
  run = pipeline.train_iteration(tasks, root, out, model_dir, config=config,
                                 max_images=None if shots == ALL else shots, subset_seed=seed)
  wall = time.monotonic() - started
  metrics = json.loads(run.metrics.read_text())
  row = {'seed': seed, **({'draw': draw} if draw else {}), 'iteration_s': round(wall, 1),
         'train_s': metrics['wall_time_s'].get('train_s'),
         'steps': metrics['steps'], 'images': metrics['images']['train'],
         'choices': metrics.get('choices', {}),
         'int8_tune': metrics['evaluation'].get('int8_tune')}
  for kind in (None, 'float', 'int8'):
    evaluation = evaluate_run(run.root, *test, kind)
    row[kind or 'checkpoint'] = {'map50': evaluation['map50'], 'map': evaluation['map'],
                                 'per_class': {k: v['map50'] for k, v in
                                               evaluation['per_class'].items()}}
  log.info('%s shots seed %d draw %d: checkpoint %.3f float %.3f int8 %.3f (%.0f s)', shots,
           seed, draw, row['checkpoint']['map50'], row['float']['map50'], row['int8']['map50'],
           wall)
  shutil.rmtree(out.parent)  # the row holds what is kept; run folders (views.npz) filled disks
  return row


def summarize(rows: list[dict]) -> dict:
  def mean(key, field='map50'):
    return round(statistics.mean(r[key][field] for r in rows), 4)
  per_class = {}
  for label in rows[0]['float']['per_class']:
    per_class[label] = round(statistics.mean(r['float']['per_class'].get(label, 0.0)
                                             for r in rows), 4)
  by_subset = {}
  for r in rows:
    by_subset.setdefault(r['seed'], []).append(r['float']['map50'])
  draws = [statistics.pstdev(s) for s in by_subset.values() if len(s) > 1]
  return {'checkpoint': mean('checkpoint'), 'float': mean('float'), 'int8': mean('int8'),
          'float_map': mean('float', 'map'),
          'float_std': round(statistics.pstdev(r['float']['map50'] for r in rows), 4),
          **({'draw_std': round(statistics.mean(draws), 4)} if draws else {}),
          'per_class': per_class,
          'iteration_s': round(statistics.mean(r['iteration_s'] for r in rows), 1),
          'subsets': len(by_subset), 'runs': rows}


def subset_rows(results: dict, datasets: list[str], variants: list[str],
                shots: list[str]) -> list[str]:
  """One line per data set, variant and image count in `results`: each subset's
  (and draw's) float / int8 mAP@0.5 in seed order, then their means (`--rows`)."""
  lines = []
  for dataset in datasets:
    for variant in variants:
      for count in shots:
        summary = results['datasets'].get(dataset, {}).get(variant, {}).get(str(count))
        if summary is None:
          lines.append(f'{dataset} | {variant} | {count} | not measured')
          continue
        runs = sorted(summary['runs'], key=lambda r: (r['seed'], r.get('draw', 0)))
        scores = '  '.join(f'{r["seed"]}{"." + str(r["draw"]) if r.get("draw") else ""}: '
                           f'{r["float"]["map50"]:.3f} / {r["int8"]["map50"]:.3f}' for r in runs)
        lines.append(f'{dataset} | {variant} | {count} | {scores} | mean '
                     f'{summary["float"]:.3f} / {summary["int8"]:.3f}')
  return lines


def write(results: dict) -> str:
  result_files.write_json('generalization', results)
  lines = ['# Generalization: mAP@0.5 on each data set\'s test split', '',
           f'{os.cpu_count()} cores. Mean over subsets (seeds) where there are several; '
           'float / int8 are the .tflite files, checkpoint the TF model. '
           '`benchmarks/generalization.py` writes this.']
  for dataset, by_variant in sorted(results['datasets'].items()):
    lines += ['', f'## {dataset}', '',
              '| variant | images | subsets | checkpoint | float (± std) | int8 | float mAP | '
              'per class (float) | s per iteration |', '|---|---|---|---|---|---|---|---|---|']
    for variant, by_shots in by_variant.items():
      for shots, s in by_shots.items():
        classes = ', '.join(f'{k} {v:.2f}' for k, v in s['per_class'].items())
        draws = f' (draws ± {s["draw_std"]:.3f})' if 'draw_std' in s else ''
        lines.append(f'| {variant} | {shots} | {s["subsets"]} | {s["checkpoint"]:.3f} | '
                     f'{s["float"]:.3f} ± {s["float_std"]:.3f}{draws} | {s["int8"]:.3f} | '
                     f'{s["float_map"]:.3f} | {classes} | {s["iteration_s"]:.0f} |')
  return result_files.write_markdown('generalization', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_dataset_arguments(parser, shots=['1', '5', '10', ALL])
  parser.add_argument('--variant', action='append', default=[],
                      help='name:key=value,... (TrainConfig overrides); default: "default"')
  parser.add_argument('--draws', type=int, default=1,
                      help='trainings of each subset, each under its own seed (the random '
                           'views, initial columns and batches): the spread a choice must '
                           'beat (default 1)')
  parser.add_argument('--rows', action='store_true',
                      help="train nothing: print each subset's (and draw's) float / int8 "
                           'mAP@0.5 of the --variant names (what precedes any ":") from the '
                           'last results, for --datasets and --shots')
  add_test_images_argument(parser)
  args = parser.parse_args()
  results = last_results('generalization')
  if args.rows:
    names = [parse_assignments(v)[0] for v in args.variant] or ['default']
    print('\n'.join(subset_rows(results, args.datasets, names, args.shots)))
    return
  set_up_logging()
  variants = [parse_variant(v) for v in args.variant] or [('default', {})]
  args.work.mkdir(parents=True, exist_ok=True)
  for name in args.datasets:
    root, tasks, test = load_dataset(name, args.work, args.test_images)
    for variant, overrides in variants:
      for shots in args.shots:
        count = subset_count(shots)
        row = results['datasets'].setdefault(name, {}).setdefault(variant, {})
        earlier = [r for r in row.get(str(shots), {}).get('runs', [])
                   if r.get('seed', args.seed_from) < args.seed_from]
        rows = [run_one(tasks, root, args.model_dir, args.work, count, seed, overrides, test,
                        draw)
                for seed in seeds_for(count, args.seeds, args.all_seeds, args.seed_from)
                for draw in range(args.draws)]
        row[str(shots)] = summarize(earlier + rows)
        write(results)  # after each row: a long run's rows are not lost to a crash
  print(write(results))


if __name__ == '__main__':
  main()
