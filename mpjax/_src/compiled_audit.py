"""What XLA:GPU made of a step: kernels, copies, memory, lost 16-bit roundings.

`audit_program` reads the *lowered* program, what mpjax asks for; this reads
the *compiled* one, what the GPU would run (compile it for a target with
`mpjax.compile_for_target`, no GPU needed). The two can disagree: with
XLA's default ``xla_allow_excess_precision=True`` a fusion may read a
float32 value where the program asked for its bfloat16 rounding, and keep
that float32 array alive into the backward pass.

From the optimized HLO (``compiled.as_text()``): every matmul kernel with
its implementation (Triton gemm fusion, cuBLAS, cuBLASLt, its fp8 variant,
cuDNN) and operand/result dtypes and FLOPs; every ``copy`` and what it
copies (an entry parameter, e.g. an Adam moment, or an intermediate); the
number of fusions; the bytes each kernel reads and writes. From
``memory_analysis()``: argument, output, alias, temp and peak bytes. From
XLA's live-range dump (`audit_for_target` asks for it): the largest buffers
live at the peak, with shape, dtype and the op that made them, and the
float32 ones a mixed step should not have.
"""

import collections
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax

from mpjax._src import gpu_target as gpu_target_lib
from mpjax._src.program_audit import DTYPE_NAMES

_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1,
          "f8e5m2": 1, "f8e4m3": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "s16": 2,
          "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HLO_DTYPES = dict(DTYPE_NAMES, f8e4m3fn="float8_e4m3fn", f8e5m2="float8_e5m2",
                   pred="bool", s8="int8", s32="int32", s64="int64",
                   u8="uint8", u32="uint32")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_NO_KERNEL = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple",
              "after-all", "partition-id", "replica-id", "copy-done",
              "opt-barrier", "call"}
# Implementation of a matmul kernel, by fusion kind or custom-call target.
_IMPLEMENTATIONS = (
    ("__cublas$lt$matmul$f8", "cuBLASLt fp8"),
    ("__cublas$lt$matmul", "cuBLASLt"),
    ("__cublas$gemm", "cuBLAS"),
    ("__cudnn$fmha", "cuDNN fused attention"),
    ("__cudnn$blockScaledDot", "cuDNN block-scaled GEMM"),
    ("__cudnn$conv", "cuDNN convolution"),
    ("__cudnn$fusion", "cuDNN fusion"),
    ("__triton_nested_gemm_fusion", "Triton gemm fusion"),
    ("__triton_gemm", "Triton gemm fusion"),
    ("__triton_scaled_dot_fusion", "Triton scaled-dot fusion"),
    ("__custom_fusion", "custom fusion"),
)
SIXTEEN_BIT = ("bfloat16", "float16")


def _split_type(text: str) -> Tuple[str, str]:
  """``'(f32[], s32[]) fusion(...)'`` -> (type text, rest)."""
  text = text.strip()
  if text.startswith("("):
    depth = 0
    for i, ch in enumerate(text):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return text[:i + 1], text[i + 1:]
  head, _, rest = text.partition(" ")
  return head, rest


def _arrays(type_text: str) -> List[Tuple[str, Tuple[int, ...]]]:
  return [(d, tuple(int(x) for x in dims.split(",") if x))
          for d, dims in _ARRAY.findall(type_text)]


def _nbytes(type_text: str) -> int:
  return sum(math.prod(shape) * _BYTES.get(d, 4)
             for d, shape in _arrays(type_text))


def _dtype(hlo: str) -> str:
  return _HLO_DTYPES.get(hlo, hlo)


class _Instr(NamedTuple):
  name: str
  type: str
  opcode: str
  operands: Tuple[str, ...]
  attrs: str
  computation: str


