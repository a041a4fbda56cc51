"""`policy_table`: per-module dtypes of a model under a policy.

Like Keras's ``model.summary()`` with dtype columns: for every module that
runs (linen or NNX), the dtype its params are stored in, the dtype it
computes in, the dtype it returns, its own param count and bytes, and the
rule of the `PolicyMap` that decided. Nothing is computed: the model is
traced with ``jax.eval_shape``.

The compute dtype is the module's own ``dtype`` attribute when it has one
(flax casts to it inside the module); else the policy's compute dtype at a
boundary, and for a container with no params of its own (it computes
nothing itself); else the dtype its floating inputs and its params (as
read) promote to, which is what flax's layers compute in when
``dtype=None``. A note flags modules that compute wider than the policy asks
for (an input or param promoted them, flax #2384) or whose own ``dtype``
overrides the map.
"""

import functools
import math
import types
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mpjax._src import linen_policy
from mpjax._src import policy_map as module_policy
from mpjax._src import nnx_policy
from mpjax._src import train_step


class PolicyRow(NamedTuple):
  """One row of `policy_table`.

  Attributes:
    path: the module's path (``"Block_0/Dense_0"``; ``"(root)"`` for the
      root), with ``".method"`` appended for methods other than
      ``__call__`` (``"embed.attend"``).
    cls: the module's class name.
    param_dtype: dtype(s) of the module's own params as stored (the master
      copy), ``"-"`` without params.
    compute_dtype: the dtype the module computes in (see the module doc).
    output_dtype: dtype(s) of its floating outputs, ``"-"`` if none.
    param_count: number of elements of its own params (not its children's).
    param_bytes: bytes of its own params as stored.
    rule: the `PolicyMap` rule that decided (``"float32 island"``,
      ``"path 'head'"``, ...); ``"-"`` without a map.
    note: a warning, or ``""``.
  """
  path: str
  cls: str
  param_dtype: str
  compute_dtype: str
  output_dtype: str
  param_count: int
  param_bytes: int
  rule: str
  note: str


class _Call(NamedTuple):
  path: str
  cls: type
  inputs: tuple
  own_dtype: Any
  read_dtypes: tuple
  outputs: tuple
  resolved: Optional[module_policy.ModulePolicy]


def _floating_dtypes(tree: Any) -> tuple:
  leaves = jax.tree.leaves(tree, is_leaf=module_policy._is_graph_leaf)  # pylint: disable=protected-access
  names = []
  for x in leaves:
    dtype = getattr(x, "dtype", None)
    if (hasattr(x, "shape") and dtype is not None and
        jnp.issubdtype(dtype, jnp.floating) and
        jnp.dtype(dtype).name not in names):
      names.append(jnp.dtype(dtype).name)
  return tuple(names)


def _join(names: Sequence[str]) -> str:
  return "+".join(names) if names else "-"


def _row(call: _Call, own: Dict[str, Any]) -> PolicyRow:
  resolved = call.resolved
  note = ""
  if call.own_dtype is not None:
    compute = jnp.dtype(call.own_dtype).name
    if (resolved is not None and
        jnp.dtype(call.own_dtype) != jnp.dtype(resolved.policy.compute_dtype)):
      note = (f"own dtype={compute} overrides the map's "
              f"{jnp.dtype(resolved.policy.compute_dtype).name}")
  elif resolved is not None and (resolved.boundary or not call.read_dtypes):
    # A boundary casts to its compute dtype; a container without params of
    # its own computes nothing itself and hands its inputs to its children.
    compute = jnp.dtype(resolved.policy.compute_dtype).name
  else:
    dtypes = call.inputs + call.read_dtypes
    compute = (jnp.result_type(*dtypes).name if dtypes else "-")
    if (resolved is not None and dtypes and
        jnp.finfo(compute).bits >
        jnp.finfo(resolved.policy.compute_dtype).bits):
      note = (f"promoted to {compute} (policy computes in "
              f"{jnp.dtype(resolved.policy.compute_dtype).name})")
  return PolicyRow(
      path=call.path, cls=call.cls.__name__,
      param_dtype=_join(own.get("dtypes", ())),
      compute_dtype=compute, output_dtype=_join(call.outputs),
      param_count=own.get("count", 0), param_bytes=own.get("bytes", 0),
      rule="-" if resolved is None else resolved.rule, note=note)


