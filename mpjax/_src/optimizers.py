"""Precision-aware optimizers: moment storage dtypes, 16-bit master weights, fused skip.

`adamw` and `sgd` are optax optimizers (one `GradientTransformationExtraArgs`
each) that

- store each moment in its own dtype (``mu_dtype``, ``nu_dtype``: float32,
  bfloat16 or float16) and compute every update in float32 from upcast
  moments and gradients, rounding only what they store;
- write the update back to 16-bit params themselves, to nearest, with
  stochastic rounding (a PRNG key in the state) or with Kahan compensation (a
  buffer per param in the param dtype), returning updates that
  `optax.apply_updates` turns into exactly those params
  (`mpjax._src.master_update`);
- take `loss_scaled`'s skip decision into their own elementwise update
  (`mpjax._src.fused_skip`), so that a skipped step costs no select over the
  donated optimizer state.

With float32 everywhere `adamw(weight_decay=0.0)` is `mpjax.adam` bit for
bit (the same moments and the same float32-accurate bias corrections) and
`sgd` is `optax.sgd`. Because the write-back rounds ``params + update``, each
must be the last transformation of its chain; put clipping and the like
before it (``optax.chain(optax.clip_by_global_norm(1.0), mpjax.adamw(...))``).
"""

import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpjax._src import adam as adam_lib
from mpjax._src import fused_skip
from mpjax._src import master_update
from mpjax._src import stochastic_rounding

STORAGE_DTYPES = ("float32", "bfloat16", "float16")
MOMENT_ROUNDINGS = ("nearest", "stochastic")

MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


class AdamWState(NamedTuple):
  """State of `adamw`.

  Attributes:
    count: int32 [], applied steps (a skipped step does not count; the
      learning-rate schedule and the bias corrections read it).
    mu: first moments, shaped like the params, in ``mu_dtype``.
    nu: second moments, shaped like the params, in ``nu_dtype``.
    key: uint32 key data [2] (threefry) of the rounding key, with stochastic
      rounding; None otherwise. It never changes: applied step ``t`` rounds
      with the seed of ``fold_in(key, t)`` (``t`` is `count`, which a skipped
      step leaves), so a resumed run rounds as the uninterrupted one.
    compensation: Kahan buffers, shaped like the params in their dtype, with
      ``rounding="kahan"`` (float32 params get a [0] placeholder); None
      otherwise.
  """
  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates
  key: Optional[chex.Array]
  compensation: Optional[optax.Updates]


class SGDState(NamedTuple):
  """State of `sgd`.

  Attributes:
    count: int32 [], applied steps (schedules read it).
    mu: momentum buffers, shaped like the params, in ``mu_dtype``; None
      without momentum.
    key: as for `AdamWState`.
    compensation: as for `AdamWState`.
  """
  count: chex.Array
  mu: Optional[optax.Updates]
  key: Optional[chex.Array]
  compensation: Optional[optax.Updates]


def _storage_dtype(name: str, dtype: Any, owner: str) -> np.dtype:
  if dtype is None:
    return np.dtype(jnp.float32)
  try:
    resolved = np.dtype(jnp.dtype(dtype))
  except TypeError:
    resolved = None
  if resolved is None or resolved.name not in STORAGE_DTYPES:
    raise TypeError(f"{owner}: {name} must be one of {', '.join(STORAGE_DTYPES)}"
                    f" (or None: float32), got {dtype!r}.")
  return resolved


def _choice(name: str, value: Any, allowed: Tuple[str, ...],
            owner: str) -> str:
  if value not in allowed:
    raise ValueError(f"{owner}: {name} must be one of "
                     f"{', '.join(map(repr, allowed))}, got {value!r}.")
  return value


def _half_ulp(dtype: np.dtype) -> float:
  """Half the relative gap between 1 and the next value of `dtype`."""
  return float(jnp.finfo(dtype).eps) / 2


