"""Reading images: EXIF orientation, model input, clear errors."""

import numpy as np
import pytest
from PIL import Image

from model.boxes import iou_xyxy, normalized_yxyx_to_pixel_xyxy
from model.images import ImageError, load_image, to_model_input
from tests.synthetic import save_jpeg, textured_background


def test_exif_orientation_is_applied(tmp_path):
  pixels = textured_background(120, 80)
  pixels[:10, :] = 255  # a white band along the stored top edge
  image = load_image(save_jpeg(pixels, tmp_path / 'r.jpg', orientation=6))
  assert image.size == (80, 120) and image.mode == 'RGB'
  # Orientation 6 turns the stored top edge into the upright right edge.
  upright = np.asarray(image, dtype=np.float32)
  assert upright[:, -5:].mean() > 230 > upright[:, :5].mean()


@pytest.mark.parametrize('suffix', ['jpg', 'png'])
def test_large_images_shrink_to_max_side_upright_and_like_a_full_decode(tmp_path, suffix):
  pixels = textured_background(2000, 1200, seed=3)  # stored 2000 wide, 1200 high
  pixels[:100, :] = 255  # the stored top edge: the upright right edge (orientation 6)
  path = save_jpeg(pixels, tmp_path / 'big.jpg', orientation=6)
  if suffix == 'png':  # no draft decoding for PNG: the resize alone
    path = tmp_path / 'big.png'
    Image.fromarray(pixels).save(path)
  small = load_image(path, max_side=500)
  full = load_image(path)
  expected = (300, 500) if suffix == 'jpg' else (500, 300)
  assert small.size == expected and small.mode == 'RGB'
  reference = np.asarray(full.resize(small.size, Image.Resampling.BICUBIC), np.float32)
  assert np.abs(np.asarray(small, np.float32) - reference).mean() < 4.0
  assert load_image(path, max_side=5000).size == full.size  # never enlarged


def test_model_input_is_square_and_scaled(tmp_path):
  image = load_image(save_jpeg(textured_background(90, 60), tmp_path / 'a.jpg'))
  x = to_model_input(image, 300)
  assert x.shape == (300, 300, 3) and x.dtype == np.float32
  assert -1.0 <= x.min() < x.max() <= 1.0


def test_grey_and_rgba_images_become_rgb(tmp_path):
  Image.new('L', (20, 10), 128).save(tmp_path / 'g.png')
  Image.new('RGBA', (20, 10), (1, 2, 3, 0)).save(tmp_path / 'a.png')
  assert load_image(tmp_path / 'g.png').mode == 'RGB'
  assert load_image(tmp_path / 'a.png').mode == 'RGB'


def test_unreadable_images_name_the_file(tmp_path):
  (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8 truncated')
  with pytest.raises(ImageError, match='bad.jpg'):
    load_image(tmp_path / 'bad.jpg')
  with pytest.raises(ImageError, match='no such file'):
    load_image(tmp_path / 'missing.png')


def test_decompression_bomb_is_refused(tmp_path):
  # A 1-bit PNG of 15000 x 15000 is tiny on disk but 225 megapixels decoded.
  Image.new('1', (15000, 15000)).save(tmp_path / 'bomb.png')
  with pytest.raises(ImageError, match='too large'):
    load_image(tmp_path / 'bomb.png')


def test_the_pixel_limit_is_checked_before_decoding(tmp_path):
  """14000 x 14000 is under Pillow's own bomb limit but over ours: refused from the header."""
  import resource
  Image.new('1', (14000, 14000)).save(tmp_path / 'wide.png')
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  with pytest.raises(ImageError, match='14000 x 14000 pixels, over the limit'):
    load_image(tmp_path / 'wide.png')
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: not decoded


def test_normalized_boxes_to_pixels_clip_to_the_image():
  boxes = normalized_yxyx_to_pixel_xyxy(np.array([[0.1, 0.2, 0.5, 1.2]]), width=200, height=100)
  np.testing.assert_allclose(boxes, [[40, 10, 200, 50]])


def test_iou():
  assert iou_xyxy((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert iou_xyxy((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
  assert iou_xyxy((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
