"""Tests for mpjax/_src/policy_table.py: the per-module dtype table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpjax._src.policy_table import PolicyRow
from mpjax._src.policy_table import policy_table
from mpjax._src.policy_map import PolicyMap
from mpjax._src.nnx_policy import with_nnx_policy

X = jnp.ones((2, 6), jnp.float32)


class Raw(nn.Module):
  """A user layer with a raw param and no dtype: promotes when fed float32."""

  @nn.compact
  def __call__(self, x):
    return x @ self.param("w", nn.initializers.ones, (x.shape[-1], 3))


class Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="fc")(x)
    x = nn.LayerNorm(name="ln")(x)
    x = Raw(name="raw")(x)
    return nn.Dense(2, dtype=jnp.float32, name="head")(x)


def by_path(rows):
  return {r.path: r for r in rows}


def test_linen_rows_show_each_modules_dtypes_counts_and_rule():
  rows = policy_table(Net(), X, policy=PolicyMap("mixed_bfloat16"),
                      print_fn=None)
  assert all(isinstance(r, PolicyRow) for r in rows)
  assert [r.path for r in rows] == ["(root)", "fc", "ln", "raw", "head"]
  got = {r.path: (r.cls, r.param_dtype, r.compute_dtype, r.output_dtype,
                  r.param_count, r.param_bytes, r.rule) for r in rows}
  assert got == {
      "(root)": ("Net", "-", "bfloat16", "float32", 0, 0, "default"),
      "fc": ("Dense", "float32", "bfloat16", "bfloat16", 56, 224,
             "low-precision layer"),
      "ln": ("LayerNorm", "float32", "float32", "float32", 16, 64,
             "float32 island"),
      "raw": ("Raw", "float32", "float32", "float32", 24, 96, "inherited"),
      "head": ("Dense", "float32", "float32", "bfloat16", 8, 32,
               "low-precision layer"),
  }
  rows = by_path(rows)
  assert rows["raw"].note == "promoted to float32 (policy computes in bfloat16)"
  assert rows["head"].note == "own dtype=float32 overrides the map's bfloat16"
  assert rows["fc"].note == rows["ln"].note == ""
  params = Net().init(jax.random.key(0), X)["params"]
  assert sum(r.param_count for r in by_path(
      policy_table(Net(), X, print_fn=None)).values()) == sum(
          np.size(p) for p in jax.tree.leaves(params))


def test_linen_without_a_policy_and_with_a_whole_model_policy():
  plain = by_path(policy_table(Net(), X, print_fn=None))
  assert plain["fc"].compute_dtype == "float32" and plain["fc"].rule == "-"
  whole = by_path(policy_table(Net(), X, policy="mixed_bfloat16",
                               print_fn=None))
  # jmp's whole-model cast: every module computes in bfloat16, norms too.
  assert whole["ln"].compute_dtype == "bfloat16"
  assert whole["ln"].output_dtype == "bfloat16"
  assert whole["fc"].param_dtype == "float32"  # as stored, before the cast


def test_the_table_is_printed_with_a_total_line():
  printed = []
  policy_table(Net(), X, policy=PolicyMap("mixed_float16"),
               print_fn=printed.append)
  (text,) = printed
  lines = text.splitlines()
  assert lines[0].split()[:5] == ["path", "class", "params", "compute",
                                  "output"]
  assert lines[-1].split() == ["total", "104", "416"]
  assert any(line.startswith("ln ") and "float32 island" in line
             for line in lines)


class NNXNet(nnx.Module):

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.fc = nnx.Linear(6, 8, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
    self.embed = nnx.Embed(5, 8, rngs=rngs)

  def __call__(self, x):
    x = self.ln(self.fc(x))
    for layer in self.layers:
      x = layer(x)
    return self.embed.attend(x)


def test_nnx_rows_match_the_map_and_leave_the_model_unchanged():
  model = NNXNet()
  rows = policy_table(model, X, policy=PolicyMap("mixed_float16",
                                                 {"layers/1": "float32"}),
                      print_fn=None)
  got = {r.path: (r.cls, r.param_dtype, r.compute_dtype, r.output_dtype,
                  r.param_count, r.rule) for r in rows}
  assert got == {
      "(root)": ("NNXNet", "-", "float16", "float32", 0, "default"),
      "fc": ("Linear", "float32", "float16", "float16", 56,
             "low-precision layer"),
      "ln": ("LayerNorm", "float32", "float32", "float32", 16,
             "float32 island"),
      "layers/0": ("Linear", "float32", "float16", "float16", 72,
                   "low-precision layer"),
      "layers/1": ("Linear", "float32", "float32", "float32", 72,
                   "path 'layers/1'"),
      "embed.attend": ("Embed", "float32", "float16", "float16", 40,
                       "low-precision layer"),
  }
  assert type(model.fc) is nnx.Linear and model.embed.dtype == jnp.float32
  # A prepared model is audited with the map it carries.
  with_nnx_policy(model, PolicyMap("mixed_bfloat16"))
  rows = by_path(policy_table(model, X, print_fn=None))
  assert rows["fc"].compute_dtype == "bfloat16"
  assert rows["layers/1"].output_dtype == "bfloat16"


def test_policy_table_rejects_other_objects():
  with pytest.raises(TypeError, match="linen.Module or an nnx.Module"):
    policy_table(lambda x: x, X)
  with pytest.raises(ValueError, match="variables= is for linen"):
    policy_table(NNXNet(), X, variables={})
