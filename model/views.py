"""Training views: augmented images, their anchor targets, and the cached output
of the part of the network that does not train.

Each training image becomes several views (`augment.make_views`); each view's
boxes become anchor targets (`targets.TargetAssigner`); each view goes once
through the frozen part of the extractor and is kept as float16. Training then
runs only what trains, on that cache (`model.train`).

Making views is the slow part (augmentation, targets, the frozen part), and the
next iteration mostly sees the same images: `StoredViews` keeps an iteration's
views in its run folder, and the next one reuses those of every image whose
pixels, boxes and labels are unchanged (`fingerprint`), made under the same
settings (`signature`), and their cached outputs where the frozen part is the
same (`frozen_signature`: it never trains, so it is the base's in every
iteration of a project).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import weakref
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from model import augment
from model.config import ViewsConfig
from model.targets import TargetAssigner
from model.tasks import Example

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CachedViews:
  """What the frozen part made of augmented views, and their anchor targets.

  Attributes:
    features: float16 arrays [V, ...], the outputs of `ExtractorSplit.frozen`
      (the six feature maps when only the heads train).
    class_targets: int32 [V, N] (0 background, 1..C labels, -1 ignored).
    box_targets: float32 [V, N, 4] encoded boxes (zeros off positives).
    per_image: views per image; the views of image i are
      [i * per_image, (i + 1) * per_image), the first of them the image as it is.
    reused: images whose views came from an earlier iteration (`StoredViews`).
    reused_outputs: views whose frozen-part outputs came from there too.
    peaks: [V, T] `export.peaks_of` the unbounded activations inside the frozen
      part, measured while caching (int8 calibration leaves out outliers by them).
    carried: bool [V], whether the view's image came over unchanged from the
      earlier iteration (a warm start trains less, and draws the others more).
  """

  features: list[np.ndarray]
  class_targets: np.ndarray
  box_targets: np.ndarray
  per_image: int = 1
  reused: int = 0
  peaks: np.ndarray | None = None
  reused_outputs: int = 0
  carried: np.ndarray | None = None

  def __len__(self):
    return len(self.class_targets)

  def new_share(self) -> float:
    """The share of the views (and images) an earlier iteration did not train on;
    1.0 when none came over."""
    return 1.0 if self.carried is None else 1.0 - float(self.carried.mean())

  @property
  def originals(self) -> slice:
    """Selects each image's unaugmented view (view 0 of its views)."""
    return slice(0, None, self.per_image)

  def originals_first(self) -> np.ndarray:
    """Every view's index: each image's original, then each image's second view, and so on."""
    return np.argsort(np.arange(len(self)) % self.per_image, kind='stable')


def cache_features(frozen, pixels: np.ndarray, batch_size: int = 16
                   ) -> tuple[list[np.ndarray], np.ndarray]:
  """Runs a frozen model over views, uint8 pixels [V, S, S, 3].

  Returns:
    (its outputs as float16 arrays, [V, T] peaks of its T unbounded activations).
    float16 halves the cache (about 0.7 MB per view for the six maps at
    300x300); training runs in float32 on it.
  """
  extract, peak_count = _traced_outputs(frozen)
  # Filled in place: with hundreds of views, stacking copies cost seconds.
  features, peaks = None, np.empty([len(pixels), peak_count], np.float32)
  for start in range(0, len(pixels), batch_size):
    maps, inner = extract(tf.constant(pixels[start:start + batch_size]))
    if features is None:
      features = [np.empty([len(pixels), *m.shape[1:]], np.float16) for m in maps]
    for store, fmap in zip(features, maps):
      store[start:start + len(fmap)] = fmap.numpy()
    peaks[start:start + len(inner)] = inner.numpy()
  return features, peaks


# frozen model -> (its traced outputs, the number of peaks). Tracing takes
# ~0.25 s, twice an iteration with held-out images; a pooled model
# (`model_pool`) keeps its frozen part, and the next iteration its trace. Weak:
# the traced function holds the frozen part's layers, not the model.
_traced = weakref.WeakKeyDictionary()


def _traced_outputs(frozen):
  """(uint8 views [B, S, S, 3] -> (the frozen part's outputs, peaks [B, T]), T)."""
  if frozen not in _traced:
    _traced[frozen] = _trace_outputs(frozen)
  return _traced[frozen]


def _trace_outputs(frozen):
  import tf_keras
  from model.export import peaks_of, unbounded_outputs
  unbounded = unbounded_outputs(frozen)
  maps = len(frozen.outputs)
  probe = tf_keras.Model(frozen.input, [*frozen.outputs, *unbounded])

  def extract(batch):
    outputs = tf.nest.flatten(probe(tf.cast(batch, tf.float32) / 127.5 - 1.0, training=False))
    return outputs[:maps], (peaks_of(outputs[maps:]) if unbounded
                            else tf.zeros([tf.shape(batch)[0], 0]))
  # Traced: about 8 ms per view at 2 threads, five times faster than eager. The
  # frozen part's input has its side fixed, so one trace serves every call.
  views = tf.TensorSpec([None, *frozen.input.shape[1:]], tf.uint8)
  return tf.function(extract, input_signature=[views]), len(unbounded)


