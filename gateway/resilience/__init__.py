"""Resilience policy (pure: the clock is passed in, nothing here does I/O).

The relay asks, the policy answers; the relay acts on the answer:

    attempts.py       may an attempt start with what remains, after which backoff, and
                      does an upstream's Retry-After fit
    latency.py        each target's recent time to first token (estimates, percentiles)
    retry_budget.py   retries and hedges of a route within a ratio of its recent requests
    outlier.py        an upstream ejected after consecutive failures, then probed
"""
