"""The one module-call hook for NNX: a per-instance class swap, no patching.

NNX has no interception hook, and Python looks methods up on the class, so a
module whose calls are hooked becomes an instance of a generated subclass of
its own class (`hooked_class`, one per class) whose ``__call__`` and public
methods dispatch to the hooks; ``isinstance``, the module's state and its
paths are unchanged, and flax's own classes are never modified. Two kinds of
hooks run there, as `hooks.Hook` functions with a `hooks.CallContext`:

- **attached** (`attach`): a `Site` stored on the module as a static
  attribute (so it travels in the ``GraphDef`` through ``nnx.split``/
  ``nnx.merge``, ``nnx.jit`` and ``nnx.grad``): the module's path and chain,
  its resolved policy and its hooks (hashable values, compared by value, so
  a prepared model compiles once). `mpjax.with_nnx_policy` attaches the
  policy's casts this way; other per-module features (fp8 matmuls) add
  their hooks to the same site.
- **observing** (`observe`): a hook active only for a ``with`` block, held
  in thread-local state: calls made by other threads, or after the block,
  are not seen. Observers run outside the attached hooks (they see the call
  as the caller makes it), the first registered outermost.

A module overriding a method and calling ``super()`` is one hooked call: only
the generated class's method dispatches.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  >>> seen = []
  >>> def observer(next_fun, args, kwargs, call):
  ...   seen.append((call.path, call.cls.__name__))
  ...   return next_fun(*args, **kwargs)
  >>> with observe(observer, model):
  ...   _ = model(jnp.ones((1, 3)))
  >>> seen
  [('', 'Sequential'), ('layers/0', 'Linear')]
  >>> isinstance(model.layers[0], nnx.Linear)
  True
"""

import contextlib
import dataclasses
import functools
import threading
import types
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from flax import nnx

from mpjax._src import hooks as hooks_lib
from mpjax._src import policy_map as policy_map_lib

_SITE = "_mpjax_site"


@dataclasses.dataclass(frozen=True)
class Site:
  """What `attach` stores on a module: static, hashable, compared by value.

  Attributes:
    path: the module's path from the root it was attached under.
    chain: ``((path, class), ...)`` from that root to the module.
    policy: the `ModulePolicy` resolved for the module, or None.
    hooks: the attached hooks, outermost first (hashable values).
  """
  path: str
  chain: policy_map_lib.Chain
  policy: Optional[policy_map_lib.ModulePolicy] = None
  hooks: Tuple[hooks_lib.Hook, ...] = ()


class _Observers(threading.local):
  """This thread's `observe` blocks: ``(hook, {id(module): (path, chain)})``."""

  def __init__(self):
    super().__init__()
    self.stack = []


_OBSERVERS = _Observers()


def original_class(module: nnx.Module) -> type:
  """The module's class before `hooked_class` swapped it."""
  return getattr(type(module), "__mpjax_base__", type(module))


def site_of(module: nnx.Module) -> Optional[Site]:
  """The `Site` attached to `module`, or None."""
  return vars(module).get(_SITE)


def hooked_methods(base: type) -> Dict[str, Callable[..., Any]]:
  """``__call__`` and the public methods the Module classes of `base` define."""
  methods = {}
  for klass in reversed(base.__mro__):
    if not (isinstance(klass, type) and issubclass(klass, nnx.Module)) or \
        klass is nnx.Module:
      continue
    for name, attr in vars(klass).items():
      if (isinstance(attr, types.FunctionType) and
          hooks_lib.is_hooked_method(name)):
        methods[name] = attr
  return methods