def _parse(text: str) -> Tuple[Dict[str, List[_Instr]], str, Dict[str, _Instr]]:
  """Computations (name -> instructions), the entry's name, all by name."""
  comps: Dict[str, List[_Instr]] = {}
  by_name: Dict[str, _Instr] = {}
  entry, current = "", None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and not _INSTR.match(line):
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.startswith("}"):
      current = None
      continue
    found = _INSTR.match(line)
    if not found:
      continue
    type_text, rest = _split_type(found.group(3))
    op = re.match(r"\s*([\w\-]+)\(", rest)
    if not op:
      continue
    depth, start = 0, op.end() - 1
    end = len(rest)
    for i in range(start, len(rest)):
      depth += rest[i] == "("
      depth -= rest[i] == ")"
      if depth == 0:
        end = i
        break
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[start:end]))
    instr = _Instr(found.group(2), type_text, op.group(1), operands,
                   rest[end + 1:], current)
    comps[current].append(instr)
    by_name[instr.name] = instr
  return comps, entry, by_name


def _attr(attrs: str, key: str) -> Optional[str]:
  found = re.search(key + r'="?([^",}\s]+)', attrs)
  return found.group(1) if found else None


def _op_name(attrs: str) -> str:
  found = re.search(r'op_name="([^"]*)"', attrs)
  return found.group(1) if found else ""


class MatmulKernel(NamedTuple):
  """One matmul kernel of the compiled program.

  Attributes:
    name: the HLO instruction (``gemm_fusion_dot.96``, ``custom-call.3``).
    implementation: ``"Triton gemm fusion"``, ``"cuBLAS"``, ``"cuBLASLt"``,
      ``"cuBLASLt fp8"``, ``"cuDNN fused attention"``, ``"cuDNN
      block-scaled GEMM"`` / ``"Triton block-scaled gemm fusion"`` (MXFP8:
      fp8 data with e8m0 block scales), ...
    lhs_dtype, rhs_dtype: operand dtype names of the dot.
    out_dtype: the dot's result dtype (the kernel may convert after it).
    flops: 2 x multiply-adds (attention kernels: their two matmuls).
    highest: the dot asks for precision HIGHEST (true float32).
    op_name: the JAX op it came from.
  """
  name: str
  implementation: str
  lhs_dtype: str
  rhs_dtype: str
  out_dtype: str
  flops: int
  highest: bool
  op_name: str


class Copy(NamedTuple):
  """A ``copy`` kernel: `source` is the entry parameter it copies (e.g.
  ``state_opt_state_0__mu__...``) or ``"intermediate"``."""
  name: str
  shape: Tuple[int, ...]
  dtype: str
  bytes: int
  source: str


class Buffer(NamedTuple):
  """A value live at the peak (XLA's live-range analysis)."""
  name: str
  bytes: int
  dtype: str
  shape: Tuple[int, ...]
  op_name: str


class Kernel(NamedTuple):
  """What a kernel costs in the roofline: matmul FLOPs per peak key and
  bytes read + written."""
  name: str
  opcode: str
  flops: Dict[str, int]
  bytes: int


