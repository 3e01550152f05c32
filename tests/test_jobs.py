"""The training queue: one job per project, coalesced triggers, failures kept visible."""

import threading
import time

from backend.jobs import ProjectLock, TrainingQueue


class Recorder:
  """A stand-in training job that records its runs and can be held open."""

  def __init__(self, fail=False):
    self.runs = []
    self.release = threading.Event()
    self.started = threading.Event()
    self.fail = fail

  def __call__(self, project, progress):
    self.runs.append(project)
    self.started.set()
    self.release.wait(10)
    if self.fail:
      raise RuntimeError('disk full')
    return f'fewshot-ssd-v{len(self.runs)}'


def test_triggers_during_a_run_coalesce_into_one_follow_up(tmp_path):
  job = Recorder()
  queue = TrainingQueue(job, tmp_path)
  assert queue.trigger(1, 'button') == 'queued'
  assert job.started.wait(5)
  outcomes = [queue.trigger(1, 'button') for _ in range(3)]
  assert outcomes == ['follow-up'] * 3
  assert queue.status[1].state == 'running'
  job.release.set()
  assert queue.wait_idle(10)
  assert job.runs == [1, 1]
  assert queue.status[1].state == 'idle' and queue.status[1].model_version == 'fewshot-ssd-v2'


def test_projects_queue_behind_each_other_and_duplicates_merge(tmp_path):
  job = Recorder()
  queue = TrainingQueue(job, tmp_path)
  queue.trigger(1, 'a')
  assert job.started.wait(5)
  assert queue.trigger(2, 'b') == 'queued'
  assert queue.trigger(2, 'b again') == 'coalesced'
  job.release.set()
  assert queue.wait_idle(10)
  assert job.runs == [1, 2]


def test_the_worker_thread_warms_up_before_its_first_job_and_survives_a_failed_warm_up(tmp_path):
  events, warming = [], threading.Event()

  def warm_up():
    warming.wait(5)
    events.append('warm')
  job = Recorder()
  job.release.set()
  queue = TrainingQueue(lambda project, progress: events.append('job') or job(project, progress),
                        tmp_path, warm_up=warm_up)
  queue.trigger(1, 'button')  # queued while the thread warms up
  assert not job.started.wait(0.3)
  warming.set()
  assert queue.wait_idle(10)
  assert events == ['warm', 'job'] and queue.status[1].state == 'idle'

  def broken():
    raise ImportError('no TensorFlow here')
  other = Recorder()
  other.release.set()
  queue = TrainingQueue(other, tmp_path / 'other', warm_up=broken)
  queue.trigger(2, 'button')
  assert queue.wait_idle(10)
  assert other.runs == [2] and queue.status[2].state == 'idle'


def test_a_failed_job_is_reported_and_the_queue_goes_on(tmp_path):
  job = Recorder(fail=True)
  job.release.set()
  queue = TrainingQueue(job, tmp_path)
  queue.trigger(3, 'x')
  assert queue.wait_idle(10)
  assert queue.status[3].state == 'failed'
  assert 'disk full' in queue.status[3].last_error
  job.fail = False
  queue.trigger(3, 'again')
  assert queue.wait_idle(10)
  assert queue.status[3].state == 'idle' and queue.status[3].last_error is None


def test_a_lock_folder_gone_bad_fails_the_job_but_not_the_queue(tmp_path):
  job = Recorder()
  job.release.set()
  (tmp_path / 'locks').write_text('a file where the lock folder must go')
  queue = TrainingQueue(job, tmp_path / 'locks')
  queue.trigger(4, 'x')
  assert queue.wait_idle(10)
  assert queue.status[4].state == 'failed' and 'training lock' in queue.status[4].last_error
  assert job.runs == []
  queue.lock_dir = tmp_path / 'fixed'
  queue.trigger(4, 'again')
  assert queue.wait_idle(10)
  assert queue.status[4].state == 'idle' and job.runs == [4]


def test_events_the_run_already_fetched_make_no_second_run(tmp_path):
  """Label some tasks, press Start Training: the annotation events' debounced
  trigger fires during that run, on data it already has, and must not train again."""
  job = Recorder()
  queue = TrainingQueue(job, tmp_path, every_n_annotations=1, debounce_s=0.3)
  queue.annotation_event(5, 'ANNOTATION_CREATED')
  time.sleep(0.05)
  queue.trigger(5, 'START_TRAINING')
  assert job.started.wait(5)
  time.sleep(0.6)  # the debounced trigger fires now, during the run
  job.release.set()
  assert queue.wait_idle(10)
  assert job.runs == [5]
  # An annotation made during a run does make one more.
  job.release.clear()
  queue.trigger(5, 'START_TRAINING')
  time.sleep(0.2)
  queue.annotation_event(5, 'ANNOTATION_UPDATED')
  time.sleep(0.6)
  job.release.set()
  assert queue.wait_idle(10)
  assert job.runs == [5, 5, 5]


