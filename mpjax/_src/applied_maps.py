"""Which `PolicyMap`s modules ran under during a call, per thread.

`mpjax.with_policy(apply_fn, policy_map)` checks after the call that some
module ran under its map and none under another (an NNX model prepared with a
different map): each policy hook calls `note_applied`, and the caller reads
what `tracking_applied` collected. The state is thread-local, so two threads
applying models at once do not see each other's maps.
"""

import threading
from typing import Any, Set


class _Applied(threading.local):
  """The sets of maps being collected, innermost `tracking_applied` last."""

  def __init__(self):
    super().__init__()
    self.stack = []


_APPLIED = _Applied()


def note_applied(policy_map: Any) -> None:
  """Records that a module ran under `policy_map` (for `tracking_applied`)."""
  if _APPLIED.stack:
    _APPLIED.stack[-1].add(policy_map)


class tracking_applied:  # pylint: disable=invalid-name
  """Context manager: the set of maps modules ran under inside it.

  Examples:
    >>> with tracking_applied() as seen:
    ...   note_applied("a map")
    >>> seen
    {'a map'}
  """

  def __enter__(self) -> Set[Any]:
    self.seen = set()
    _APPLIED.stack.append(self.seen)
    return self.seen

  def __exit__(self, *exc) -> None:
    _APPLIED.stack.pop()
