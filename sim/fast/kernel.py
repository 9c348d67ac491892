"""The compiled inner loop of the fast engine: the forward passes of demand-only caching, layer by layer.

Replays exactly what sim.engine and sim.link do for a policy that copies only on demand (no
prefetch, whole experts, one GPU per layer): at each layer the router's experts are touched (LRU),
classified, pinned; missing ones are copied one after another from the moment the layer's router
has run (admission, and so eviction, when each copy starts, after the previous one landed); the
compute runs them in order, each once resident, unpinning what it has computed before it waits.
Victims are chosen as policies.lru with policies.quota's per-layer shares does, on intrusive
linked lists (O(1) recency). Floating-point sums are taken in the SimPy engine's order, so times
are bit-identical.

Where the reference's outcome would hinge on a same-instant ordering of SimPy events, or on a
state this loop does not model (a demand with no evictable room, which the link resolves by
waiting or releasing), the pass returns ABORT and the caller runs the SimPy engine instead.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

ABORT = -1.0
NO_PIN = -1.0  # pin_until of a block the running layer does not pin


@njit(cache=True, inline="always")
def _unlink(prev, nxt, b):
    p, n = prev[b], nxt[b]
    nxt[p] = n
    prev[n] = p


@njit(cache=True, inline="always")
def _append(prev, nxt, sentinel, b):
    tail = prev[sentinel]
    nxt[tail] = b
    prev[b] = tail
    nxt[b] = sentinel
    prev[sentinel] = b


@njit(cache=True)
def _quota_add(layer, delta, qcount, qcap, over, nover):
    qcount[layer] += delta
    now_over = qcount[layer] > qcap[layer]
    if now_over and not over[layer]:
        over[layer] = True
        nover[0] += 1
    elif not now_over and over[layer]:
        over[layer] = False
        nover[0] -= 1


@njit(cache=True)
def _evictable(b, s, resident, pin_until, flag):
    """Resident and not pinned at time s; flag[0] set when the answer hinges on a same-time tie."""
    if not resident[b]:
        return False
    until = pin_until[b]
    if until == s:
        flag[0] = True
    return until < s


@njit(cache=True)
def _first(sentinel, nxt, s, E, g, layer_gpu, resident, pin_until, victims, nv, over_only, over, flag):
    b = nxt[sentinel]
    while b != sentinel:
        if layer_gpu[b // E] == g and (not over_only or over[b // E]) and \
                _evictable(b, s, resident, pin_until, flag):
            taken = False
            for v in range(nv):
                if victims[v] == b:
                    taken = True
            if not taken:
                return b
        b = nxt[b]
    return -1


@njit(cache=True)
def _next_use(b, now, uses_ptr, uses_pos, cursor):
    """policies.belady's next use after `now` (a cursor per block: the clock only moves forward)."""
    i, end = cursor[b], uses_ptr[b + 1]
    while i < end and uses_pos[i] <= now:
        i += 1
    cursor[b] = i
    return float(uses_pos[i]) if i < end else np.inf