class CompiledAudit(NamedTuple):
  """What a compiled program does; see the module docstring.

  Attributes:
    target: the device kind it was compiled for.
    matmuls: every matmul kernel.
    copies: every copy.
    fusions: number of fusion kernels.
    kernels: every kernel (for `project`).
    memory: ``memory_analysis()`` fields (``peak_bytes``, ``temp_bytes``,
      ``argument_bytes``, ``output_bytes``, ``alias_bytes``).
    peak_buffers: the largest values live at the peak, largest first
      (empty without the live-range dump).
    lost_roundings: float32 buffers live at the peak that look like
      activations of a 16-bit step (see `audit_compiled`).
  """
  target: str
  matmuls: Tuple[MatmulKernel, ...]
  copies: Tuple[Copy, ...]
  fusions: int
  kernels: Tuple[Kernel, ...]
  memory: Dict[str, Optional[int]]
  peak_buffers: Tuple[Buffer, ...]
  lost_roundings: Tuple[Buffer, ...]

  @property
  def matmul_flops(self) -> int:
    return sum(m.flops for m in self.matmuls)

  def matmul_share(self, dtype: str) -> float:
    """Fraction of matmul FLOPs whose two operands are both `dtype`."""
    total = self.matmul_flops
    return 1.0 if not total else sum(
        m.flops for m in self.matmuls
        if m.lhs_dtype == dtype and m.rhs_dtype == dtype) / total

  def implementations(self) -> Dict[str, int]:
    """How many matmul kernels each implementation runs."""
    return dict(collections.Counter(m.implementation for m in self.matmuls))

  def copied_parameters(self, contains: str = "") -> List[Copy]:
    """Copies of entry parameters whose name contains `contains`
    (``"opt_state"``: the optimizer state)."""
    return [c for c in self.copies
            if c.source != "intermediate" and contains in c.source]

  def to_json(self) -> Dict[str, Any]:
    """A JSON-ready dict (every field; kernels summed, not listed)."""
    return {
        "target": self.target,
        "matmuls": [m._asdict() for m in self.matmuls],
        "matmul_implementations": self.implementations(),
        "matmul_flops": self.matmul_flops,
        "copies": [c._asdict() for c in self.copies],
        "fusions": self.fusions,
        "kernels": len(self.kernels),
        "kernel_bytes": sum(k.bytes for k in self.kernels),
        "memory": self.memory,
        "peak_buffers": [b._asdict() for b in self.peak_buffers],
        "lost_roundings": [b._asdict() for b in self.lost_roundings],
    }

  def table(self, buffers: int = 10) -> str:
    """A Markdown summary: kernels, copies, memory, peak buffers."""
    gib = 2.0**30
    mem = self.memory
    lines = [f"compiled for {self.target}", "",
             "| matmul kernels | implementation | lhs x rhs -> out | GFLOP |",
             "|---|---|---|---|"]
    groups: Dict[Tuple[str, str], List[MatmulKernel]] = collections.defaultdict(list)
    for m in self.matmuls:
      groups[(m.implementation,
              f"{m.lhs_dtype} x {m.rhs_dtype} -> {m.out_dtype}"
              + (" (highest)" if m.highest else ""))].append(m)
    for (impl, types), ms in sorted(groups.items()):
      lines.append(f"| {len(ms)} | {impl} | {types} | "
                   f"{sum(m.flops for m in ms) / 1e9:,.2f} |")
    lines += ["", f"fusions: {self.fusions}; kernels: {len(self.kernels)}; "
              f"copies: {len(self.copies)} ("
              + (", ".join(f"{c.source} {c.dtype}{list(c.shape)}"
                           for c in self.copies[:6]) or "none")
              + (", ..." if len(self.copies) > 6 else "") + ")"]
    if mem.get("peak_bytes") is not None:
      lines.append(
          f"memory: peak {mem['peak_bytes'] / gib:.3f} GiB = arguments "
          f"{mem['argument_bytes'] / gib:.3f} + outputs "
          f"{mem['output_bytes'] / gib:.3f} - aliased "
          f"{mem['alias_bytes'] / gib:.3f} + temp {mem['temp_bytes'] / gib:.3f}")
    if self.peak_buffers:
      lines += ["", "| live at the peak | bytes | dtype | shape | op |",
                "|---|---|---|---|---|"]
      for b in self.peak_buffers[:buffers]:
        lines.append(f"| {b.name} | {b.bytes:,} | {b.dtype} | {list(b.shape)} "
                     f"| {b.op_name} |")
    lines.append("")
    lines.append("16-bit roundings lost: " + (
        ", ".join(f"{b.name} {b.dtype}{list(b.shape)} ({b.op_name})"
                  for b in self.lost_roundings) or "none"))
    return "\n".join(lines)


def _dot_info(instr: _Instr, by_name: Dict[str, _Instr]):
  """(lhs dtype, rhs dtype, out dtype, flops, highest) of a ``dot``."""
  lhs, rhs = (by_name.get(o) for o in instr.operands[:2])
  if lhs is None or rhs is None:
    return None
  (ld, lshape), = _arrays(lhs.type)[:1]
  (rd, _), = _arrays(rhs.type)[:1]
  (od, oshape), = _arrays(instr.type)[:1]
  dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
  k = math.prod(lshape[int(d)] for d in dims.group(1).split(",")
                if d) if dims else 1
  highest = "highest" in (re.search(r"operand_precision=\{([^}]*)\}",
                                    instr.attrs) or [""])[0].lower()
  return _dtype(ld), _dtype(rd), _dtype(od), 2 * math.prod(oshape) * k, highest


