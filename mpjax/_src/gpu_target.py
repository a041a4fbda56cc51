"""Compile a jitted step for an NVIDIA GPU from any machine, no GPU needed.

XLA:GPU compiles for a target described by a ``GpuTargetConfig`` text proto
(the files in ``mpjax/target_configs/``, XLA's own device specs) on a
CPU-only machine: what comes back is the real GPU program (fusions, the
kernel of every matmul, copies, `memory_analysis()`, the buffer
assignment); only the GEMM autotuner is missing, so tilings are heuristic.
Users size a job before they get a GPU; CI checks GPU programs on CPU
runners.

Needs the ``gpu-compile`` extra (``pip install 'mpjax[gpu-compile]'``:
``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` at exactly jax's version).
On a machine without an NVIDIA driver the plugin would fail its CUDA
version check and never register; mpjax sets
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` there (only there: with a driver the
check stays on) when it is imported, and again before it asks for a target.

Example (the seed MLP's step, for one H100)::

  step = mpjax.make_train_step(loss_fn)
  compiled = mpjax.compile_for_target(step, state, batch, target="h100_sxm")
  compiled.memory_analysis().peak_memory_in_bytes
"""

import dataclasses
import functools
import importlib.metadata
import importlib.resources
import math
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np

_PLUGIN_PACKAGES = ("jax-cuda12-plugin", "jax-cuda12-pjrt")
_SKIP_CHECK = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"

# Target name -> spec file in mpjax/target_configs (see its README.md).
TARGET_FILES: Dict[str, str] = {
    "h100_sxm": "h100_sxm.txtpb",
    "h200_sxm": "h200.txtpb",
    "b200": "b200.txtpb",
    "a100_sxm_80": "a100_sxm_80.txtpb",
}
_ALIASES = {"h100": "h100_sxm", "h200": "h200_sxm", "a100": "a100_sxm_80",
            "a100_sxm": "a100_sxm_80"}

# XLA PrimitiveType numbers (xla_data.proto) of the rate tables in a spec.
_PRIMITIVE_DTYPES = {2: "int8", 10: "float16", 11: "float32", 12: "float64",
                     16: "bfloat16", 19: "float8_e5m2", 20: "float8_e4m3fn"}

# XLA's default lets a fusion keep a 16-bit value in float32 (on GPT-2 the
# backward pass reads the float32 attention scores instead of the saved
# bfloat16 probabilities): the policy's rounding, and its memory saving, are
# gone. `make_train_step` compiles with this unless told otherwise.
FAITHFUL_ROUNDING: Mapping[str, Any] = {"xla_allow_excess_precision": False}


class GpuCompileUnavailableError(RuntimeError):
  """The CUDA compiler plugin is missing, of another version than jax, or
  cannot make the target's devices."""


def _has_nvidia_driver() -> bool:
  return os.path.exists("/proc/driver/nvidia/version")


def skip_cuda_check_without_driver() -> None:
  """Sets ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` if this machine has no NVIDIA
  driver (the check could only fail there) and the plugin is installed."""
  if _SKIP_CHECK in os.environ or _has_nvidia_driver():
    return
  try:
    importlib.metadata.version(_PLUGIN_PACKAGES[0])
  except importlib.metadata.PackageNotFoundError:
    return
  os.environ[_SKIP_CHECK] = "1"


def _installed_version(package: str) -> Optional[str]:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _install_hint(jax_version: str) -> str:
  return ("pip install 'mpjax[gpu-compile]' (or: pip install "
          + " ".join(f"{p}=={jax_version}" for p in _PLUGIN_PACKAGES) + ")")


def check_plugin() -> str:
  """The plugin's version, or `GpuCompileUnavailableError` naming the fix.

  Both packages must be installed at exactly jax's version (the plugin is
  built against one jaxlib).
  """
  jax_version = jax.__version__
  found = {p: _installed_version(p) for p in _PLUGIN_PACKAGES}
  missing = [p for p, v in found.items() if v is None]
  if missing:
    raise GpuCompileUnavailableError(
        f"Compiling for a GPU target needs {' and '.join(missing)} (not "
        f"installed). Install them at jax's version {jax_version}: "
        + _install_hint(jax_version))
  wrong = {p: v for p, v in found.items() if v != jax_version}
  if wrong:
    listed = ", ".join(f"{p} {v}" for p, v in wrong.items())
    raise GpuCompileUnavailableError(
        f"Compiling for a GPU target needs the CUDA plugin at jax's version "
        f"{jax_version}, found {listed}: " + _install_hint(jax_version))
  return jax_version


def target_names() -> List[str]:
  """Names `gpu_target` accepts (aliases aside)."""
  return sorted(TARGET_FILES)


