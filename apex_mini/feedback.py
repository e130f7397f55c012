"""Online correction of the predictor: scale the profile's predictions by what the engine
measures.

A profile is measured once, and then the machine changes under it: other tenants come and go,
clocks and memory placement drift (on the 2-vCPU machine of docs/benchmarks.md the same
iterations, measured minutes apart, differ by 30%; in one report the tables alone were off by
27%).

So the engine reports every iteration it runs (`Predictor.observe`), and every prediction is
multiplied by the median of measured / predicted over the last `WINDOW` iterations:

    correction = median(measured_i / table_prediction_i  for the last WINDOW iterations)
    prediction = table_prediction * correction

The median of 3 ignores one stalled iteration and follows drift within a few iterations. An
iteration that captured a CUDA graph is not observed at all (`IterationRecord.captured_graph`):
on an H200 captures took 57 to 104 ms against 7 to 8 ms a replay, and two among three
iterations (a new block-table width, then a new batch size) were common enough to set the
median. Until `MIN_SEEN` iterations have run the correction is 1. Every prediction the scheduler uses is made
before its iteration runs, from earlier iterations only, and that is the prediction the error
report scores.

One factor for every plan, on purpose: it scales every candidate of an iteration alike, so it
changes no scheduling decision (apex compares tokens/s between candidates and bounds latency
relative to the GPU-only plan: both are ratios), only the predicted times. A factor per
execution path (decode step, layer loop, overlap, pipeline) fitted recorded reports slightly
better, but it set paths against each other with corrections learned at different moments: in
`bench serve` (chat) after the `neo` run, `apex` with per-path factors served 0.53x GPU-only's
tokens/s, against 1.15x without feedback. (Replaying four recorded `profile --report` runs:
windows of 3, 5 and 8 gave median errors of 5.2-9.0%, 5.6-10.2% and 7.0-12.2%; the tables
alone 12.1-27.0%; a mean instead of the median did worse.)
"""
from __future__ import annotations

import collections
import statistics

WINDOW = 3       # the last iterations that set the correction
MIN_SEEN = 3     # iterations before any correction


class Feedback:
    def __init__(self, window: int = WINDOW, min_seen: int = MIN_SEEN):
        self.min_seen = min_seen
        self.ratios: collections.deque[float] = collections.deque(maxlen=window)

    def correction(self) -> float:
        return statistics.median(self.ratios) if len(self.ratios) >= self.min_seen else 1.0

    def observe(self, table_s: float, measured_s: float) -> None:
        """An iteration took `measured_s`; the tables alone predicted `table_s`."""
        if table_s > 0 and measured_s > 0:
            self.ratios.append(measured_s / table_s)
