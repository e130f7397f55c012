"""`python -m apex_mini.bench {kernels,decode,serve,overlap}`: the benchmarks, one sub-command each.

    kernels   CPU attention's achieved bandwidth beside this machine's copy bandwidth
    decode    decode tokens/s and GB/s against the roofline, beside transformers' generate
    serve     a serving workload through every policy, side by side
    overlap   when CPU attention and device attention run, per layer of a hybrid decode step
"""
from __future__ import annotations

import importlib
import sys

from .cli import run_cli

COMMANDS = {
    "kernels": ("apex_mini.bench_kernels", "CPU attention bandwidth vs memory-copy bandwidth"),
    "decode": ("apex_mini.bench_decode", "decode tok/s and GB/s vs the roofline and transformers"),
    "serve": ("apex_mini.bench_serve", "serving workloads through every policy"),
    "overlap": ("apex_mini.bench_overlap", "when CPU and device attention run, per layer"),
}


def usage() -> str:
    lines = ["usage: python -m apex_mini.bench {kernels,decode,serve,overlap} [options]", ""]
    lines += [f"  {name:8s} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m apex_mini.bench COMMAND --help` lists each command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not argv:                                      # a command is needed: one line, as an error
        print(f"error: name a benchmark: one of {', '.join(COMMANDS)}; see --help", file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        raise ValueError(f"unknown benchmark {argv[0]!r}; choose one of {', '.join(COMMANDS)} "
                         "(see --help)")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
