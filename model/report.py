"""report.png of an iteration: the loss curve, mAP per iteration, a few detections."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from model.boxes import Detection


def write_report(path: Path, losses: list[float], validation: list[tuple[int, float]],
                 history: list[dict], samples: list[tuple[Image.Image, list[Detection]]]) -> None:
  """Draws the report.

  Args:
    losses: training loss per step.
    validation: (step, held-out loss) pairs.
    history: one dict per iteration so far, with 'iteration' and 'map50' (None if
      unmeasured), and where images were labeled after it, 'later': {'images', 'map50'}.
    samples: up to three images with their detections (pixel boxes).
  """
  # A bare Figure, not pyplot: no global state, so it draws in any thread.
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  columns = max(2, len(samples))
  figure = Figure(figsize=(4 * columns, 7), dpi=80)
  grid = figure.add_gridspec(2, columns)

  curve = figure.add_subplot(grid[0, :columns // 2 or 1])
  curve.plot(range(1, len(losses) + 1), losses, lw=0.8, label='training')
  if validation:
    curve.plot(*zip(*validation), 'o-', label='held out')
  curve.set(title='loss per step', xlabel='step', yscale='log')
  curve.legend()

  maps = figure.add_subplot(grid[0, columns // 2 or 1:])
  held_out = [(h['iteration'], h['map50']) for h in history if h.get('map50') is not None]
  later = [(h['iteration'], h['later']['map50']) for h in history
           if (h.get('later') or {}).get('map50') is not None]
  for points, style, label in ((held_out, 'o-', 'held out'),
                               (later, 's--', 'the images labeled next')):
    if points:
      maps.plot(*zip(*points), style, label=label)
  if held_out or later:
    maps.set(ylim=(0, 1), xticks=[h['iteration'] for h in history])
    maps.legend()
  else:
    maps.text(0.5, 0.5, 'mAP needs a held-out split (20+ labeled images,\n'
              'TRAIN_HOLD_OUT_FROM) or images labeled after an iteration',
              ha='center', va='center', transform=maps.transAxes)
  maps.set(title='mAP@0.5 per iteration', xlabel='iteration')

  for i, (image, detections) in enumerate(samples[:columns]):
    axes = figure.add_subplot(grid[1, i])
    axes.imshow(image)
    axes.axis('off')
    for d in detections[:5]:
      x1, y1, x2, y2 = d.box
      axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color='red', lw=2))
      axes.text(x1, y1, f'{d.label} {d.score:.2f}', color='white', fontsize=8,
                bbox={'facecolor': 'red', 'pad': 1, 'lw': 0})
  figure.tight_layout()
  figure.savefig(path)
