"""Tests for mpjax/_src/hooks_linen.py: the one module-call hook for linen."""

import threading

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

import mpjax
from mpjax._src import hooks_linen
from mpjax._src.policy_map import PolicyMap

F32 = jnp.float32
X = jnp.ones((2, 4), F32)


class Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name="ln")(nn.Dense(8, name="fc")(x))
    return nn.Embed(5, 8, name="embed").attend(x)


VARIABLES = Net().init(jax.random.key(0), X)


def recording(log, name="hook"):
  """A hook appending (name, path, chain classes, method, rule, dtypes)."""
  def hook(next_fun, args, kwargs, call):
    out = next_fun(*args, **kwargs)
    log.append((name, call.path, tuple(c.__name__ for _, c in call.chain),
                call.method, None if call.policy is None else call.policy.rule,
                jnp.dtype(args[0].dtype).name, jnp.dtype(out.dtype).name))
    return out
  return hook


def test_a_hook_sees_path_chain_method_policy_and_the_callers_dtypes():
  log = []
  apply = mpjax.with_policy(Net().apply, PolicyMap("mixed_bfloat16"))
  with hooks_linen.intercept(recording(log)):
    apply(VARIABLES, X)
  # Registered outside the policy: the call as the caller makes it (inputs
  # before the boundary's cast, outputs after it); the map's policy comes
  # with it. The shape-only discovery trace is not seen: each call once.
  assert log == [
      ("hook", "fc", ("Net", "Dense"), "__call__", "low-precision layer",
       "bfloat16", "bfloat16"),  # the root's boundary cast its input
      ("hook", "ln", ("Net", "LayerNorm"), "__call__", "float32 island",
       "bfloat16", "float32"),
      ("hook", "embed", ("Net", "Embed"), "attend", "low-precision layer",
       "float32", "bfloat16"),
      ("hook", "", ("Net",), "__call__", "default", "float32", "float32"),
  ]


def test_without_a_map_calls_carry_no_policy():
  log = []
  with hooks_linen.intercept(recording(log)):
    Net().apply(VARIABLES, X)
  assert [entry[4] for entry in log] == [None] * 4


def test_hooks_compose_the_first_registered_outermost():
  order = []

  def named(name):
    def hook(next_fun, args, kwargs, call):
      order.append(f"{name}>{call.path}")
      out = next_fun(*args, **kwargs)
      order.append(f"{name}<{call.path}")
      return out
    return hook

  with hooks_linen.intercept(named("outer")), \
      hooks_linen.intercept(named("inner")):
    nn.Dense(8).apply({"params": VARIABLES["params"]["fc"]}, X)
  assert order == ["outer>", "inner>", "inner<", "outer<"]


def test_a_hook_can_replace_the_call():
  def zero_dense(next_fun, args, kwargs, call):
    if call.cls is nn.Dense:
      return jnp.zeros((args[0].shape[0], 8), args[0].dtype)
    return next_fun(*args, **kwargs)

  with hooks_linen.intercept(zero_dense):
    out = Net().apply(VARIABLES, X)
  ln = VARIABLES["params"]["ln"]
  expected = nn.LayerNorm().apply({"params": ln}, jnp.zeros((2, 8)))
  expected = expected @ VARIABLES["params"]["embed"]["embedding"].T
  chex.assert_trees_all_close(out, expected)


def test_suspended_hides_calls_from_the_hooks_around_it_only():
  outer, inner = [], []
  with hooks_linen.intercept(recording(outer)):
    with hooks_linen.suspended(), hooks_linen.intercept(recording(inner)):
      Net().apply(VARIABLES, X)
    Net().apply(VARIABLES, X)
  assert len(inner) == 4 and len(outer) == 4


def test_a_thread_that_does_not_intercept_is_not_seen():
  log = []
  entered, called = threading.Event(), threading.Event()

  def other_thread():
    entered.wait(timeout=60)
    Net().apply(VARIABLES, X)
    called.set()

  thread = threading.Thread(target=other_thread)
  thread.start()
  with hooks_linen.intercept(recording(log)):
    entered.set()
    assert called.wait(timeout=60)
  thread.join()
  assert not log