def _warn_decay(owner: str, name: str, decay: float, moment: str,
                dtype: np.dtype, moment_rounding: str) -> None:
  """Warns when `decay` rounds to 1 in the storage dtype of its moment."""
  decay = _static(decay)
  if dtype == np.float32 or moment_rounding == "stochastic" or decay is None:
    return
  if float(jnp.asarray(decay, dtype)) == 1.0:
    warnings.warn(
        f"{owner}: {name}={decay} is 1.0 in {dtype.name} ({moment}_dtype): "
        f"a step moves {moment} by (1 - {name}) = {1 - decay:.3g} of its "
        f"distance to the new value, below {dtype.name}'s half-ulp "
        f"({_half_ulp(dtype):.3g} relative), so a round-to-nearest {moment} "
        f"stops tracking slow changes. The update itself is computed in "
        f"float32 with the exact {name}. Use {moment}_dtype=jnp.float32 or "
        "moment_rounding='stochastic'.", stacklevel=3)


def _warn_eps(owner: str, eps: float, eps_root: float,
              dtype: np.dtype) -> None:
  """Warns when second moments as small as eps**2 flush to zero."""
  eps, eps_root = _static(eps), _static(eps_root)
  if dtype == np.float32 or eps is None or eps_root is None:
    return
  for name, tiny in (("eps**2", eps * eps), ("eps_root", eps_root)):
    if tiny > 0 and float(jnp.asarray(tiny, dtype)) == 0.0:
      warnings.warn(
          f"{owner}: {name} = {tiny:.3g} is 0 in {dtype.name} (nu_dtype): "
          f"second moments that small flush to zero, so sqrt(nu) + eps falls "
          f"back to eps where float32 would not. Use nu_dtype=jnp.float32 "
          f"(or bfloat16, which has float32's range).", stacklevel=3)


class _Precision(NamedTuple):
  """The static precision options shared by `adamw` and `sgd`."""
  rounding: str
  moment_rounding: str
  key_data: Optional[jax.Array]
  key_impl: Optional[str]

  @classmethod
  def check(cls, owner: str, rounding: str, moment_rounding: str,
            key: Any) -> "_Precision":
    _choice("rounding", rounding, stochastic_rounding.ROUNDING_MODES, owner)
    _choice("moment_rounding", moment_rounding, MOMENT_ROUNDINGS, owner)
    needs_key = "stochastic" in (rounding, moment_rounding)
    if not needs_key:
      if key is not None:
        raise ValueError(f"{owner}: key is only used with stochastic rounding "
                         f"(rounding='stochastic' or moment_rounding="
                         f"'stochastic'), got rounding={rounding!r}.")
      return cls(rounding, moment_rounding, None, None)
    if key is None:
      raise ValueError(f"{owner}: stochastic rounding needs a key, e.g. "
                       "key=jax.random.key(0).")
    key = stochastic_rounding.check_key(key, owner)
    return cls(rounding, moment_rounding, jax.random.key_data(key),
               str(jax.random.key_impl(key)))

  def init_key(self) -> Optional[jax.Array]:
    return None if self.key_data is None else jnp.array(self.key_data)

  def init_compensation(self, params: optax.Params) -> Optional[Any]:
    if self.rounding != "kahan":
      return None
    def zeros(p):
      if master_update.is_low_precision(p.dtype):
        return jnp.zeros(p.shape, p.dtype)
      return jnp.zeros([0], p.dtype)
    return jax.tree.map(zeros, params)

  def step_key(self, key_data: Optional[jax.Array],
               count: chex.Array) -> Optional[jax.Array]:
    """The rounding seed (uint32 [2]) of applied step `count` (int32, the
    count before it): one PRNG call per step, whatever the leaf count."""
    if key_data is None:
      return None
    key = jax.random.wrap_key_data(key_data, impl=self.key_impl)
    return stochastic_rounding.key_seed(jax.random.fold_in(key, count))

  def store(self, x: chex.Array, dtype: np.dtype, seed: Optional[jax.Array]
            ) -> chex.Array:
    """A float32 moment rounded to its storage dtype."""
    return master_update.round_to(x, dtype, self.moment_rounding, seed)


