"""Serving metrics (metrics.py) on hand-built requests with known times: the TTFT, TPOT and
throughput figures that bench serve and simulate report, checked against the arithmetic of
their definitions rather than only for being positive."""
from __future__ import annotations

import pytest

from apex_mini.metrics import IterationTally, latencies, summarize
from apex_mini.plan import Plan, Strategy
from apex_mini.sampling import SamplingParams
from apex_mini.sequence import Sequence


def request(seq_id: int, arrival: float, first: float | None, finish: float | None,
            outputs: int, prompt_len: int = 4) -> Sequence:
    """A request of `prompt_len` prompt tokens that arrived at `arrival`, got its first token at
    `first` and finished at `finish` (None: not yet) with `outputs` output tokens."""
    seq = Sequence(seq_id, [7] * (prompt_len + outputs), SamplingParams(), seed=seq_id,
                   arrival_time=arrival, prompt_len=prompt_len)
    seq.first_token_time, seq.finish_time = first, finish
    return seq


def requests() -> list[Sequence]:
    """Four finished requests (one with a single output token), one still running, one still
    waiting for its first token; the clock starts at 10."""
    return [
        request(0, arrival=10.0, first=11.0, finish=15.0, outputs=5),   # TTFT 1, TPOT 4/4 = 1
        request(1, arrival=10.0, first=13.0, finish=14.0, outputs=3),   # TTFT 3, TPOT 1/2 = 0.5
        request(2, arrival=12.0, first=12.5, finish=12.5, outputs=1),   # TTFT 0.5, no TPOT
        request(3, arrival=14.0, first=16.0, finish=20.0, outputs=9),   # TTFT 2, TPOT 4/8 = 0.5
        request(4, arrival=15.0, first=17.0, finish=None, outputs=6),   # running: not counted
        request(5, arrival=19.0, first=None, finish=None, outputs=0),   # waiting: not counted
    ]


def test_latencies_follow_their_definitions():
    """TTFT = first token - arrival (queueing included), TPOT = (finish - first token) /
    (outputs - 1); a one-token request has a TTFT but no TPOT (it has no second token), and a
    request that has not finished has neither."""
    ttft, tpot = latencies(requests())
    assert ttft == pytest.approx([1.0, 3.0, 0.5, 2.0])
    assert tpot == pytest.approx([1.0, 0.5, 0.5])


def test_summary_row_from_known_times():
    """Throughput is the finished requests' output tokens over the time from the clock's start
    to the last finish; the percentiles are numpy's (linear) over the finished requests only."""
    seqs = requests()
    tally = IterationTally()
    for _ in range(2):
        tally.add(Plan(gpu_decodes=seqs[:2]))
    tally.add(Plan(gpu_decodes=seqs[:1], cpu_decodes=seqs[1:2], strategy=Strategy.OVERLAP))
    tally.add(Plan(cpu_decodes=seqs[:2], strategy=Strategy.PIPELINE))
    tally.add(Plan())                                      # an empty plan is no iteration
    row = summarize(seqs, 10.0, tally, preemptions=2, swaps=3, parks=1)
    assert row["output_tokens"] == 5 + 3 + 1 + 9
    assert row["duration_s"] == pytest.approx(10.0)
    assert row["throughput_tok_s"] == pytest.approx(18 / 10.0)
    assert row["completed"] == 4 and row["num_requests"] == 6
    assert row["ttft_p50_s"] == pytest.approx(1.5)         # median of 0.5, 1, 2, 3
    assert row["ttft_p99_s"] == pytest.approx(2.0 + 0.97 * (3.0 - 2.0))
    assert row["tpot_p50_s"] == pytest.approx(0.5)
    assert row["tpot_p99_s"] == pytest.approx(0.5 + 0.98 * (1.0 - 0.5))
    assert (row["preemptions"], row["swaps"], row["parks"]) == (2, 3, 1)
    assert row["iterations"] == 4
    assert (row["host_decode_iterations"], row["host_decodes"]) == (2, 3)
    assert row["strategy_mix"] == {"gpu-only": 0.5, "overlap": 0.25, "pipeline": 0.25}
    assert row["samples"] == {"ttft_s": pytest.approx([1.0, 3.0, 0.5, 2.0]),
                              "tpot_s": pytest.approx([1.0, 0.5, 0.5])}


def test_summary_of_nothing_finished():
    """No finished request: zero throughput and no latency figures, not a division by zero."""
    row = summarize(requests()[4:], 10.0, IterationTally(), 0, 0)
    assert row["throughput_tok_s"] == 0.0 and row["completed"] == 0
    assert row["ttft_p50_s"] is None and row["tpot_p99_s"] is None
