"""Forward passes of policies that prefetch by a plan that does not depend on timing, as events.

Replays what sim.engine, sim.layer_protocol, sim.copy_scheduler and sim.link do for two kinds of
policy (sim.fast.engine.KINDS), on layer placement with whole-expert copies:
- NEXT_LAYER (policies.deepspeed): a layer gathers all its experts before computing; while it runs,
  every expert of the next layer is fetched at priority 1; a copy drops every block outside the
  running and the next layer, then the running layer's unpinned ones, then the next layer's,
  highest expert first;
- ORACLE (policies.oracle_prefetch): before every pass and after every router, the queued
  prefetches are replaced by the next `slots` distinct blocks needed within the horizon, soonest
  first; Belady victims, and a prefetch is declined when every candidate victim is needed first.

Each GPU's link copies one block at a time from its queue (demand before prefetch, then priority,
rank, order of request; sim.copy_queue), admitting it (and so choosing victims) when it starts,
after the previous one landed. The compute process advances step by step and first handles the
link events due before each step ends (a landing commits the block, then starts the next copy), so
every admission sees the pins and policy state of its instant. Floating-point sums are taken in
the SimPy engine's order.

A landing due at the very instant the compute resumes goes in SimPy's order (first when its copy
was scheduled before the compute's step began, after otherwise). Where the outcome would hinge on
an order this does not know (both scheduled at one instant), or on a state it does not model (a
demand that finds no room, which the scheduler resolves by waiting or releasing; host copies of
two GPUs sharing the host's bandwidth at once, which its fluid model re-plans), the call returns
ABORT and the caller runs the SimPy engine instead. Hot helpers are inlined: each call passes the
state arrays, and numba counts a reference for each.
"""
from __future__ import annotations

import numpy as np
from numba import njit, objmode

from sim.fast.kernel import ABORT, _compute, _next_use, layer_experts

NEXT_LAYER, ORACLE = 1, 2
NONE, RES, FLY = 0, 1, 2
HIT, LATE, MISS = 0, 1, 2
# per-GPU integer state, gi[g, ...]; GATHER: whether the GPU can hold a whole layer
CAP, USED, NRES, NPINRES, HIGH, EVICT, WASTE, CUR, QN, GATHER = range(10)
# per-GPU float state, gf[g, ...]: the current copy's priority, start and landing; compute warmth
PRIO, START, END, WARMTH, BUSY = range(5)
# counters, cnt[...]: prefetches requested, dropped, cancelled; queue order; the policy's clock
# (NEXT_LAYER: the running layer; ORACLE: the position); FAIL: set when the call must abort
REQ, DROP, CANC, SEQ, NOW, FAIL = range(6)
# why a call aborted, cnt[FAIL]
TIE, NO_ROOM, SHARED_FABRIC = 1, 2, 3
WHY = {TIE: "a copy lands at the very instant the compute resumes (SimPy's event order decides)",
       NO_ROOM: "a demand copy finds no room (the scheduler waits or releases memory)",
       SHARED_FABRIC: "host copies of two GPUs overlap on the shared host bandwidth (its fluid model re-plans)"}
# bytes copied, fb[...]
DEMAND_B, PREFETCH_B = range(2)
# integer parameters, pi[...]
P_L, P_E, P_BPE, P_KIND, P_FABRIC, P_SLOTS, P_TOPK, P_HORIZON, P_NSTEPS, P_AW = range(10)
# float parameters, pf[...]
P_COPY, P_LAT, P_FABRIC_BPS, P_HOST_STEP, P_HOST_LAYER, P_AW_CF, P_AW_UP, P_AW_DOWN = range(8)


