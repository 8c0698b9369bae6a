"""Short measurements that calibrate the cost model on this machine."""

from __future__ import annotations

import statistics
import time

from .model import ForwardCost


def measure_forward_cost(stage, context: list[int], ns=(1, 2, 3, 5, 9, 17), reps: int = 7) -> ForwardCost:
    """``t(n)`` of a :class:`~..stages.model.ModelStage` (or any stage with ``score``): the median of
    ``reps`` forwards over ``n`` new tokens after ``context`` (cached once, rolled back each time)."""
    stage.score(context[:-1], [])  # the context is in the cache; every timed call rolls back to it
    filler = context[-1:]
    times: dict[int, list[float]] = {n: [] for n in ns}
    for _ in range(reps):  # interleaved, so drifts of the machine hit every n alike
        for n in ns:
            t0 = time.perf_counter()
            stage.score(context, filler * (n - 1))
            times[n].append(time.perf_counter() - t0)
    return ForwardCost(getattr(stage, "name", "stage"), tuple((n, statistics.median(v)) for n, v in times.items()))
