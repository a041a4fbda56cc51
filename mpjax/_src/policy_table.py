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

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mpjax._src import casting
from mpjax._src import hooks
from mpjax._src import hooks_linen
from mpjax._src import hooks_nnx
from mpjax._src import linen_policy
from mpjax._src import nnx_policy
from mpjax._src import policy_map as policy_map_lib
from mpjax._src import policy as policy_lib


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
  resolved: Optional[policy_map_lib.ModulePolicy]


def _floating_dtypes(tree: Any) -> tuple:
  leaves = jax.tree.leaves(tree, is_leaf=casting.is_graph_leaf)
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
  apply_fn = (model.apply if policy is None
              else policy_lib.with_policy(model.apply, policy))
  calls: Dict[tuple, Optional[_Call]] = {}

  def observe(next_fun, args, kw, call: hooks.CallContext):
    module = call.module
    key = (call.path, call.method)
    calls.setdefault(key, None)
    own_params = module.variables.get("params", {})
    read = tuple(jnp.dtype(v.dtype).name
                 for v in jax.tree.leaves(
                     {k: v for k, v in own_params.items()
                      if not isinstance(v, dict)}))
    out = next_fun(*args, **kw)
    if calls[key] is None:
      calls[key] = _Call(
          _display(call.path, call.method), call.cls,
          _floating_dtypes((args, kw)), getattr(module, "dtype", None),
          read, _floating_dtypes(out), call.policy)
    return out

  # Outside the policy's hook: the call as the caller makes it; the map's
  # policy of each module comes with the call.
  with hooks_linen.intercept(observe):
    jax.eval_shape(lambda v: apply_fn(v, *inputs, **kwargs), variables)
  records = {tuple(path.split("/")) if path else (): None
             for path, _ in calls}
  own: Dict[str, Dict[str, Any]] = {}
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = linen_policy.dict_names(path)
    module_path = linen_policy.owner(records, names[:-1])
    _add_param(own, "/".join(module_path or ()), leaf)
  return calls, own


def _nnx_observer(own: Dict[str, Dict[str, Any]],
                  calls: Dict[tuple, Optional[_Call]]) -> hooks.Hook:
  """Records the first call of each (module path, method), parents first."""

  def observe(next_fun, args, kwargs, call: hooks.CallContext):
    key = (call.path, call.method)
    calls.setdefault(key, None)
    out = next_fun(*args, **kwargs)
    if calls[key] is not None:
      return out
    resolved = call.policy
    read = tuple(own.get(call.path, {}).get("dtypes", ()))
    in_dtypes = _floating_dtypes((args, kwargs))
    if resolved is not None:
      # The observer runs outside the policy's casts: apply them here.
      compute = jnp.dtype(resolved.policy.compute_dtype).name
      read = tuple(compute for _ in read)
      if resolved.boundary:
        in_dtypes = tuple(compute for _ in in_dtypes)
    calls[key] = _Call(
        _display(call.path, call.method), call.cls, in_dtypes,
        getattr(call.module, "dtype", None), read, _floating_dtypes(out),
        resolved)
    return out

  return observe


def _nnx_calls(model: nnx.Module, inputs: tuple, kwargs: dict, policy: Any):
  graphdef, state = nnx.split(model)
  calls: Dict[tuple, Optional[_Call]] = {}
  own: Dict[str, Dict[str, Any]] = {}

  def run(state, inputs):
    # A copy that lives only inside this trace: preparing and observing it
    # leaves the model as it is.
    copy = nnx.merge(graphdef, state)
    if policy is not None:
      nnx_policy.with_nnx_policy(copy, policy)
    paths = {id(node): "/".join(str(p) for p in path)
             for path, node in nnx.iter_graph(copy)
             if isinstance(node, nnx.Module)}
    for param, owner_module in nnx_policy.owned_params(copy):
      _add_param(own, paths[id(owner_module)], param.get_value())
    with hooks_nnx.observe(_nnx_observer(own, calls), copy):
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