def _called(comps, name: str) -> List[_Instr]:
  """Instructions of computation `name` and of those it calls, depth first."""
  out, todo, seen = [], [name], set()
  while todo:
    comp = todo.pop()
    if comp in seen or comp not in comps:
      continue
    seen.add(comp)
    for instr in comps[comp]:
      out.append(instr)
      todo += re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", instr.attrs)
  return out


def _implementation(instr: _Instr) -> Optional[str]:
  key = (_attr(instr.attrs, "custom_call_target") if instr.opcode ==
         "custom-call" else _attr(instr.attrs, '"kind":'))
  if key is None and instr.opcode == "fusion":
    found = re.search(r'"kind":"([^"]+)"', instr.attrs)
    key = found.group(1) if found else None
  for prefix, impl in _IMPLEMENTATIONS:
    if key and key.startswith(prefix):
      return impl
  return None


def _gemm_config_dot(instr: _Instr, by_name) -> Optional[tuple]:
  """A cuBLAS custom call's dot, from its operands and backend config."""
  lhs, rhs = (by_name.get(o) for o in instr.operands[:2])
  if lhs is None or rhs is None:
    return None
  (ld, lshape), (rd, _) = _arrays(lhs.type)[0], _arrays(rhs.type)[0]
  (od, oshape) = _arrays(instr.type)[0]
  dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.attrs)
  k = math.prod(lshape[int(d)] for d in re.findall(r"\d+", dims.group(1))
                ) if dims else 1
  highest = '"HIGHEST"' in instr.attrs
  return _dtype(ld), _dtype(rd), _dtype(od), 2 * math.prod(oshape) * k, highest


def _block_scaled_info(instr: _Instr, by_name) -> Optional[tuple]:
  """cuDNN's block-scaled GEMM: ``[B, M, K] x [B, N, K]`` (K last) with
  block scales; (lhs, rhs, out dtype, flops, False)."""
  lhs, rhs = (by_name.get(o) for o in instr.operands[:2])
  if lhs is None or rhs is None:
    return None
  (ld, lshape), (rd, _) = _arrays(lhs.type)[0], _arrays(rhs.type)[0]
  (od, oshape) = _arrays(instr.type)[0]
  return (_dtype(ld), _dtype(rd), _dtype(od),
          2 * math.prod(oshape) * lshape[-1], False)


def _conv_info(instr: _Instr, by_name) -> Optional[tuple]:
  """A cuDNN convolution custom call's (lhs, rhs, out dtype, flops, False).

  FLOPs = 2 x elements of the forward output x (kernel elements / output
  features), the same for the forward, backward-input and backward-filter
  kernels (each computes one of the three products).
  """
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
  target = _attr(instr.attrs, "custom_call_target") or ""
  operands = [by_name.get(o) for o in instr.operands[:2]]
  if not labels or None in operands:
    return None
  (ld, lshape), (rd, rshape) = (_arrays(o.type)[0] for o in operands)
  (od, oshape) = _arrays(instr.type)[0]
  _, kernel_labels, _ = labels.groups()
  if "BackwardFilter" in target:    # (input, grad out) -> grad kernel
    kernel, out = oshape, rshape
  elif "BackwardInput" in target:   # (grad out, kernel) -> grad input
    kernel, out = rshape, lshape
  else:                             # (input, kernel) -> output
    kernel, out = rshape, oshape
  if len(kernel) != len(kernel_labels) or "o" not in kernel_labels:
    return None
  per_output = math.prod(kernel) // kernel[kernel_labels.index("o")]
  highest = "operand_precision={highest" in instr.attrs
  return (_dtype(ld), _dtype(rd), _dtype(od),
          2 * math.prod(out) * per_output, highest)