def _dispatching(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
  @functools.wraps(method)
  def dispatch(self, *args, **kwargs):
    site = site_of(self)
    entries = []  # (hook, context), outermost first
    for hook, where in _OBSERVERS.stack:
      found = where.get(id(self))
      if found is not None:
        entries.append((hook, hooks_lib.CallContext(
            self, found[0], found[1], name,
            None if site is None else site.policy)))
    if site is not None and site.hooks:
      context = hooks_lib.CallContext(self, site.path, site.chain, name,
                                      site.policy)
      entries.extend((hook, context) for hook in site.hooks)
    call = functools.partial(method, self)
    for hook, context in reversed(entries):
      call = functools.partial(_run, hook, call, context)
    return call(*args, **kwargs)
  return dispatch


def _run(hook, next_fun, context, *args, **kwargs):
  return hook(next_fun, args, kwargs, context)


_CLASSES: Dict[type, type] = {}
_CLASSES_LOCK = threading.Lock()


def hooked_class(base: type) -> type:
  """The subclass of `base` whose hooked methods dispatch (one per class).

  Created once per class, under a lock: two threads hooking the same class
  get the same subclass (a second one would change the GraphDef).
  """
  with _CLASSES_LOCK:
    cls = _CLASSES.get(base)
    if cls is None:
      namespace = {name: _dispatching(name, fn)
                   for name, fn in hooked_methods(base).items()}
      namespace.update(__module__=base.__module__,
                       __qualname__=base.__qualname__, __doc__=base.__doc__,
                       __mpjax_base__=base)
      cls = _CLASSES[base] = types.new_class(
          base.__name__, (base,),
          {"pytree": getattr(base, "_pytree__is_pytree", False)},
          lambda ns: ns.update(namespace))
    return cls


def make_hookable(module: nnx.Module) -> None:
  """Swaps `module`'s class to its `hooked_class` (once; idempotent)."""
  cls = hooked_class(original_class(module))
  if type(module) is not cls:
    module.__class__ = cls


def attach(module: nnx.Module, site: Site) -> None:
  """Stores `site` on `module`; with hooks, makes the module hookable.

  Replaces a site attached before. The module's class is swapped only when
  `site` has hooks, so a module that carries only its policy keeps its
  class.
  """
  if not isinstance(site, Site):
    raise TypeError(f"attach: expected a Site, got {site!r}.")
  setattr(module, _SITE, site)
  if site.hooks:
    make_hookable(module)


def detach(module: nnx.Module) -> None:
  """Removes the attached site and gives `module` back its own class."""
  if _SITE in vars(module):
    delattr(module, _SITE)
  module.__class__ = original_class(module)


def _modules(root: Any) -> Dict[Tuple[Any, ...], nnx.Module]:
  return {tuple(path): node for path, node in nnx.iter_graph(root)
          if isinstance(node, nnx.Module)}


def sites(root: Any) -> Dict[Tuple[Any, ...], Tuple[str, Any]]:
  """``{graph path: (path, chain)}`` of every module reachable from `root`.

  Args:
    root: an ``nnx.Module`` (its path is ``""``), or any NNX graph node
      holding modules (a list of modules: paths start with the index).

  Returns:
    A dict in graph order; chains hold original classes (`original_class`).
  """
  modules = _modules(root)
  found = {}
  for path in modules:
    chain = tuple(("/".join(str(p) for p in path[:end]),
                   original_class(modules[path[:end]]))
                  for end in range(len(path) + 1) if path[:end] in modules)
    found[path] = ("/".join(str(p) for p in path), chain)
  return found


@contextlib.contextmanager
def observe(hook: hooks_lib.Hook, root: Any) -> Iterator[None]:
  """Runs `hook` around method calls of the modules under `root`, in the block.

  Only this thread's calls, and only while the block runs, are seen (the
  hook is held in thread-local state). The modules reachable from `root`
  are made hookable (`make_hookable`) and stay so: without an active hook a
  hookable module runs as before. To leave a model's classes untouched,
  observe a copy (``nnx.merge(*nnx.split(model))``), as `debug_forward` and
  `policy_table` do.

  Args:
    hook: a `hooks.Hook`; its calls carry the path and chain from `root` and
      the policy of the module's attached site (None without one).
    root: an ``nnx.Module`` or a graph node holding modules (see `sites`).

  Yields:
    Nothing; the hook is active until the block exits.
  """
  modules = _modules(root)
  where = {}
  for path, path_and_chain in sites(root).items():
    make_hookable(modules[path])
    where.setdefault(id(modules[path]), path_and_chain)
  entry = (hook, where)
  _OBSERVERS.stack.append(entry)
  try:
    yield
  finally:
    # By identity: blocks of one thread close innermost first, but a
    # generator-held block may close late.
    index = next(i for i, e in enumerate(_OBSERVERS.stack) if e is entry)
    del _OBSERVERS.stack[index]