def _split(seed: Optional[jax.Array], index: int, parts: int):
  """`parts` independent rounding seeds for leaf `index` (None without one).

  Constant xor masks of the step's seed (`stochastic_rounding.stream_seed`),
  not a ``fold_in`` per leaf: on GPT-2 124M compiled for an H100 the
  per-leaf threefry keys and bits were most of the step's compile time
  (XLA:GPU's priority fusion), see `mpjax._src.stochastic_rounding`.
  """
  if seed is None:
    return (None,) * parts
  return tuple(stochastic_rounding.stream_seed(seed, parts * index + i)
               for i in range(parts))


def _moment(g: chex.Array, moment: chex.Array, decay: float, order: int,
            finite: Optional[chex.Array]) -> chex.Array:
  """``(1 - decay) * g**order + decay * moment`` in float32 (optax's EMA).

  With a skip decision the skipped step keeps `moment` bit for bit inside
  the same elementwise update (`fused_skip.moving_average`): no select of
  new against old moments, whose donated buffers XLA then copies.
  """
  moment = moment.astype(jnp.float32)
  if finite is None:
    return optax.tree.update_moment_per_elem_norm(g, moment, decay, order)
  return fused_skip.moving_average(g**order, moment, decay, finite)


def _learning_rate(learning_rate: optax.ScalarOrSchedule,
                   count: chex.Array) -> chex.Array:
  """``-learning_rate`` at `count` in float32 (``scale_by_learning_rate``)."""
  lr = learning_rate(count) if callable(learning_rate) else learning_rate
  return jnp.asarray(-1 * lr, jnp.float32)


def _weight_decay_mask(mask: MaskOrFn, params: optax.Params,
                       owner: str) -> list:
  leaves = jax.tree.leaves(params)
  if mask is None:
    return [True] * len(leaves)
  tree = mask(params) if callable(mask) else mask
  flags = jax.tree.leaves(tree)
  if len(flags) != len(leaves) or not all(isinstance(f, bool) for f in flags):
    raise ValueError(f"{owner}: mask must be a tree of Python bools shaped "
                     f"like the params (or a function of the params giving "
                     f"one), got {tree!r}.")
  return flags


def _check_learning_rate(learning_rate: Any, owner: str) -> None:
  if callable(learning_rate):
    return
  if isinstance(learning_rate, bool) or not (
      isinstance(learning_rate, (int, float)) or (
          hasattr(learning_rate, "dtype") and
          jnp.issubdtype(learning_rate.dtype, jnp.floating))):
    raise TypeError(f"{owner}: learning_rate must be a float, a float array "
                    f"or a schedule, got {learning_rate!r}.")


