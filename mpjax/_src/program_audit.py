"""What a jitted step asks XLA for: matmul dtypes, converts, host round trips.

Evidence that holds on any device: it reads the *lowered* StableHLO
(``jax.jit(f).lower(...).as_text()``), the program mpjax hands to XLA, not
the compiled one (XLA:CPU upcasts float16/bfloat16 matmuls when it compiles,
so a CPU-compiled program says nothing about a GPU). And the bytes of the
residuals the backward pass keeps (the arrays held by `jax.vjp`'s closure),
found with `jax.eval_shape`, so nothing is computed or allocated.

Ops are counted once per occurrence in the program text; a function called
from several places (rare in a train step: `nn.scan`, `lax.map`) counts once.
"""

import collections
import math
import re
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

import jax
import numpy as np

_TENSOR = re.compile(r"tensor<([^>]*)>")
_DOT = re.compile(
    r"stablehlo\.dot_general\s+%[\w#.]+,\s*%[\w#.]+,.*?contracting_dims\s*=\s*"
    r"\[([\d,\s]*)\]\s*x\s*\[[\d,\s]*\].*?:\s*\((tensor<[^>]*>),\s*"
    r"(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)")
_CONV = re.compile(
    r"stablehlo\.convolution\(.*?dim_numbers\s*=\s*\[[^\]]*\]x\[([^\]]*)\]->"
    r".*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)")
_HOST_PATTERNS = (
    ("host callback", re.compile(r"custom_call\s*@\w*(callback|host_compute)\w*")),
    ("infeed", re.compile(r"stablehlo\.infeed")),
    ("outfeed", re.compile(r"stablehlo\.outfeed")),
    ("send", re.compile(r"stablehlo\.send")),
    ("recv", re.compile(r"stablehlo\.recv")),
    ("host transfer", re.compile(
        r"custom_call\s*@(annotate_device_placement|MoveToHost|MoveToDevice)"
        r"|mhlo\.memory_kind\s*=\s*\"pinned_host\"")),
)
# Non-matmul ops whose dtype says whether a float32 island is in place.
_ISLAND_OPS = ("exponential", "log", "rsqrt", "sqrt", "tanh", "logistic",
               "divide", "reduce", "power", "exponential_minus_one",
               "log_plus_one")
_ELEMENT = re.compile(r"stablehlo\.(%s)\b[^\n]*?->\s*(tensor<[^>]*>)"
                      % "|".join(_ISLAND_OPS))
_ELEMENT_SAME = re.compile(r"=\s*stablehlo\.(%s)\s[^\n]*?:\s*(tensor<[^>]*>)\s*$"
                           % "|".join(_ISLAND_OPS), re.M)

DTYPE_NAMES = {"f64": "float64", "f32": "float32", "f16": "float16",
               "bf16": "bfloat16", "f8E4M3FN": "float8_e4m3fn",
               "f8E5M2": "float8_e5m2", "i1": "bool", "i8": "int8",
               "i32": "int32", "i64": "int64", "ui32": "uint32"}


def _tensor(text: str) -> Tuple[Tuple[int, ...], str]:
  """``tensor<16x8xf16>`` -> ((16, 8), 'float16')."""
  body = _TENSOR.match(text).group(1)
  *dims, element = body.split("x")
  shape = tuple(int(d) for d in dims if d and d != "?")
  return shape, DTYPE_NAMES.get(element, element)


class MatmulOp(NamedTuple):
  """One ``dot_general`` or ``convolution`` of the lowered program."""
  kind: str  # "dot_general" or "convolution"
  lhs_dtype: str
  rhs_dtype: str
  out_dtype: str
  flops: int  # 2 x multiply-adds
  lhs_shape: Tuple[int, ...]
  rhs_shape: Tuple[int, ...]


