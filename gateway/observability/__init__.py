"""Observability: what operators see. It observes the `Exchange` when a request ends and
samples what is in flight; it never reaches into the relay.

    metrics.py   the Prometheus series of DESIGN §7, recorded once per request, gauges
                 sampled every second (and at each scrape), summed across `--workers`
    logs.py      one access line per request, text or JSON, never a secret
"""
