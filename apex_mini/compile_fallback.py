"""Run a compiled function, or the same math eagerly when compiling fails.

torch.compile compiles at the first call, and that can fail where the code is fine: no C++
compiler, an unsupported platform. apex_mini's compiled paths (CPU attention, the decode step,
the CUDA graphs' warm-up) then run eagerly for the rest of the process, with one warning. An
error the eager function raises too (bad input) is raised: the compiler is not to blame.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable


def compiled_or_eager(compiled: Callable, eager: Callable, args: tuple, what: str,
                      on_failure: Callable[[], None]) -> Any:
    """`compiled(*args)`; if it raises, `eager(*args)`, then `on_failure()` (the caller stops
    calling `compiled`) and a RuntimeWarning naming `what` and the compiler's error."""
    try:
        return compiled(*args)
    except Exception as e:
        out = eager(*args)                 # bad input raises here, as it should
        on_failure()                       # eager worked: compiling is the problem
        first_line = (str(e).splitlines() or [""])[0]
        warnings.warn(f"{what}: torch.compile failed ({type(e).__name__}: {first_line}); "
                      f"running it eagerly from now on", RuntimeWarning, stacklevel=3)
        return out