def _field(text: str, name: str, cast=float):
  found = re.search(rf"^\s*{name}:\s*\"?([^\"\n]+)\"?\s*$", text, re.M)
  return cast(found.group(1)) if found else None


def _rates(text: str, table: str, cores: int) -> Dict[str, float]:
  """FLOP/s per dtype of a spec's ``scalar_unit_description`` or
  ``matrix_unit_description`` (ops per clock are fused multiply-adds)."""
  block = re.search(table + r"\s*\{(.*?)\n  \}", text, re.S)
  out: Dict[str, float] = {}
  if not block:
    return out
  for key, body in re.findall(r"key:\s*(\d+)\s*value\s*\{([^}]*)\}",
                              block.group(1)):
    dtype = _PRIMITIVE_DTYPES.get(int(key))
    if dtype is None:
      continue
    clock = _field(body, "clock_rate_ghz")
    units = _field(body, "units_per_core")
    ops = _field(body, "ops_per_clock")
    out[dtype] = 2 * clock * 1e9 * units * ops * cores
  return out


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """A named GPU target: its XLA spec and the device facts read from it.

  Attributes:
    name: the target name (``"h100_sxm"``, ...).
    device_kind: what the compiled-for device reports
      (``"NVIDIA H100 80GB HBM3"``).
    memory_bytes: device memory (the spec's ``device_memory_size``).
    hbm_bytes_per_s: memory bandwidth.
    compute_capability: e.g. ``"9.0"``.
    matmul_flops_per_s: dense tensor-core FLOP/s per operand dtype name
      (``"bfloat16"``, ``"float16"``, ``"float32"`` meaning TF32,
      ``"float8_e4m3fn"``, ...); empty when the spec has no rate table.
    vector_flops_per_s: non-tensor FLOP/s per dtype (``"float32"`` is what
      a true-float32 matmul, precision HIGHEST, runs at).
    config_text: the ``GpuTargetConfig`` text proto handed to XLA.
  """
  name: str
  device_kind: str
  memory_bytes: int
  hbm_bytes_per_s: float
  compute_capability: str
  matmul_flops_per_s: Mapping[str, float]
  vector_flops_per_s: Mapping[str, float]
  config_text: str = dataclasses.field(repr=False)

  def devices(self, num_devices: int = 1) -> List[Any]:
    """`num_devices` compile-only devices of this target (one host)."""
    return target_devices(self.name, num_devices)


@functools.lru_cache(maxsize=None)
def gpu_target(name: str) -> GpuTarget:
  """The target called `name` (see `target_names`; ``"h100"`` works too).

  Reads the spec shipped with mpjax; needs no plugin.
  """
  if not isinstance(name, str):
    raise TypeError(f"gpu_target: name must be a str, got {name!r}.")
  key = name.lower().replace("-", "_").replace(" ", "_")
  key = _ALIASES.get(key, key)
  if key not in TARGET_FILES:
    raise ValueError(f"gpu_target: unknown target {name!r}; known: "
                     f"{', '.join(target_names())}.")
  text = (importlib.resources.files("mpjax") / "target_configs" /
          TARGET_FILES[key]).read_text()
  cores = _field(text, "core_count", int)
  capability = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", text)
  major = _field(capability.group(1), "major", int) if capability else None
  minor = (_field(capability.group(1), "minor", int) if capability else 0) or 0
  return GpuTarget(
      name=key,
      device_kind=_field(text, "device_description_str", str),
      memory_bytes=_field(text, "device_memory_size", int),
      hbm_bytes_per_s=_field(text, "memory_bandwidth"),
      compute_capability=f"{major}.{minor}",
      matmul_flops_per_s=_rates(text, "matrix_unit_description", cores),
      vector_flops_per_s=_rates(text, "scalar_unit_description", cores),
      config_text=text)


def _topology(target: GpuTarget, num_devices: int):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(
      "", "cuda", topology=f"1x1x{num_devices}",
      target_config=target.config_text)


@functools.lru_cache(maxsize=None)
def _devices(name: str, num_devices: int) -> tuple:
  check_plugin()
  target = gpu_target(name)
  skip_cuda_check_without_driver()
  try:
    topology = _topology(target, num_devices)
  except NotImplementedError:
    # The plugin was discovered before the check could be skipped (jax ran
    # something first): its initialize raised and nothing registered.
    # Register it now; the backends already made stay as they are.
    try:
      import jax_plugins.xla_cuda12 as cuda_plugin  # pylint: disable=g-import-not-at-top
      cuda_plugin.initialize()
      topology = _topology(target, num_devices)
    except Exception as e:  # pylint: disable=broad-except
      raise GpuCompileUnavailableError(
          f"The CUDA plugin is installed but did not register ({e}). Set "
          f"{_SKIP_CHECK}=1 before jax first runs anything, or import mpjax "
          "first.") from e
  return tuple(topology.devices)


