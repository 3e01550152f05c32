"""A built SSD kept between the iterations of a long-lived process (a backend's
training thread or RQ worker, a benchmark), for the next one of the same shape.

Building the SSD and splitting its extractor take ~0.5 s, and tracing its train
step 1.5-2.5 s of Python that competes with making the views for the
interpreter lock: most of a warm start's fixed cost. An iteration of the same
shape (`key`) instead restores its weights into the last one's model and
resets the trainer's optimizers (`pipeline.build_model`).

`take` hands an entry out for an iteration's sole use; `give_back` keeps the
last one returned. Only `pipeline.train_iteration` gives back, once it is done
with the model, so a caller holding a `pipeline.fit` result never sees its
model reused under it.
"""

from __future__ import annotations

import dataclasses
import threading


@dataclasses.dataclass
class Built:
  """A project's SSD with what training adds to it.

  Attributes:
    key: what another iteration must share to reuse it (`key`); None: never reused.
    model: the SSD.
    split: its extractor cut for training (`train.ExtractorSplit`).
    trainer: its `train.Trainer` (None when compression wraps what trains).
    reused: whether this iteration took it from the pool rather than building it.
  """

  key: tuple | None
  model: object
  split: object
  trainer: object | None
  reused: bool = False


_lock = threading.Lock()
_idle: Built | None = None


def key(ssd_config, config) -> tuple | None:
  """What a model must share with an iteration to serve it, or None where it cannot:
  the network and what trains (the traced step also holds the loss settings).
  Only a model whose every weight the iteration sets again is reusable: the
  extractor and box head restored, the class head filled by `start_class_head`;
  compression wraps what trains anew every time."""
  if config.compression.active or config.warm_start.restore != 'extractor+box':
    return None
  return (ssd_config, config.trainable, config.loss)


def take(wanted: tuple | None) -> Built | None:
  """The idle model of this key, now the caller's alone, or None."""
  global _idle  # pylint: disable=global-statement
  with _lock:
    if wanted is None or _idle is None or _idle.key != wanted:
      return None
    built, _idle = _idle, None
  built.reused = True
  return built


def give_back(built: Built) -> None:
  """Keeps `built` for the next iteration of its key (in place of any other)."""
  global _idle  # pylint: disable=global-statement
  if built.key is None:
    return
  with _lock:
    _idle = built


def clear() -> None:
  global _idle  # pylint: disable=global-statement
  with _lock:
    _idle = None
