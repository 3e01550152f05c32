"""Typed settings of the detector, one frozen dataclass per stage.

Builders read these; components take plain values. Variants come from
`dataclasses.replace`; nothing mutates a config after it is built.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class BasePackage:
  """Where the pretrained SSD MobileNetV2 comes from, pinned by version and hash.

  The npm package `@mediapipe/objectron` ships, inside an Emscripten
  file-packager bundle, a TF Object Detection API `ssd_mobilenet_v2` trained on
  Open Images v4 (23 classes) as a float16 `.tflite` without post-processing.
  """

  npm_name: str = '@mediapipe/objectron'
  version: str = '0.4.1675468480'
  tarball_sha256: str = (
      'fc3e37b326b05e8f596099c90b3e0931b05a56cd3160b9ac450b621794bac94c')
  tflite_sha256: str = (
      'd0a5255bf8c4f5a0bc4240741a76c41d5e939f7655078f945f50ab53a9375da6')
  # Members of the tarball: the packed assets and the loader holding their
  # table of contents.
  assets_member: str = 'package/objectron_solution_packed_assets.data'
  loader_member: str = 'package/objectron_solution_packed_assets_loader.js'
  # Files inside the packed assets, found by the end of their path.
  tflite_suffix: str = '/object_detection_ssd_mobilenetv2_oidv4_fp16.tflite'
  labelmap_suffix: str = '/object_detection_oidv4_labelmap.txt'
  # The label map of that exact .tflite (checked by its hash), used when a
  # user supplies the bare .tflite without the package around it.
  labels: tuple[str, ...] = (
      '???', 'Bicycle', 'Boot', 'Laptop', 'Person', 'Chair', 'Cattle', 'Desk',
      'Cat', 'Computer mouse', 'Computer monitor', 'Box', 'Mug', 'Coffee cup',
      'Stationary bicycle', 'Table', 'Bottle', 'High heels', 'Vehicle',
      'Footwear', 'Dog', 'Book', 'Camera', 'Car')

  @property
  def spec(self) -> str:
    """The npm package specifier, `name@version`."""
    return f'{self.npm_name}@{self.version}'

  @property
  def tarball_name(self) -> str:
    """The file name `npm pack` writes for this package."""
    return f'{self.npm_name.lstrip("@").replace("/", "-")}-{self.version}.tgz'


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """SSD multiple-grid anchors, as the TF Object Detection API generates them.

  Layer i of `num_layers` has scale min + (max - min) * i / (num_layers - 1),
  one anchor per aspect ratio, plus one of ratio 1 at sqrt(s_i * s_{i+1})
  (s_num_layers = 1.0). The lowest layer is reduced to three anchors:
  (lowest_layer_scale, 1), (s_0, 2), (s_0, 0.5).
  """

  num_layers: int = 6
  min_scale: float = 0.2
  max_scale: float = 0.95
  aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
  lowest_layer_scale: float = 0.1
  reduce_lowest_layer: bool = True

  def scales(self) -> list[float]:
    """Scales s_0..s_num_layers (the last one, 1.0, only feeds the extra anchor)."""
    step = (self.max_scale - self.min_scale) / (self.num_layers - 1)
    return [self.min_scale + step * i for i in range(self.num_layers)] + [1.0]

  def anchors_per_location(self) -> list[int]:
    """How many anchors each feature map has at every cell."""
    full = len(self.aspect_ratios) + 1
    counts = [full] * self.num_layers
    if self.reduce_lowest_layer:
      counts[0] = 3
    return counts


@dataclasses.dataclass(frozen=True)
class SSDConfig:
  """The network: input size, classes and box coding.

  `num_classes` counts real classes; the class head has one more output per
  anchor, column 0, for the background.
  """

  num_classes: int
  input_size: int = 300
  anchors: AnchorConfig = AnchorConfig()
  # Faster R-CNN box coding (ty, tx, th, tw) with these scale factors.
  box_scale_factors: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
  # The class head also reads the image's mean colour per cell (`ssd.colour_maps`),
  # through a colour_kernel x colour_kernel conv (runs before it was chosen: 1).
  colour: bool = False
  colour_kernel: int = 1

  def __post_init__(self):
    if self.num_classes < 1:
      raise ValueError(f'num_classes must be at least 1, got {self.num_classes}')
    if self.input_size < 32 or self.input_size % 2:
      raise ValueError(
          f'input_size must be an even number of at least 32, got {self.input_size}')

  def feature_map_sizes(self) -> list[int]:
    """Side of each of the six square feature maps for this input size.

    Every stride-2 convolution uses SAME padding, so each halving rounds up:
    300 -> 150 -> 75 -> 38 -> 19 (map 0) -> 10 (map 1) -> 5 -> 3 -> 2 -> 1.
    """
    side = self.input_size
    for _ in range(4):
      side = math.ceil(side / 2)
    sizes = []
    for _ in range(self.anchors.num_layers):
      sizes.append(side)
      side = math.ceil(side / 2)
    return sizes

  def num_anchors(self) -> int:
    return sum(n * n * k for n, k in zip(self.feature_map_sizes(),
                                         self.anchors.anchors_per_location()))


# One object, one box: detections overlapping a better one by more than this
# are suppressed, across classes, in the .tflite files and the checkpoint alike.
NMS_IOU_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
  """Turning raw outputs into detections: scores, NMS and how many to keep."""

  min_score: float = 0.25
  nms_iou_threshold: float = NMS_IOU_THRESHOLD
  max_detections: int = 100


@dataclasses.dataclass(frozen=True)
class ScoreThresholdConfig:
  """The score from which a pre-annotation shows a box, per label (`model.score_thresholds`).

  Chosen from the grid `low`..`high` (step `step`) where an annotator's edits
  on the held-out images cost least, where they hold `min_boxes` of the
  label's boxes; else `default`. Against 0.25 for every label, this left 0.58,
  0.64 and 0.73 of the work at 50 images on raccoon, BCCD and raccoon with
  shapes, 1.00 on crowded shapes; at 10 images the default 0.35 left 0.67-0.94
  (0.3 before: 0.35 left less work on every photo-based data set measured, 2-8 %
  more on synthetic small shapes, whose models score lower; why:
  benchmarks/results/choices.md).
  """

  default: float = 0.35
  # A missed box costs this many wrong ones: drawing a box takes 7 s or more,
  # checking a shown one ~1.6 s and deleting a wrong one ~1 s more
  # (benchmarks/results/choices.md).
  missed_cost: float = 2.0
  low: float = 0.1
  high: float = 0.9
  step: float = 0.05
  min_boxes: int = 3
  # Where too few boxes are held out, this share of the way from the default to
  # the least work on the images labeled since the previous version, as it
  # detected them. Off: halfway saved 10-14 % of the work on raccoon and BCCD
  # against the default 0.3, none on average against 0.35 (raccoon -10 %, BCCD
  # +5 % with 2 new images; choices.md).
  previous_weight: float = 0.0
  # The images labeled since the previous version it detects, at most (~10-30 ms
  # each): for the history's `later` mAP, and the above.
  previous_images: int = 32

  def __post_init__(self):
    if not 0 < self.low <= self.default <= self.high < 1:
      raise ValueError(f'score thresholds need 0 < low <= default <= high < 1, not '
                       f'{self.low}, {self.default}, {self.high}')
    if not 0 <= self.previous_weight <= 1:
      raise ValueError(f'previous_weight is a share, 0 to 1, not {self.previous_weight}')

  def grid(self) -> list[float]:
    count = round((self.high - self.low) / self.step)
    return [round(self.low + i * self.step, 4) for i in range(count + 1)]


@dataclasses.dataclass(frozen=True)
class BasePaths:
  """Where the converted base lives under the model directory.

  `base_name` is the base folder's name; the conversion writes a staging
  folder of another name and renames it into place.
  """

  model_dir: Path
  base_name: str = 'base'

  @property
  def base_dir(self) -> Path:
    return self.model_dir / self.base_name

  @property
  def downloads_dir(self) -> Path:
    return self.model_dir / 'downloads'

  @property
  def tflite(self) -> Path:
    """The pretrained .tflite, kept as the reference the conversion is checked against."""
    return self.base_dir / 'ssd_mobilenetv2_oidv4.tflite'

  @property
  def labels(self) -> Path:
    """The base label map, one name per line, line 0 the background `???`."""
    return self.base_dir / 'labels.txt'

  @property
  def checkpoint_prefix(self) -> Path:
    """tf.train.Checkpoint prefix with `feature_extractor`, `box_head`, `class_head`."""
    return self.base_dir / 'ckpt'

  @property
  def detector_tflite(self) -> Path:
    """The base as a serving .tflite with post-processing inside (what the backend runs)."""
    return self.base_dir / 'detector.tflite'

  @property
  def detector_labels(self) -> Path:
    """Real labels of `detector_tflite` in class-id order (the label map without `???`)."""
    return self.base_dir / 'detector_labels.txt'

  @property
  def manifest(self) -> Path:
    """JSON record of what was converted, from which source, and how exact it is."""
    return self.base_dir / 'base.json'


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """The model input's side in pixels, and the smallest anchor's scale.

  `size` None: chosen from the labeled boxes (`choose`), the smallest of
  `sizes` at which every label's typical object (the `size_quantile` of its
  box sides) spans `min_object_px` or more (the largest when none does).
  36 px and up to 512 rather than 30 and 448: BCCD, the crowded and the
  small shapes scored 0.013-0.025 higher at 10 images, BCCD with all its
  images 0.829 instead of 0.815, in about 1.2x the time; larger objects keep
  300 (benchmarks/results/choices.md).
  `lowest_anchor` None: the base's (0.1 of the input side); set, the lowest
  map's square anchor takes it and the restored box head is rescaled to match
  (`model.warm_start`). Shrinking it to the smallest label's size lost on
  BCCD, the small shapes and ducky (benchmarks/results/choices.md).
  `colour`: the class head also reads the image's mean colour per cell of
  each feature map (`ssd.colour_maps`), which MobileNetV2's frozen blocks
  hand on little of: labels told apart by colour (nine shapes in three
  colours, 10 images) 0.39 -> 0.82 mAP@0.5 at the same time (choices.md).
  `colour_kernel`: the side of the conv that reads them; 3 sees the cells
  around too, as an anchor does (its box is larger than its cell): the same
  set 0.82 -> 0.96, BCCD at 10 images 0.64 -> 0.69, no data set lower; 5
  adds nothing (choices.md).
  """

  size: int | None = None
  sizes: tuple[int, ...] = (300, 384, 448, 512)
  min_object_px: float = 36.0
  # Which of a label's box sides counts as typical: the lower quarter, so that
  # most of its objects span min_object_px, not half (the median's rule):
  # raccoon with shapes 0.963 -> 0.980 at 10 images, fruit with all its images
  # 0.912 -> 0.926 (int8 0.892 -> 0.921), in up to ~1.5x the time where the
  # size grows (benchmarks/results/choices.md).
  size_quantile: float = 0.25
  lowest_anchor: float | None = None
  colour: bool = True
  colour_kernel: int = 3

  def __post_init__(self):
    if self.colour_kernel < 1 or self.colour_kernel % 2 == 0:
      raise ValueError(f'colour_kernel must be an odd number from 1 on, not {self.colour_kernel}')
    for size in (self.size, *self.sizes):
      if size is not None and (size < 128 or size > 1024 or size % 2):
        raise ValueError(f'input sizes must be even numbers from 128 to 1024, not {size}')
    if not 0.0 <= self.size_quantile <= 1.0:
      raise ValueError(f'size_quantile must be in [0, 1], not {self.size_quantile}')
    if self.lowest_anchor is not None and not 0.01 <= self.lowest_anchor <= 0.5:
      raise ValueError(f'lowest_anchor must be in [0.01, 0.5], not {self.lowest_anchor}')

  @property
  def anchors(self) -> AnchorConfig:
    if self.lowest_anchor is None:
      return AnchorConfig()
    return dataclasses.replace(AnchorConfig(), lowest_layer_scale=self.lowest_anchor)

  def ssd_config(self, num_classes: int) -> SSDConfig:
    """The network of these choices (`size` and `lowest_anchor` made)."""
    return SSDConfig(num_classes=num_classes, input_size=self.size, anchors=self.anchors,
                     colour=self.colour, colour_kernel=self.colour_kernel)

  def choose(self, typical_sides: dict[str, float]) -> tuple[int, str]:
    """The input side for objects of these sizes, and why.

    Args:
      typical_sides: label -> the `size_quantile` of its boxes' sqrt(height *
        width), normalized (a fraction of the image side; the input is square).
    """
    if self.size is not None:
      return self.size, 'set'
    label, side = min(typical_sides.items(), key=lambda item: item[1])
    for size in self.sizes:
      if side * size >= self.min_object_px:
        break
    return size, (f'"{label}", the smallest label: {self.size_quantile:.0%} of its boxes span '
                  f'under {side * size:.0f} px at {size} (aim: {self.min_object_px:g} px or more, '
                  f'from {self.sizes[0]} up)')


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  """Where a new model's parts come from (`model.warm_start`).

  Attributes:
    restore: what the base (or previous iteration) gives: 'extractor+box'
      (the few-shot default), 'extractor' (fresh box head) or 'none'.
    class_init: a new label's class column: 'base-fit' (the base class that
      names or fits it) or 'fresh' (small random weights, prior 0.01).
    blend: a base-fit column is the mean of this many best-fitting classes.
    min_fit_score: a base class starts a label's column only where its mean
      score on the label's boxes reaches this (`warm_start.class_fit`).
  """

  restore: str = 'extractor+box'
  class_init: str = 'base-fit'
  blend: int = 2
  # Weak fits (the synthetic shapes' best base classes, all under 0.05) start
  # worse than a fresh column; fits of 0.06-0.09 (raccoon faded) about as well
  # or better (why: benchmarks/results/choices.md).
  min_fit_score: float = 0.05

  def __post_init__(self):
    if self.restore not in ('extractor+box', 'extractor', 'none'):
      raise ValueError(f'restore must be extractor+box, extractor or none, not {self.restore!r}')
    if self.class_init not in ('base-fit', 'fresh'):
      raise ValueError(f'class_init must be base-fit or fresh, not {self.class_init!r}')
    if not 0 <= self.min_fit_score <= 1:
      raise ValueError(f'min_fit_score must be in [0, 1], not {self.min_fit_score}')

  def restored_parts(self) -> tuple[str, ...]:
    return {'extractor+box': ('feature_extractor', 'box_head'),
            'extractor': ('feature_extractor',), 'none': ()}[self.restore]


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
  """Training steps: `base` + `per_first_image` for each of the first
  `first_images` + `per_further_image` for each further one, at most `max`
  (75 / 275 / 325 / 1000 for 1 / 5 / 10 / 160 images), then scaled by how the
  class columns start: 75 / 100 / 150 / 1000 where every column starts fitted,
  75 / 330 / 330 / 1000 where one starts fresh (why: benchmarks/results/choices.md)."""

  base: int = 25
  per_first_image: int = 50
  first_images: int = 5
  per_further_image: int = 10
  max: int = 1000
  # A warm start whose previous iteration knows every label trains the share of
  # its images that are new (or changed), from `warm_fraction_min` to
  # `warm_fraction` of the steps, never fewer than `base`: 2 of 10 new train a
  # quarter, half or more new (or not known) a half (why: benchmarks/results/choices.md).
  warm_fraction: float = 0.5
  warm_fraction_min: float = 0.25
  # A fresh class column (no base class fits the label) starts from nothing,
  # so a run from the base with one trains at least this many times the
  # budget of its first `first_images` images, from two images on (one image
  # overfits sooner): ducky's mAP@0.5 0.930 -> 0.950 on 4 of 4 seeds at 5
  # images, the other data sets +0.002 on average at 1-10; beyond the first
  # images the budget is what it was (10 images: 330 steps, not 390, since the
  # 10-image time is the fast-iterations issue's; benchmarks/results/choices.md).
  fresh_factor: float = 1.2
  # Every class column fitted (from a base class that already finds the label's
  # boxes, or the previous iteration): the first images' budget times this, from
  # two images on (100 of the first five images' 275 steps). Raccoon, six
  # subsets, at 0.364x / 0.5x / 1.0x: 10 images 0.934 / 0.931 / 0.931, 5 images
  # 0.902 / 0.892 / 0.897 (twelve other subsets at 10: 0.920 / 0.926); in grey
  # at a third of the contrast 0.828 / 0.824 at 10, in fog (three fitted
  # subsets) 0.757 / 0.727; int8 better with fewer steps, its weights closer to
  # the base's (benchmarks/results/choices.md).
  fitted_factor: float = 0.364
  # ... where every fitted base class scores at least this on its label's boxes
  # (raccoon's "Dog" 0.24). Weak fits want the whole budget: the crowd with
  # every shape started from some base class (scores under 0.05) scored 0.974 at
  # half the budget, 0.988 at all of it.
  fitted_min_score: float = 0.1

  def __post_init__(self):
    if self.max < 1:
      raise ValueError(f'the step cap must be 1 or more, not {self.max}')
    if not 0 < self.fitted_factor <= 1:
      raise ValueError(f'fitted_factor must be in (0, 1], not {self.fitted_factor}')

  def steps(self, num_images: int, warm: bool = False, new_share: float = 1.0,
            fresh_column: bool = False, fitted_columns: bool = False) -> int:
    """Steps for `num_images`: a warm start's share of the budget (`warm_share`),
    else the budget for a run with a `fresh_column` or with only `fitted_columns`
    (neither: the budget as it is)."""
    first = min(num_images, self.first_images)
    first_budget = self.base + self.per_first_image * first
    steps = first_budget + self.per_further_image * (num_images - first)
    if not warm and num_images > 1:
      if fresh_column:
        steps = max(steps, round(first_budget * self.fresh_factor))
      elif fitted_columns:
        steps -= round(first_budget * (1 - self.fitted_factor))
    steps = min(self.max, steps)
    if not warm:
      return steps
    return min(self.max, max(self.base, round(steps * self.warm_share(new_share))))

  def warm_share(self, new_share: float) -> float:
    """The fraction of the budget a warm start trains when `new_share` of its images are new."""
    return min(self.warm_fraction, max(self.warm_fraction_min, new_share))


@dataclasses.dataclass(frozen=True)
class ViewsConfig:
  """Augmented views per training image (`model.augment`, `model.views`).

  Original + mirror, then random crops while the cache holds them (many for a
  handful of images, few for many), then shrunk views as a fraction `zoom_out`
  of the crops (0 turns them off): a share `mosaic` of them 2x2 mosaics of the
  image's own crops (`augment.make_views`), the rest zoom-outs (the image
  shrunk onto a black canvas by a factor drawn from `zoom_out_scale`), as are
  all of an image with a box over `mosaic_max_side` of its height or width.

  From `many_images` training images on, the images themselves vary enough:
  the views stay close to the photos (crops of at least `many_crop_min_scale`
  of each side, no zoom-outs) and the cache grows to `many_cached` views, so
  that 1000 steps do not run ~15 epochs over each image and its mirror (BCCD
  with all images 0.824 -> 0.832, the many small shapes 0.815 -> 0.845;
  benchmarks/results/choices.md "Many images"). Small objects (most boxes on
  the lowest map) get them from `small_objects_many_images` on
  (`TrainConfig.choose_many_images`; None: from `many_images` like the rest).

  With `carry_over`, a run folder keeps its views and the frozen part's
  outputs (when there are at most `max_cached`; ~0.75 MB each at 300 px with
  'top', ~1.6 MB at 448) and the next iteration reuses those of the images it
  keeps unchanged instead of making and running them through again.
  """

  zoom_out: float = 0.5
  zoom_out_scale: tuple[float, float] = (0.4, 0.9)
  # Mosaics instead of zoom-outs: the objects as small, among the image's own
  # content and four crops' worth of them per view. Fruit at 10 images 0.584 ->
  # 0.680, ducky's duck found at 0.5 in all 49 frames on 4 seeds; the other data
  # sets within their spread (benchmarks/results/choices.md, "Mosaics instead of
  # zoom-outs") ...
  mosaic: float = 1.0
  # ... but for an image with a box over this share of its height or width: most
  # crops cut such an object, and a mosaic shows parts of it (raccoon at one
  # image 0.734 -> 0.634 with them; the image stays a zoom-out).
  mosaic_max_side: float = 0.5
  crop_min_scale: float = 0.3  # a random crop's height and width, as fractions of the image's
  max_per_image: int = 16
  max_cached: int = 480
  many_images: int = 100
  # Small objects want them sooner: BCCD at 50 images 0.740 -> 0.782, while
  # raccoon's large ones lost there (benchmarks/results/choices.md).
  small_objects_many_images: int | None = 40
  many_cached: int = 1800  # ~2 GB at 512 px with 'upper'
  many_crop_min_scale: float = 0.7
  carry_over: bool = True

  def __post_init__(self):
    if not 0.0 <= self.zoom_out <= 1.0:
      raise ValueError(f'zoom_out must be in [0, 1], not {self.zoom_out}')
    if not 0.0 <= self.mosaic <= 1.0:
      raise ValueError(f'mosaic must be in [0, 1], not {self.mosaic}')
    if not 0.0 < self.mosaic_max_side <= 1.0:
      raise ValueError(f'mosaic_max_side must be in (0, 1], not {self.mosaic_max_side}')

  def per_image(self, num_images: int) -> int:
    """Original + flip at least; more random crops when images are few."""
    cached = self.many_cached if self.many(num_images) else self.max_cached
    return max(2, min(self.max_per_image, cached // max(1, num_images)))

  def zoom_outs_per_image(self, num_images: int) -> int:
    """Zoom-outs on top of the views above: a fraction of the random crops."""
    if self.many(num_images):
      return 0
    return round(self.zoom_out * (self.per_image(num_images) - 2))

  def crop_scale(self, num_images: int) -> float:
    """The smallest random crop's sides, as fractions of the image's."""
    return self.many_crop_min_scale if self.many(num_images) else self.crop_min_scale

  def many(self, num_images: int) -> bool:
    return num_images >= self.many_images

  def why(self, num_images: int) -> str:
    if self.many(num_images):
      return (f'{num_images} training images (from {self.many_images} on): up to '
              f'{self.many_cached} views, close to the photos')
    return f'up to {self.max_cached} views'


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
  """Anchors with IoU >= positive are matched, < negative are background, ignored between.

  Adaptive matching: a box that no anchor covers well gets its own threshold
  from its `adaptive_top_k` best IoUs (`model.targets`), on `adaptive_views`:
  'none', 'zoom-outs' or 'all'. None chooses from the data (`choose_adaptive`):
  on the zoom-outs when the labeled objects are at least the lowest anchor's
  size (zoom-outs shrink them below it: ducky's far ducks found in 45, 44, 44
  of 49 frames instead of 43, 42, 37, raccoon even), else none (objects
  already that small shrink to a few pixels, and lifting their IoUs taught
  loose boxes: BCCD and the small shapes lost; benchmarks/results/choices.md).
  """

  positive_iou: float = 0.5
  negative_iou: float = 0.4
  adaptive_top_k: int = 16
  adaptive_views: str | None = None

  def __post_init__(self):
    if self.adaptive_views not in (None, 'none', 'all', 'zoom-outs'):
      raise ValueError(f'adaptive_views must be none, all or zoom-outs, not {self.adaptive_views!r}')

  def choose_adaptive(self, smallest_side: float, lowest_anchor: float) -> tuple[str, str]:
    """Where adaptive matching applies, and why.

    Args:
      smallest_side: the smallest label's typical box side, a fraction of the image side.
      lowest_anchor: the lowest map's square anchor, the same way.
    """
    if self.adaptive_views is not None:
      return self.adaptive_views, 'set'
    if smallest_side >= lowest_anchor:
      return 'zoom-outs', (f'the smallest label is typically {smallest_side:.3f} of the image, '
                           f'the lowest anchor {lowest_anchor:g}: zoom-outs shrink it below')
    return 'none', (f'the smallest label is typically {smallest_side:.3f} of the image, under '
                    f'the lowest anchor ({lowest_anchor:g})')


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Sigmoid focal loss on the class logits plus `box_weight` x Huber on boxes."""

  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  box_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Adam with a linear warm-up then cosine decay, one optimizer per part.

  `learning_rate` (the class head's peak), `box_scale` (the box head's,
  relative to it) and `extractor_scale` (the extractor's, relative) None:
  chosen from the data (`class_learning_rate`, `box_learning_rate_scale`,
  `choose_extractor_scale`).
  `batch_size` 8: as good as 16 at about 0.65x the training time
  (benchmarks/results/choices.md). `new_image_share`: in a warm start, the
  views of images the previous iteration did not train on (new or changed)
  are drawn for at least this share of every batch (`train.batch_odds`).
  """

  batch_size: int = 8
  learning_rate: float | None = None
  box_scale: float | None = None
  extractor_scale: float | None = None
  # The extractor moves gently (0.3 lost raccoon's boxes and small shapes at
  # 10 images), but where images are many and most boxes fit the lowest map,
  # whose features the base never made at that scale, it moves faster: BCCD
  # with all images 0.832 -> 0.840, int8 0.829 -> 0.844; the many small
  # shapes 0.845 -> 0.844, int8 0.803 -> 0.816; the many crowded ones at
  # their ceiling either way (3 seeds each; benchmarks/results/choices.md).
  usual_extractor_scale: float = 0.1
  many_small_extractor_scale: float = 0.3
  # ... and where 'most' trains labels no base class finds, from
  # `new_labels_fast_from_images` images on: no label needs what the base made.
  # 10 images: BCCD 0.788 -> 0.799 (int8 0.772 -> 0.795), the small shapes
  # 0.954 -> 0.983, the colour set 0.972 -> 0.991; 5 images: +0.009 to +0.055.
  # One image overfits (the small shapes 0.575 -> 0.399), a label a base
  # class finds loses (raccoon beside shapes 0.94 -> 0.85), and so does a warm
  # start from an iteration already adapted (BCCD 8 images then 10: 0.757
  # against 0.775 at 0.1x; benchmarks/results/choices.md).
  new_labels_extractor_scale: float = 0.3
  new_labels_fast_from_images: int = 5
  warmup_fraction: float = 0.1
  new_image_share: float = 0.5
  # Where 'top' trains, the last this share of the steps may train the heads
  # alone, on the extractor's feature maps computed once
  # (`train.heads_only_steps`): a heads-only step costs under a third of one
  # through the top. Off: fresh runs scored the same with 0.6 in ~0.85x the
  # command's time, but warm starts from such runs scored 0.010-0.018 lower
  # (raccoon, six subsets; benchmarks/results/choices.md). Never where those
  # maps of every view would take more than `heads_only_max_mb`, nor where the
  # lowest map trains ('upper': BCCD lost 0.007-0.016).
  heads_only_tail: float = 0.0
  # Where a class column starts fresh and the top trains, the first this share
  # of the steps train the heads alone on the restored extractor's maps,
  # computed once (linear probing, then fine-tuning): the fresh column's first,
  # random gradients would move the extractor (`train.heads_first_steps`).
  # Raccoon as a label no base class fits, 10 images: 0.894 -> 0.915 over six
  # subsets, in 0.85x the time; not where the lowest map trains ('upper': the
  # small shapes 0.638 -> 0.607; benchmarks/results/choices.md).
  heads_first: float = 0.3
  heads_only_max_mb: float = 1024.0

  def __post_init__(self):
    if not 0.0 <= self.new_image_share <= 1.0:
      raise ValueError(f'new_image_share must be in [0, 1], not {self.new_image_share}')
    for name in ('heads_only_tail', 'heads_first'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'{name} must be in [0, 1), not {getattr(self, name)}')


@dataclasses.dataclass(frozen=True)
class EarlyStoppingConfig:
  """A held-out split once there are `min_images` images (None: never), for
  early stopping and held-out mAP; evaluated every `every` steps.

  Training on the held-out tenth too (None) gained BCCD with all its images
  0.012 mAP@0.5 (int8 0.020) on each of three seeds, but cost the small
  shapes with 150 images 0.030 in int8 on each of three (float even), so the
  split stays; with the many-image views since, BCCD gains 0.005 (int8 0.013)
  that way (benchmarks/results/choices.md).
  `restore_best`: a run ends with the weights that did best on the held-out
  images since half its budget (else with its last ones).
  """

  min_images: int | None = 20
  validation_fraction: float = 0.1
  # At most this many held out (None: no cap): a large project's tenth
  # trains instead: BCCD (292 images, 29 held out before) 0.840 -> 0.848,
  # int8 0.844 -> 0.848 over three seeds; projects of up to 160 images hold
  # out what they did (benchmarks/results/choices.md).
  max_validation_images: int | None = 16
  every: int = 50
  patience: int = 6
  restore_best: bool = True


@dataclasses.dataclass(frozen=True)
class Int8TuneConfig:
  """A quantization-aware tail for the int8 file (`model.int8_tune`).

  Where the int8 file scores more than `tolerance` mAP@0.5 under the float one
  on the held-out images (None: never), what trained continues for
  `steps_fraction` of its steps with QAT of the extractor's trained part, at
  `learning_rate_scale` x the run's peak rates; that int8 file ships if it does
  better on the held-out images. Its weights go to the int8 file only. On
  four small-shape models int8 gained 0.001-0.028 with a fifth of the steps at
  0.3x, 0.013-0.019 more than as many plain steps; at 1.0x it gained nothing
  (benchmarks/results/choices.md).
  """

  tolerance: float | None = 0.01
  steps_fraction: float = 0.2
  learning_rate_scale: float = 0.3


COMPRESSION_NEEDS_EXTRACTOR = (
    'QAT and pruning act on the extractor: train "top", "upper" or "all", not "heads"')


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
  """Optional, on what trains of the extractor (`model.compression`): quantization-aware
  training for the int8 file, or magnitude pruning to this fraction of zeros. Not both."""

  quantization_aware: bool = False
  prune_sparsity: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.prune_sparsity < 1.0:
      raise ValueError(f'prune_sparsity must be in [0, 1), not {self.prune_sparsity}')
    if self.quantization_aware and self.prune_sparsity:
      raise ValueError('choose QAT or pruning, not both')

  @property
  def active(self) -> bool:
    return self.quantization_aware or self.prune_sparsity > 0


# What can train (`TrainConfig.trainable`), from the least to everything.
TRAINABLE = ('heads', 'top', 'upper', 'most', 'all')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Few-shot training, one nested config per stage.

  `trainable` is what trains: 'heads' (box and class heads on cached feature
  maps, as in the notebook), 'top' (also Conv_1 and the four SSD extra
  layers, which make five of the six maps), 'upper' (also the stride-16
  blocks under them, so all six maps adapt), 'most' (also the blocks from the
  first at stride 16: what labels told apart by colour need, ~1.5-2x 'upper')
  or 'all' (the whole extractor; ~3x 'upper' on a CPU); None: 'most' under
  `most_under_images` training images where a label is new to the base, where
  the previous version mixed up labels on the images labeled since, or with
  many images of small objects, else 'upper' or 'top' (`choose_trainable`).
  What is frozen is computed once per view and cached. Variants: `with_overrides({'views.zoom_out': 0.0, 'trainable': 'heads'})`.
  """

  seed: int = 0
  trainable: str | None = None
  # 'most' under this many training images where a label has no base class
  # that finds its boxes (whatever the previous iteration knew): the blocks from
  # stride 16 on were made for the base's 23 classes, and frozen they lose what
  # tells new objects from the background and from each other; at the
  # extractor's low rate a handful of images adapts them without losing the
  # base. 10 images, 'most' against 'top' / 'upper': small shapes 0.662 ->
  # 0.954, BCCD 0.692 -> 0.788, fruit 0.430 -> 0.572, raccoon with shapes 0.843
  # -> 0.965, at ~1.7x the time; raccoon, whose label a base class fits, keeps
  # 'top' (0.933; 'most' 0.948 at 1.6x: benchmarks/results/choices.md). None:
  # never.
  most_under_images: int | None = 100
  upper_from_images: int = 100
  # ... or when more than this share of the labeled boxes fit the lowest map best.
  upper_from_lowest_map_share: float = 0.5
  # 'most' where the previous version named at least this share of the boxes it
  # found on the images labeled since (scoring the default pre-annotation
  # threshold or more; at least `most_from_found_boxes` of them) by another label:
  # labels told apart by colour, which the blocks 'upper' freezes lose (choices.md).
  # None: never.
  most_from_other_label_share: float | None = 0.2
  most_from_found_boxes: int = 10
  # ... and from this many training images on where most boxes fit the lowest map
  # (small objects): BCCD with all images 0.844 -> 0.892 mAP@0.5 (platelets 0.75
  # -> 0.85), the 150-image small shapes 0.84 -> 0.99; raccoon, whose boxes are
  # large, keeps 'upper' (0.963; 'most' 0.945). None: never.
  most_from_images_of_small_objects: int | None = 100
  input: InputConfig = InputConfig()
  warm_start: WarmStartConfig = WarmStartConfig()
  budget: BudgetConfig = BudgetConfig()
  views: ViewsConfig = ViewsConfig()
  matching: MatchingConfig = MatchingConfig()
  loss: LossConfig = LossConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
  compression: CompressionConfig = CompressionConfig()
  int8_tune: Int8TuneConfig = Int8TuneConfig()
  score_thresholds: ScoreThresholdConfig = ScoreThresholdConfig()

  def __post_init__(self):
    if self.trainable not in (None, *TRAINABLE):
      raise ValueError(f'trainable must be one of {", ".join(TRAINABLE)}, not {self.trainable!r}')
    if self.compression.active and self.trainable == 'heads':
      raise ValueError(COMPRESSION_NEEDS_EXTRACTOR)

  def with_overrides(self, overrides: dict) -> 'TrainConfig':
    """A copy with fields replaced, nested ones by dotted name ('views.zoom_out').

    Raises:
      ValueError: an unknown field or a value a stage refuses.
    """
    config = self
    for name, value in overrides.items():
      stage, _, field = name.rpartition('.')
      if not stage:
        config = _replace(config, field, value)
      else:
        config = _replace(config, stage, _replace(getattr(config, stage), field, value))
    return config

  def max_image_side(self) -> int:
    """Training images larger than this on their longer side are shrunk to it: the
    smallest random crop still fills the largest input with the image's own
    pixels, while a 12-megapixel photo no longer costs them all in every view."""
    largest = max(size for size in (self.input.size, *self.input.sizes) if size is not None)
    return math.ceil(largest / self.views.crop_min_scale)

  def small_objects(self, lowest_map_share: float) -> bool:
    """Whether most labeled boxes fit the lowest feature map best (more than
    `upper_from_lowest_map_share`): what several choices treat as small objects."""
    return lowest_map_share > self.upper_from_lowest_map_share

  def most_for_new_labels(self, num_images: int) -> bool:
    """Whether so few images train that a label new to the base trains 'most'."""
    return self.most_under_images is not None and num_images < self.most_under_images

  def choose_trainable(self, num_images: int, lowest_map_share: float = 0.0,
                       other_labels: tuple[int, int] | None = None,
                       labels_fitted: bool = False) -> tuple[str, str]:
    """What trains, and why: 'most' where labels are mixed up, where small
    objects are many, and under `most_under_images` images unless a base
    class finds every label; else 'upper' from `upper_from_images` images on,
    since many images teach sharper boxes (raccoon 160 images mAP 0.644 ->
    0.688, BCCD 0.433 -> 0.496), or when most boxes fit the lowest feature map's anchors
    (the top does not make that map: BCCD at 10 images 0.552 -> 0.611, the
    crowded shapes 0.931 -> 0.980); else the top alone
    (benchmarks/results/choices.md).

    Args:
      lowest_map_share: the share of the labeled boxes whose best-fitting
        anchors are the lowest map's (`choices.lowest_map_share`).
      other_labels: (found under another label, found) of the boxes on the images
        labeled since the previous version, as it detected them
        (`evaluate.found_under_other_labels`); None: no such images.
      labels_fitted: whether a base class finds every label's boxes
        (`choices.labels_the_base_finds`).
    """
    if self.trainable is not None:
      return self.trainable, 'set'
    other, found = other_labels or (0, 0)
    share = self.most_from_other_label_share
    if share is not None and found >= self.most_from_found_boxes and other >= share * found:
      return 'most', (f'the previous version named {other} of the {found} boxes it found on '
                      f'the images labeled since by another label (from {share:.0%} on)')
    many_small = self.most_from_images_of_small_objects
    if (many_small is not None and num_images >= many_small
        and self.small_objects(lowest_map_share)):
      return 'most', (f'{num_images} training images (from {many_small} on) and '
                      f'{lowest_map_share:.0%} of the boxes on the lowest feature map')
    few = self.most_for_new_labels(num_images)
    if few and not labels_fitted:
      return 'most', (f'{num_images} training images (under {self.most_under_images}) and a '
                      'label no base class finds: the blocks from stride 16 on learn it')
    if num_images >= self.upper_from_images:
      return 'upper', f'{num_images} training images (from {self.upper_from_images} on)'
    found = ', and a base class finds every label' if few else ''
    if self.small_objects(lowest_map_share):
      return 'upper', (f'{lowest_map_share:.0%} of the boxes fit the lowest feature map, '
                       f'which the top does not make{found}')
    return 'top', (f'{num_images} training images (under {self.upper_from_images}), '
                   f'{lowest_map_share:.0%} of the boxes on the lowest map{found}')

  def choose_many_images(self, lowest_map_share: float) -> tuple[int, str]:
    """From how many training images on the views stay close to the photos
    (`ViewsConfig.many`), and why: sooner for small objects."""
    views, small = self.views, self.views.small_objects_many_images
    share = f'{lowest_map_share:.0%} of the boxes on the lowest feature map'
    if small is not None and small < views.many_images and self.small_objects(lowest_map_share):
      return small, f'{share}: small objects, from {small} images on (else {views.many_images})'
    return views.many_images, share

  def choose_extractor_scale(self, num_images: int, lowest_map_share: float,
                             base_finds_none: bool = False, from_base: bool = True
                             ) -> tuple[float, str]:
    """The extractor's learning rate relative to the class head's, and why.

    base_finds_none: whether no base class finds any label's boxes
      (`choices.labels_the_base_finds`).
    from_base: whether the run starts from the base, not a previous iteration.
    """
    schedule = self.schedule
    if schedule.extractor_scale is not None:
      return schedule.extractor_scale, 'set'
    if (self.trainable == 'most' and base_finds_none and from_base
        and num_images >= schedule.new_labels_fast_from_images):
      return schedule.new_labels_extractor_scale, (
          f'"most" trains from the base, {num_images} training images (from '
          f'{schedule.new_labels_fast_from_images} on), and no base class finds any label')
    if self.views.many(num_images) and self.small_objects(lowest_map_share):
      return schedule.many_small_extractor_scale, (
          f'{num_images} training images (from {self.views.many_images} on) and '
          f'{lowest_map_share:.0%} of the boxes on the lowest feature map')
    return schedule.usual_extractor_scale, (
        f'{num_images} training images, {lowest_map_share:.0%} of the boxes on the lowest '
        f'feature map (faster from {self.views.many_images} images on where over '
        f'{self.upper_from_lowest_map_share:.0%} are)')

  def class_learning_rate(self, num_images: int, any_fresh_column: bool) -> float:
    """A column started from a fitting base class is already good and one
    image overfits it at 5e-3, while a fresh column needs the larger rate;
    more images tolerate more (benchmarks/results/choices.md)."""
    if self.schedule.learning_rate is not None:
      return self.schedule.learning_rate
    if any_fresh_column or self.warm_start.restore == 'none':
      return 5e-3
    return min(5e-3, 1e-3 * math.sqrt(num_images))

  def box_learning_rate_scale(self, num_images: int) -> float:
    """The restored box head stays frozen on one or two images and moves gently
    on more (benchmarks/results/choices.md); a fresh one has everything to learn."""
    if self.schedule.box_scale is not None:
      return self.schedule.box_scale
    if 'box_head' not in self.warm_start.restored_parts():
      return 1.0
    return 0.0 if num_images < 3 else 0.1


def _replace(config, field: str, value):
  if field not in {f.name for f in dataclasses.fields(config)}:
    raise ValueError(f'{type(config).__name__} has no field {field!r}')
  return dataclasses.replace(config, **{field: value})


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """The .tflite files: post-processing inside the graph (TFLite_Detection_PostProcess)."""

  max_detections: int = 100
  # Candidates below this score never reach NMS (low, so evaluation sees the tail).
  nms_score_threshold: float = 0.01
  nms_iou_threshold: float = NMS_IOU_THRESHOLD
  # A box conv's weights beyond this x their output channel's 99th percentile
  # get a conv of their own (0: never), so int8 keeps the others' precision
  # (`export.split_box_head`; why: benchmarks/results/choices.md).
  box_weight_outlier_ratio: float = 4.0
  # Box size codes are bounded below where every box is under this many pixels,
  # centre codes a whole anchor off (0: unbounded), so that empty anchors'
  # degenerate codes do not coarsen int8's step for the real ones
  # (`export.code_floors`; why: benchmarks/results/choices.md).
  box_floor_px: float = 1.0
  # Class logits are bounded below here (a score of 0.0003, which never passes
  # `nms_score_threshold`) and the background column, which the post-processing
  # skips, sits at the bound, so that the one int8 range all logits share spans
  # the scores that matter (`export.bounded_class_scores`; why:
  # benchmarks/results/choices.md). None: unbounded.
  min_class_logit: float | None = -8.0
  # Inputs that calibrate the int8 model: the project's training views, each
  # image as it is first, then its augmented views while there are fewer images
  # than twice `calibration_images` ('originals': the images as they are only).
  # Chosen from twice as many, leaving out those whose activations reach
  # `calibration_outlier_ratio` x the median (`export.calibration_inputs`),
  # when they are rare: at most `calibration_outlier_share` of them (more
  # reach that level in the data's own views, zoom-outs or a whole photo's,
  # and clipping it cost few-shot raccoon models 0.02-0.05). 32 scored as 64
  # did on four data sets and converts ~3 s faster (why all four:
  # benchmarks/results/choices.md).
  calibration_images: int = 32
  calibration_views: str = 'all'
  calibration_outlier_ratio: float = 3.0
  calibration_outlier_share: float = 1 / 16

  def __post_init__(self):
    if self.calibration_views not in ('all', 'originals'):
      raise ValueError(f'calibration_views must be all or originals, not {self.calibration_views!r}')
    if (self.min_class_logit is not None
        and 1 / (1 + math.exp(-self.min_class_logit)) >= self.nms_score_threshold):
      raise ValueError(f'min_class_logit {self.min_class_logit} would change scores that '
                       f'pass nms_score_threshold {self.nms_score_threshold}')
