"""Online correction of the predictor: scale the profile's predictions by what the engine
measures.

A profile is measured once, and then the machine changes under it: other tenants come and go,
clocks and memory placement drift (on the 2-vCPU machine of docs/benchmarks.md the same
iterations, measured minutes apart, differ by 30%). Each way of running an iteration also has
its own systematic error (a sum of pieces timed alone is not quite the layer loop they make).

So the engine reports every iteration it runs (`Predictor.observe`), and for each execution
path the prediction is multiplied by the median of measured / predicted over that path's last
`WINDOW` iterations:

    correction(path) = median(measured_i / table_prediction_i  for the last WINDOW iterations)
    prediction       = table_prediction * correction(path)

The median ignores a single stalled iteration; the short window follows drift within a few
iterations. (Replaying one recorded `profile --report` run with other settings: windows of 4,
8, 16 and 32 iterations gave median errors of 6.4%, 7.4%, 10.2% and 12.2%, the tables alone
16.1%; a mean instead of the median did worse at every size, and a global correction instead
of one per path slightly worse.) A path seen fewer than `MIN_SEEN` times is not corrected. Every prediction the
scheduler uses is made before its iteration runs, from earlier iterations only, and that is
the prediction the error report scores.
"""
from __future__ import annotations

import collections
import statistics

WINDOW = 8       # iterations per path that set its correction
MIN_SEEN = 3     # a path is corrected once it has run this many times

# The execution paths, as the runner chooses them (see Predictor.path).
PATHS = ("decode step", "layer loop", "overlap", "pipeline")


class Feedback:
    def __init__(self, window: int = WINDOW, min_seen: int = MIN_SEEN):
        self.min_seen = min_seen
        self.ratios = {p: collections.deque(maxlen=window) for p in PATHS}

    def correction(self, path: str) -> float:
        seen = self.ratios[path]
        return statistics.median(seen) if len(seen) >= self.min_seen else 1.0

    def observe(self, path: str, table_s: float, measured_s: float) -> None:
        """One iteration of `path` took `measured_s`; the tables alone predicted `table_s`."""
        if table_s > 0 and measured_s > 0:
            self.ratios[path].append(measured_s / table_s)

    def summary(self) -> dict[str, float]:
        """The current correction of every path that has one."""
        return {p: round(self.correction(p), 3) for p in PATHS if len(self.ratios[p]) >= self.min_seen}