@njit(cache=True)
def _furthest(sentinel, nxt, s, now, E, g, layer_gpu, resident, pin_until, victims, nv, over_only, over, flag,
              uses_ptr, uses_pos, cursor):
    """Belady's first victim among the resident blocks of a list: the evictable one used furthest
    ahead, ties to the lowest block (policies.belady._ranked)."""
    best, best_use = -1, -1.0
    b = sentinel
    while True:
        b = nxt[b]
        if b == sentinel:
            break
        if layer_gpu[b // E] != g or (over_only and not over[b // E]) or \
                not _evictable(b, s, resident, pin_until, flag):
            continue
        taken = False
        for v in range(nv):
            if victims[v] == b:
                taken = True
        if taken:
            continue
        use = _next_use(b, now, uses_ptr, uses_pos, cursor)
        if use > best_use or (use == best_use and b < best):
            best, best_use = b, use
    return best


@njit(cache=True)
def _compute(g, now, seconds, aw, aw_cf, aw_up, aw_down, warmth, busy_until):
    """sim.compute.ComputeModel.run for layer placement (nothing slides, so no hold): the wall time of
    `seconds` of warm work started on GPU g at `now`, after_wait's warm-up applied (aw), in its order."""
    if not aw:
        wall = seconds
    else:
        waited = max(0.0, now - busy_until[g])
        w = warmth[g] * math.e ** (-waited / aw_down)
        wall = seconds * (1.0 + (aw_cf - 1.0) * (1.0 - w))
        warmth[g] = 1.0 - (1.0 - w) * math.e ** (-wall / aw_up)
    busy_until[g] = now + wall
    return (now - now) + wall


@njit(cache=True)
def layer_experts(p, l, kinds, refs, row_start, row_count, rows, experts_tab, counts_tab, ex, tk, counted):
    """Pass p's experts at layer l, in the order sim.schedule gives them, into ex[:n] (tokens each in
    tk[:n]); returns n. counted: E zeros, left zero."""
    E = counts_tab.shape[2]
    k = experts_tab.shape[2]
    n = 0
    if kinds[p] == 0:
        for e in range(E):
            c = counts_tab[refs[p], l, e]
            if c:
                ex[n] = e
                tk[n] = c
                n += 1
    elif row_count[p] == 1:
        row = rows[row_start[p]]
        for j in range(k):
            ex[n] = experts_tab[row, l, j]
            tk[n] = 1
            n += 1
    else:
        for j in range(row_count[p]):
            row = rows[row_start[p] + j]
            for i in range(k):
                counted[experts_tab[row, l, i]] += 1
        for e in range(E):
            if counted[e]:
                ex[n] = e
                tk[n] = counted[e]
                counted[e] = 0
                n += 1
    return n


@njit(cache=True)
def run_passes(kinds, refs, row_start, row_count, rows, ne, xfer, xi, host_step, host_layer, extime,
               experts_tab, counts_tab, layer_gpu, E, bpe, copy_s, fabric, latency_s, fabric_Bps, lru, use_quota,
               resident, pin_until, cap, used, nres, high, evictions, gprev, gnext, lprev, lnext,
               qcount, qcap, over, nover, hits, misses, uses, stall, lbytes, dbytes, t, ends,
               belady, step0, uses_ptr, uses_pos, cursor, aw, aw_cf, aw_up, aw_down, warmth, busy_until):
    """Run passes p = 0..len(kinds)-1 from time t; ends[p] gets each pass's end. Returns the end of
    the last, or ABORT. kinds[p]: 0 prefill of request refs[p] (counts_tab), 1 decode of rows
    rows[row_start[p]: +row_count[p]] (experts_tab). ne[p]: its non-expert time per layer;
    xfer[xi[p], layer]: the hidden state's move into each layer. State arrays are updated in place. belady: victims by
    furthest next use (uses_pos[uses_ptr[b]:uses_ptr[b+1]]: block b's use positions, step*L + layer,
    pass p being step step0 + p) instead of least recent use. aw: compute warms up after waits
    (sim.profiles.AfterWaitSpec: cold_factor aw_cf, warm_up_s aw_up, cool_down_s aw_down; per-GPU
    warmth and busy_until carried across calls)."""
    L = layer_gpu.shape[0]
    N = L * E
    ex = np.empty(E, np.int64)
    tk = np.empty(E, np.int64)
    order = np.empty(E, np.int64)
    miss = np.zeros(E, np.bool_)
    done = np.empty(E, np.float64)
    start = np.empty(E, np.float64)
    counted = np.zeros(E, np.int64)
    victims = np.empty(E + 4, np.int64)
    flag = np.zeros(1, np.bool_)
    nbytes = float(bpe)
    for p in range(kinds.shape[0]):
        if host_step:
            t = t + host_step
        for l in range(L):
            g = layer_gpu[l]
            if l and g != layer_gpu[l - 1]:
                t = t + xfer[xi[p], l]
            t = t + _compute(g, t, ne[p], aw, aw_cf, aw_up, aw_down, warmth, busy_until)
            n = layer_experts(p, l, kinds, refs, row_start, row_count, rows, experts_tab, counts_tab, ex, tk, counted)
            base = l * E
            if lru:  # on_layer_start: the cached ones become the most recent
                for i in range(n):
                    b = base + ex[i]
                    if resident[b]:
                        _unlink(gprev, gnext, b)
                        _append(gprev, gnext, N, b)
                        _unlink(lprev, lnext, b)
                        _append(lprev, lnext, N + l, b)
            if host_layer:
                t = t + host_layer
            any_miss = False
            for i in range(n):
                order[i] = i
                if resident[base + ex[i]]:
                    hits[l] += 1
                    miss[i] = False
                else:
                    misses[l] += 1
                    miss[i] = True
                    any_miss = True
            uses[l] += n
            if any_miss:
                resident_first = n * bpe > cap[g]  # as start_layer sorts by rank (stable)
                if not resident_first and n * (bpe + 1) > cap[g]:
                    # start_layer's _completes: each copy must fit beside what later experts hold;
                    # else _held_first, which for whole experts is resident first too
                    held = 0
                    for j in range(n - 1, -1, -1):
                        if not miss[j]:
                            held += bpe
                        elif bpe + held > cap[g]:
                            resident_first = True
                            break
                if resident_first:
                    m = 0
                    for i in range(n):
                        if not miss[i]:
                            order[m] = i
                            m += 1
                    for i in range(n):
                        if miss[i]:
                            order[m] = i
                            m += 1
                s = t  # the link copies the misses one after another, in compute order
                for j in range(n):
                    i = order[j]
                    if miss[i]:
                        start[i] = s
                        if fabric:
                            s = (s + latency_s) + nbytes / fabric_Bps
                        else:
                            s = s + copy_s
                        done[i] = s
            # compute: each expert once resident; what ran is unpinned before waiting
            c = t
            busy = 0.0
            waited = 0.0
            first_open = 0  # order[first_open:j] computed since the last unpin
            for j in range(n):
                i = order[j]
                pin_until[base + ex[i]] = np.inf
            for j in range(n):
                i = order[j]
                if miss[i]:
                    d = done[i]
                    if d == c:
                        return ABORT
                    if d > c:
                        if busy:
                            c = c + _compute(g, c, busy, aw, aw_cf, aw_up, aw_down, warmth, busy_until)
                            busy = 0.0
                            for q in range(first_open, j):
                                pin_until[base + ex[order[q]]] = c
                            first_open = j
                        if d == c:
                            return ABORT
                        if d > c:
                            waited += d - c
                            c = d
                busy += extime[tk[i]]
            if busy:
                c = c + _compute(g, c, busy, aw, aw_cf, aw_up, aw_down, warmth, busy_until)
            stall[l] += waited
            if any_miss:  # admissions, each when its copy starts (after the previous one landed)
                for j in range(n):
                    i = order[j]
                    if not miss[i]:
                        continue
                    s = start[i]
                    b_in = base + ex[i]
                    free = cap[g] - used[g]
                    pinned = 0
                    for q in range(n):
                        bq = base + ex[order[q]]
                        if resident[bq]:
                            if pin_until[bq] == s:
                                return ABORT
                            if pin_until[bq] > s:
                                pinned += 1
                    if free + (nres[g] - pinned) * bpe < bpe:
                        return ABORT  # the demand would wait for room: the link's _make_room
                    nv = 0
                    flag[0] = False
                    now = (step0 + p) * L + l
                    if use_quota and qcount[l] >= qcap[l]:
                        if belady:
                            own = _furthest(N + l, lnext, s, now, E, g, layer_gpu, resident, pin_until, victims, nv,
                                            False, over, flag, uses_ptr, uses_pos, cursor)
                        else:
                            own = _first(N + l, lnext, s, E, g, layer_gpu, resident, pin_until, victims, nv, False,
                                         over, flag)
                        if own >= 0:
                            victims[nv] = own
                            nv += 1
                            free += bpe
                            _quota_add(own // E, -1, qcount, qcap, over, nover)
                    while free < bpe:
                        b = -1
                        for over_only in (True, False):
                            if b >= 0 or (over_only and not (use_quota and nover[0] > 0)):
                                continue
                            if belady:
                                b = _furthest(N, gnext, s, now, E, g, layer_gpu, resident, pin_until, victims, nv,
                                              over_only, over, flag, uses_ptr, uses_pos, cursor)
                            else:
                                b = _first(N, gnext, s, E, g, layer_gpu, resident, pin_until, victims, nv, over_only,
                                           over, flag)
                        if b < 0:
                            break
                        victims[nv] = b
                        nv += 1
                        free += bpe
                        if use_quota:
                            _quota_add(b // E, -1, qcount, qcap, over, nover)
                    if flag[0] or free < bpe:
                        return ABORT
                    if use_quota:
                        _quota_add(l, 1, qcount, qcap, over, nover)
                    for v in range(nv):
                        b = victims[v]
                        resident[b] = False
                        _unlink(gprev, gnext, b)
                        _unlink(lprev, lnext, b)
                        used[g] -= bpe
                        nres[g] -= 1
                        evictions[g] += 1
                    used[g] += bpe
                    if used[g] > high[g]:
                        high[g] = used[g]
                    # landed: resident, the most recent
                    resident[b_in] = True
                    nres[g] += 1
                    _append(gprev, gnext, N, b_in)
                    _append(lprev, lnext, N + l, b_in)
                    lbytes[l] += nbytes
                    dbytes[0] += nbytes
            for j in range(n):
                pin_until[base + ex[order[j]]] = NO_PIN
            t = c
        ends[p] = t
    return t