def _source(name: str, by_name) -> str:
  """The entry parameter a value is (through bitcasts and tuple
  elements), or ``"intermediate"``."""
  seen = 0
  while name in by_name and seen < 64:
    instr = by_name[name]
    if instr.opcode == "parameter":
      return instr.name
    if instr.opcode not in ("bitcast", "get-tuple-element") or not instr.operands:
      return "intermediate"
    name, seen = instr.operands[0], seen + 1
  return "intermediate"


def _peak_key(dtype: str, highest: bool) -> str:
  if dtype in SIXTEEN_BIT or dtype.startswith("float8") or dtype == "int8":
    return dtype
  return "float32_highest" if highest else "tf32"


def _rate_key(lhs: str, rhs: str, highest: bool) -> str:
  """The rate-table key a matmul runs at: its operands' dtype. An fp8 x fp8
  matmul of two formats (the e5m2 x e4m3 gradient GEMMs) runs at the fp8
  tensor-core rate (the specs give e4m3 and e5m2 one rate: the lhs's);
  any other mixed pair at float32's."""
  if lhs.startswith("float8") and rhs.startswith("float8"):
    return lhs
  return _peak_key(lhs if lhs == rhs else "float32", highest)


def _memory(compiled) -> Dict[str, Optional[int]]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  fields = {"argument_bytes": "argument_size_in_bytes",
            "output_bytes": "output_size_in_bytes",
            "alias_bytes": "alias_size_in_bytes",
            "temp_bytes": "temp_size_in_bytes",
            "peak_bytes": "peak_memory_in_bytes"}
  out = {k: (getattr(m, v, None) if m is not None else None)
         for k, v in fields.items()}
  if out["peak_bytes"] is None and out["temp_bytes"] is not None:
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] -
                         out["alias_bytes"] + out["temp_bytes"])
  return out


def _peak_buffers(live_range: str, by_name) -> List[Buffer]:
  """Values of the ``Live ranges at N (peak)`` section, largest first."""
  section = re.search(r"Live ranges at \d+ \(peak\):\n(.*?)(?:\n\S|\n  \S|\Z)",
                      live_range, re.S)
  out = []
  if not section:
    return out
  for name, index, size in re.findall(r"^\s+([\w.\-]+)\{([\d,]*)\}:\s*(\d+) bytes",
                                      section.group(1), re.M):
    instr = by_name.get(name)
    dtype, shape, op = "?", (), ""
    if instr is not None:
      arrays = _arrays(instr.type)
      i = int(index.split(",")[0]) if index else 0
      if arrays:
        dtype, shape = arrays[min(i, len(arrays) - 1)]
      dtype = _dtype(dtype)
      op = _op_name(instr.attrs) or instr.opcode
    out.append(Buffer(name, int(size), dtype, shape, op))
  out.sort(key=lambda b: -b.bytes)
  return out


