"""The host thread of a run in simulated time: it decides and launches, and it handles every copy
landing (commits the block, tells the policy, ranks the next copy's victims and starts it), one
thing at a time.

Only what a profile charges occupies it: a policy's decisions (policy_host_s layer_s and step_s)
and each landing's handling (land_s). A landing due while the host is busy waits for it, and the
next copy starts only once its landing is handled, so the link idles meanwhile; a decision due
while a landing is handled starts after it. On H200s the real executor spent 0.49 ms handling each
of oracle_prefetch's landings and 0.22 ms of FineMoE's against lru's 35 us (gpt-oss-20b, 192
experts: docs/realrun/h200-gpt-oss-20b.md), a third to a half of a 0.92 ms expert copy.
"""
from __future__ import annotations

import simpy


class HostThread:
    def __init__(self, env: simpy.Environment, land_s: float):
        self.env = env
        self.land_s = land_s
        self.busy_until = 0.0

    def take(self, seconds: float) -> float:
        """Occupy the host for `seconds` from when it is free; how long from now until that is done."""
        now = self.env.now
        self.busy_until = max(now, self.busy_until) + seconds
        return self.busy_until - now

    def free_in(self) -> float:
        """How long from now until the host is free."""
        return max(0.0, self.busy_until - self.env.now)
