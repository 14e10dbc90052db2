"""Tenants: each API key a tenant with a priority class, quotas and the routes it may use.

    buckets     pure arithmetic: token buckets refilled continuously (requests and tokens per
                minute), the verdict over every limit of a key at once, what a request
                reserves and what it is charged when it ends, OpenAI's `x-ratelimit-*` headers
    fair_queue  pure ordering of an upstream's waiters: priority class, then fair share among
                the keys of a class (virtual time), then earliest deadline; whom to shed
    quotas      this process's side: admit a request (in this process, or through the shared
                store when `shared` is set, `shared.on_failure` while it is down) and settle it

The queue itself stays in `gateway.upstream` (the bulkheads order their waiters with a
`FairQueue`); the proxy admits before the relay starts and settles when the request ends.
A key without `limits` costs one attribute check.
"""
