"""What a module-call hook is, for linen (`hooks_linen`) and NNX (`hooks_nnx`).

A hook runs around one method call of one Flax module, with the signature of
a `flax.linen.intercept_methods` interceptor but a richer context::

    def hook(next_fun, args, kwargs, call: CallContext):
      ...                                   # before: may change args/kwargs
      out = next_fun(*args, **kwargs)       # the method (and inner hooks)
      ...                                   # after: may change out
      return out

A hook may also not call `next_fun` and return something else instead
(replace the call: a float32 norm island, an fp8 matmul). Hooks compose like
decorators: the first registered is the outermost, so an observer registered
around a policy sees the call as the caller makes it (uncast inputs, cast
outputs).

Per-module policies (`linen_policy`, `nnx_policy`), `policy_table` and
`debug_forward` are all hooks; `hooks_linen.intercept` and
`hooks_nnx.attach`/`hooks_nnx.observe` are the only places module calls are
intercepted.
"""

from typing import Any, Callable, NamedTuple, Optional

from mpjax._src import policy_map as policy_map_lib


class CallContext(NamedTuple):
  """What a hook knows about the call it runs around.

  Attributes:
    module: the module (linen: the bound module; NNX: the instance).
    path: its path, '/'-joined (``"Block_0/Dense_1"``, ``"blocks/0/attn"``);
      ``""`` for the root.
    chain: ``((path, class), ...)`` from the root to the module, as
      `PolicyMap.resolve` takes it; classes are the user's (for NNX, the
      class before `mpjax.with_nnx_policy`).
    method: the method called: ``"__call__"`` or a public method's name.
    policy: the `ModulePolicy` the active `PolicyMap` gives the module, or
      None where no map applies.
  """
  module: Any
  path: str
  chain: policy_map_lib.Chain
  method: str
  policy: Optional[policy_map_lib.ModulePolicy]

  @property
  def cls(self) -> type:
    """The module's class as the user wrote it (``chain[-1][1]``)."""
    return self.chain[-1][1]


# hook(next_fun, args, kwargs, call) -> the call's result.
Hook = Callable[[Callable[..., Any], tuple, dict, CallContext], Any]


def is_hooked_method(name: str) -> bool:
  """Methods hooks run around: ``__call__`` and public methods.

  Examples:
    >>> [is_hooked_method(n) for n in ("__call__", "attend", "_helper",
    ...                                "setup", "<lambda>")]
    [True, True, False, False, False]
  """
  # Lifted linen transforms (nn.remat) call internal lambdas through the
  # module; linen's setup builds submodules and computes nothing.
  return name == "__call__" or (name.isidentifier() and
                                not name.startswith("_") and name != "setup")
