"""What every experiment prints and records: the environment and a Markdown table."""

import datetime
import importlib.metadata
import platform
from typing import Any, Dict, List, Sequence, Tuple

import flax
import jax
import optax

import mpjax

# (title, row key, format spec) per column.
Columns = Sequence[Tuple[str, str, str]]


def environment(argv: List[str]) -> Dict[str, Any]:
  """Where, when and how a result was made: device, versions, date, command."""
  device = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": "python " + " ".join(argv),
      "device": f"{device.platform}:{device.device_kind}",
      "machine": platform.machine(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": importlib.metadata.version("jaxlib"),
      "flax": flax.__version__,
      "optax": optax.__version__,
      "mpjax": mpjax.__version__,
  }


def markdown_table(rows: List[Dict[str, Any]], columns: Columns) -> str:
  """The rows as a Markdown table; a missing or None value prints as n/a."""
  fmt = lambda spec, value: "n/a" if value is None else spec.format(value)
  lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  for row in rows:
    cells = [fmt(spec, row.get(key)) for _, key, spec in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def xla_memory(compiled: Any) -> Dict[str, Any]:
  """A compiled step's `memory_analysis()` figures (None where unsupported)."""
  memory = compiled.memory_analysis()
  return {f"xla_{name}_bytes": getattr(memory, f"{name}_size_in_bytes", None)
          for name in ("argument", "output", "alias", "temp")}
