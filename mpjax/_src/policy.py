"""Precision policies: named presets and parsing on top of `jmp.Policy`.

A policy says three dtypes: the dtype the master parameters are stored in
(`param_dtype`), the dtype the model computes in (`compute_dtype`) and the
dtype its outputs are handed back in (`output_dtype`). mpjax uses `jmp.Policy`
unchanged so that policies interoperate with Haiku/jmp code; this module only
adds the presets users know from Keras and clear errors.
"""

from typing import Union

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
