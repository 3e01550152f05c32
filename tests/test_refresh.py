"""The refresh's own rules, without Label Studio (the end-to-end tests drive a real one)."""

from __future__ import annotations

import threading

from backend.refresh import NEW_VERSION, RefreshQueue, RefreshStatus, StatusFile, _has_version, _pages


def test_a_task_has_a_version_only_when_one_of_its_predictions_is_exactly_it():
  assert _has_version({'predictions_model_versions': ['fewshot-ssd-v1']}, 'fewshot-ssd-v1')
  assert not _has_version({'predictions_model_versions': ['fewshot-ssd-v10']}, 'fewshot-ssd-v1')
  assert _has_version({'predictions_model_versions': 'fewshot-ssd-v2,fewshot-ssd-v1'},
                      'fewshot-ssd-v1')  # SQLite joins them
  assert _has_version({'predictions': [{'model_version': 'fewshot-ssd-v1'}]}, 'fewshot-ssd-v1')
  assert not _has_version({'predictions': []}, 'fewshot-ssd-v1')
  assert not _has_version({}, 'fewshot-ssd-v1')


def test_tasks_go_a_page_at_a_time_without_reading_ahead():
  read = []

  def tasks():
    for i in range(250):
      read.append(i)
      yield {'id': i}
  pages = _pages(tasks())
  assert [t['id'] for t in next(pages)] == list(range(100))
  assert len(read) == 100
  assert [len(page) for page in pages] == [100, 50]


def test_the_status_file_reads_back_what_was_written_and_idle_when_missing(tmp_path):
  file = StatusFile(tmp_path, 7)
  assert file.read() == RefreshStatus()
  file.write(RefreshStatus(state='running', kind=NEW_VERSION, pushed=3))
  assert file.read() == RefreshStatus(state='running', kind=NEW_VERSION, pushed=3)
  file.path.write_text('{not json')
  assert file.read().state == 'idle'


class _Refresher:
  """Records runs; the first one waits for `release` so requests pile up behind it."""

  def __init__(self, status_dir):
    self.status_dir = status_dir
    self.runs = []
    self.started, self.release = threading.Event(), threading.Event()

  def run(self, project, tasks):
    self.started.set()
    self.release.wait(10)
    self.runs.append((project, None if tasks is None else [t['id'] for t in tasks]))


def test_new_version_requests_coalesce_while_waiting_and_late_tasks_queue(tmp_path):
  refresher = _Refresher(tmp_path)
  queue = RefreshQueue(refresher)
  assert queue.request(1) == 'queued'
  assert refresher.started.wait(10)  # runs, held
  assert queue.request(1) == 'queued'  # waits
  assert queue.request(1) == 'coalesced'
  assert queue.request(2) == 'queued'
  assert queue.request(1, [{'id': 5}]) == 'queued'
  assert StatusFile(tmp_path, 1).read().state == 'queued'
  refresher.release.set()
  assert queue.wait_idle(10)
  assert refresher.runs == [(1, None), (1, None), (2, None), (1, [5])]


def test_late_tasks_already_queued_or_running_are_not_queued_again(tmp_path):
  """Retrieve Predictions pressed again while the first press's late tasks are completing."""
  refresher = _Refresher(tmp_path)
  queue = RefreshQueue(refresher)
  assert queue.request(1, [{'id': 5}, {'id': 6}]) == 'queued'
  assert refresher.started.wait(10)  # running, held
  assert queue.completing(1) == {5, 6}
  assert queue.request(1, [{'id': 6}, {'id': 7}, {'id': 'x'}, {}]) == 'queued'  # only 7 is new
  assert queue.request(1, [{'id': 5}, {'id': 7}]) == 'coalesced'
  assert queue.completing(1) == {5, 6, 7} and queue.completing(2) == set()
  refresher.release.set()
  assert queue.wait_idle(10)
  assert refresher.runs == [(1, [5, 6]), (1, [7])]
  assert queue.completing(1) == set()
  assert queue.request(1, [{'id': 5}]) == 'queued'  # done: a later press may ask again
  assert queue.request(3, [{'id': 'x'}]) == 'coalesced' and 3 not in queue._late  # pylint: disable=protected-access
