"""The one exception the service turns into a JSON error with a status."""

from __future__ import annotations


class BackendError(Exception):
  """An error the client should see: HTTP `status` and a clear `message`."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message

  def to_dict(self) -> dict:
    return {'status': self.status, 'error': self.message}
