"""Augmented views keep their boxes on the objects: crops, flips, colour and zoom-out."""

import numpy as np
import tensorflow as tf
from PIL import Image

from model.augment import Augmenter, make_views, shared_augmenter
from model.boxes import iou_xyxy
from model.config import TrainConfig, ViewsConfig
from model.images import pixels_to_input

SIZE = 96


def red_square_image():
  """A 160x120 grey image with a red square at x 100..140, y 20..60."""
  pixels = np.full((120, 160, 3), 128, np.uint8)
  pixels[20:60, 100:140] = (230, 20, 20)
  box = np.array([[20 / 120, 100 / 160, 60 / 120, 140 / 160]], np.float32)
  return Image.fromarray(pixels), box


def redness_inside(view, box):
  """Mean (red - green) of the model input inside `box` (normalized yxyx), in [-2, 2]."""
  y1, x1, y2, x2 = (np.array(box) * SIZE).round().astype(int)
  inside = view[y1 + 1:y2 - 1, x1 + 1:x2 - 1]
  return float(np.mean(inside[..., 0] - inside[..., 1]))


def input_views(*args, **kwargs):
  """`make_views`, each view's pixels as the model input (they come as uint8)."""
  views = make_views(*args, **kwargs)
  assert all(pixels.dtype == np.uint8 for pixels, _, _ in views)
  return [(pixels_to_input(pixels), boxes, ids) for pixels, boxes, ids in views]


def test_every_view_has_its_box_on_the_object():
  tf.random.set_seed(3)
  image, box = red_square_image()
  views = input_views(image, box, np.array([1], np.int32), 12, SIZE, zoom_outs=5,
                      shrink=ViewsConfig(mosaic=0.0))
  assert len(views) == 17
  for index, (view, boxes, ids) in enumerate(views):
    assert view.shape == (SIZE, SIZE, 3) and -1.0 <= view.min() and view.max() <= 1.0
    assert list(ids) == [1] and boxes.shape == (1, 4)
    assert np.all(boxes >= 0) and np.all(boxes <= 1), index
    assert redness_inside(view, boxes[0]) > 1.0, index


def test_an_image_without_boxes_gives_every_view_jittered_whole():
  tf.random.set_seed(4)
  image, _ = red_square_image()
  views = input_views(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int32), 6, SIZE,
                      zoom_outs=2)
  assert len(views) == 8
  for view, boxes, ids in views:
    assert view.shape == (SIZE, SIZE, 3) and boxes.shape == (0, 4) and ids.shape == (0,)
  # The random views are the whole image (no crop without boxes): the square stays in the
  # top right, or the top left when mirrored.
  for view, _, _ in views[2:6]:
    top_right, top_left = view[20:44, 62:82], view[20:44, 14:34]
    red = max(float(np.mean(part[..., 0] - part[..., 1])) for part in (top_right, top_left))
    assert red > 1.0


def is_on_canvas(view):
  """A shrunk image sits in a top corner: the bottom rows are canvas, black (-1 at the model
  input) but for the colour jitter, and even."""
  bottom = view[-2:]
  return float(bottom.mean()) < -0.7 and float(bottom.std()) < 0.02


def test_zoom_outs_come_after_the_crops_and_make_the_object_smaller():
  tf.random.set_seed(5)
  image, box = red_square_image()
  original_area = (box[0, 2] - box[0, 0]) * (box[0, 3] - box[0, 1])
  views = input_views(image, box, np.array([1], np.int32), 8, SIZE, zoom_outs=4,
                      shrink=ViewsConfig(mosaic=0.0))
  assert not any(is_on_canvas(view) for view, _, _ in views[:8])
  for view, boxes, _ in views[8:]:
    assert is_on_canvas(view)
    area = (boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1])
    assert 0.4 ** 2 * original_area * 0.9 <= area <= 0.9 ** 2 * original_area * 1.1


