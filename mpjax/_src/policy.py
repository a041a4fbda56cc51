"""Precision policies: named presets and parsing on top of `jmp.Policy`.

A policy says three dtypes: the dtype the master parameters are stored in
(`param_dtype`), the dtype the model computes in (`compute_dtype`) and the
dtype its outputs are handed back in (`output_dtype`). mpjax uses `jmp.Policy`
unchanged so that policies interoperate with Haiku/jmp code; this module only
adds the presets users know from Keras, clear errors, and `with_policy`,
which runs a model under a policy.
"""

import functools
from typing import Any, Callable, Mapping, Union

import jax.numpy as jnp
import jmp

PolicyLike = Union[str, jmp.Policy]

_F32, _F16, _BF16 = jnp.float32, jnp.float16, jnp.bfloat16

# Keras names; "mixed_*" keeps float32 master params and float32 outputs so
# that losses and metrics are computed in float32.
PRESETS = {
    "float32": jmp.Policy(_F32, _F32, _F32),
    "float16": jmp.Policy(_F16, _F16, _F16),
    "bfloat16": jmp.Policy(_BF16, _BF16, _BF16),
    "mixed_float16": jmp.Policy(_F32, _F16, _F32),
    "mixed_bfloat16": jmp.Policy(_F32, _BF16, _F32),
}

_SHORT_NAMES = {
    jnp.dtype(jnp.float64): "f64",
    jnp.dtype(_F32): "f32",
    jnp.dtype(_F16): "f16",
    jnp.dtype(_BF16): "bf16",
}


def get_policy(spec: PolicyLike) -> jmp.Policy:
  """Returns the `jmp.Policy` named by `spec`.

  Args:
    spec: a preset name (``"float32"``, ``"float16"``, ``"bfloat16"``,
      ``"mixed_float16"``, ``"mixed_bfloat16"``), a jmp policy string such as
      ``"params=float32,compute=bfloat16,output=float32"`` or
      ``"p=f32,c=f16,o=f32"`` (jmp's rules: params default to float32, compute
      follows params, output follows compute), or a `jmp.Policy`, returned as is.

  Returns:
    The policy.

  Raises:
    TypeError: if `spec` is neither a string nor a `jmp.Policy`.
    ValueError: if the string is neither a preset nor a valid jmp policy
      string; the message names the spec and lists the presets.

  Examples:
    >>> import mpjax
    >>> mpjax.policy_name(mpjax.get_policy("mixed_bfloat16"))
    'p=f32,c=bf16,o=f32'
  """
  if isinstance(spec, jmp.Policy):
    return spec
  if not isinstance(spec, str):
    raise TypeError(
        f"A precision policy must be a string or a jmp.Policy, got {spec!r} "
        f"of type {type(spec).__name__}.")
  name = spec.strip()
  if name in PRESETS:
    return PRESETS[name]
  try:
    # jmp's parser does not tolerate spaces around keys ("p=f32, c=f16").
    policy = jmp.get_policy(",".join(p.strip() for p in name.split(",")))
  except ValueError as e:
    raise ValueError(
        f"Unknown precision policy {spec!r}: expected one of the presets "
        f"{sorted(PRESETS)} or a jmp policy string such as "
        f"'params=float32,compute=bfloat16,output=float32' or "
        f"'p=f32,c=f16,o=f32' ({e}).") from None
  for role in ("param_dtype", "compute_dtype", "output_dtype"):
    dtype = getattr(policy, role)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"Precision policy {spec!r} has a non-floating {role} {dtype}.")
  return policy


def policy_name(policy: PolicyLike) -> str:
  """Returns the short string of a policy, e.g. ``'p=f32,c=f16,o=f32'``.

  Unlike ``str(jmp.Policy)``, float32 is written ``f32`` rather than ``full``.
  The result parses back to an equal policy with `get_policy`.
  """
  policy = get_policy(policy)
  names = [
      _SHORT_NAMES.get(jnp.dtype(d), jnp.dtype(d).name)
      for d in (policy.param_dtype, policy.compute_dtype, policy.output_dtype)
  ]
  return "p={},c={},o={}".format(*names)


def _cast_params_only(args: tuple, kwargs: dict,
                      cast: Callable[[Any], Any]) -> tuple:
  """Applies `cast` to ``args``/``kwargs``, but of a variables dict (the first
  argument) only to its ``"params"``: other collections are model state
  (BatchNorm's running statistics), which a policy never casts."""
  if args and isinstance(args[0], Mapping) and "params" in args[0]:
    variables = dict(args[0])
    variables["params"] = cast(variables["params"])
    return (variables,) + tuple(cast(tuple(args[1:]))), cast(kwargs)
  return cast(args), cast(kwargs)


def with_policy(apply_fn: Callable, policy: PolicyLike) -> Callable:
  """Wraps a model's apply function to run under `policy`.

  With a whole-model policy (a preset, a jmp string or a `jmp.Policy`) the
  wrapper casts the floating leaves of every argument to
  ``policy.compute_dtype`` (of the variables dict, its ``"params"`` only:
  ``batch_stats`` and other collections keep their dtype) and the floating
  leaves of the model's output to ``policy.output_dtype`` (with
  ``mutable=``, the output only, not the updated collections). Integer
  inputs (token ids), PRNG keys and non-array arguments pass untouched.
  Differentiating through it with respect to float32 params gives float32
  gradients: the casts are part of the graph.

  With a `mpjax.PolicyMap` the policy is per module instead (float32
  islands, overrides by class and path): for linen, `apply_fn` is
  ``model.apply`` (or a function of ``(variables, ...)`` that calls it) and
  each module casts at its own boundary; for NNX, `apply_fn` calls a model
  prepared with ``mpjax.with_nnx_policy(model, policy_map)`` (as
  `mpjax.TrainState.from_nnx` does).

  Args:
    apply_fn: e.g. ``model.apply``.
    policy: a preset name, a jmp policy string, a `jmp.Policy` or a
      `PolicyMap`.

  Returns:
    A function with the signature of `apply_fn`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mpjax
    >>> model = nn.Dense(2)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> apply = mpjax.with_policy(model.apply, "mixed_bfloat16")
    >>> apply(variables, jnp.ones((1, 3))).dtype
    dtype('float32')
  """
  # Local import: the per-module machinery imports this module.
  from mpjax._src import linen_policy  # pylint: disable=g-import-not-at-top
  from mpjax._src import policy_map  # pylint: disable=g-import-not-at-top
  if isinstance(policy, policy_map.PolicyMap):
    return linen_policy.with_policy_map(apply_fn, policy)
  policy = get_policy(policy)

  @functools.wraps(apply_fn)
  def apply(*args, **kwargs):
    args, kwargs = _cast_params_only(args, kwargs,
                                     policy.cast_to_compute)
    out = apply_fn(*args, **kwargs)
    if kwargs.get("mutable", False) is not False:
      model_out, collections = out
      return policy.cast_to_output(model_out), collections
    return policy.cast_to_output(out)

  return apply