@njit(cache=True, inline="always")
def _copy_end(g, s, pi, pf, gi, gf, cnt):
    """When a copy started at s on GPU g lands (sim.link). With a host fabric, a transfer that
    overlaps another GPU's would be re-planned by its fluid model: abort."""
    if not pi[P_FABRIC]:
        return s + pf[P_COPY]
    begin = s + pf[P_LAT]
    end = begin + float(pi[P_BPE]) / pf[P_FABRIC_BPS]
    for h in range(gi.shape[0]):
        if h != g and gi[h, CUR] >= 0 and max(begin, gf[h, START] + pf[P_LAT]) <= min(end, gf[h, END]):
            cnt[FAIL] = SHARED_FABRIC
    return end


@njit(cache=True, inline="always")
def _evict(b, g, bpe, E, gi, bstate, unused, lres):
    bstate[b] = NONE
    lres[b // E] -= 1
    gi[g, NRES] -= 1
    gi[g, USED] -= bpe
    gi[g, EVICT] += 1
    if unused[b]:  # a prefetch never used
        unused[b] = False
        gi[g, WASTE] += bpe


@njit(cache=True, inline="always")
def _admit(g, b, demand, pi, gi, cnt, bstate, pinned, unused, lres, layer_gpu, uses_ptr, uses_pos, cursor):
    """sim.cache.ExpertCache.admit with the policy's choose_victims: False when the copy cannot
    start (too little evictable memory, or the oracle declines a prefetch)."""
    L, E, bpe = pi[P_L], pi[P_E], pi[P_BPE]
    free = gi[g, CAP] - gi[g, USED]
    if free + (gi[g, NRES] - gi[g, NPINRES]) * bpe < bpe:
        return False
    if pi[P_KIND] == NEXT_LAYER:
        now = cnt[NOW]
        live = (now + 1) % L
        for l in range(L):  # every evictable block outside the running and the next layer
            if l == now or l == live or layer_gpu[l] != g or lres[l] == 0:
                continue
            for e in range(E):
                x = l * E + e
                if bstate[x] == RES and pinned[x] == 0:
                    _evict(x, g, bpe, E, gi, bstate, unused, lres)
                    free += bpe
        for l in (now, live):  # then the running layer's, the next layer's, highest expert first
            if layer_gpu[l] != g:
                continue
            for e in range(E - 1, -1, -1):
                if free >= bpe:
                    break
                x = l * E + e
                if bstate[x] == RES and pinned[x] == 0:
                    _evict(x, g, bpe, E, gi, bstate, unused, lres)
                    free += bpe
        return True
    if free >= bpe:
        return True
    now = cnt[NOW]
    best, best_use = -1, -1.0  # Belady: the evictable block used furthest ahead, ties to the lowest
    for l in range(L):
        if layer_gpu[l] != g or lres[l] == 0:
            continue
        for e in range(E):
            x = l * E + e
            if bstate[x] == RES and pinned[x] == 0:
                use = _next_use(x, now, uses_ptr, uses_pos, cursor)
                if use > best_use:
                    best, best_use = x, use
    uses = uses_pos[uses_ptr[b]:uses_ptr[b + 1]]
    i = np.searchsorted(uses, now - 1, side="right")
    needed_at = float(uses[i]) if i < uses.shape[0] else np.inf
    if best_use <= needed_at:  # every candidate victim is needed first
        if demand:
            cnt[FAIL] = NO_ROOM
        return False
    _evict(best, g, bpe, E, gi, bstate, unused, lres)
    return True


@njit(cache=True, inline="always")
def _queue_head(g, gi, qb, q_prio, q_rank, q_seq):
    """The position in qb[g] of the job copied next: highest priority, then lowest rank, then oldest."""
    best = -1
    for j in range(gi[g, QN]):
        x = qb[g, j]
        if best < 0:
            best = j
            continue
        y = qb[g, best]
        if q_prio[x] > q_prio[y] or (q_prio[x] == q_prio[y] and (
                q_rank[x] < q_rank[y] or (q_rank[x] == q_rank[y] and q_seq[x] < q_seq[y]))):
            best = j
    return best


@njit(cache=True, inline="always")
def _dequeue(g, j, gi, qb, in_q):
    in_q[qb[g, j]] = False
    gi[g, QN] -= 1
    qb[g, j] = qb[g, gi[g, QN]]


@njit(cache=True)
def _kick(g, s, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres, layer_gpu,
          uses_ptr, uses_pos, cursor):
    """sim.copy_scheduler.CopyScheduler.kick at time s: start the next copy if the link is idle."""
    if gi[g, CUR] >= 0:
        return
    while gi[g, QN] > 0:
        j = _queue_head(g, gi, qb, q_prio, q_rank, q_seq)
        b = qb[g, j]
        demand = q_prio[b] == np.inf
        if not _admit(g, b, demand, pi, gi, cnt, bstate, pinned, unused, lres, layer_gpu, uses_ptr, uses_pos,
                      cursor):
            if demand:  # it would wait for room, or have the scheduler release some
                cnt[FAIL] = NO_ROOM
                return
            _dequeue(g, j, gi, qb, in_q)
            cnt[DROP] += 1
            continue
        bstate[b] = FLY
        gi[g, USED] += pi[P_BPE]
        if gi[g, USED] > gi[g, HIGH]:
            gi[g, HIGH] = gi[g, USED]
        _dequeue(g, j, gi, qb, in_q)
        gi[g, CUR] = b
        gf[g, PRIO] = q_prio[b]
        gf[g, START] = s
        gf[g, END] = _copy_end(g, s, pi, pf, gi, gf, cnt)
        return


@njit(cache=True, inline="always")
def _fetch(g, b, prio, rank, s, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused,
           lres, layer_gpu, uses_ptr, uses_pos, cursor):
    """CopyScheduler.fetch: ask for a block; one already queued or copying is only re-prioritised."""
    if gi[g, CUR] == b:
        gf[g, PRIO] = max(gf[g, PRIO], prio)
        return
    if in_q[b]:
        if prio > q_prio[b]:
            q_prio[b], q_rank[b], q_seq[b] = prio, rank, cnt[SEQ]
            cnt[SEQ] += 1
    elif bstate[b] != NONE:
        return
    else:
        if prio != np.inf:
            cnt[REQ] += 1
        in_q[b] = True
        q_prio[b], q_rank[b], q_seq[b] = prio, rank, cnt[SEQ]
        cnt[SEQ] += 1
        qb[g, gi[g, QN]] = b
        gi[g, QN] += 1
    if gi[g, CUR] < 0:  # (a call only when the link is idle: passing the state arrays costs refcounts)
        _kick(g, s, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres, layer_gpu,
              uses_ptr, uses_pos, cursor)


@njit(cache=True, inline="always")
def _land(g, pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
          layer_gpu, uses_ptr, uses_pos, cursor):
    """CopyScheduler.chunk_landed: the copy is committed (a prefetch stays 'unused' until computed),
    then the next one starts."""
    b = gi[g, CUR]
    gi[g, CUR] = -1
    nbytes = float(pi[P_BPE])
    lbytes[b // pi[P_E]] += nbytes
    if gf[g, PRIO] == np.inf:
        fb[DEMAND_B] += nbytes
    else:
        fb[PREFETCH_B] += nbytes
        unused[b] = True
    bstate[b] = RES
    lres[b // pi[P_E]] += 1
    gi[g, NRES] += 1
    if pinned[b]:
        gi[g, NPINRES] += 1
    _kick(g, gf[g, END], pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
          layer_gpu, uses_ptr, uses_pos, cursor)


@njit(cache=True, inline="always")
def _next_landing(gi, gf):
    g, best = -1, np.inf
    for h in range(gi.shape[0]):
        if gi[h, CUR] >= 0 and gf[h, END] < best:
            g, best = h, gf[h, END]
    return g, best


@njit(cache=True)
def links_until(until, since, pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned,
                unused, lres, layer_gpu, uses_ptr, uses_pos, cursor):
    """Handle every landing due before `until`, for a step of the compute from `since` to `until`
    (since=-inf: every landing due at `until` too). A landing due at `until` itself goes first when
    SimPy scheduled it before the compute's step (its transfer began before `since`), after when
    later (it is left for the next call); at `since` exactly, which is first is unknown: abort.
    Returns the time of the last one handled (-inf if none)."""
    last = -np.inf
    while cnt[FAIL] == 0:
        g, when = _next_landing(gi, gf)
        if g < 0 or when > until:
            break
        if when == until and since != -np.inf:
            scheduled = gf[g, START] + pf[P_LAT] if pi[P_FABRIC] else gf[g, START]
            if scheduled > since:
                break
            if scheduled == since:
                cnt[FAIL] = TIE
                break
        _land(g, pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
              layer_gpu, uses_ptr, uses_pos, cursor)
        last = when
    return last


@njit(cache=True, inline="always")
def _pin(b, g, gi, bstate, pinned):
    pinned[b] += 1
    if pinned[b] == 1 and bstate[b] == RES:
        gi[g, NPINRES] += 1


@njit(cache=True, inline="always")
def _unpin(b, g, gi, bstate, pinned):
    pinned[b] -= 1
    if pinned[b] == 0 and bstate[b] == RES:
        gi[g, NPINRES] -= 1


@njit(cache=True)
def _oracle_plan(step, t, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
                 layer_gpu, uses_ptr, uses_pos, cursor, upcoming, cand, chosen):
    """policies.oracle_prefetch's plan (the next `slots` distinct blocks needed within the horizon,
    soonest first), applied as sim.layer_protocol.apply_plan does: queued prefetches cancelled,
    then each entry not resident fetched in order."""
    if pi[P_SLOTS] < pi[P_TOPK]:
        return
    N = upcoming.shape[0]
    limit = float(min(step + pi[P_HORIZON], pi[P_NSTEPS]) * pi[P_L])
    m = 0
    for x in range(N):
        if upcoming[x] < limit:
            cand[m] = x
            m += 1
    ordered = cand[:m][np.argsort(upcoming[cand[:m]], kind="mergesort")]  # by (upcoming, block)
    count = min(pi[P_SLOTS], N)
    if m > count:
        if upcoming[ordered[count]] == upcoming[ordered[count - 1]]:
            # ties across the cut: which of them np.argpartition keeps is numpy's own choice
            with objmode(picked="int64[:]"):
                picked = np.argpartition(upcoming, count - 1)[:count].astype(np.int64)
            chosen[:] = False
            chosen[picked] = True
            k = 0
            for j in range(m):
                if chosen[ordered[j]]:
                    ordered[k] = ordered[j]
                    k += 1
            ordered = ordered[:k]
        else:
            ordered = ordered[:count]
    for g in range(gi.shape[0]):  # replace=True: every queued prefetch cancelled
        j = 0
        while j < gi[g, QN]:
            if q_prio[qb[g, j]] != np.inf:
                _dequeue(g, j, gi, qb, in_q)
                cnt[CANC] += 1
            else:
                j += 1
    for j in range(ordered.shape[0]):
        x = ordered[j]
        if bstate[x] != RES:
            _fetch(layer_gpu[x // pi[P_E]], x, -upcoming[x], 0.0, t, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq,
                   in_q, bstate, pinned, unused, lres, layer_gpu, uses_ptr, uses_pos, cursor)
            if cnt[FAIL]:
                return


@njit(cache=True)
def step_plan(step, t, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
              layer_gpu, uses_ptr, uses_pos, cursor, upcoming, cand, chosen):
    """on_step_start's plan (the oracle's; the next-layer stream has none)."""
    if pi[P_KIND] == ORACLE:
        cnt[NOW] = step * pi[P_L] - 1
        _oracle_plan(step, t, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
                     layer_gpu, uses_ptr, uses_pos, cursor, upcoming, cand, chosen)


@njit(cache=True)
def run_stream(kinds, refs, row_start, row_count, rows, ne, xfer, xi, extime, experts_tab, counts_tab, step0, t, ends,
               pi, pf, gi, gf, cnt, fb, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres, layer_gpu,
               uses_ptr, uses_pos, cursor, upcoming, consumed, hits, misses, late, pf_hits, uses, stall, lbytes):
    """Run passes p = 0..len(kinds)-1 (as sim.fast.kernel.run_passes takes them) from time t, pass p
    being step step0 + p; ends[p] gets each pass's end. Returns the end of the last, or ABORT. The
    state arrays are updated in place and carry the links' copies from one call to the next."""
    L, E, bpe = pi[P_L], pi[P_E], pi[P_BPE]
    N = L * E
    aw, aw_cf, aw_up, aw_down = pi[P_AW] != 0, pf[P_AW_CF], pf[P_AW_UP], pf[P_AW_DOWN]
    warmth, busy_until = gf[:, WARMTH].copy(), gf[:, BUSY].copy()
    ex = np.empty(E, np.int64)
    tk = np.empty(E, np.int64)
    counted = np.zeros(E, np.int64)
    rank = np.empty(E, np.int64)
    order = np.empty(E, np.int64)  # compute order: indices into ex (those >= n: a gather's experts)
    tmp = np.empty(E, np.int64)
    cand = np.empty(N, np.int64)
    chosen = np.zeros(N, np.bool_)
    for p in range(kinds.shape[0]):
        step = step0 + p
        step_plan(step, t, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
                  layer_gpu, uses_ptr, uses_pos, cursor, upcoming, cand, chosen)
        if pf[P_HOST_STEP]:
            t = _advance(t, pf[P_HOST_STEP], pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q,
                         bstate, pinned, unused, lres, layer_gpu, uses_ptr, uses_pos, cursor)
        for l in range(L):
            if cnt[FAIL]:
                break
            g = layer_gpu[l]
            if l and g != layer_gpu[l - 1]:
                t = _advance(t, xfer[xi[p], l], pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q,
                             bstate, pinned, unused, lres, layer_gpu, uses_ptr, uses_pos, cursor)
            t = _advance(t, _compute(g, t, ne[p], aw, aw_cf, aw_up, aw_down, warmth, busy_until), pi, pf, gi, gf,
                         cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres, layer_gpu,
                         uses_ptr, uses_pos, cursor)
            n = layer_experts(p, l, kinds, refs, row_start, row_count, rows, experts_tab, counts_tab, ex, tk, counted)
            base = l * E
            # on_layer_start: the policy's clock; the oracle's next needs move on
            if pi[P_KIND] == NEXT_LAYER:
                cnt[NOW] = l
            else:
                cnt[NOW] = step * L + l
                for i in range(n):
                    b = base + ex[i]
                    consumed[b] += 1
                    j = uses_ptr[b] + consumed[b]
                    upcoming[b] = float(uses_pos[j]) if j < uses_ptr[b + 1] else np.inf
            if pf[P_HOST_LAYER]:
                t = _advance(t, pf[P_HOST_LAYER], pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q,
                             bstate, pinned, unused, lres, layer_gpu, uses_ptr, uses_pos, cursor)
            # start_layer: classify and pin, choose the compute order
            any_rank = False
            for i in range(n):
                b = base + ex[i]
                if bstate[b] == RES:
                    hits[l] += 1
                    if unused[b]:
                        pf_hits[l] += 1
                    rank[i] = HIT
                elif bstate[b] == FLY or in_q[b]:
                    late[l] += 1
                    rank[i] = LATE
                    any_rank = True
                else:
                    misses[l] += 1
                    rank[i] = MISS
                    any_rank = True
                _pin(b, g, gi, bstate, pinned)
                order[i] = i
            uses[l] += n
            cap = gi[g, CAP]
            if any_rank:
                if n * bpe > cap:  # resident first, then in flight, then missing (a stable sort)
                    m = 0
                    for r in (HIT, LATE, MISS):
                        for i in range(n):
                            if rank[i] == r:
                                tmp[m] = i
                                m += 1
                    order[:n] = tmp[:n]
                if n * (bpe + 1) > cap:
                    held, completes = 0, True  # _completes: each copy fits beside what later experts hold
                    for j in range(n - 1, -1, -1):
                        if bstate[base + ex[order[j]]] != NONE:
                            held += bpe
                        elif bpe + held > cap:
                            completes = False
                            break
                    if not completes:  # _held_first
                        m = 0
                        for j in range(n):
                            if bstate[base + ex[order[j]]] != NONE:
                                tmp[m] = order[j]
                                m += 1
                        for j in range(n):
                            if bstate[base + ex[order[j]]] == NONE:
                                tmp[m] = order[j]
                                m += 1
                        order[:n] = tmp[:n]
            total = n
            if pi[P_KIND] == NEXT_LAYER and gi[g, GATHER]:  # the layer's other experts, waited for first
                for i in range(n):
                    counted[ex[i]] = 1
                for e in range(E):
                    if counted[e]:
                        counted[e] = 0
                    else:
                        ex[total] = e
                        tk[total] = 0
                        total += 1
                m = total - n
                for j in range(n - 1, -1, -1):
                    order[j + m] = order[j]
                for j in range(m):
                    order[j] = n + j
            position = 0.0
            if any_rank:
                for j in range(total):
                    i = order[j]
                    if i < n:
                        b = base + ex[i]
                        if rank[i] != HIT and bstate[b] != RES:
                            _fetch(g, b, np.inf, position, t, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q,
                                   bstate, pinned, unused, lres, layer_gpu, uses_ptr, uses_pos, cursor)
                        position += 1.0
            else:
                position = float(n)
            for j in range(total - n):  # a gather's: pinned and demanded after the routed experts
                b = base + ex[order[j]]
                _pin(b, g, gi, bstate, pinned)
                if bstate[b] != RES:
                    _fetch(g, b, np.inf, position, t, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q,
                           bstate, pinned, unused, lres, layer_gpu, uses_ptr, uses_pos, cursor)
                position += 1.0
            # the plan
            if pi[P_KIND] == NEXT_LAYER:
                nl = (l + 1) % L
                for e in range(E):
                    b = nl * E + e
                    if bstate[b] != RES:
                        _fetch(layer_gpu[nl], b, 1.0, 0.0, t, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q,
                               bstate, pinned, unused, lres, layer_gpu, uses_ptr, uses_pos, cursor)
            else:
                _oracle_plan(step, t, pi, pf, gi, gf, cnt, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused,
                             lres, layer_gpu, uses_ptr, uses_pos, cursor, upcoming, cand, chosen)
            if cnt[FAIL]:
                break
            # compute: each expert once resident; what ran is unpinned before waiting
            busy = 0.0
            waited = 0.0
            first_open = 0  # order[first_open:j] computed since the last unpin
            for j in range(total):
                i = order[j]
                b = base + ex[i]
                if bstate[b] != RES:
                    if busy:
                        t = _advance(t, _compute(g, t, busy, aw, aw_cf, aw_up, aw_down, warmth, busy_until), pi, pf,
                                     gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused,
                                     lres, layer_gpu, uses_ptr, uses_pos, cursor)
                        busy = 0.0
                        for q in range(first_open, j):
                            _unpin(base + ex[order[q]], g, gi, bstate, pinned)
                        first_open = j
                    if bstate[b] != RES:
                        began = t
                        t = _wait(b, pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned,
                                  unused, lres, layer_gpu, uses_ptr, uses_pos, cursor)
                        waited += t - began
                    if cnt[FAIL]:
                        break
                if i < n:
                    unused[b] = False  # mark_used
                    busy += extime[tk[i]]
                else:
                    busy += 0.0
            if cnt[FAIL]:
                break
            if busy:
                t = _advance(t, _compute(g, t, busy, aw, aw_cf, aw_up, aw_down, warmth, busy_until), pi, pf, gi, gf,
                             cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
                             layer_gpu, uses_ptr, uses_pos, cursor)
            for q in range(first_open, total):
                _unpin(base + ex[order[q]], g, gi, bstate, pinned)
            stall[l] += waited
        if cnt[FAIL]:
            return ABORT
        ends[p] = t
    gf[:, WARMTH], gf[:, BUSY] = warmth, busy_until
    return t


@njit(cache=True, inline="always")
def _advance(t, seconds, pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused,
             lres, layer_gpu, uses_ptr, uses_pos, cursor):
    """Let `seconds` of compute pass: the landings due meanwhile are handled first (links_until)."""
    until = t + seconds
    g, when = _next_landing(gi, gf)
    if g >= 0 and when <= until:
        links_until(until, t, pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned,
                    unused, lres, layer_gpu, uses_ptr, uses_pos, cursor)
    return until


@njit(cache=True, inline="always")
def _wait(b, pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
          layer_gpu, uses_ptr, uses_pos, cursor):
    """Wait until block b has landed; returns then. Other GPUs' landings due at that instant come
    first (they were scheduled before the waiter's wake-up)."""
    when = -np.inf
    while cnt[FAIL] == 0:
        g, due = _next_landing(gi, gf)
        if bstate[b] == RES and (g < 0 or due > when):
            break
        if g < 0:  # nothing on the way: a demand waits for room
            cnt[FAIL] = NO_ROOM
            break
        _land(g, pi, pf, gi, gf, cnt, fb, lbytes, qb, q_prio, q_rank, q_seq, in_q, bstate, pinned, unused, lres,
              layer_gpu, uses_ptr, uses_pos, cursor)
        when = due
    return when


class Stream:
    """The kernel's state for a run of a prefetching kind, taken from the warmed caches and the bound
    policy (sim.fast.engine.FastSimulation.prepare), carried from one call to the next."""

    def __init__(self, kind: int, sim):
        model, topo, hw, policy = sim.model, sim.topology, sim.hardware, sim.policy
        L, E, bpe = model.num_layers, model.num_experts, model.bytes_per_expert
        N, G = L * E, topo.num_gpus
        self.layer_gpu = np.asarray(topo.layer_gpu, np.int64)
        self.bstate = np.zeros(N, np.int8)
        self.lres = np.zeros(L, np.int64)
        gi = self.gi = np.zeros((G, 10), np.int64)
        for g, cache in enumerate(sim.caches):
            for layer, e, _ in cache.resident_blocks():
                self.bstate[layer * E + e] = RES
                self.lres[layer] += 1
            gi[g, CAP], gi[g, USED], gi[g, HIGH], gi[g, EVICT] = (cache.capacity_bytes, cache.used_bytes,
                                                                  cache.high_water_bytes, cache.evictions)
            gi[g, NRES] = sum(1 for _ in cache.resident_blocks())
            gi[g, WASTE] = cache.wasted_prefetch_bytes
            gi[g, GATHER] = E * bpe <= cache.capacity_bytes
        gi[:, CUR] = -1
        self.gf = np.zeros((G, 5))
        self.cnt = np.zeros(6, np.int64)
        self.cnt[NOW] = policy._now
        self.fb = np.zeros(2)
        self.qb = np.zeros((G, N), np.int64)
        self.q_prio, self.q_rank = np.zeros(N), np.zeros(N)
        self.q_seq = np.zeros(N, np.int64)
        self.in_q = np.zeros(N, np.bool_)
        self.pinned = np.zeros(N, np.int64)
        self.unused = np.zeros(N, np.bool_)
        future = sim.future
        self.uses_ptr = future.uses_ptr if future is not None else np.zeros(N + 1, np.int64)
        self.uses_pos = future.block_uses if future is not None else np.zeros(0, np.int64)
        self.cursor = self.uses_ptr[:-1].copy()
        if kind == ORACLE:
            self.upcoming = policy._upcoming.astype(np.float64).copy()
            self.consumed = policy._consumed.astype(np.int64).copy()
            slots, horizon, nsteps = policy.slots, policy.horizon_steps, future.num_steps
        else:
            self.upcoming, self.consumed = np.zeros(N), np.zeros(N, np.int64)
            slots = horizon = nsteps = 0
        link, aw = hw.host_link, hw.after_wait
        fabric = hw.host_aggregate_Bps is not None and hw.host_aggregate_Bps < G * link.bandwidth_Bps
        self.pi = np.array([L, E, bpe, kind, fabric, slots, model.top_k, horizon, nsteps, aw is not None], np.int64)
        host = sim.policy_host
        self.pf = np.array([link.copy_time(bpe), link.latency_s,
                            min(link.bandwidth_Bps, hw.host_aggregate_Bps) if fabric else 1.0, float(host.step_s),
                            float(host.layer_s), aw.cold_factor if aw else 1.0, aw.warm_up_s if aw else 1.0,
                            aw.cool_down_s if aw else 1.0])
        self.hits, self.misses, self.late, self.pf_hits, self.uses = (np.zeros(L, np.int64) for _ in range(5))
        self.stall, self.lbytes = np.zeros(L), np.zeros(L)

    def _links(self):
        return (self.pi, self.pf, self.gi, self.gf, self.cnt, self.fb, self.lbytes, self.qb, self.q_prio, self.q_rank,
                self.q_seq, self.in_q, self.bstate, self.pinned, self.unused, self.lres, self.layer_gpu,
                self.uses_ptr, self.uses_pos, self.cursor)

    def run(self, kinds, refs, row_start, row_count, rows, ne, xfer, xi, extime, tables, step0, t, ends) -> float:
        return run_stream(kinds, refs, row_start, row_count, rows, ne, xfer, xi, extime, tables.experts, tables.counts,
                          step0, t, ends, self.pi, self.pf, self.gi, self.gf, self.cnt, self.fb, self.qb, self.q_prio,
                          self.q_rank, self.q_seq, self.in_q, self.bstate, self.pinned, self.unused, self.lres,
                          self.layer_gpu, self.uses_ptr, self.uses_pos, self.cursor, self.upcoming, self.consumed,
                          self.hits, self.misses, self.late, self.pf_hits, self.uses, self.stall, self.lbytes)

    def until(self, when: float) -> float:
        """Handle the landings due by `when` (the server idle until then: SimPy wakes it after them);
        the time of the last one (-inf if none)."""
        return links_until(when, -np.inf, *self._links())

    @property
    def failed(self) -> str:
        """Why the last call aborted ('' if it did not)."""
        return WHY.get(int(self.cnt[FAIL]), "")

    def record(self, rec) -> None:
        rec.uses, rec.hits, rec.misses = self.uses.tolist(), self.hits.tolist(), self.misses.tolist()
        rec.late, rec.prefetch_hits = self.late.tolist(), self.pf_hits.tolist()
        rec.stall_s, rec.layer_bytes = self.stall.tolist(), self.lbytes.tolist()
        rec.demand_bytes, rec.prefetch_bytes = float(self.fb[DEMAND_B]), float(self.fb[PREFETCH_B])
        rec.prefetches_requested, rec.prefetches_dropped, rec.prefetches_cancelled = (int(self.cnt[REQ]),
                                                                                      int(self.cnt[DROP]),
                                                                                      int(self.cnt[CANC]))
