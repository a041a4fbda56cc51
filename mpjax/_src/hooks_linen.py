"""The one module-call hook for linen, on `flax.linen.intercept_methods`.

`intercept(hook)` runs a `hooks.Hook` around every ``__call__`` and public
method call of every linen module inside its ``with`` block, in the calling
thread only (flax keeps its interceptor stack thread-local). The hook gets a
`hooks.CallContext`: the bound module, its path, the ``(path, class)`` chain
from the root (rebuilt inside lifted transforms such as ``nn.scan`` and
``nn.remat``, whose modules' parents are scopes) and the policy the active
`PolicyMap` gives it: the map given to this `intercept`, else the innermost
map of an enclosing ``intercept(..., policy_map=...)`` block of this thread.

`suspended()` pauses every hook already registered in the thread: a
shape-only trace run inside a call (the per-module policy's discovery of
which class sits at which path) is then not seen by the observers around
the call.

Examples:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> model = nn.Sequential([nn.Dense(2), nn.Dense(1)])
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> seen = []
  >>> def observe(next_fun, args, kwargs, call):
  ...   seen.append((call.path, call.cls.__name__, call.method))
  ...   return next_fun(*args, **kwargs)
  >>> with intercept(observe):
  ...   _ = model.apply(variables, jnp.ones((1, 3)))
  >>> for entry in seen:
  ...   print(entry)
  ('', 'Sequential', '__call__')
  ('layers_0', 'Dense', '__call__')
  ('layers_1', 'Dense', '__call__')
"""

import contextlib
import threading
from typing import Iterator, Optional

import flax.linen as nn

from mpjax._src import hooks
from mpjax._src import policy_map as policy_map_lib


class _State(threading.local):
  """This thread's active `intercept` blocks."""

  def __init__(self):
    super().__init__()
    self.depth = 0  # intercept blocks entered
    self.floor = 0  # blocks below this depth are suspended
    self.maps = []  # policy maps of the enclosing blocks, innermost last


_STATE = _State()


class _ChainTracker:
  """Builds ``((path, class), ...)`` chains from the root to a bound module.

  The chain follows ``module.parent``; inside lifted transforms (``nn.scan``,
  ``nn.remat``) a module's parent is a scope, not its parent module, so the
  missing ancestors are taken from the modules seen earlier in the same
  block (by path: the lifted module and its wrapper share their path).
  """

  def __init__(self):
    self.seen = {}

  def chain(self, module: nn.Module) -> policy_map_lib.Chain:
    modules = []
    while isinstance(module, nn.Module):
      modules.append(module)
      module = module.parent
    chain = [(tuple(m.path), type(m)) for m in reversed(modules)]
    top = chain[0][0]
    missing = [(top[:end], self.seen.get(top[:end], nn.Module))
               for end in range(len(top))]
    chain = missing + chain
    for path, cls in chain:
      self.seen.setdefault(path, cls)
    return tuple(("/".join(path), cls) for path, cls in chain)


@contextlib.contextmanager
def intercept(hook: hooks.Hook, *,
              policy_map: Optional[policy_map_lib.PolicyMap] = None
              ) -> Iterator[None]:
  """Runs `hook` around linen module method calls inside the block.

  Args:
    hook: a `hooks.Hook`. Hooks of blocks entered earlier run outside it.
    policy_map: the map whose `ModulePolicy` the hook's calls carry (and,
      for the block's duration, the calls of hooks of enclosing blocks that
      have no map of their own). None: the innermost enclosing block's map,
      or no policy.

  Yields:
    Nothing; the hook is active until the block exits.
  """
  level = _STATE.depth
  tracker = _ChainTracker()

  def interceptor(next_fun, args, kwargs, context):
    if level < _STATE.floor or not hooks.is_hooked_method(
        context.method_name):
      return next_fun(*args, **kwargs)
    module = context.module
    chain = tracker.chain(module)
    pm = policy_map if policy_map is not None else (
        _STATE.maps[-1] if _STATE.maps else None)
    call = hooks.CallContext(module, "/".join(module.path), chain,
                             context.method_name,
                             None if pm is None else pm.resolve(chain))
    return hook(next_fun, args, kwargs, call)

  _STATE.depth += 1
  if policy_map is not None:
    _STATE.maps.append(policy_map)
  try:
    with nn.intercept_methods(interceptor):
      yield
  finally:
    if policy_map is not None:
      _STATE.maps.pop()
    _STATE.depth -= 1


@contextlib.contextmanager
def suspended() -> Iterator[None]:
  """Pauses this thread's hooks registered so far, for the block.

  Hooks registered inside the block (by `intercept`) run as usual.
  """
  floor = _STATE.floor
  _STATE.floor = _STATE.depth
  try:
    yield
  finally:
    _STATE.floor = floor