def audit_compiled(compiled: Any, dump_dir: Optional[str] = None,
                   peak_buffers: int = 40,
                   min_lost_bytes: int = 1 << 20) -> CompiledAudit:
  """Audits a compiled program (``jax.stages.Compiled``, or its HLO text).

  Args:
    compiled: what `compile_for_target` (or ``lowered.compile()``) returns.
    dump_dir: the ``xla_dump_to`` directory it was compiled with, for the
      buffers live at the peak (`audit_for_target` sets it up).
    peak_buffers: how many of those to keep.
    min_lost_bytes: smaller float32 buffers are not flagged (per-row
      statistics of float32 islands are float32 by design).

  A float32 buffer live at the peak is flagged in ``lost_roundings`` when
  the program is a 16-bit one (its matmuls take 16-bit operands), it is not
  an entry parameter, and it has the element count and minor dimension of
  some 16-bit value of the program that is not shaped like a parameter: an
  activation the policy asked to round to 16 bits, held in float32.
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  comps, entry, by_name = _parse(text)
  fused, called = set(), set()
  for instrs in comps.values():
    for instr in instrs:
      fused.update(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", instr.attrs))
      if instr.opcode == "call":  # a subroutine whose kernels run as such
        called.update(re.findall(r"to_apply=%([\w.\-]+)", instr.attrs))
  top = [i for c, instrs in comps.items() if c not in fused - called
         for i in instrs]
  target = ""
  if not isinstance(compiled, str):
    for sharding in jax.tree.leaves(compiled.input_shardings):
      target = next(iter(sharding.device_set)).device_kind
      break

  matmuls, copies, kernels = [], [], []
  fusions = 0
  for instr in top:
    if instr.opcode in _NO_KERNEL:
      continue
    fusions += instr.opcode == "fusion"
    flops: Dict[str, int] = collections.Counter()
    impl = _implementation(instr)
    if instr.opcode == "custom-call" and impl and impl.startswith("cuBLAS"):
      info = _gemm_config_dot(instr, by_name)
      infos = [info] if info else []
    elif instr.opcode == "custom-call" and impl == "cuDNN convolution":
      info = _conv_info(instr, by_name)
      infos = [info] if info else []
    elif instr.opcode == "custom-call" and impl == "cuDNN block-scaled GEMM":
      info = _block_scaled_info(instr, by_name)
      infos = [info] if info else []
    else:
      dots = [i for i in _called(
          comps, (re.findall(r"calls=%([\w.\-]+)", instr.attrs) or [""])[0])
              if i.opcode in ("dot", "scaled-dot")
              ] if instr.opcode == "fusion" else []
      infos = [i for i in (_dot_info(d, by_name) for d in dots) if i]
      if impl == "Triton gemm fusion" and any(d.opcode == "scaled-dot"
                                              for d in dots):
        impl = "Triton block-scaled gemm fusion"  # XLA's scaled-dot (MX)
      if instr.opcode == "dot":
        infos = [i for i in [_dot_info(instr, by_name)] if i]
        impl = impl or "XLA dot"
    if impl == "cuDNN fused attention" and not infos:
      q = by_name.get(instr.operands[0]) if instr.operands else None
      if q is not None:
        (qd, qshape), = _arrays(q.type)[:1]
        # [B, S, H, D] (BTNH): QK^T and PV, x3 for a backward kernel.
        b, s, h, d = (qshape + (1, 1, 1, 1))[:4]
        mult = 2 if "Backward" in (_attr(instr.attrs, "custom_call_target")
                                   or "") else 1
        infos = [(_dtype(qd), _dtype(qd), _dtype(qd),
                  mult * 4 * b * h * s * s * d, False)]
    if infos and impl is None:
      impl = "fusion with a dot"
    for ld, rd, od, f, highest in infos:
      matmuls.append(MatmulKernel(instr.name, impl, ld, rd, od, f, highest,
                                  _op_name(instr.attrs)))
      flops[_rate_key(ld, rd, highest)] += f
    if instr.opcode in ("copy", "copy-start"):
      (d, shape), = _arrays(instr.type)[:1] or [("?", ())]
      copies.append(Copy(instr.name, shape, _dtype(d), _nbytes(instr.type),
                         _source(instr.operands[0], by_name)
                         if instr.operands else "intermediate"))
    moved = _nbytes(instr.type) + sum(
        _nbytes(by_name[o].type) for o in instr.operands if o in by_name)
    kernels.append(Kernel(instr.name, instr.opcode, dict(flops), moved))

  buffers: List[Buffer] = []
  if dump_dir:
    for fname in sorted(os.listdir(dump_dir)):
      if fname.endswith("gpu_after_optimizations-live-range.txt"):
        with open(os.path.join(dump_dir, fname)) as f:
          buffers = _peak_buffers(f.read(), by_name)
  # An array and its bitcasts share the element count and the minor
  # dimension ([96, 1024, 1024] scores are [8, 12, 1024, 1024]).
  def key(shape):
    return (math.prod(shape), shape[-1] if shape else 1)
  params = {key(shape) for i in comps.get(entry, [])
            if i.opcode == "parameter" for _, shape in _arrays(i.type)}
  sixteen = {key(shape) for i in top for d, shape in _arrays(i.type)
             if _dtype(d) in SIXTEEN_BIT}
  mixed = bool(matmuls) and all(m.lhs_dtype in SIXTEEN_BIT
                                for m in matmuls)
  lost = [b for b in buffers if mixed and b.dtype == "float32"
          and b.bytes >= min_lost_bytes
          and by_name.get(b.name, _Instr("", "", "parameter", (), "", "")
                          ).opcode != "parameter"
          and key(b.shape) in sixteen - params]
  return CompiledAudit(target, tuple(matmuls), tuple(copies), fusions,
                       tuple(kernels), _memory(compiled) if not isinstance(
                           compiled, str) else {},
                       tuple(buffers[:peak_buffers]), tuple(lost))


def audit_for_target(fn: Callable, *args, target: str = "h100_sxm",
                     num_devices: int = 1,
                     compiler_options: Optional[Mapping[str, Any]] = None,
                     keep_dump: Optional[str] = None,
                     **kwargs) -> CompiledAudit:
  """Compiles ``fn(*args, **kwargs)`` for `target` and audits it, with the
  buffers live at the peak (XLA's dump is written to a temporary directory,
  or to `keep_dump`, and read back). Arguments as `compile_for_target`.

  Examples:
    The seed MLP's mixed step on an H100 (``state``, ``batch`` as for
    ``step(state, batch)``)::

      report = mpjax.audit_for_target(step, state, batch, target="h100_sxm")
      print(report.table())
      report.copied_parameters("opt_state")   # [] on the GPU
  """
  dump = keep_dump or tempfile.mkdtemp(prefix="mpjax_xla_dump_")
  options = dict(compiler_options or {})
  options["xla_dump_to"] = dump
  try:
    compiled = gpu_target_lib.compile_for_target(
        fn, *args, target=target, num_devices=num_devices,
        compiler_options=options, **kwargs)
    return audit_compiled(compiled, dump_dir=dump)
  finally:
    if keep_dump is None:
      shutil.rmtree(dump, ignore_errors=True)


def project(report: CompiledAudit, target: str) -> Dict[str, Any]:
  """Per-kernel roofline of a compiled program on `target`: a projection.

  Each kernel takes max(its matmul FLOPs at its dtype's dense peak, the
  bytes of its operands and results at HBM bandwidth); the step is their
  sum. A lower bound: no launch gaps, no L2 reuse between kernels, GEMM
  tilings at peak. float32 matmuls run at TF32 unless they ask for HIGHEST
  (then at the non-tensor float32 rate).
  """
  t = gpu_target_lib.gpu_target(target)
  peaks = dict(t.matmul_flops_per_s)
  if not peaks:
    raise ValueError(f"project: the {t.name} spec has no rate table.")
  peaks["tf32"] = peaks.pop("float32")
  peaks["float32_highest"] = t.vector_flops_per_s["float32"]
  compute = memory = total = 0.0
  bound = collections.Counter()
  for k in report.kernels:
    c = sum(f / peaks[key] for key, f in k.flops.items())
    m = k.bytes / t.hbm_bytes_per_s
    compute, memory, total = compute + c, memory + m, total + max(c, m)
    bound["compute" if c > m else "memory"] += 1
  return {"label": "projection, not a measurement", "target": t.name,
          "device_kind": t.device_kind, "projected_step_s": total,
          "compute_s": compute, "memory_s": memory,
          "kernels_compute_bound": bound["compute"],
          "kernels_memory_bound": bound["memory"],
          "hbm_bytes_per_s": t.hbm_bytes_per_s,
          "peaks_flops_per_s": peaks,
          "model": "sum over kernels of max(matmul FLOPs / dense peak of the "
                   "operand dtype, (operand + result bytes) / HBM bandwidth)"}


def to_json(report: CompiledAudit) -> str:
  return json.dumps(report.to_json(), indent=1)
