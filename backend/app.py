"""The Flask app: Label Studio's ML-backend protocol (label-studio-ml 2.x) plus artifacts.

`create_app(settings)` builds a fresh app (tests build one each); gunicorn runs
`backend.app:create_app()`, which reads the environment. Every error is JSON.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import threading
import time

from flask import Blueprint, Flask, current_app, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from backend import diagnostics
from backend.errors import BackendError
from backend.images import ImageFetcher
from backend.jobs import TrainingQueue
from backend.label_config import parse_label_config
from backend.predictor import Predictor
from backend.refresh import RefreshQueue, Refresher
from backend.settings import Settings, configure_logging
from backend.store import ModelStore, project_key, sha256_file
from backend.training import train_project

log = logging.getLogger(__name__)
MODEL_CLASS = 'FewShotSSD'

routes = Blueprint('ml_backend', __name__)


def _services():
  return current_app.extensions['fewshot']


def _parsed_body():
  """The request's JSON, or None when there is none; hostile bodies are a 400.

  Raises:
    BackendError(400): not JSON, or nested deeper than Python's parser goes.
  """
  data = request.get_data(cache=True)
  if not data.strip():
    return None
  try:
    return json.loads(data)
  except RecursionError:
    raise BackendError(400, 'the JSON body is nested too deeply') from None
  except ValueError:
    raise BackendError(400, 'the request body must be a JSON object; it is not valid JSON') from None


def _json_body() -> dict:
  body = _parsed_body()
  if not isinstance(body, dict):
    raise BackendError(400, 'the request body must be a JSON object')
  return body


def _project_from(body: dict) -> int:
  if body.get('project') is None:
    raise BackendError(400, 'missing "project" (the Label Studio project id)')
  return project_key(body['project'])


@routes.get('/')
@routes.get('/health')
def health():
  return jsonify(status='UP', model_class=MODEL_CLASS)


@routes.post('/setup')
def setup():
  """Label Studio calls this before every predict: answer fast, with the current version."""
  project = _project_from(_json_body())
  version = _services()['store'].current(project)
  _services()['diagnostics'].on_connect(project)  # in the background, to the log
  return jsonify(model_version=version.name if version else 'none')


@routes.get('/diagnose')
def diagnose():
  """Can this backend reach Label Studio, use its key, read the project and one image? With
  the fix for what fails (`?project=<id>` for the last two)."""
  raw = request.args.get('project')
  project = project_key(raw) if raw else None
  services = _services()
  checks = diagnostics.diagnose(current_app.config['SETTINGS'], services['fetcher'], project)
  return jsonify(ok=all(c.ok for c in checks), checks=[dataclasses.asdict(c) for c in checks])


@routes.post('/predict')
def predict():
  body = _json_body()
  tasks = body.get('tasks')
  if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
    raise BackendError(400, '"tasks" must be a list of task objects')
  project = _project_from(body)
  target = parse_label_config(body.get('label_config') or '')
  started = time.monotonic()
  settings: Settings = current_app.config['SETTINGS']
  # What is left out is completed through the API, when the backend can reach it.
  completing = _services()['refresh'].completing(project)
  at_most = settings.predict_max_answered if settings.refreshes else None
  results = _services()['predictor'].predict(project, tasks, target, completing, at_most)
  _services()['counters'].add('predicted_tasks', len(tasks))
  late = [task for task, result in zip(tasks, results) if 'result' not in result]
  log.info('Project %s: predicted %d tasks in %.2f s with %s; answered %d, %d left for later',
           project, len(tasks), time.monotonic() - started,
           results[0]['model_version'] if results else '-', len(tasks) - len(late), len(late))
  if late:
    _complete_later(project, late)
  return jsonify(results=results)


def _complete_later(project: int, late: list[dict]) -> None:
  """Predicts in the background, through the API, the tasks a /predict left out."""
  settings: Settings = current_app.config['SETTINGS']
  if settings.refreshes:
    _services()['refresh'].request(project, late)
  else:
    log.warning('Project %s: %d tasks left for the next Retrieve Predictions (completing them in '
                'the background needs REFRESH_PREDICTIONS, LABEL_STUDIO_URL and '
                'LABEL_STUDIO_API_KEY)', project, len(late))


ANNOTATION_EVENTS = ('ANNOTATION_CREATED', 'ANNOTATION_UPDATED', 'ANNOTATIONS_DELETED')


def _webhook_project(body: dict) -> int:
  project = body.get('project')
  if isinstance(project, dict):
    project = project.get('id')
  if project is None and isinstance(body.get('annotation'), dict):
    project = body['annotation'].get('project')
  if project is None:
    raise BackendError(400, 'the event names no project (project.id)')
  return project_key(project)


@routes.post('/webhook')
def webhook():
  """Label Studio's events: START_TRAINING and annotation changes queue training.

  Answers at once (Label Studio waits 1 s for annotation events); the
  training runs in the background.
  """
  body = _json_body()
  action = body.get('action')
  if not isinstance(action, str):
    raise BackendError(400, 'missing "action"')
  _services()['counters'].add('webhooks')
  queue = _services()['queue']
  if action == 'START_TRAINING':
    outcome = queue.trigger(_webhook_project(body), 'START_TRAINING')
  elif action in ANNOTATION_EVENTS:
    settings: Settings = current_app.config['SETTINGS']
    if settings.train_every_n_annotations == 0:
      outcome = 'ignored (TRAIN_EVERY_N_ANNOTATIONS=0)'
    else:
      outcome = queue.annotation_event(_webhook_project(body), action)
  else:
    outcome = 'ignored'
  return jsonify(status='ok', action=action, training=outcome)


@routes.get('/train/status')
def train_status():
  project = project_key(request.args.get('project', ''))
  status = _services()['queue'].status_of(project)
  current = _services()['store'].current(project)
  status['current_version'] = current.name if current else None
  status['refresh'] = _services()['refresh'].refresher.status_of(project).to_dict()
  return jsonify(status)


@routes.get('/versions')
def versions():
  body = _parsed_body()
  project = body.get('project') if isinstance(body, dict) else None
  project = project_key(project if project is not None else request.args.get('project', ''))
  store = _services()['store']
  names = [v.name for v in store.versions(project)]
  base = store.base_version()
  return jsonify(versions=([base.name] if base else []) + names)


@routes.get('/metrics')
def metrics():
  services = _services()
  return jsonify(**services['counters'].snapshot(),
                 loaded_models=services['predictor'].detectors.loaded())


@routes.get('/artifacts/<project>')
def artifact_listing(project):
  project = project_key(project)
  return jsonify(project=project, versions=_services()['store'].listing(project))


@routes.get('/artifacts/<project>/<version>/<filename>')
def artifact(project, version, filename):
  path = _services()['store'].artifact(project_key(project), version, filename)
  digest = sha256_file(path)
  response = send_file(path, as_attachment=filename.endswith('.tflite'), etag=digest,
                       download_name=filename, max_age=0)
  response.headers['X-Content-SHA256'] = digest
  return response


# Open without credentials, so a container's health check works with auth on;
# they answer only that the service is up.
OPEN_PATHS = ('/', '/health')


def _check_basic_auth():
  settings: Settings = current_app.config['SETTINGS']
  if not settings.auth_enabled or request.path in OPEN_PATHS:
    return None
  auth = request.authorization
  ok = (auth is not None and auth.type == 'basic'
        and hmac.compare_digest((auth.username or '').encode(), settings.basic_auth_user.encode())
        and hmac.compare_digest((auth.password or '').encode(), settings.basic_auth_pass.encode()))
  if ok:
    return None
  response = jsonify(status=401, error='authentication required (basic auth)')
  response.status_code = 401
  response.headers['WWW-Authenticate'] = 'Basic realm="fewshot-ssd"'
  return response


def _handle_backend_error(error: BackendError):
  response = jsonify(error.to_dict())
  response.status_code = error.status
  return response


def _handle_http_exception(error: HTTPException):
  response = jsonify(status=error.code, error=f'{error.name}: {error.description}')
  response.status_code = error.code or 500
  return response


def _handle_unexpected(error: Exception):
  log.exception('Unhandled error on %s %s', request.method, request.path)
  response = jsonify(status=500, error=f'internal error ({type(error).__name__}); see the backend log')
  response.status_code = 500
  return response


class _Counters:
  """Request counters for /metrics, safe across threads."""

  def __init__(self):
    self._counts = {'predicted_tasks': 0, 'webhooks': 0}
    self._lock = threading.Lock()

  def add(self, key: str, amount: int = 1) -> None:
    with self._lock:
      self._counts[key] += amount

  def snapshot(self) -> dict:
    with self._lock:
      return dict(self._counts)


def _training_queue(settings: Settings, store: ModelStore, fetcher: ImageFetcher,
                    refresh: RefreshQueue):
  """The embedded in-process queue, or RQ workers through Redis (TRAINING_QUEUE=redis)."""
  if settings.training_queue == 'redis':
    from backend.redis_queue import RedisTrainingQueue
    return RedisTrainingQueue(settings)

  def run_job(project, progress):
    def published(version):  # the served file is there: refresh while the other one converts
      if settings.refreshes:
        refresh.request(project)
    return train_project(settings, store, fetcher, project, progress, published)
  return TrainingQueue(run_job, settings.model_dir / 'locks',
                       settings.train_every_n_annotations or 1, settings.train_debounce_s,
                       warm_up=_warm_up_training if settings.train_warm_up else None)


def _warm_up_training() -> None:
  """TensorFlow imported and the augmentation traced before the first job, as an RQ
  worker does before it registers (`pipeline.warm_up`)."""
  from model import pipeline
  pipeline.warm_up()


def create_app(settings: Settings | None = None) -> Flask:
  """The WSGI app. Reads the environment only when no settings are given."""
  settings = settings or Settings.from_env()
  configure_logging(settings.log_level)
  app = Flask(__name__)
  app.config['SETTINGS'] = settings
  app.config['MAX_CONTENT_LENGTH'] = settings.max_request_bytes  # larger bodies get a 413
  store = ModelStore(settings.model_dir, settings.model_variant)
  fetcher = ImageFetcher(settings)
  predictor = Predictor(store, fetcher, settings.score_threshold, settings.fetch_concurrency,
                        settings.predict_deadline_s)
  refresh = RefreshQueue(Refresher(settings, store, predictor))
  app.extensions['fewshot'] = {
      'store': store,
      'queue': _training_queue(settings, store, fetcher, refresh),
      'predictor': predictor,
      'refresh': refresh,
      'fetcher': fetcher,
      'diagnostics': diagnostics.ConnectDiagnostics(settings, fetcher),
      'counters': _Counters(),
  }
  app.before_request(_check_basic_auth)
  app.register_blueprint(routes)
  app.register_error_handler(BackendError, _handle_backend_error)
  app.register_error_handler(HTTPException, _handle_http_exception)
  app.register_error_handler(Exception, _handle_unexpected)
  return app
