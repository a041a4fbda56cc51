"""The LM examples in fp8, both APIs: delayed and current scaling vs bfloat16.

A wrapper over `lm_linen.py` and `lm_nnx.py`, which train in fp8 themselves
(``--configs mixed_bfloat16 fp8_delayed fp8_current``; the configurations are
`lm_common.CONFIGS`, the fp8 map `lm_common.fp8_policy`): it runs each API's
example with those configurations and one JSON and metrics file per API.
Every other flag is the LM examples' (``python experiments/lm_linen.py
--help``); each API's run exits with an error if an fp8 run's validation
loss is more than ``--max-fp8-gap-pct`` (1.5%) from mixed_bfloat16's.

Command (1.5 to 4 minutes per API on 2 shared CPU cores, measured 2026-12-02)::

  python experiments/fp8_lm.py --json 'benchmarks/fp8/lm_{api}_cpu.json' \\
      --metrics 'benchmarks/fp8/lm_{api}_metrics.jsonl'

which is, per API, ``python experiments/lm_{api}.py --configs
mixed_bfloat16 fp8_delayed fp8_current --json ... --metrics ...``.
"""

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

APIS = ("linen", "nnx")
CONFIGS = ("mixed_bfloat16",) + cli.FP8_CONFIGS


def parse_args(argv: List[str]) -> argparse.Namespace:
  """The wrapper's flags; ``args.lm_argv[api]`` is each example's argv."""
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      epilog="Any other flag is passed to lm_linen.py / lm_nnx.py (see "
             "their --help).")
  parser.add_argument("--apis", nargs="+", choices=APIS, default=list(APIS))
  parser.add_argument("--json", default=os.path.join("runs",
                                                     "lm_{api}_fp8.json"),
                      help="each API's --json; {api} is replaced")
  parser.add_argument("--metrics", default=os.path.join(
      "runs", "lm_{api}_fp8_metrics.jsonl"),
                      help="each API's --metrics; {api} is replaced")
  args, rest = parser.parse_known_args(argv)
  if "--configs" not in rest:
    rest = ["--configs", *CONFIGS, *rest]
  args.lm_argv = {}
  for api in args.apis:
    lm_argv = [*rest, "--json", args.json.format(api=api),
               "--metrics", args.metrics.format(api=api)]
    cli.parse_lm_args(lm_argv, api)  # bad flags fail here, before jax
    args.lm_argv[api] = lm_argv
  return args


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args(sys.argv[1:])

# pylint: disable=g-import-not-at-top,wrong-import-position
import lm_common
import mpjax


def policy_map(api: Optional[str], recipe: Any) -> mpjax.PolicyMap:
  """The fp8 LM map of `api` (`lm_common.fp8_policy`)."""
  return lm_common.fp8_policy(recipe, api)


def main(argv: List[str]) -> Dict[str, Any]:
  """Runs each API's LM example in fp8; returns their results by API."""
  import lm_linen  # pylint: disable=import-outside-toplevel
  import lm_nnx  # pylint: disable=import-outside-toplevel
  args = parse_args(argv[1:])
  scripts = {"linen": lm_linen, "nnx": lm_nnx}
  return {api: scripts[api].main([f"lm_{api}.py", *args.lm_argv[api]])
          for api in args.apis}


if __name__ == "__main__":
  main(sys.argv)