def _display(path: str, method: str) -> str:
  shown = path or "(root)"
  return shown if method == "__call__" else f"{shown}.{method}"


def _add_param(own: Dict[str, Dict[str, Any]], path: str, leaf: Any) -> None:
  entry = own.setdefault(path, {"dtypes": [], "count": 0, "bytes": 0})
  dtype = jnp.dtype(leaf.dtype)
  if dtype.name not in entry["dtypes"]:
    entry["dtypes"].append(dtype.name)
  size = math.prod(leaf.shape)
  entry["count"] += size
  entry["bytes"] += size * dtype.itemsize


def _linen_calls(model: nn.Module, inputs: tuple, kwargs: dict,
                 policy: Any, variables: Any):
  pm = policy if isinstance(policy, module_policy.PolicyMap) else None
  apply_fn = (model.apply if policy is None
              else train_step.with_policy(model.apply, policy))
  calls: Dict[tuple, Optional[_Call]] = {}
  tracker = linen_policy.ChainTracker()

  def observe(next_fun, args, kw, context):
    module = context.module
    if (linen_policy.discovering() or
        not linen_policy.is_policy_method(context.method_name)):
      return next_fun(*args, **kw)
    key = ("/".join(module.path), context.method_name)
    calls.setdefault(key, None)
    resolved = None if pm is None else pm.resolve(tracker.chain(module))
    own_params = module.variables.get("params", {})
    read = tuple(jnp.dtype(v.dtype).name
                 for v in jax.tree.leaves(
                     {k: v for k, v in own_params.items()
                      if not isinstance(v, dict)}))
    out = next_fun(*args, **kw)
    if calls[key] is None:
      calls[key] = _Call(
          _display("/".join(module.path), context.method_name), type(module),
          _floating_dtypes((args, kw)), getattr(module, "dtype", None),
          read, _floating_dtypes(out), resolved)
    return out

  with nn.intercept_methods(observe):
    jax.eval_shape(lambda v: apply_fn(v, *inputs, **kwargs), variables)
  records = {tuple(path.split("/")) if path else (): None
             for path, _ in calls}
  own: Dict[str, Dict[str, Any]] = {}
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = linen_policy._dict_names(path)  # pylint: disable=protected-access
    module_path = linen_policy.owner(records, names[:-1])
    _add_param(own, "/".join(module_path or ()), leaf)
  return calls, own


@functools.lru_cache(maxsize=None)
def _observed_class(base: type) -> type:
  """A subclass of `base` whose policy methods report to ``_mpjax_observer``."""
  def wrap(name, method):
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
      observer = self._mpjax_observer  # pylint: disable=protected-access
      observer.enter(self, name)
      out = method(self, *args, **kwargs)
      observer.exit(self, name, (args, kwargs), out)
      return out
    return wrapped
  namespace = {name: wrap(name, fn)
               for name, fn in nnx_policy._policy_methods(base).items()}  # pylint: disable=protected-access
  namespace.update(__module__=base.__module__, __qualname__=base.__qualname__)
  return types.new_class(
      base.__name__, (base,),
      {"pytree": getattr(base, "_pytree__is_pytree", False)},
      lambda ns: ns.update(namespace))


class _NNXObserver:
  """Records the first call of each (module path, method), parents first."""

  def __init__(self, paths: Dict[int, str], own: Dict[str, Dict[str, Any]],
               calls: Dict[tuple, Optional[_Call]]):
    self.paths, self.own, self.calls = paths, own, calls

  def enter(self, module, name):
    path = self.paths.get(id(module))
    if path is not None:
      self.calls.setdefault((path, name), None)

  def exit(self, module, name, inputs, out):
    path = self.paths.get(id(module))
    if path is None or self.calls.get((path, name)) is not None:
      return
    resolved = nnx_policy.policy_of(module)
    boundary = resolved is not None and resolved.boundary
    read = tuple(self.own.get(path, {}).get("dtypes", ()))
    in_dtypes = _floating_dtypes(inputs)
    if resolved is not None:
      compute = jnp.dtype(resolved.policy.compute_dtype).name
      read = tuple(compute for _ in read)
      if boundary:
        in_dtypes = tuple(compute for _ in in_dtypes)
    self.calls[(path, name)] = _Call(
        _display(path, name), nnx_policy.original_class(module), in_dtypes,
        getattr(module, "dtype", None), read, _floating_dtypes(out), resolved)