def test_status_shows_the_stage_a_run_is_in_and_where_it_failed(tmp_path):
  entered, release = threading.Event(), threading.Event()

  def job(project, progress):
    progress('fetching')
    progress('make_views')
    entered.set()
    release.wait(10)
    raise RuntimeError('out of memory')

  queue = TrainingQueue(job, tmp_path)
  queue.trigger(8, 'button')
  assert entered.wait(5)
  assert queue.status_of(8)['state'] == 'running' and queue.status_of(8)['stage'] == 'make_views'
  release.set()
  assert queue.wait_idle(10)
  assert queue.status_of(8)['state'] == 'failed' and queue.status_of(8)['stage'] == 'make_views'


def test_annotation_events_are_counted_then_debounced(tmp_path):
  job = Recorder()
  job.release.set()
  queue = TrainingQueue(job, tmp_path, every_n_annotations=3, debounce_s=0.3)
  assert queue.annotation_event(5, 'ANNOTATION_CREATED').startswith('counted 1/3')
  queue.annotation_event(5, 'ANNOTATION_CREATED')
  queue.annotation_event(5, 'ANNOTATION_CREATED')
  time.sleep(0.1)
  assert job.runs == []  # still inside the quiet time
  assert queue.wait_idle(10)
  assert job.runs == [5]


def test_an_event_during_the_quiet_time_pushes_training_back(tmp_path):
  job = Recorder()
  job.release.set()
  queue = TrainingQueue(job, tmp_path, every_n_annotations=2, debounce_s=1.0)
  queue.annotation_event(6, 'ANNOTATION_CREATED')
  assert queue.annotation_event(6, 'ANNOTATION_CREATED').startswith('training in 1 s')
  time.sleep(0.6)
  # One event, fewer than N, but inside the wait: it restarts the wait.
  assert queue.annotation_event(6, 'ANNOTATION_UPDATED').startswith('training in 1 s')
  time.sleep(0.7)  # 1.3 s after the second event: the first wait would have fired
  assert job.runs == []
  assert queue.wait_idle(10)
  assert job.runs == [6]
  # Once it has fired, events count towards the next run afresh.
  assert queue.annotation_event(6, 'ANNOTATION_CREATED') == 'counted 1/2'


def test_fired_timers_and_projects_label_studio_does_not_know_leave_nothing_behind(tmp_path):
  from backend.errors import BackendError

  def job(project, progress):
    if project >= 100:
      raise BackendError(404, f'Label Studio answered HTTP 404 for project {project}')
    return 'fewshot-ssd-v1'
  queue = TrainingQueue(job, tmp_path, every_n_annotations=1, debounce_s=0.05)
  queue.MAX_REMEMBERED = 2
  for project in (1, 100, 101):
    queue.annotation_event(project, 'ANNOTATION_CREATED')
    assert queue.wait_idle(10)
  assert queue._timers == {}  # pylint: disable=protected-access
  assert sorted(path.name for path in tmp_path.iterdir()) == ['1.lock', '1.status.json']
  # The newest unknown ones keep their error in memory, for whoever asks why.
  assert sorted(queue.status) == [100, 101]
  assert 'HTTP 404 for project 101' in queue.status_of(101)['last_error']
  # Asking about any project id stores nothing.
  assert queue.status_of(12345)['state'] == 'idle' and sorted(queue.status) == [100, 101]


def test_every_worker_process_shows_the_status_of_the_one_that_trains(tmp_path):
  """Two gunicorn workers: A trains; B, asked for /train/status, reads what A writes."""
  job = Recorder()
  trainer, other = TrainingQueue(job, tmp_path), TrainingQueue(Recorder(), tmp_path)
  assert other.status_of(4)['state'] == 'idle'
  trainer.trigger(4, 'START_TRAINING')
  assert job.started.wait(5)
  seen = other.status_of(4)
  assert seen['state'] == 'running' and seen['started_at'] is not None
  job.release.set()
  assert trainer.wait_idle(10)
  seen = other.status_of(4)
  assert (seen['state'], seen['model_version'], seen['runs']) == ('idle', 'fewshot-ssd-v1', 1)


def test_a_status_left_running_by_a_dead_process_shows_as_failed(tmp_path):
  import json
  (tmp_path / '5.status.json').write_text(json.dumps(
      {'state': 'running', 'step': 30, 'total_steps': 300, 'started_at': 10.0, 'pid': 4321}))
  queue = TrainingQueue(Recorder(), tmp_path)
  # While some process holds the project's lock, the run is live.
  holder = ProjectLock(tmp_path / '5.lock')
  assert holder.acquire()
  assert queue.status_of(5)['state'] == 'running'
  holder.release()  # what the kernel does when the holder dies
  status = queue.status_of(5)
  assert status['state'] == 'failed' and 'pid 4321' in status['last_error']
  assert status['step'] == 30


def test_a_project_lock_is_exclusive(tmp_path):
  first, second = ProjectLock(tmp_path / '1.lock'), ProjectLock(tmp_path / '1.lock')
  assert first.acquire()
  assert not second.acquire()
  first.release()
  assert second.acquire()
  second.release()