def test_mosaics_tile_four_crops_with_each_box_on_its_object():
  tf.random.set_seed(6)
  image, box = red_square_image()
  views = input_views(image, box, np.array([1], np.int32), 8, SIZE, zoom_outs=4,
                      shrink=ViewsConfig(mosaic=0.5))
  assert len(views) == 12
  assert all(is_on_canvas(view) for view, _, _ in views[8:10])  # zoom-outs first
  for view, boxes, ids in views[10:]:
    assert not is_on_canvas(view) and list(ids) == [1] * 4 and boxes.shape == (4, 4)
    assert np.all(boxes >= 0) and np.all(boxes <= 1)
    xyxy = boxes[:, [1, 0, 3, 2]]
    assert all(iou_xyxy(xyxy[i], xyxy[j]) == 0 for i in range(4) for j in range(i))
    for tile_box in boxes:  # one per quarter of the grid, none overlapping another
      if min(tile_box[2] - tile_box[0], tile_box[3] - tile_box[1]) * SIZE >= 6:
        assert redness_inside(view, tile_box) > 1.0


def test_an_object_most_crops_cut_is_zoomed_out_whole_instead_of_tiled():
  tf.random.set_seed(6)
  pixels = np.full((120, 160, 3), 128, np.uint8)
  pixels[10:110, 20:140] = (230, 20, 20)  # a box over half the image's height and width
  box = np.array([[10 / 120, 20 / 160, 110 / 120, 140 / 160]], np.float32)
  views = input_views(Image.fromarray(pixels), box, np.array([1], np.int32), 8, SIZE,
                      zoom_outs=4, shrink=ViewsConfig(mosaic=1.0, mosaic_max_side=0.5))
  assert len(views) == 12
  assert all(len(boxes) == 1 for _, boxes, _ in views)  # a mosaic holds one per crop

def test_no_zoom_out_unless_asked():
  tf.random.set_seed(5)
  image, box = red_square_image()
  for view, _, _ in input_views(image, box, np.array([1], np.int32), 8, SIZE):
    assert not np.any(np.all(view < -0.8, axis=-1))  # grey and red only: no black canvas


def test_zoom_outs_are_added_as_a_fraction_of_the_crops():
  config = TrainConfig()
  assert config.views.per_image(5) == 16 and config.views.zoom_outs_per_image(5) == 7
  assert config.views.per_image(60) == 8 and config.views.zoom_outs_per_image(60) == 3
  assert config.with_overrides({'views.zoom_out': 0.0}).views.zoom_outs_per_image(5) == 0



def test_int8_calibration_takes_every_image_as_it_is_before_any_augmented_view():
  from model.views import CachedViews
  views = CachedViews([np.zeros((6, 1), np.float16)], np.zeros((6, 1), np.int32),
                      np.zeros((6, 1, 4), np.float32), per_image=3)
  assert views.originals_first().tolist() == [0, 3, 1, 4, 2, 5]


def test_the_shared_augmenter_draws_what_a_new_one_draws_under_the_same_seed():
  """Iterations of one process share the traced ops; each run's seed still decides its views."""
  image, box = red_square_image()

  def views(seed, augmenter=None):
    tf.random.set_seed(seed)
    made = make_views(image, box, np.array([1], np.int32), 5, SIZE, zoom_outs=2,
                      augmenter=augmenter or shared_augmenter(0.3))
    return np.stack([pixels for pixels, _, _ in made]), np.concatenate([b for _, b, _ in made])

  first = views(5)
  assert shared_augmenter(0.3) is shared_augmenter(0.3)
  other_seed = views(6)
  for seed, made in ((5, first), (5, views(5)), (6, other_seed)):
    expected = views(seed, Augmenter(0.3))
    np.testing.assert_array_equal(made[0], expected[0])
    np.testing.assert_array_equal(made[1], expected[1])
  assert not np.array_equal(first[0], other_seed[0])