def _nnx_calls(model: nnx.Module, inputs: tuple, kwargs: dict, policy: Any):
  graphdef, state = nnx.split(model)
  calls: Dict[tuple, Optional[_Call]] = {}
  own: Dict[str, Dict[str, Any]] = {}

  def run(state, inputs):
    copy = nnx.merge(graphdef, state)
    if policy is not None:
      nnx_policy.with_nnx_policy(copy, policy)
    paths = {id(node): "/".join(str(p) for p in path)
             for path, node in nnx.iter_graph(copy)
             if isinstance(node, nnx.Module)}
    for param, owner_module in nnx_policy._owned_params(copy):  # pylint: disable=protected-access
      _add_param(own, paths[id(owner_module)], param.get_value())
    observer = _NNXObserver(paths, own, calls)
    for _, node in list(nnx.iter_graph(copy)):
      if isinstance(node, nnx.Module):
        # The copy lives only inside this trace: plain attributes, no graph.
        object.__setattr__(node, "_mpjax_observer", observer)
        node.__class__ = _observed_class(type(node))
    return copy(*inputs, **kwargs)

  jax.eval_shape(run, state, inputs)
  return calls, own


def policy_table(model: Any, *example_inputs: Any, policy: Any = None,
                 variables: Any = None,
                 print_fn: Optional[Callable[[str], Any]] = print,
                 **kwargs) -> List[PolicyRow]:
  """Prints and returns the dtypes of every module a call runs.

  Args:
    model: a ``flax.linen.Module`` or an ``nnx.Module``.
    *example_inputs: the positional inputs of a call (arrays or
      ``jax.ShapeDtypeStruct``; only shapes and dtypes are used).
    policy: for linen, what `mpjax.with_policy` is given: a `PolicyMap`
      (per module) or a policy (whole model); for NNX, what
      `mpjax.with_nnx_policy` is given (applied to a copy; the model is not
      changed). None: linen runs without a policy; an NNX model runs as it is
      (with the map it was prepared with, if any).
    variables: linen only: the variables (default: ``model.init``'s, traced
      with ``jax.eval_shape``, so nothing is allocated).
    print_fn: where the table goes; None prints nothing.
    **kwargs: keyword arguments of the call (``train=False``, ``mutable=``).

  Returns:
    The rows, in call order (parents before children).
  """
  if isinstance(model, nn.Module):
    if variables is None:
      variables = jax.eval_shape(
          lambda: model.init(jax.random.key(0), *example_inputs, **kwargs))
    calls, own = _linen_calls(model, example_inputs, kwargs, policy,
                              variables)
  elif isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("policy_table: variables= is for linen models; an NNX "
                       "model holds its own.")
    calls, own = _nnx_calls(model, example_inputs, kwargs, policy)
  else:
    raise TypeError(
        "policy_table: expected a flax.linen.Module or an nnx.Module, got "
        f"{type(model).__name__}.")
  seen_own = set()
  rows = []
  for (path, _), call in calls.items():
    module_own = {} if path in seen_own else own.get(path, {})
    seen_own.add(path)
    rows.append(_row(call, module_own))
  if print_fn is not None:
    print_fn(format_table(rows))
  return rows


_COLUMNS = (("path", "path"), ("class", "cls"), ("params", "param_dtype"),
            ("compute", "compute_dtype"), ("output", "output_dtype"),
            ("# params", "param_count"), ("bytes", "param_bytes"),
            ("rule", "rule"), ("note", "note"))


def format_table(rows: Sequence[PolicyRow]) -> str:
  """The rows as a fixed-width text table with a total line."""
  def cell(row, field):
    value = getattr(row, field)
    return f"{value:,}" if isinstance(value, int) else str(value)

  body = [[cell(r, f) for _, f in _COLUMNS] for r in rows]
  total = ["total", "", "", "", "",
           f"{sum(r.param_count for r in rows):,}",
           f"{sum(r.param_bytes for r in rows):,}", "", ""]
  widths = [max(len(t), *(len(b[i]) for b in body + [total]))
            for i, (t, _) in enumerate(_COLUMNS)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)
                                 ).rstrip()
  rule = "-" * len(line(["-" * w for w in widths]))
  return "\n".join([line([t for t, _ in _COLUMNS]), rule] +
                   [line(b) for b in body] + [rule, line(total)])
