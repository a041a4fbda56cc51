"""Op classes under torch's CPU autocast against mpjax's float32 islands.

A float32 input ``x`` [4, 16] goes through a matmul with ``w`` [16, 8] in a
low-precision region (`torch.autocast("cpu", dtype)` on one side, a jmp
policy's ``cast_to_compute`` on the other), then through one op. The tests
check the output dtype each side gives and that each side's values are as
accurate as its output dtype allows, against a float64 reference computed from
that side's own matmul output.

Where the dtypes differ, they differ on purpose: torch's *CPU* autocast runs
losses (cross_entropy, nll_loss, mse_loss...), linalg and fft ops in float32
but not softmax, log_softmax, logsumexp or layer_norm, which on a bfloat16
activation return bfloat16 on CPU; torch's *CUDA* autocast runs them in
float32 (autocast op reference, "CUDA Ops that can autocast to float32"), and
mpjax's numerics islands follow that list on every device. sum and exp, also
on the CUDA float32 list, have no mpjax island: ``jnp.sum`` / ``jnp.exp`` keep
the compute dtype, as torch's CPU autocast does. torch 2.13's CPU autocast
takes float16 as well as bfloat16; both are checked.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import mpjax
from mpjax._src import numerics

torch = pytest.importorskip(
    "torch", reason="torch is not installed; it comes with the `conformance` "
    "extra: pip install -e '.[conformance]'")
F = torch.nn.functional

LABELS = np.array([0, 3, 7, 1])

# op: (torch fn, mpjax fn, float64 reference), each taking the matmul output
# h [4, 8] plus the float32 layer-norm scale g and bias b [8].
OPS = {
    "matmul": (lambda h, g, b: h, lambda h, g, b: h, lambda h, g, b: h),
    "softmax": (
        lambda h, g, b: torch.softmax(h, -1),
        lambda h, g, b: numerics.softmax(h),
        lambda h, g, b: np.exp(h - h.max(-1, keepdims=True))
        / np.exp(h - h.max(-1, keepdims=True)).sum(-1, keepdims=True)),
    "log_softmax": (
        lambda h, g, b: torch.log_softmax(h, -1),
        lambda h, g, b: numerics.log_softmax(h),
        lambda h, g, b: h - _logsumexp(h)[:, None]),
    "logsumexp": (
        lambda h, g, b: torch.logsumexp(h, -1),
        lambda h, g, b: numerics.logsumexp(h),
        lambda h, g, b: _logsumexp(h)),
    "layer_norm": (
        lambda h, g, b: F.layer_norm(h, (h.shape[-1],), g, b, eps=1e-5),
        lambda h, g, b: numerics.layer_norm(h, g, b, epsilon=1e-5),
        lambda h, g, b: (h - h.mean(-1, keepdims=True))
        / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * g + b),
    "sum": (lambda h, g, b: h.sum(-1), lambda h, g, b: jnp.sum(h, -1),
            lambda h, g, b: h.sum(-1)),
    "exp": (lambda h, g, b: torch.exp(h), lambda h, g, b: jnp.exp(h),
            lambda h, g, b: np.exp(h)),
    "cross_entropy": (
        lambda h, g, b: F.cross_entropy(h, torch.from_numpy(LABELS)),
        lambda h, g, b: numerics.softmax_cross_entropy_with_integer_labels(
            h, jnp.asarray(LABELS)).mean(),
        lambda h, g, b: np.mean(_logsumexp(h) - h[np.arange(4), LABELS])),
}

# The output dtype of each op on the matmul output: "c" is the compute dtype.
TORCH_CPU_DTYPE = {"matmul": "c", "softmax": "c", "log_softmax": "c",
                   "logsumexp": "c", "layer_norm": "c", "sum": "c", "exp": "c",
                   "cross_entropy": "float32"}
MPJAX_DTYPE = {"matmul": "c", "softmax": "float32", "log_softmax": "float32",
               "logsumexp": "float32", "layer_norm": "float32", "sum": "c",
               "exp": "c", "cross_entropy": "float32"}


def _logsumexp(h):
  top = h.max(-1)
  return top + np.log(np.exp(h - top[:, None]).sum(-1))


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 16)).astype(np.float32)
  w = (0.25 * rng.normal(size=(16, 8))).astype(np.float32)
  g = (1.0 + 0.1 * rng.normal(size=8)).astype(np.float32)
  b = (0.1 * rng.normal(size=8)).astype(np.float32)
  return x, w, g, b


def _unit_roundoff(dtype) -> float:
  return float(jnp.finfo(dtype).eps) / 2


@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
@pytest.mark.parametrize("op", list(OPS))
def test_op_dtype_and_accuracy_against_torch_cpu_autocast(op, compute):
  torch_fn, mpjax_fn, reference = OPS[op]
  x, w, g, b = _inputs()
  torch_dtype = getattr(torch, compute)
  with torch.autocast("cpu", dtype=torch_dtype):
    h_torch = torch.from_numpy(x) @ torch.from_numpy(w)
    theirs = torch_fn(h_torch, torch.from_numpy(g), torch.from_numpy(b))
  policy = mpjax.get_policy(f"p=f32,c={compute},o=f32")
  h_ours = policy.cast_to_compute(jnp.asarray(x)) @ policy.cast_to_compute(
      jnp.asarray(w))
  ours = mpjax_fn(h_ours, jnp.asarray(g), jnp.asarray(b))

  expected = lambda kind: compute if kind == "c" else kind
  assert str(theirs.dtype) == f"torch.{expected(TORCH_CPU_DTYPE[op])}"
  assert str(ours.dtype) == expected(MPJAX_DTYPE[op])

  # Both matmuls take the operands rounded to the compute dtype and round a
  # float32 accumulation of their product back to it.
  h_torch = h_torch.float().numpy()
  h_ours = np.asarray(h_ours.astype(jnp.float32))
  rounded = lambda a: np.asarray(
      jnp.asarray(a).astype(compute).astype(jnp.float32), np.float64)
  exact = rounded(x) @ rounded(w)
  for h in (h_torch, h_ours):
    np.testing.assert_allclose(h, exact, rtol=2 * _unit_roundoff(compute),
                               atol=1e-6)

  _check_accuracy(theirs.float().numpy(), h_torch,
                  str(theirs.dtype).removeprefix("torch."), reference, g, b)
  _check_accuracy(np.asarray(ours.astype(jnp.float32)), h_ours,
                  str(ours.dtype), reference, g, b)


def _check_accuracy(out, h, out_dtype, reference, g, b):
  """`out` is as accurate as its own dtype allows, against float64.

  The reference is computed in float64 from the same (rounded) matmul output
  `h`, so only the op's own error counts: a bfloat16 output is allowed 8
  roundings of bfloat16 (unit roundoff 2**-9), a float16 one 8 of float16
  (2**-12), a float32 island's output 64 of float32 (2**-24, ~4e-6) which a
  computation in the compute dtype could never meet.
  """
  ref = reference(h.astype(np.float64), g.astype(np.float64),
                  b.astype(np.float64))
  u = _unit_roundoff(out_dtype)
  # Outputs near 0 (layer_norm, log_softmax) get an absolute allowance too.
  tol = (8 * u if out_dtype != "float32" else 64 * u)
  np.testing.assert_allclose(out, ref, rtol=tol, atol=tol,
                             err_msg=f"output dtype {out_dtype}")
