"""Tests for mpjax/_src/hooks_nnx.py: the one module-call hook for NNX."""

import dataclasses
import threading

import chex
import jax.numpy as jnp
from flax import nnx

from mpjax._src import hooks_nnx
from mpjax._src.nnx_policy import with_nnx_policy
from mpjax._src.policy_map import PolicyMap

F32 = jnp.float32
X = jnp.ones((2, 4), F32)


class Net(nnx.Module):

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.fc = nnx.Linear(4, 8, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.embed = nnx.Embed(5, 8, rngs=rngs)

  def __call__(self, x):
    return self.embed.attend(self.ln(self.fc(x)))


def recording(log, name="hook"):
  """A hook appending (name, path, chain classes, method, rule, dtypes)."""
  def hook(next_fun, args, kwargs, call):
    out = next_fun(*args, **kwargs)
    log.append((name, call.path, tuple(c.__name__ for _, c in call.chain),
                call.method, None if call.policy is None else call.policy.rule,
                jnp.dtype(args[0].dtype).name, jnp.dtype(out.dtype).name))
    return out
  return hook


def test_an_observer_sees_path_chain_method_policy_and_the_callers_dtypes():
  model = with_nnx_policy(Net(), PolicyMap("mixed_bfloat16"))
  log = []
  with hooks_nnx.observe(recording(log), model):
    model(X)
  # Outside the policy's attached hook: the call as the caller makes it.
  assert log == [
      ("hook", "fc", ("Net", "Linear"), "__call__", "low-precision layer",
       "bfloat16", "bfloat16"),  # the root's boundary cast its input
      ("hook", "ln", ("Net", "LayerNorm"), "__call__", "float32 island",
       "bfloat16", "float32"),
      ("hook", "embed", ("Net", "Embed"), "attend", "low-precision layer",
       "float32", "bfloat16"),
      ("hook", "", ("Net",), "__call__", "default", "float32", "float32"),
  ]
  model(X)
  assert len(log) == 4  # the block is over


def test_observing_swaps_instances_not_flax_classes():
  model = Net()
  linear_call = vars(nnx.Linear)["__call__"]
  with hooks_nnx.observe(recording([]), model):
    assert vars(nnx.Linear)["__call__"] is linear_call
    assert isinstance(model.fc, nnx.Linear) and type(model.fc) is not nnx.Linear
  assert hooks_nnx.original_class(model.fc) is nnx.Linear
  assert nnx.Linear(4, 8, rngs=nnx.Rngs(0)).__class__ is nnx.Linear


@dataclasses.dataclass(frozen=True)
class Scale:
  """An attached hook (a value, as a Site needs): multiplies the output."""
  factor: float

  def __call__(self, next_fun, args, kwargs, call):
    return next_fun(*args, **kwargs) * self.factor


def test_attached_hooks_compose_inside_observers_and_travel_in_the_graphdef():
  model = Net()
  expected = model.fc(X) * 6.0
  site = hooks_nnx.Site("fc", (("", Net), ("fc", nnx.Linear)),
                        hooks=(Scale(2.0), Scale(3.0)))
  hooks_nnx.attach(model.fc, site)
  assert hooks_nnx.site_of(model.fc) == site
  log = []
  with hooks_nnx.observe(recording(log), model.fc):
    chex.assert_trees_all_close(model.fc(X), expected)
  assert log[0][1] == ""  # the observer's path is from its own root
  copy = nnx.merge(*nnx.split(model))
  chex.assert_trees_all_close(copy.fc(X), expected)
  hooks_nnx.detach(model.fc)
  assert type(model.fc) is nnx.Linear and hooks_nnx.site_of(model.fc) is None


def test_a_hook_can_replace_the_call():
  model = Net()

  def zero_linear(next_fun, args, kwargs, call):
    if call.cls is nnx.Linear:
      return jnp.zeros((args[0].shape[0], 8), args[0].dtype)
    return next_fun(*args, **kwargs)

  with hooks_nnx.observe(zero_linear, model):
    out = model(X)
  chex.assert_trees_all_close(
      out, model.embed.attend(model.ln(jnp.zeros((2, 8)))))


class Doubled(nnx.Linear):

  def __call__(self, x):
    return super().__call__(x) * 2


def test_a_super_call_is_one_hooked_call():
  layer = Doubled(4, 8, rngs=nnx.Rngs(0))
  log = []
  with hooks_nnx.observe(recording(log), layer):
    layer(X)
  assert [(e[1], e[2]) for e in log] == [("", ("Doubled",))]


def test_a_thread_that_does_not_observe_is_not_seen():
  # The same model in two threads: one observing, one not. A class-level
  # patch (or a process-wide observer list) would record the other
  # thread's calls too, or leave flax's class patched.
  model = Net()
  linear_call = vars(nnx.Linear)["__call__"]
  log = []
  entered, called = threading.Event(), threading.Event()

  def other_thread():
    entered.wait(timeout=60)
    for _ in range(3):
      model(X)
    called.set()

  thread = threading.Thread(target=other_thread)
  thread.start()
  with hooks_nnx.observe(recording(log), model):
    entered.set()
    assert called.wait(timeout=60)
    model(X)
  thread.join()
  assert [e[1] for e in log] == ["fc", "ln", "embed", ""]
  assert vars(nnx.Linear)["__call__"] is linear_call
