"""`python -m model predict --base`: the base SSD detects on its own."""

import json
import os
import subprocess
import sys

import pytest

from model.boxes import iou_xyxy
from model.images import load_image
from model.checkpoint_detector import CheckpointDetector
from tests.conftest import RACCOON, REPO
from tests.synthetic import save_jpeg, textured_background

RACCOON_1_BOX = (81, 88, 522, 408)  # annotated in ../shared/datasets/raccoon


def run_predict(model_dir, *args):
  env = dict(os.environ, MODEL_DIR=str(model_dir))
  return subprocess.run([sys.executable, '-m', 'model', 'predict', '--base', *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_prints_one_json_list_in_image_order(base_paths, tmp_path):
  # Stored 120x80 but tagged "rotate 90°": upright it is 80 wide, 120 high.
  rotated = save_jpeg(textured_background(120, 80, seed=3), tmp_path / 'rotated.jpg',
                      orientation=6)
  plain = save_jpeg(textured_background(200, 150, seed=4), tmp_path / 'plain.jpg')
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'not a jpeg at all')

  result = run_predict(base_paths.model_dir, rotated, broken, plain)

  assert result.returncode == 1, result.stderr  # one image was unreadable
  assert 'broken.jpg' in result.stderr
  entries = json.loads(result.stdout)
  assert [e['image'] for e in entries] == [str(rotated), str(broken), str(plain)]
  assert (entries[0]['width'], entries[0]['height']) == (80, 120)
  assert (entries[2]['width'], entries[2]['height']) == (200, 150)
  assert entries[1]['detections'] == [] and entries[1]['error']
  for entry in (entries[0], entries[2]):
    scores = [d['score'] for d in entry['detections']]
    assert scores == sorted(scores, reverse=True)
    for detection in entry['detections']:
      assert detection['score'] >= 0.25
      x1, y1, x2, y2 = detection['box']
      assert 0 <= x1 <= x2 <= entry['width'] and 0 <= y1 <= y2 <= entry['height']


def test_min_score_filters_detections(base_model, tmp_path):
  model, labels = base_model
  from model.config import PostprocessConfig
  image = load_image(save_jpeg(textured_background(300, 200, seed=5), tmp_path / 'a.jpg'))
  loose = CheckpointDetector(model, labels[1:], PostprocessConfig(min_score=0.01)).detect([image])[0]
  strict = CheckpointDetector(model, labels[1:], PostprocessConfig(min_score=0.5)).detect([image])[0]
  assert len(loose) > len(strict)
  assert all(d.score >= 0.01 for d in loose) and all(d.score >= 0.5 for d in strict)
  assert all(d.label != '???' for d in loose)  # the background is never a detection


@pytest.mark.skipif(not RACCOON.is_dir(), reason='../shared/datasets/raccoon is not on this machine')
def test_base_finds_the_raccoon_as_a_dog(base_paths):
  result = run_predict(base_paths.model_dir, RACCOON / 'images' / 'raccoon-1.jpg')
  assert result.returncode == 0, result.stderr
  (entry,) = json.loads(result.stdout)
  assert (entry['width'], entry['height']) == (650, 417)
  best = entry['detections'][0]
  assert best['label'] == 'Dog'
  assert 0.25 <= best['score'] <= 0.4
  assert iou_xyxy(best['box'], RACCOON_1_BOX) >= 0.8


def test_missing_base_and_no_way_to_fetch_it_fails_clearly(tmp_path):
  env = dict(os.environ, MODEL_DIR=str(tmp_path / 'empty'), PATH=str(tmp_path))
  image = save_jpeg(textured_background(64, 64), tmp_path / 'x.jpg')
  result = subprocess.run([sys.executable, '-m', 'model', 'predict', '--base', str(image)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stdout == ''
  assert 'npm' in result.stderr and '--from' in result.stderr
