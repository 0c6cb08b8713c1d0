"""The workload a latency is asked for, and the one place the metrics are defined.

Latency is what the flow's own serving loop delivers (``generate()`` for eager PyTorch: greedy,
fixed output length, no early stop). Definitions, in milliseconds for one request of ``batch``
sequences:

- ``ttft_ms``: time to first token = a request for one new token over a ``prompt_len`` prompt
  (the prefill forward, the first token's sampling and the loop's own per-request work).
- ``tpot_ms``: time per output token = the mean decode step over the ``gen_len - 1`` steps that
  produce tokens 2..gen_len. Step i (1-based) runs with ``prompt_len + i - 1`` tokens already in
  the KV cache; decode cost grows with that context, so it is integrated, not sampled once. A
  table's decode row at context c is (e2e(1 + n) - e2e(1)) / n of a request whose prompt KV is
  already cached, with the n steps centred on c.
- ``e2e_ms``: ttft + the sum of those decode steps.

``compose`` is the one place these sums are written: the predictor composes from a table's rows,
validation from measured whole models, both through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.inputs import positive_int

METRICS = ("ttft_ms", "tpot_ms", "e2e_ms")


def cached_prefix(context: int, steps: int) -> int:
    """Tokens whose KV is cached before a decode row's window: the ``steps`` timed decode steps
    then run at KV lengths centred on ``context`` (``context - steps // 2`` onwards). Every flow's
    tpot request starts from this prefix, so the rows of different flows time the same positions."""
    return max(0, context - steps // 2)


def tpot_prompt_tokens(context: int, steps: int) -> int:
    """Prompt tokens of a tpot request on a flow that caches a prefix itself: the cached prefix
    plus its last token, which the flow always recomputes before decoding."""
    return cached_prefix(context, steps) + 1


METRIC_ALIASES = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2e": "e2e_ms"}


def metric_name(text: str) -> str:
    """'tpot', 'TPOT' or 'tpot_ms' -> 'tpot_ms': the one parser of metric names, so the CLI and the
    Python API accept the same spellings."""
    key = str(text).strip().lower()
    name = METRIC_ALIASES.get(key, key)
    if name not in METRICS:
        raise UsageError(f"unknown metric {text!r}: use one of ttft, tpot, e2e (or ttft_ms, tpot_ms, e2e_ms)")
    return name


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 128

    def __post_init__(self) -> None:
        for field in ("batch", "prompt_len", "gen_len"):
            positive_int(getattr(self, field), f"workload {field}")

    def decode_span(self) -> tuple[int, int] | None:
        """First and last KV-cache length of the decode steps (None when gen_len == 1): a range is
        checked on these two before ``decode_contexts`` materializes gen_len - 1 of them."""
        return (self.prompt_len, self.prompt_len + self.gen_len - 2) if self.gen_len > 1 else None

    def decode_contexts(self) -> np.ndarray:
        """KV-cache lengths seen by each decode step (empty when gen_len == 1)."""
        return np.arange(self.prompt_len, self.prompt_len + self.gen_len - 1, dtype=np.int64)


@dataclass(frozen=True)
class Metrics:
    """The three metrics of one request, in ms; ``tpot_ms`` is NaN when there is no decode step."""

    ttft_ms: float
    tpot_ms: float
    e2e_ms: float

    def metric(self, name: str) -> float:
        """``name`` in any spelling ``metric_name`` accepts; tpot without a decode step is refused."""
        name = metric_name(name)
        if name == "tpot_ms" and math.isnan(self.tpot_ms):
            raise UsageError("tpot needs --gen-len >= 2 (there is no decode step otherwise)")
        return float(getattr(self, name))


def compose(ttft_ms: float, decode_steps_ms: np.ndarray) -> Metrics:
    """The metrics of a request from its ttft and its decode steps' times, one per context of
    ``Workload.decode_contexts()`` (empty when ``gen_len`` is 1: tpot is NaN and e2e is the ttft)."""
    steps = np.asarray(decode_steps_ms, dtype=float)
    tpot = float(steps.mean()) if len(steps) else math.nan
    return Metrics(float(ttft_ms), tpot, float(ttft_ms + steps.sum()))