def target_devices(target: str = "h100_sxm", num_devices: int = 1) -> List[Any]:
  """`num_devices` compile-only devices of `target` on one host.

  Put them in a ``jax.sharding.SingleDeviceSharding`` or a
  ``jax.sharding.Mesh`` (``mpjax.data_parallel(mesh)`` and ``mpjax.fsdp``
  work on it) and compile with `compile_for_target`. They cannot run
  anything.

  Raises:
    GpuCompileUnavailableError: the plugin is missing or of another version.
  """
  if (isinstance(num_devices, bool) or not isinstance(num_devices, int)
      or num_devices < 1):
    raise ValueError("target_devices: num_devices must be an int >= 1, got "
                     f"{num_devices!r}.")
  return list(_devices(gpu_target(target).name, num_devices))


def target_mesh(target: str, shape: Sequence[int],
                axis_names: Sequence[str]) -> jax.sharding.Mesh:
  """A mesh of ``prod(shape)`` devices of `target` (``("data",)`` ...)."""
  devices = target_devices(target, math.prod(shape))
  return jax.sharding.Mesh(np.array(devices).reshape(tuple(shape)),
                           tuple(axis_names))


def _on_target(sharding: Any, devices: Sequence[Any]) -> bool:
  try:
    return set(sharding.device_set) <= set(devices)
  except AttributeError:
    return False


def abstract_for_target(tree: Any, target: str = "h100_sxm",
                        num_devices: int = 1, sharding: Any = None) -> Any:
  """`tree` with every array leaf a ``jax.ShapeDtypeStruct`` on `target`.

  A leaf already placed on the target's devices keeps its sharding; the
  others get `sharding`: by default the device itself with one device, and
  none with several (the jitted function's own shardings then decide, e.g.
  ``make_train_step(..., sharding=mpjax.data_parallel(mesh))`` on a
  `target_mesh`). Arrays, ShapeDtypeStructs and Python scalars all work;
  nothing is allocated.
  """
  devices = target_devices(target, num_devices)
  if sharding is None and num_devices == 1:
    sharding = jax.sharding.SingleDeviceSharding(devices[0])

  def leaf(x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      if isinstance(x, (bool, int, float, complex)):
        x = np.asarray(x)
      else:
        return x
    own = getattr(x, "sharding", None)
    keep = own if own is not None and _on_target(own, devices) else sharding
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=keep,
                                weak_type=getattr(x, "weak_type", False))

  return jax.tree.map(leaf, tree)


def compile_for_target(fn: Callable, *args, target: str = "h100_sxm",
                       num_devices: int = 1,
                       compiler_options: Optional[Mapping[str, Any]] = None,
                       **kwargs) -> jax.stages.Compiled:
  """Compiles ``fn(*args, **kwargs)`` for `target`; runs nothing.

  `fn` is a jitted function (anything with ``.lower``, e.g.
  `make_train_step`'s step, sharded or not) or a plain function (jitted
  here). `args` may be real arrays or ShapeDtypeStructs: each leaf is made
  abstract on the target (`abstract_for_target`), so a model far larger
  than this host compiles from its shapes (build the state with
  ``jax.eval_shape``).

  Args:
    fn: the function.
    *args: its positional arguments.
    target: a `gpu_target` name.
    num_devices: devices of the target (``>1`` for a sharded step: build
      its mesh with `target_mesh` or `target_devices`).
    compiler_options: per-program XLA options (``{"xla_dump_to": dir}``,
      `FAITHFUL_ROUNDING`, ...), over those `fn` was jitted with; none
      by default, so the program is the one a GPU of the target would run.
    **kwargs: keyword arguments of `fn`.

  Returns:
    The ``jax.stages.Compiled`` (``as_text()``, ``memory_analysis()``);
    `mpjax.audit_compiled` reads it.

  Raises:
    GpuCompileUnavailableError: the plugin is missing or of another version.
  """
  abstract_args, abstract_kwargs = abstract_for_target(
      (args, kwargs), target, num_devices)
  lower = getattr(fn, "lower", None) or jax.jit(fn).lower
  compiled = lower(*abstract_args, **abstract_kwargs).compile(
      compiler_options=dict(compiler_options) if compiler_options else None)
  devices = set(target_devices(target, num_devices))
  for sharding in jax.tree.leaves(compiled.input_shardings):
    if not set(sharding.device_set) <= devices:
      raise ValueError(
          "compile_for_target: the program was compiled for "
          f"{sorted(d.platform for d in sharding.device_set)[0]} devices, not "
          f"for {target}: with num_devices > 1 give the step shardings on a "
          "target mesh (mpjax.target_mesh) or the arguments theirs.")
  return compiled


skip_cuda_check_without_driver()
