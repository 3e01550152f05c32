"""What the project's label config says: tag names, labels, and model-name mapping.

Read with label-studio-sdk's LabelInterface. The backend needs one
RectangleLabels control bound to one Image object.
"""

from __future__ import annotations

import dataclasses
import logging

from backend.errors import BackendError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RectangleTarget:
  """Where predicted regions go.

  Attributes:
    from_name: the RectangleLabels control's name.
    to_name: the Image object's name.
    image_key: the task data key holding the image URL (`$image` -> 'image').
    labels: the control's label values, in config order.
    aliases: lower-cased model class name -> label, from each label's own
      value and its `predicted_values` attribute.
  """

  from_name: str
  to_name: str
  image_key: str
  labels: tuple[str, ...]
  aliases: dict[str, str]

  def label_for(self, model_class: str) -> str | None:
    """The config label a model class maps to, or None when the project doesn't use it."""
    return self.aliases.get(model_class.strip().lower())


def parse_label_config(config: str) -> RectangleTarget:
  """Finds the RectangleLabels control and its Image.

  Raises:
    BackendError(422): unparsable config, or no RectangleLabels bound to an Image.
  """
  from label_studio_sdk.label_interface import LabelInterface
  if not isinstance(config, str) or not config.strip():
    raise BackendError(422, 'the project has no label config')
  try:
    interface = LabelInterface(config)
  except Exception as error:  # the SDK raises lxml, KeyError, ValueError...
    raise BackendError(422, f'the label config cannot be parsed: {error}') from error
  for control in interface.controls:
    if control.tag != 'RectangleLabels':
      continue
    for to_name in control.to_name or []:
      try:
        image = interface.get_object(to_name)
      except Exception:  # pylint: disable=broad-except
        continue
      if image.tag != 'Image':
        continue
      aliases = {}
      for label in control.labels:
        attrs = control.labels_attrs.get(label)
        attrs = getattr(attrs, 'attr', attrs) or {}
        aliases.setdefault(label.lower(), label)
        for alias in str(attrs.get('predicted_values') or '').split(','):
          if alias.strip():
            aliases.setdefault(alias.strip().lower(), label)
      return RectangleTarget(control.name, to_name, image.value_name or 'image',
                             tuple(control.labels), aliases)
  raise BackendError(422, 'the label config needs a <RectangleLabels> bound (toName) to an '
                          '<Image>; this backend predicts rectangles on images')