def fingerprint(example: Example, image: Image.Image) -> str:
  """Names an image with its boxes and labels: its views hold while this does."""
  pixels = np.asarray(image, np.uint8)
  digest = hashlib.sha256(repr(pixels.shape).encode())
  digest.update(pixels.tobytes())
  digest.update(np.asarray(example.boxes, np.float32).tobytes())
  digest.update('\n'.join(example.labels).encode())
  return digest.hexdigest()


def signature(assigner: TargetAssigner, input_size: int, shrink: ViewsConfig,
              crop_min_scale: float) -> str:
  """Names the settings views are made under: input size, anchors, matching, crops,
  zoom-outs and mosaics."""
  digest = hashlib.sha256(np.asarray(assigner.anchors, np.float32).tobytes())
  digest.update(repr((input_size, tuple(shrink.zoom_out_scale), crop_min_scale,
                      assigner.settings(), (shrink.mosaic, shrink.mosaic_max_side))).encode())
  return digest.hexdigest()


def frozen_signature(frozen) -> str:
  """Names the frozen part by its layers, outputs and weights: its cached outputs hold
  while this does."""
  digest = hashlib.sha256(repr(([type(layer).__name__ for layer in frozen.layers],
                                [tuple(output.shape) for output in frozen.outputs])).encode())
  for weight in frozen.weights:
    digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
  return digest.hexdigest()


@dataclasses.dataclass
class StoredViews:
  """An iteration's views as its run folder keeps them (`views.npz`): per image, its
  views' pixels and anchor targets, found by the image's `fingerprint`.

  Attributes:
    signature: the settings they were made under (`signature`).
    labels: class id - 1 -> label, for the class targets.
    views_each, zoom_outs: views per image: `views_each` first, then the zoom-outs.
    fingerprints: one per image, in view order.
    pixels: uint8 [V, S, S, 3]; class_targets, box_targets: as in `CachedViews`.
    frozen, features, peaks: the frozen part's `frozen_signature` and its cached
      outputs and peaks (`CachedViews`), or '' and None.
  """

  signature: str
  labels: list[str]
  views_each: int
  zoom_outs: int
  fingerprints: list[str]
  pixels: np.ndarray
  class_targets: np.ndarray
  box_targets: np.ndarray
  frozen: str = ''
  features: list[np.ndarray] | None = None
  peaks: np.ndarray | None = None

  def save(self, path: Path) -> None:
    cached = {}
    if self.features is not None:
      cached = {'frozen': self.frozen, 'peaks': self.peaks,
                **{f'feature_{i}': f for i, f in enumerate(self.features)}}
    with open(path, 'wb') as file:  # uncompressed: pixels hardly compress, and fast matters
      np.savez(file, signature=self.signature, labels=np.array(self.labels, str),
               views_each=self.views_each, zoom_outs=self.zoom_outs,
               fingerprints=np.array(self.fingerprints, str), pixels=self.pixels,
               class_targets=self.class_targets, box_targets=self.box_targets, **cached)

  @classmethod
  def load(cls, path: Path) -> 'StoredViews | None':
    """The views at `path`, or None where there are none or they cannot be read."""
    try:
      with np.load(path, allow_pickle=False) as data:
        cached = {}
        if 'frozen' in data.files:
          count = sum(name.startswith('feature_') for name in data.files)
          cached = {'frozen': str(data['frozen']), 'peaks': data['peaks'],
                    'features': [data[f'feature_{i}'] for i in range(count)]}
        return cls(str(data['signature']), data['labels'].tolist(), int(data['views_each']),
                   int(data['zoom_outs']), data['fingerprints'].tolist(), data['pixels'],
                   data['class_targets'], data['box_targets'], **cached)
    except FileNotFoundError:
      return None
    except (OSError, ValueError, KeyError) as error:
      log.warning('Ignoring the stored views at %s: %s', path, error)
      return None

  def find(self, key: str, label_ids: dict[str, int], views_each: int, zoom_outs: int):
    """(pixels, class targets, box targets, their rows here) of image `key`'s first
    `views_each` views and first `zoom_outs` zoom-outs, class ids as in `label_ids`; or None."""
    if key not in self.fingerprints or views_each > self.views_each or zoom_outs > self.zoom_outs:
      return None
    first = self.fingerprints.index(key) * (self.views_each + self.zoom_outs)
    rows = [*range(first, first + views_each),
            *range(first + self.views_each, first + self.views_each + zoom_outs)]
    # old id -> new id; -1 (ignored anchors) maps to itself through the last entry. A
    # label gone from the project is in no unchanged image, so its 0 is never used.
    new_ids = np.array([0, *(label_ids.get(label, 0) for label in self.labels), -1], np.int32)
    return self.pixels[rows], new_ids[self.class_targets[rows]], self.box_targets[rows], rows