def _static(value: Any) -> Optional[float]:
  """`value` as a Python float when it is known at construction, else None
  (a traced hyper-parameter of ``optax.inject_hyperparams``)."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _check_hyper(check: Callable, name: str, value: Any, owner: str) -> Any:
  """Checks a Python number with `check`; passes a float array through
  (``optax.inject_hyperparams`` hands hyper-parameters over as arrays)."""
  if hasattr(value, "dtype") and not isinstance(value, (int, float)):
    if not jnp.issubdtype(value.dtype, jnp.floating) or jnp.shape(value):
      raise TypeError(f"{owner}: {name} must be a float or a float scalar, "
                      f"got {value!r}.")
    return value
  return check(name, value, owner)


def _one_minus_power(beta: Any, count: chex.Array) -> chex.Array:
  """``1 - beta**count``: `mpjax.adam`'s for a Python float, the same
  formula in float32 for an injected (array) beta."""
  if not hasattr(beta, "dtype"):
    return adam_lib.one_minus_power(beta, count)
  beta = jnp.asarray(beta, jnp.float32)
  return -jnp.expm1(count.astype(jnp.float32) * jnp.log(beta))


def _check_float(name: str, value: Any, owner: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"{owner}: {name} must be a float, got {value!r}.")
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"{owner}: {name} must be finite and >= 0, got {value!r}.")
  return float(value)


def _require_params(params: Any, owner: str) -> None:
  if params is None:
    raise ValueError(f"{owner}: update needs the params (it writes the update "
                     "back to them); call tx.update(grads, state, params).")


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
          weight_decay: Any = 1e-4, mask: MaskOrFn = None, *,
          mu_dtype: Any = None, nu_dtype: Any = None,
          rounding: str = "nearest", moment_rounding: str = "nearest",
          key: Optional[jax.Array] = None
          ) -> optax.GradientTransformationExtraArgs:
  """AdamW with per-moment storage dtypes and 16-bit master-weight rounding.

  Per leaf, in float32: ``mu = (1 - b1) g + b1 mu``, ``nu = (1 - b2) g**2 +
  b2 nu``, ``u = -lr (mu / c1 / (sqrt(nu / c2 + eps_root) + eps) + wd p)``
  with the bias corrections ``c = 1 - b**t`` of `mpjax.adam`; then ``p + u``
  is rounded to the params' dtype by `rounding` and the moments to their
  storage dtypes by `moment_rounding`. The count, the schedule and the
  rounding key move on applied steps only.

  Args:
    learning_rate: a float, a float32 array (``optax.inject_hyperparams``) or
      an optax schedule of the applied-step count.
    b1, b2: decay rates of the moments, floats in [0, 1). Under
      ``optax.inject_hyperparams`` they arrive as arrays, which it stores in
      the params' dtype unless given ``hyperparam_dtype=jnp.float32``
      (``b2=0.999`` is 1.0 in bfloat16); the bias corrections of an array
      beta are computed in float32 rather than from its float64 log.
    eps: added to ``sqrt(nu_hat)``, as optax and torch do.
    eps_root: added to ``nu_hat`` inside the root.
    weight_decay: decoupled weight decay (optax's default 1e-4; 0.0 is Adam).
    mask: which params decay: a tree of bools like the params, or a function
      of the params returning one; None: all.
    mu_dtype, nu_dtype: storage dtypes of the moments: float32 (None),
      bfloat16 or float16. A warning says when ``b1``/``b2`` is 1.0 in it
      (``b2=0.999`` in bfloat16) or ``eps**2`` is 0 (float16).
    rounding: how ``p + u`` reaches 16-bit params: ``"nearest"`` (updates
      below half an ulp are lost), ``"stochastic"`` (unbiased; needs `key`)
      or ``"kahan"`` (a compensation buffer per param keeps what rounding
      dropped). float32 params are updated as ``p + u`` whatever it is.
    moment_rounding: ``"nearest"`` or ``"stochastic"`` (needs `key`), for
      16-bit moments.
    key: a PRNG key (``jax.random.key(seed)``) for stochastic rounding.

  Returns:
    A `GradientTransformationExtraArgs` whose state is an `AdamWState`. It
    must be the last transformation of its chain (see
    `mpjax._src.master_update`) and its ``update`` needs the params. It takes
    `loss_scaled`'s ``finite_decision`` (`mpjax._src.fused_skip`).

  Raises:
    TypeError: a storage dtype that is not a float of `STORAGE_DTYPES`, or a
      key that is not a PRNG key.
    ValueError: an unknown rounding mode, or a key missing or unused.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, mpjax
    >>> tx = mpjax.adamw(1e-3, weight_decay=0.0, nu_dtype=jnp.bfloat16,
    ...                  b2=0.95, rounding="stochastic", key=jax.random.key(0))
    >>> params = {"w": jnp.ones(3, jnp.bfloat16)}
    >>> state = tx.init(params)
    >>> state.nu["w"].dtype, state.mu["w"].dtype
    (dtype(bfloat16), dtype('float32'))
    >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].dtype, int(state.count)
    (dtype(bfloat16), 1)
  """
  owner = "mpjax.adamw"
  _check_learning_rate(learning_rate, owner)
  b1 = _check_hyper(adam_lib.check_beta, "b1", b1, owner)
  b2 = _check_hyper(adam_lib.check_beta, "b2", b2, owner)
  eps = _check_hyper(_check_float, "eps", eps, owner)
  eps_root = _check_hyper(_check_float, "eps_root", eps_root, owner)
  weight_decay = _check_hyper(_check_float, "weight_decay", weight_decay,
                              owner)
  mu_dtype = _storage_dtype("mu_dtype", mu_dtype, owner)
  nu_dtype = _storage_dtype("nu_dtype", nu_dtype, owner)
  precision = _Precision.check(owner, rounding, moment_rounding, key)
  _warn_decay(owner, "b1", b1, "mu", mu_dtype, moment_rounding)
  _warn_decay(owner, "b2", b2, "nu", nu_dtype, moment_rounding)
  _warn_eps(owner, eps, eps_root, nu_dtype)

  def init_fn(params):
    return AdamWState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params, dtype=nu_dtype),
        key=precision.init_key(),
        compensation=precision.init_compensation(params))

  def update_fn(grads, state, params=None, **extra_args):
    _require_params(params, owner)
    decision = fused_skip.FiniteDecision.from_extra_args(extra_args)
    finite = None if decision is None else decision.finite
    count = optax.safe_increment(state.count)
    c1, c2 = _one_minus_power(b1, count), _one_minus_power(b2, count)
    step_size = _learning_rate(learning_rate, state.count)
    decays = _weight_decay_mask(mask, params, owner)
    step_key = precision.step_key(state.key, state.count)

    treedef = jax.tree.structure(params)
    flat = [treedef.flatten_up_to(t) for t in (grads, state.mu, state.nu)]
    comps = (treedef.flatten_up_to(state.compensation)
             if state.compensation is not None
             else [None] * treedef.num_leaves)
    out_u, out_mu, out_nu, out_c = [], [], [], []
    for i, (g, mu, nu, p, c, decay) in enumerate(zip(
        *flat, treedef.flatten_up_to(params), comps, decays)):
      k_mu, k_nu, k_p = _split(step_key, i, 3)
      g = g.astype(jnp.float32)
      m32 = _moment(g, mu, b1, 1, finite)
      v32 = _moment(g, nu, b2, 2, finite)
      u = (m32 / c1) / (jnp.sqrt(v32 / c2 + eps_root) + eps)
      if decay and not (isinstance(weight_decay, float) and weight_decay == 0):
        u = u + weight_decay * p.astype(jnp.float32)
      u = step_size * u
      new_mu = precision.store(m32, mu_dtype, k_mu)
      new_nu = precision.store(v32, nu_dtype, k_nu)
      u, c = master_update.write_back(p, u, rounding=precision.rounding,
                                      seed=k_p, compensation=c, finite=finite)
      out_u.append(u)
      out_mu.append(new_mu)
      out_nu.append(new_nu)
      out_c.append(c)

    if finite is not None:
      count = jnp.where(finite, count, state.count)
    new_state = AdamWState(
        count=count,
        mu=treedef.unflatten(out_mu),
        nu=treedef.unflatten(out_nu),
        key=state.key,
        compensation=(None if state.compensation is None
                      else treedef.unflatten(out_c)))
    if decision is not None:
      decision.take(new_state)
    return treedef.unflatten(out_u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sgd(learning_rate: optax.ScalarOrSchedule,
        momentum: Optional[float] = None, nesterov: bool = False, *,
        mu_dtype: Any = None, rounding: str = "nearest",
        moment_rounding: str = "nearest", key: Optional[jax.Array] = None
        ) -> optax.GradientTransformationExtraArgs:
  """SGD (with momentum) with a momentum storage dtype and master rounding.

  Per leaf, in float32: ``mu = g + momentum * mu`` (optax's `trace`), ``u =
  -lr * (g + momentum * mu if nesterov else mu)``, then ``p + u`` rounded
  as for `adamw`. Weight decay: chain ``optax.add_decayed_weights`` *before*
  it (torch's SGD adds it to the gradient too).

  Args:
    learning_rate: a float, a float32 array or an optax schedule.
    momentum: the decay of the momentum buffer in [0, 1), or None (no buffer).
    nesterov: Nesterov momentum.
    mu_dtype: the buffer's storage dtype: float32 (None), bfloat16, float16.
    rounding, moment_rounding, key: as for `adamw`.

  Returns:
    A `GradientTransformationExtraArgs` whose state is an `SGDState`; with
    float32 params and buffers it is ``optax.sgd`` bit for bit.

  Examples:
    >>> import jax.numpy as jnp, optax, mpjax
    >>> tx = mpjax.sgd(0.5, momentum=0.9, mu_dtype=jnp.bfloat16,
    ...                rounding="kahan")
    >>> params = jnp.ones(2, jnp.bfloat16)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.full(2, 2.0**-12), state, params)
    >>> optax.apply_updates(params, updates).tolist()  # below half an ulp
    [1.0, 1.0]
    >>> state.compensation.tolist()  # kept for the next step
    [-0.0001220703125, -0.0001220703125]
  """
  owner = "mpjax.sgd"
  _check_learning_rate(learning_rate, owner)
  if momentum is not None:
    momentum = _check_hyper(adam_lib.check_beta, "momentum", momentum, owner)
  if not isinstance(nesterov, bool):
    raise TypeError(f"{owner}: nesterov must be a bool, got {nesterov!r}.")
  mu_dtype = _storage_dtype("mu_dtype", mu_dtype, owner)
  precision = _Precision.check(owner, rounding, moment_rounding, key)
  if momentum is not None:
    _warn_decay(owner, "momentum", momentum, "mu", mu_dtype, moment_rounding)

  def init_fn(params):
    return SGDState(
        count=jnp.zeros([], jnp.int32),
        mu=(None if momentum is None
            else optax.tree.zeros_like(params, dtype=mu_dtype)),
        key=precision.init_key(),
        compensation=precision.init_compensation(params))

  def update_fn(grads, state, params=None, **extra_args):
    _require_params(params, owner)
    decision = fused_skip.FiniteDecision.from_extra_args(extra_args)
    finite = None if decision is None else decision.finite
    step_size = _learning_rate(learning_rate, state.count)
    step_key = precision.step_key(state.key, state.count)
    treedef = jax.tree.structure(params)
    none = [None] * treedef.num_leaves
    mus = none if state.mu is None else treedef.flatten_up_to(state.mu)
    comps = (none if state.compensation is None
             else treedef.flatten_up_to(state.compensation))
    out_u, out_mu, out_c = [], [], []
    for i, (g, mu, p, c) in enumerate(zip(
        treedef.flatten_up_to(grads), mus, treedef.flatten_up_to(params),
        comps)):
      k_mu, k_p = _split(step_key, i, 2)
      g = g.astype(jnp.float32)
      u = g
      if mu is not None:
        if finite is None:
          m32 = g + momentum * mu.astype(jnp.float32)
        else:  # as in `_moment`: -0.0 + mu is mu, bit for bit
          m32 = (jnp.where(finite, g, jnp.float32(-0.0)) +
                 jnp.where(finite, jnp.asarray(momentum, jnp.float32), 1.0)
                 * mu.astype(jnp.float32))
        u = g + momentum * m32 if nesterov else m32
        out_mu.append(precision.store(m32, mu_dtype, k_mu))
      u, c = master_update.write_back(p, step_size * u,
                                      rounding=precision.rounding, seed=k_p,
                                      compensation=c, finite=finite)
      out_u.append(u)
      out_c.append(c)

    count = optax.safe_increment(state.count)
    if finite is not None:
      count = jnp.where(finite, count, state.count)
    new_state = SGDState(
        count=count,
        mu=None if state.mu is None else treedef.unflatten(out_mu),
        key=state.key,
        compensation=(None if state.compensation is None
                      else treedef.unflatten(out_c)))
    if decision is not None:
      decision.take(new_state)
    return treedef.unflatten(out_u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