class ProgramAudit(NamedTuple):
  """The dtypes a lowered program asks for.

  Attributes:
    matmuls: every dot_general and convolution with operand dtypes and FLOPs.
    converts: number of ``stablehlo.convert`` ops (dtype changes).
    host_ops: host callbacks, infeed/outfeed, send/recv and host-memory
      transfers found (each ``kind: line``); empty for a step that never
      leaves the device.
    op_dtypes: for transcendental, division and reduction ops, the count per
      result dtype (``{"exponential": {"float32": 2, "bfloat16": 1}}``): the
      float32 ones in a mixed step are its float32 islands.
  """
  matmuls: Tuple[MatmulOp, ...]
  converts: int
  host_ops: Tuple[str, ...]
  op_dtypes: Dict[str, Dict[str, int]]

  @property
  def matmul_flops(self) -> int:
    return sum(m.flops for m in self.matmuls)

  def matmul_flops_by_dtype(self) -> Dict[str, int]:
    """FLOPs per operand dtype pair, e.g. ``{"bfloat16": n, "float32": m}``
    (``"float32*bfloat16"`` when the two operands differ)."""
    out: Dict[str, int] = collections.Counter()
    for m in self.matmuls:
      key = (m.lhs_dtype if m.lhs_dtype == m.rhs_dtype
             else f"{m.lhs_dtype}*{m.rhs_dtype}")
      out[key] += m.flops
    return dict(out)

  def matmul_share(self, dtype: Any) -> float:
    """Fraction of matmul FLOPs whose two operands are both `dtype`."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    total = self.matmul_flops
    if not total:
      return 1.0
    return sum(m.flops for m in self.matmuls
               if m.lhs_dtype == name and m.rhs_dtype == name) / total

  def fp8_flops(self) -> Dict[str, int]:
    """Matmul FLOPs per fp8 format: each fp8 operand's format is credited
    with the FLOPs of its matmuls (``{"float8_e4m3fn": n, "float8_e5m2":
    m}``; an e5m2 x e4m3 gradient matmul counts for both), plus ``"fp8"``:
    the FLOPs of matmuls whose two operands are fp8."""
    out: Dict[str, int] = collections.Counter()
    for m in self.matmuls:
      formats = {d for d in (m.lhs_dtype, m.rhs_dtype)
                 if d.startswith("float8")}
      for d in formats:
        out[d] += m.flops
      if len(formats) and all(d.startswith("float8")
                              for d in (m.lhs_dtype, m.rhs_dtype)):
        out["fp8"] += m.flops
    return dict(out)

  def float32_islands(self) -> Dict[str, int]:
    """Non-matmul ops computing in float32: ``{"exponential": 2, ...}``."""
    return {op: d["float32"] for op, d in sorted(self.op_dtypes.items())
            if d.get("float32")}


def audit_lowered(text: str) -> ProgramAudit:
  """Audits StableHLO text (``jax.jit(f).lower(*args).as_text()``)."""
  matmuls: List[MatmulOp] = []
  for contracting, lhs, rhs, out in _DOT.findall(text):
    (lhs_shape, lhs_dtype), (rhs_shape, rhs_dtype) = _tensor(lhs), _tensor(rhs)
    out_shape, out_dtype = _tensor(out)
    dims = [int(d) for d in contracting.replace(" ", "").split(",") if d]
    k = math.prod(lhs_shape[d] for d in dims)
    matmuls.append(MatmulOp("dot_general", lhs_dtype, rhs_dtype, out_dtype,
                            2 * math.prod(out_shape) * k, lhs_shape,
                            rhs_shape))
  for kernel_dims, lhs, rhs, out in _CONV.findall(text):
    (lhs_shape, lhs_dtype), (rhs_shape, rhs_dtype) = _tensor(lhs), _tensor(rhs)
    out_shape, out_dtype = _tensor(out)
    labels = [d.strip() for d in kernel_dims.split(",")]
    per_output = math.prod(rhs_shape) // rhs_shape[labels.index("o")]
    matmuls.append(MatmulOp("convolution", lhs_dtype, rhs_dtype, out_dtype,
                            2 * math.prod(out_shape) * per_output, lhs_shape,
                            rhs_shape))
  host_ops = []
  for line in text.splitlines():
    for kind, pattern in _HOST_PATTERNS:
      if pattern.search(line):
        host_ops.append(f"{kind}: {line.strip()[:160]}")
  op_dtypes: Dict[str, Dict[str, int]] = collections.defaultdict(
      collections.Counter)
  for op, tensor in _ELEMENT.findall(text) + _ELEMENT_SAME.findall(text):
    op_dtypes[op][_tensor(tensor)[1]] += 1
  converts = len(re.findall(r"stablehlo\.convert\b", text))
  return ProgramAudit(tuple(matmuls), converts, tuple(host_ops),
                      {k: dict(v) for k, v in op_dtypes.items()})


def audit(fn: Callable, *args, **kwargs) -> ProgramAudit:
  """Lowers ``fn(*args, **kwargs)`` (jitting it if needed) and audits it.

  `fn` may also be an already lowered program (``jax.jit(f).lower(...)``,
  a `jax.stages.Lowered`, given without arguments): it is audited as it is,
  not lowered again.

  Examples:
    >>> import jax.numpy as jnp, mpjax
    >>> f = lambda w, x: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)
    >>> report = mpjax.audit_program(f, jnp.ones((8, 4)), jnp.ones((2, 8)))
    >>> report.matmul_share("bfloat16"), report.matmul_flops, report.host_ops
    (1.0, 128, ())
  """
  if isinstance(fn, jax.stages.Lowered):
    if args or kwargs:
      raise TypeError("audit_program: a lowered program takes no arguments; "
                      f"got {len(args)} positional and {sorted(kwargs)}.")
    return audit_lowered(fn.as_text())
  lower = getattr(fn, "lower", None) or jax.jit(fn).lower
  return audit_lowered(lower(*args, **kwargs).as_text())


class Residuals(NamedTuple):
  """Bytes the backward pass keeps (what `jax.vjp`'s closure holds).

  Attributes:
    total_bytes: all residual arrays.
    bytes_by_dtype: per dtype name.
    count: number of residual arrays.
  """
  total_bytes: int
  bytes_by_dtype: Dict[str, int]
  count: int


def residuals(fn: Callable, *args) -> Residuals:
  """The residuals of ``jax.vjp(fn, *args)``, found abstractly.

  `jax.eval_shape` traces the forward pass and reads the shapes and dtypes of
  the arrays the vjp closure would hold: nothing runs and nothing is
  allocated, so this works for models far larger than the host.
  """
  closure = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
  by_dtype: Dict[str, int] = collections.Counter()
  leaves = jax.tree.leaves(closure)
  for leaf in leaves:
    by_dtype[np.dtype(leaf.dtype).name] += math.prod(leaf.shape) * np.dtype(
        leaf.dtype).itemsize
  return Residuals(sum(by_dtype.values()), dict(by_dtype), len(leaves))


def matmul_precisions(text: str) -> Dict[str, int]:
  """How many ``dot_general``/``convolution`` ops of lowered StableHLO
  `text` ask for each precision (``{"DEFAULT": 40, "HIGHEST": 2}``)."""
  counts: Dict[str, int] = collections.Counter()
  for line in text.splitlines():
    if "stablehlo.dot_general" in line or "stablehlo.convolution" in line:
      found = re.search(r"precision(?:_config)?\s*=\s*\[([^\]]*)\]", line)
      names = re.findall(r"[A-Z]+", found.group(1)) if found else []
      counts[names[0] if names else "DEFAULT"] += 1
  return dict(counts)


def attention_residuals(fn: Callable, *args,
                        seq_len: int) -> Dict[str, int]:
  """Residual bytes per dtype of ``jax.vjp(fn, *args)`` held in
  ``[..., seq_len, seq_len]`` arrays of rank 4 or more (attention logits
  and probabilities; a ``[batch, seq, d_model]`` array with d_model ==
  seq_len is not one). Found abstractly, like `residuals`."""
  closure = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
  out: Dict[str, int] = collections.Counter()
  for leaf in jax.tree.leaves(closure):
    if len(leaf.shape) >= 4 and leaf.shape[-2:] == (seq_len, seq_len):
      out[np.dtype(leaf.dtype).name] += math.prod(leaf.shape) * np.dtype(
          leaf.dtype).itemsize
  return dict(out)


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