def make_cached_views(examples: list[Example], images: list[Image.Image],
                      label_ids: dict[str, int], assigner: TargetAssigner, frozen, *,
                      views_each: int, zoom_outs: int, input_size: int,
                      crop_min_scale: float, shrink: ViewsConfig = ViewsConfig(),
                      reuse: StoredViews | None = None, fingerprints: list[str] | None = None,
                      ) -> tuple[np.ndarray, CachedViews]:
  """Views of every image, their targets, and the frozen part's outputs.

  Args:
    examples, images: aligned lists of the images that train.
    label_ids: label -> class id (1-based).
    frozen: the model whose outputs are cached (`ExtractorSplit.frozen`).
    views_each, zoom_outs, shrink: per image (`augment.make_views`).
    crop_min_scale: the smallest random crop's sides (`augment.Augmenter`).
    reuse, fingerprints: an earlier iteration's views (made under the same
      settings) and each image's `fingerprint`: images found there are not
      augmented again, nor run through `frozen` if it is the one that cached them.

  Returns:
    (the views' uint8 pixels [V, S, S, 3] (`images.pixels_to_input`), the cached views).
  """
  pixels, class_targets, box_targets = [], [], []
  augmenter = augment.shared_augmenter(crop_min_scale)
  reused = 0
  same_frozen = bool(reuse and reuse.features is not None
                     and reuse.frozen == frozen_signature(frozen))
  stored_rows = {}  # view -> its row in `reuse`, where its cached outputs can be taken
  carried = []  # per view: whether its image came over unchanged from the earlier iteration
  for index, (example, image) in enumerate(zip(examples, images)):
    found = reuse and fingerprints and reuse.find(fingerprints[index], label_ids, views_each,
                                                  zoom_outs)
    if found:
      reused += 1
      if same_frozen:
        stored_rows.update(zip(range(len(pixels), len(pixels) + len(found[3])), found[3]))
      pixels.extend(found[0])
      class_targets.extend(found[1])
      box_targets.extend(found[2])
      carried.extend([True] * len(found[0]))
      continue
    ids = np.array([label_ids[label] for label in example.labels], np.int32)
    views = augment.make_views(image, example.boxes, ids, views_each, input_size, zoom_outs,
                               augmenter=augmenter, shrink=shrink)
    for number, (x, boxes, view_ids) in enumerate(views):
      cls, box = assigner.assign(boxes, view_ids, zoomed_out=number >= views_each)
      pixels.append(x)
      class_targets.append(cls)
      box_targets.append(box)
      carried.append(False)
  if reused:
    log.info('Reused the earlier iteration\'s views of %d of %d images%s', reused,
             len(examples), ' and their cached outputs' if stored_rows else '')
  pixels = np.stack(pixels)
  features, peaks = _cached_outputs(frozen, pixels, stored_rows, reuse)
  return pixels, CachedViews(features, np.stack(class_targets), np.stack(box_targets),
                             per_image=views_each + zoom_outs, reused=reused, peaks=peaks,
                             reused_outputs=len(stored_rows), carried=np.array(carried, bool))


def _cached_outputs(frozen, pixels: np.ndarray, stored_rows: dict[int, int],
                    stored: StoredViews | None) -> tuple[list[np.ndarray], np.ndarray]:
  """`cache_features` of the views, taken from `stored` for those in `stored_rows`."""
  if not stored_rows:
    return cache_features(frozen, pixels)
  features = [np.empty([len(pixels), *f.shape[1:]], f.dtype) for f in stored.features]
  peaks = np.empty([len(pixels), stored.peaks.shape[1]], np.float32)
  # An image's views are consecutive rows in both: copied as slices, not through
  # a gathered copy of ~100 MB first.
  for view, row, count in _runs(stored_rows):
    for store, source in zip([*features, peaks], [*stored.features, stored.peaks]):
      store[view:view + count] = source[row:row + count]
  rest = [i for i in range(len(pixels)) if i not in stored_rows]
  if rest:
    computed, computed_peaks = cache_features(frozen, pixels[rest])
    for store, source in zip(features, computed):
      store[rest] = source
    peaks[rest] = computed_peaks
  return features, peaks


def _runs(view_rows: dict[int, int]) -> list[list[int]]:
  """[view, row, count] of each run in which consecutive views take consecutive rows."""
  runs = []
  for view, row in sorted(view_rows.items()):
    if runs and runs[-1][0] + runs[-1][2] == view and runs[-1][1] + runs[-1][2] == row:
      runs[-1][2] += 1
    else:
      runs.append([view, row, 1])
  return runs
