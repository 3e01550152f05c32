"""Few-shot quality and speed on a Label Studio task set (default: ../shared/datasets/raccoon).

For 1, 5, 10 and all training images (several seeded subsets each, twice as
many for one image) and three starts (partial restore; feature extractor only
with a fresh box head; nothing restored), plus base-fit vs fresh class-head
starts, heads-only training and no zoom-outs: mAP on the test split,
training wall time and images/s. Then the float and int8 .tflite of 10-shot
models trained plainly (post-training int8), with quantization-aware training,
and pruned to 50%: size, gzipped size, latency at 2 threads (post-processing
included) and mAP.
Optionally the notebook's ducky task: a 5-shot model over the unlabeled frames,
scored against the duck's colour-derived boxes, with a contact sheet PNG,
trained as by default and with `--zoom-out 0` (no zoom-outs).

  .venv/bin/python benchmarks/fewshot.py [--dataset DIR] [--subsets 3] [--ducky DIR]

Writes benchmarks/results/fewshot.json and fewshot.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


import numpy as np  # noqa: E402

from benchmarks.generalization import set_up_logging  # noqa: E402
import result_files  # noqa: E402
from model import pipeline, run_folder, tasks as tasks_lib  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.tflite_detector import TFLiteDetector  # noqa: E402
from model.evaluate import coco_map, evaluate_run  # noqa: E402
from model.images import load_image  # noqa: E402

log = logging.getLogger('benchmark')
STARTS = {
    'partial restore': {'warm_start.restore': 'extractor+box'},
    'extractor only, fresh box head': {'warm_start.restore': 'extractor'},
    'nothing restored': {'warm_start.restore': 'none', 'warm_start.class_init': 'fresh'},
}
# What trains besides the default (`TrainConfig.trainable`), from a partial restore.
TRAINABLE = ('heads', 'top', 'upper', 'all')


def load_split(tasks, root, split):
  examples, _ = tasks_lib.parse_tasks(tasks)
  return tasks_lib.load_example_images(tasks_lib.evaluation_examples(examples, split), root)


def tf_map(run_dir, test_examples, test_images):
  return evaluate_run(run_dir, test_examples, test_images)


def train_once(tasks, root, model_dir, work, shots, seed, export_kinds=(), overrides=None):
  out = Path(tempfile.mkdtemp(dir=work)) / 'run'
  started = time.monotonic()
  run = pipeline.train_iteration(tasks, root, out, model_dir, config=TrainConfig(seed=seed).with_overrides(overrides or {}),
                                  max_images=shots, export_kinds=export_kinds)
  metrics = json.loads(run.metrics.read_text())
  metrics['wall_s'] = time.monotonic() - started
  return run, metrics


def latency_ms(detector, image, repeats=50):
  """Median ms per image: (the interpreter alone, post-processing included; with decoding-free
  resize and quantization of the input added)."""
  tensor = detector._input_tensor(image)  # pylint: disable=protected-access
  interpreter = detector.interpreter

  def invoke():
    interpreter.set_tensor(detector.input['index'], tensor)
    interpreter.invoke()
    return [interpreter.get_tensor(i) for i in detector.outputs]

  timings = {}
  for name, run in (('invoke', invoke), ('with_resize', lambda: detector.raw(image))):
    run()
    times = []
    for _ in range(repeats):
      started = time.perf_counter()
      run()
      times.append((time.perf_counter() - started) * 1000)
    timings[name] = round(statistics.median(times), 2)
  return timings


def quality_grid(tasks, root, model_dir, work, test, shots_list, subsets, results, only=None):
  num_train = len(tasks_lib.training_examples(tasks_lib.parse_tasks(tasks)[0]))
  variants = [(name, cfg) for name, cfg in STARTS.items()]
  variants.append(('partial restore, fresh class head', {'warm_start.restore': 'extractor+box', 'warm_start.class_init': 'fresh'}))
  variants += [(f'partial restore, trains {mode}', {'trainable': mode}) for mode in TRAINABLE]
  variants.append(('partial restore, no zoom-outs', {'views.zoom_out': 0.0}))
  variants = [(name, cfg) for name, cfg in variants if only is None or name in only]
  for shots in shots_list:
    # One image varies most from subset to subset (std ~0.1 mAP) and trains in
    # seconds: twice the subsets there.
    seeds = range(2 * subsets if shots == 1 else subsets) if shots < num_train else range(1)
    for name, cfg in variants:
      if 'fresh class head' in name and shots >= num_train:
        continue
      rows = []
      for seed in seeds:
        run, metrics = train_once(tasks, root, model_dir, work, shots, seed, overrides=cfg)
        evaluation = tf_map(run.root, *test)
        rows.append({'seed': seed, 'map50': evaluation['map50'], 'map': evaluation['map'],
                     'train_s': metrics['wall_time_s']['train_s'],
                     'iteration_s': metrics['wall_time_s']['total_s'],
                     'images_per_s': metrics['images_per_s'],
                     'class_head_init': metrics['class_head_init']})
        log.info('%s shots=%s seed=%s: mAP@0.5 %.3f mAP %.3f (%.1f s)', name, shots, seed,
                 evaluation['map50'], evaluation['map'], metrics['wall_time_s']['total_s'])
        shutil.rmtree(run.root.parent)
      results['grid'] = [r for r in results['grid']
                         if (r['start'], r['shots']) != (name, min(shots, num_train))]
      results['grid'].append({
          'start': name, 'shots': min(shots, num_train), 'runs': rows,
          'map50_mean': round(statistics.mean(r['map50'] for r in rows), 4),
          'map50_std': round(statistics.pstdev(r['map50'] for r in rows), 4),
          'map_mean': round(statistics.mean(r['map'] for r in rows), 4),
          'iteration_s_mean': round(statistics.mean(r['iteration_s'] for r in rows), 1),
          'train_s_mean': round(statistics.mean(r['train_s'] for r in rows), 1),
          'images_per_s_mean': round(statistics.mean(r['images_per_s'] for r in rows), 1),
      })
      write(results)


# Ways to make the on-device files, compared at 10 shots.
EXPORT_VARIANTS = {
    'post-training int8': {},
    'QAT': {'compression.quantization_aware': True},
    'pruned 50%': {'compression.prune_sparsity': 0.5},
}


def export_comparison(tasks, root, model_dir, work, test, results, subsets):
  """float vs int8 files of each export variant: size, gzip size, latency, mAP (mean over subsets)."""
  from model import compression
  rows = {}
  for name, cfg in EXPORT_VARIANTS.items():
    per_seed = []
    for seed in range(subsets):
      run, metrics = train_once(tasks, root, model_dir, work, 10, seed,
                                export_kinds=('float', 'int8'), overrides=cfg)
      _, labels, _ = run_folder.read_run(run.root)
      row = {'tf': tf_map(run.root, *test), 'train_s': metrics['wall_time_s']['train_s'],
             'export_s': metrics['wall_time_s']['export_s']}
      for kind in ('float', 'int8'):
        detector = TFLiteDetector(run.tflite(kind), labels, num_threads=2)
        found = [detector.detect(image, min_score=0.01) for image in test[1]]
        evaluation = coco_map(test[0], test[1], found, labels)
        data = run.tflite(kind).read_bytes()
        row[kind] = {'bytes': len(data), 'gzip_bytes': compression.gzipped_size(data),
                     'latency_ms': latency_ms(detector, test[1][0]),
                     'map50': evaluation['map50'], 'map': evaluation['map']}
      log.info('%s seed=%s: float mAP@0.5 %.3f / int8 %.3f', name, seed, row['float']['map50'],
               row['int8']['map50'])
      per_seed.append(row)
      shutil.rmtree(run.root.parent)

    def mean(*keys):
      values = []
      for row in per_seed:
        for key in keys:
          row = row[key]
        values.append(row)
      return round(statistics.mean(values), 4)

    rows[name] = {'seeds': per_seed, 'train_s': mean('train_s'), 'export_s': mean('export_s'),
                  'tf': {'map50': mean('tf', 'map50'), 'map': mean('tf', 'map')}}
    for kind in ('float', 'int8'):
      rows[name][kind] = {k: mean(kind, k) for k in ('bytes', 'gzip_bytes', 'map50', 'map')}
      rows[name][kind]['latency_ms'] = {k: mean(kind, 'latency_ms', k)
                                        for k in ('invoke', 'with_resize')}
    results['export'] = rows
    write(results)


def duck_reference_box(image):
  """The duck's box in an unlabeled ducky frame: the largest duck-yellow blob.

  The 49 frames carry no boxes, and counting frames with *any* detection
  counts false ones too. The rubber duck is the only large saturated-yellow
  object in these frames (its reflection in the mirror is smaller): the
  contact sheet draws this box in green, to be checked by eye. Where the duck
  turns, its beak and shading part the yellow of its head from its body's: a
  closing over ~1/60 of the frame joins them (without it the box left the head
  out on frames 29-48, and a detection of the whole duck missed IoU 0.5 on two).
  """
  from scipy import ndimage
  hsv = np.asarray(image.convert('HSV')).astype(np.int32)
  hue = hsv[..., 0] * 360 / 255
  yellow = (hue > 35) & (hue < 70) & (hsv[..., 1] > 120) & (hsv[..., 2] > 120)
  side = max(3, round(min(image.size) / 60))
  yellow = ndimage.binary_closing(yellow, np.ones((side, side), bool))
  blobs, count = ndimage.label(yellow)
  if not count:
    return None
  largest = int(np.argmax(ndimage.sum(yellow, blobs, range(1, count + 1))))
  rows, cols = ndimage.find_objects(blobs)[largest]
  return (cols.start, rows.start, cols.stop, rows.stop)


def ducky(ducky_dir, model_dir, work, results, key='ducky', overrides=None, seed=0):
  """The notebook's task: train on its 5 labeled frames, find the duck in the 49 unlabeled ones.

  Against colour-derived reference boxes (`duck_reference_box`): frames where
  a detection at score >= 0.3 (and >= 0.5) covers the duck at IoU >= 0.5,
  frames with a detection >= 0.3 elsewhere, and mAP over the 49 frames.
  """
  from PIL import Image, ImageDraw
  from model.boxes import iou_xyxy
  tasks = tasks_lib.load_tasks_file(ducky_dir / 'tasks.json')
  run, metrics = train_once(tasks, ducky_dir, model_dir, work, None, seed, export_kinds=('float',),
                            overrides=overrides)
  _, labels, _ = run_folder.read_run(run.root)
  detector = TFLiteDetector(run.tflite('float'), labels)
  examples, _ = tasks_lib.parse_tasks(tasks)
  frames = [e for e in examples if e.split == tasks_lib.UNLABELED]
  counts = {'found_at_0.3': 0, 'found_at_0.5': 0, 'false_at_0.3': 0}
  references, images, detections, thumbs = [], [], [], []
  for example in frames:
    image = load_image(tasks_lib.resolve_image(example, ducky_dir))
    reference = duck_reference_box(image)
    found = detector.detect(image, min_score=0.01)
    on_duck = [d for d in found if iou_xyxy(d.box, reference) >= 0.5]
    counts['found_at_0.3'] += any(d.score >= 0.3 for d in on_duck)
    counts['found_at_0.5'] += any(d.score >= 0.5 for d in on_duck)
    counts['false_at_0.3'] += any(d.score >= 0.3 and d not in on_duck for d in found)
    references.append(dataclasses.replace(
        example, labels=[labels[0]], boxes=np.array([[reference[1] / image.height,
                                                      reference[0] / image.width,
                                                      reference[3] / image.height,
                                                      reference[2] / image.width]], np.float32)))
    images.append(image)
    detections.append(found)
    sheet_image = image.copy()
    draw = ImageDraw.Draw(sheet_image)
    draw.rectangle(reference, outline=(0, 255, 0), width=3)
    for d in [d for d in found if d.score >= 0.3][:3]:
      draw.rectangle(d.box, outline=(255, 0, 0), width=4)
      draw.text((d.box[0] + 4, d.box[1] + 4), f'{d.score:.2f}', fill=(255, 0, 0))
    sheet_image.thumbnail((200, 150))
    thumbs.append(sheet_image)
  sheet = Image.new('RGB', (200 * 7, 150 * ((len(thumbs) + 6) // 7)), 'white')
  for i, thumb in enumerate(thumbs):
    sheet.paste(thumb, ((i % 7) * 200, (i // 7) * 150))
  sheet_path = result_files.RESULTS / f'{key}_contact_sheet.png'
  sheet.save(sheet_path)
  evaluation = coco_map(references, images, detections, labels)
  results[key] = {'frames': len(frames), **counts,
                  'map50': evaluation['map50'], 'map': evaluation['map'],
                  'iteration_s': metrics['wall_time_s']['total_s'],
                  'contact_sheet': str(sheet_path.relative_to(REPO))}
  log.info('%s: %s', key, results[key])
  shutil.rmtree(run.root.parent)


def write(results):
  result_files.write_json('fewshot', results)
  lines = ['# Few-shot benchmark', '', f'Dataset: `{results["dataset"]}`, test split: '
           f'{results["test_images"]} images. Mean ± std over seeded subsets; times on '
           f'{os.cpu_count()} cores. A row keeps the times of the run that measured it, and '
           'these machines differ up to 3× between sessions: compare times within one run.', '',
           '| start | shots | mAP@0.5 | mAP@[.5:.95] | iteration s | train s | views/s |',
           '|---|---|---|---|---|---|---|']
  for row in sorted(results['grid'], key=lambda r: r['shots']):  # stable: variants in order
    lines.append(f'| {row["start"]} | {row["shots"]} | {row["map50_mean"]:.3f} ± '
                 f'{row["map50_std"]:.3f} | {row["map_mean"]:.3f} | {row["iteration_s_mean"]} | '
                 f'{row["train_s_mean"]} | {row["images_per_s_mean"]} |')
  if 'export' in results:
    lines += ['', '10 shots, mean over subsets; ms per image at 2 threads (the interpreter with '
              'NMS; + resizing a 650×417 photo).', '',
              '| variant | .tflite | MB | gzip MB | ms | ms + resize | mAP@0.5 | mAP | train s |',
              '|---|---|---|---|---|---|---|---|---|']
    for name, variant in results['export'].items():
      for kind in ('float', 'int8'):
        row = variant[kind]
        lines.append(f'| {name} | {kind} | {row["bytes"] / 1e6:.1f} | {row["gzip_bytes"] / 1e6:.1f} | '
                     f'{row["latency_ms"]["invoke"]:.2f} | {row["latency_ms"]["with_resize"]:.2f} | '
                     f'{row["map50"]:.3f} | {row["map"]:.3f} | {variant["train_s"]:.1f} |')
      lines.append(f'| {name} | TF checkpoint | – | – | – | – | {variant["tf"]["map50"]:.3f} | '
                   f'{variant["tf"]["map"]:.3f} | |')
  for key, how in (('ducky', 'default training'), ('ducky_no_zoom_out', '`--zoom-out 0`')):
    if key in results:
      d = results[key]
      lines += ['', f'Ducky (5 shots, {how}): the duck found (a detection at IoU ≥ 0.5 with '
                f'its colour-derived box) at score ≥ 0.3 in {d["found_at_0.3"]} and ≥ 0.5 in '
                f'{d["found_at_0.5"]} of {d["frames"]} unlabeled frames; a false detection ≥ 0.3 '
                f'in {d["false_at_0.3"]}; mAP@0.5 {d["map50"]:.3f}, mAP {d["map"]:.3f}. Contact '
                f'sheet (green: reference, red: detections ≥ 0.3) `{d["contact_sheet"]}`.']
  result_files.write_markdown('fewshot', lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', type=Path, default=REPO.parent / 'shared/datasets/raccoon')
  parser.add_argument('--ducky', type=Path, default=REPO.parent / 'shared/datasets/ducky')
  parser.add_argument('--model-dir', type=Path, default=Path(os.environ.get('MODEL_DIR', REPO / 'models')))
  parser.add_argument('--shots', type=int, nargs='+', default=[1, 5, 10, 10_000])
  parser.add_argument('--subsets', type=int, default=3)
  parser.add_argument('--skip', nargs='*', default=[], choices=['grid', 'export', 'ducky'])
  parser.add_argument('--variants', nargs='+', metavar='NAME',
                      help='only these rows of the grid, by their "start" name (default: all but '
                           '"trains top", the default training again, and "trains all", which is slow)')
  args = parser.parse_args()
  set_up_logging()
  tasks = tasks_lib.load_tasks_file(args.dataset / 'tasks.json')
  test = load_split(tasks, args.dataset, tasks_lib.TEST)
  results = {'dataset': str(args.dataset.name), 'test_images': len(test[0]), 'grid': []}
  earlier = result_files.read_json('fewshot')
  if earlier:  # what this run does not measure keeps its last result
    results = {**earlier, **results, 'grid': earlier.get('grid', [])}
  with tempfile.TemporaryDirectory() as work:
    if 'grid' not in args.skip:
      only = args.variants or [*STARTS, 'partial restore, fresh class head',
                               'partial restore, trains heads',
                               'partial restore, no zoom-outs']
      quality_grid(tasks, args.dataset, args.model_dir, work, test, args.shots, args.subsets,
                   results, only)
    if 'export' not in args.skip:
      export_comparison(tasks, args.dataset, args.model_dir, work, test, results, args.subsets)
    if 'ducky' not in args.skip and args.ducky.is_dir():
      ducky(args.ducky, args.model_dir, work, results)
      ducky(args.ducky, args.model_dir, work, results, key='ducky_no_zoom_out',
            overrides={'views.zoom_out': 0.0})
  write(results)
  print((result_files.RESULTS / 'fewshot.md').read_text())


if __name__ == '__main__':
  main()
