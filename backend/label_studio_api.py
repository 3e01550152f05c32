"""The backend's calls to Label Studio's API, through label-studio-sdk.

One `LabelStudioAPI` per job: it reads a project's config and its tasks page by
page (a Data Manager query picks annotated or unannotated ones, so memory
stays flat with project size), pushes predictions, and makes a project show
a model version. The SDK handles both kinds of API key: a personal access
token (refreshed on its real expiry, thread-safely) or a legacy token.
Every API failure becomes a BackendError that names the project.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Iterator

from backend.errors import BackendError
from backend.image_sources import shown_url
from backend.settings import Settings

log = logging.getLogger(__name__)


def _total_annotations(operator: str) -> dict:
  """A Data Manager query on the number of a task's annotations."""
  return {'filters': {'conjunction': 'and', 'items': [{
      'filter': 'filter:tasks:total_annotations', 'operator': operator, 'type': 'Number',
      'value': 0}]}}


ANNOTATED_TASKS = _total_annotations('greater')
UNANNOTATED_TASKS = _total_annotations('equal')


def tasks_with_ids(ids) -> dict:
  """A Data Manager query for the tasks with these ids (those deleted since drop out)."""
  return {'selectedItems': {'all': False, 'included': list(ids)}}


PAGE_SIZE = 100
# Label Studio imports predictions in batches of 500; one request stays well inside it.
PUSH_CHUNK = 100


class LabelStudioAPI:
  """Label Studio at LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY.

  Raises:
    BackendError(503): either setting missing.
  """

  def __init__(self, settings: Settings):
    if not settings.label_studio_configured:
      raise BackendError(503, 'this needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to reach '
                              "the project's tasks in Label Studio")
    from label_studio_sdk.client import LabelStudio
    self.url = settings.label_studio_url
    with self._errors('the API key'):  # an expired personal access token fails here
      self.client = LabelStudio(base_url=self.url, api_key=settings.label_studio_api_key)

  def auth_header(self) -> dict[str, str]:
    """The Authorization header the SDK sends now (an access token it keeps fresh)."""
    with self._errors('the API key'):
      # The SDK keeps no public accessor for it; its client wrapper owns the refresh.
      return {'Authorization': self.client._client_wrapper.get_headers()['Authorization']}  # pylint: disable=protected-access

  def label_config(self, project: int) -> str:
    with self._errors(f'project {project}'):
      return self.client.projects.get(id=project).label_config

  def tasks(self, project: int, query: dict) -> Iterator[dict]:
    """The project's tasks that `query` (a Data Manager query) selects, as plain dicts, paged."""
    with self._errors(f'project {project}'):
      for task in self.client.tasks.list(project=project, fields='all', query=json.dumps(query),
                                         page_size=PAGE_SIZE):
        yield task if isinstance(task, dict) else task.model_dump(mode='json')

  def push_predictions(self, project: int, predictions: list[dict]) -> None:
    """Stores predictions (`{"task", "result", "score", "model_version"}`) on their tasks."""
    from label_studio_sdk import PredictionRequest
    for start in range(0, len(predictions), PUSH_CHUNK):
      chunk = [PredictionRequest(**p) for p in predictions[start:start + PUSH_CHUNK]]
      with self._errors(f'project {project}'):
        self.client.projects.import_predictions(id=project, request=chunk)

  def show_version(self, project: int, version: str) -> None:
    """Makes the project's editor and Data Manager use `version`'s predictions.

    Lists the project's ML backends first: Label Studio asks each for /setup
    then, and so learns the backend's new version. Then sets the project's
    model version (Settings > Annotation > "Use predictions to prelabel
    tasks") to `version`: Label Studio 1.23 shows that version's stored
    predictions in the editor, and its "Prediction score" column averages
    the scores of that version only (choosing the backend by its title
    there, "live", leaves that column empty unless a feature flag is on).
    """
    with self._errors(f'project {project}'):
      self.client.ml.list(project=project)
      self.client.projects.update(id=project, model_version=version)

  @contextlib.contextmanager
  def _errors(self, what: str):
    from label_studio_sdk.core.api_error import ApiError
    try:
      yield
    except BackendError:
      raise
    except ApiError as error:
      status = 404 if error.status_code == 404 else 503
      raise BackendError(status, f'Label Studio answered HTTP {error.status_code} for {what}: '
                                 f'{str(error.body)[:200]}') from error
    except Exception as error:  # httpx connection errors and the like
      raise BackendError(503, f'cannot reach Label Studio at {shown_url(self.url)} for {what}: '
                              f'{type(error).__name__}: {error}') from error
