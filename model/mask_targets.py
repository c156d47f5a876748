"""Mask targets: each RoI's ground-truth polygons rasterized straight into its RxR frame, as pycocotools does.

The reference (maskrcnn-benchmark `project_masks_on_boxes`) takes each positive RoI on the host:
it crops its instance's polygons to the RoI's box (a shift by x1, y1, no clipping), scales them
to R x R (`Polygons.resize`, in float32), rasterizes every part with pycocotools (`frPyObjects`,
i.e. `rleFrPoly` of cocoapi's maskApi.c) and takes the union of the parts (`merge`). Here every
RoI of the batch is done at once on the training device, with fixed shapes and no host
synchronization, and the result is pycocotools' bit for bit (tests/reference/).

What `rleFrPoly` computes, and how it is computed here without its loops. It scales the frame by
5 and rounds each vertex to integers, x5 = (int)(5x + 0.5) (double precision, (int) truncating
toward zero); walks each edge pixel by pixel in that 5x grid along its longer axis (the edge
oriented so that axis increases); and wherever the walk's column u changes between 5n+2 and
5n+3 for an output column n in [0, R), it records a toggle in column n at row
ceil((v_min - 2) / 5) clamped to [0, R], v_min being the smaller of the two points' v. The mask
is the parity of the toggles at or above each pixel of its column (toggles at row R change
nothing). So each edge toggles each column at most once, and where is a formula:
- along x (|dx| >= |dy|): the walk visits u = 5n+2 and 5n+3 iff xs <= 5n+2 and 5n+3 <= xe, at
  t = u - xs, where v = (int)(ys + s t + 0.5) with s = (ye - ys) / dx;
- along y: u(t) = (int)(xs + s t + 0.5) with s = (xe - xs) / dy is monotone in t and crosses
  5n+3 at most once, at the first t where (xs + s t + 0.5 >= 5n+3) flips; a closed-form estimate
  of that t, checked with the same double-precision formula at its neighbours, gives it, and the
  pair's smaller v is ys + t - 1.
Both are evaluated for every (RoI, edge, column) in float64, operation by operation as the C
code does (so the roundings are the same), after the float32 crop and scale of the reference.

The union of an instance's parts needs each part's own parity: parts that overlap must not
cancel. A column's parity over its R rows is an R-bit word (bit y set: odd toggles at or above
row y), and a toggle at row r is the word with bits r..R-1 set; a part's column mask is the XOR
of its edges' words. The edges of a part are consecutive in `verts`, so one prefix XOR along
the edges (log2(V) doubling steps) gives every part's word as the XOR of two prefix values, and
the RoI's target is the OR of its instance's parts' words. Cost: O(RoIs x V x R) elementwise
work and O(RoIs x V x R) memory per chunk of RoIs (float64 while computing the toggles, then
integer words), independent of how many parts an instance has; per-part parity grids would
instead need RoIs x parts x R x R cells, and parts per instance are unbounded.
"""

from __future__ import annotations

import torch
from torch import Tensor

UPSAMPLE = 5  # rleFrPoly's `scale`: vertices are rounded on a grid 5 times finer than the pixels
# (RoI, edge, column) triples per step. On a CPU small steps stay in the caches; on a GPU each step
# is a few dozen kernel launches over float64 temporaries of 8 bytes per triple (64 MB each).
CHUNK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 23}


def polygon_edges(verts: Tensor, polys: Tensor, num_polys: Tensor) -> Tensor:
    """Per image, where each vertex's edge ends: next_vertex [B, V].

    The edge from vertex k goes to k + 1, or back to its polygon's first vertex from its last.
    Padding vertices (in no polygon) get some index in range; no window reads them.
    """
    num_verts = verts.shape[1]
    k = torch.arange(num_verts, device=verts.device)[None, :, None]
    first, end = (polys[..., i][:, None, :].long() for i in (1, 2))
    real = torch.arange(polys.shape[1], device=verts.device)[None, None, :] < num_polys[:, None, None]
    polygon = ((k >= first) & (k < end) & real).to(torch.uint8).argmax(dim=2)
    first_of_k = first.squeeze(1).gather(1, polygon)
    end_of_k = end.squeeze(1).gather(1, polygon)
    k = k.squeeze(2)
    return torch.where(k + 1 < end_of_k, k + 1, first_of_k).clamp(0, max(num_verts - 1, 0))


def polygon_mask_targets(
    boxes: Tensor,
    instance: Tensor,
    verts: Tensor,
    polys: Tensor,
    num_polys: Tensor,
    resolution: int,
    sync_free: bool = False,
) -> Tensor:
    """Binary masks [B, M, R, R] (float) of instance `instance` [B, M] cropped to `boxes` [B, M, 4].

    `boxes` are the reference's: inclusive pixel boxes (a continuous box's x2 - 1, y2 - 1), as
    the reference crops its proposals. Frame: x -> (x - x1) * R / max(x2 - x1, 1), likewise y;
    target pixel (i, j) is row i, column j of pycocotools' R x R mask of the instance's polygons.
    `verts` [B, V, 2], `polys` [B, P, 3], `num_polys` [B]: the batch's polygons (pipeline/batch.py).

    Each RoI reads the edges of its own instance, which are consecutive in `verts`: a window
    that starts at the instance's first vertex. With `sync_free` the window is every vertex of
    the image (no shape may depend on the data); otherwise it is the batch's longest instance,
    read on the host (a CUDA synchronization).
    """
    batch, num_rois = instance.shape
    num_verts = verts.shape[1]
    next_vertex = polygon_edges(verts, polys, num_polys)
    real = torch.arange(polys.shape[1], device=polys.device)[None, :] < num_polys[:, None]
    first, end = polys[..., 1].long(), polys[..., 2].long()
    mine = real[:, None, :] & (polys[..., 0][:, None, :].long() == instance[:, :, None].long())  # [B, M, P]
    start = torch.where(mine, first[:, None, :], torch.full_like(mine, num_verts, dtype=torch.int64)).amin(dim=2)
    stop = torch.where(mine, end[:, None, :], torch.zeros_like(mine, dtype=torch.int64)).amax(dim=2)
    if sync_free:
        window = num_verts
    else:  # the longest instance of the batch (an instance without a polygon has stop < start)
        window = int((stop - start).max().clamp(min=1)) if num_rois else 1
    chunk = CHUNK_ELEMENTS["cuda" if boxes.is_cuda else "cpu"]
    per_chunk = max(1, chunk // max(1, batch * window * resolution))
    words = []
    for lo in range(0, num_rois, per_chunk):
        rois = slice(lo, lo + per_chunk)
        window_verts, window_next = _window(verts, next_vertex, start[:, rois], stop[:, rois], window)
        toggles = _column_toggles(boxes[:, rois].float(), window_verts.float(), window_next, resolution)
        # Each part of the instance, as edges of the window: its last one and the one before its first.
        last = end[:, None, :] - 1 - start[:, rois, None]
        before = first[:, None, :] - 1 - start[:, rois, None]
        words.append(_instance_words(toggles, mine[:, rois], last, before))
    words = torch.cat(words, dim=1) if words else boxes.new_zeros((batch, 0, resolution), dtype=torch.int32)
    rows = torch.arange(resolution, device=boxes.device)
    # Bit y of column n's word is pixel (y, n).
    return ((words[:, :, None, :] >> rows[None, None, :, None]) & 1).to(torch.float32)


def _window(verts: Tensor, next_vertex: Tensor, start: Tensor, stop: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The `length` vertices from `start` [B, M] on, [B, M, L, 2], and their edges' ends within the window [B, M, L].

    Slots at or past `stop` (the instance's end) become point edges, which toggle nothing.
    """
    batch, num_rois = start.shape
    offset = torch.arange(length, device=verts.device)
    index = start[..., None] + offset  # [B, M, L]
    inside = index < stop[..., None]
    index = index.clamp(max=verts.shape[1] - 1).flatten(1)
    window_verts = verts.gather(1, index[..., None].expand(-1, -1, 2)).view(batch, num_rois, length, 2)
    window_next = next_vertex.gather(1, index).view(batch, num_rois, length) - start[..., None]
    return window_verts, torch.where(inside, window_next, offset)


def _frame_grid(boxes: Tensor, verts: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """Vertices [B, M, L, 2] on rleFrPoly's integer grid of their RoI's frame: x5, y5 [B, M, L] (float64 integers).

    The crop and scale are the reference's float32 operations (`Polygons.crop`, then `resize`,
    whose Python-float ratio torch applies as float32); the rounding is rleFrPoly's, in double.
    """
    x1, y1 = boxes[..., 0:1], boxes[..., 1:2]  # [B, M, 1]
    width = (boxes[..., 2:3] - x1).clamp(min=1)
    height = (boxes[..., 3:4] - y1).clamp(min=1)
    ratio_x = (resolution / width.double()).float()
    ratio_y = (resolution / height.double()).float()
    x = (verts[..., 0] - x1) * ratio_x
    y = (verts[..., 1] - y1) * ratio_y
    return torch.trunc(UPSAMPLE * x.double() + 0.5), torch.trunc(UPSAMPLE * y.double() + 0.5)


def _column_toggles(boxes: Tensor, verts: Tensor, next_vertex: Tensor, resolution: int) -> Tensor:
    """Row [B, M, L, R] where the edge from each vertex toggles each output column; `resolution` for none.

    boxes [B, M, 4]; verts [B, M, L, 2] and next_vertex [B, M, L]: each RoI's window of edges.
    """
    x5, y5 = _frame_grid(boxes, verts, resolution)
    xs, ys, xe, ye = x5, y5, x5.gather(2, next_vertex), y5.gather(2, next_vertex)
    dx, dy = (xe - xs).abs(), (ye - ys).abs()
    along_x = dx >= dy
    # rleFrPoly orients each edge so that its longer axis increases (the walk's order does not matter here).
    flip = torch.where(along_x, xs > xe, ys > ye)
    xs, xe = torch.where(flip, xe, xs), torch.where(flip, xs, xe)
    ys, ye = torch.where(flip, ye, ys), torch.where(flip, ys, ye)
    # The walk's slope along its longer axis, divided as rleFrPoly divides (a point edge toggles nothing).
    run = torch.where(along_x, dx, dy)
    s = torch.where(along_x, ye - ys, xe - xs) / torch.where(run > 0, run, torch.ones_like(run))
    # Per edge, once: the walk's line value(t) = base + s t + 0.5 (v along x, u along y).
    base = torch.where(along_x, ys, xs)
    first_step_x = 2 - xs  # along x, column n's toggle pair is at t = 5n + 2 - xs and the step after it
    crossing = torch.where(along_x | (s == 0), torch.zeros_like(s), 1 / torch.where(s != 0, s, torch.ones_like(s)))
    start_u, end_u = xs + 0.5, xs + s * dy + 0.5  # the walk's u (before truncation) at its two ends
    edge = (xs, ys, xe, dx, along_x, s, base, first_step_x, crossing, start_u, end_u)
    xs, ys, xe, dx, along_x, s, base, first_step_x, crossing, start_u, end_u = (a[..., None] for a in edge)

    five_n = UPSAMPLE * torch.arange(resolution, device=boxes.device, dtype=torch.float64)
    threshold = five_n + 3  # along y, column n toggles where u(t) crosses 5n+3
    # Along y the first step past the crossing is found from an estimate that is it or one below it:
    # t = ceil((5n + 2.5 - xs) / s) is exact up to rounding, and the two steps from its predecessor
    # are checked with the walk's own double-precision formula below.
    step = torch.where(along_x, five_n + first_step_x, (torch.ceil((five_n + 2.5 - xs) * crossing) - 1).clamp(min=1))
    value_0 = torch.trunc(base + s * step + 0.5)
    value_1 = torch.trunc(base + s * (step + 1) + 0.5)
    toggles_x = (step >= 0) & (step + 1 <= dx)  # xs <= 5n+2 and 5n+3 <= xe
    start_beyond = start_u >= threshold
    toggles_y = start_beyond != (end_u >= threshold)
    not_yet_0 = (value_0 >= threshold) == start_beyond
    not_yet_1 = (value_1 >= threshold) == start_beyond
    v_min_y = ys + step - 1 + not_yet_0.to(s.dtype) + (not_yet_0 & not_yet_1).to(s.dtype)
    v_min = torch.where(along_x, torch.minimum(value_0, value_1), v_min_y)
    row = torch.ceil((v_min - 2) / UPSAMPLE).clamp(0, resolution)
    toggles = torch.where(along_x, toggles_x, toggles_y)
    return torch.where(toggles, row, torch.full_like(row, resolution)).to(torch.int32)


def _instance_words(toggles: Tensor, parts: Tensor, last: Tensor, before: Tensor) -> Tensor:
    """Column words [B, M, R]: per RoI the OR over its parts of the XOR of their edges' words.

    toggles [B, M, L, R] (rows, R for none); parts [B, M, P] marks the polys rows of the RoI's
    instance; last, before [B, M, P]: each row's last edge in the window and the edge before
    its first (-1: none).
    """
    resolution = toggles.shape[-1]
    word_dtype = torch.int32 if resolution < 31 else torch.int64
    full = (1 << resolution) - 1
    ones = torch.ones((), dtype=word_dtype, device=toggles.device)
    edge_words = full ^ ((ones << toggles.to(word_dtype)) - 1)  # bits row..R-1; row R: no bit
    prefix = _prefix_xor(edge_words, dim=2)  # [B, M, L, R]
    length = prefix.shape[2]

    def at(edge: Tensor) -> Tensor:  # prefix[b, m, edge[b, m, p], :] -> [B, M, P, R]
        return prefix.gather(2, edge.clamp(0, length - 1)[..., None].expand(-1, -1, -1, resolution))

    at_last = at(last)
    at_before = torch.where((before >= 0)[..., None], at(before), torch.zeros_like(at_last))
    part_words = torch.where(parts[..., None], at_last ^ at_before, torch.zeros_like(at_last))
    return _reduce_or(part_words, dim=2)


def _prefix_xor(x: Tensor, dim: int) -> Tensor:
    """Inclusive prefix XOR along `dim` by doubling (Hillis-Steele): log2(n) elementwise steps."""
    n = x.shape[dim]
    shift = 1
    while shift < n:
        shifted = torch.cat([torch.zeros_like(x.narrow(dim, 0, shift)), x.narrow(dim, 0, n - shift)], dim=dim)
        x = x ^ shifted
        shift *= 2
    return x


def _reduce_or(x: Tensor, dim: int) -> Tensor:
    """Bitwise OR over `dim` by halving: log2(n) elementwise steps."""
    if x.shape[dim] == 0:
        return x.sum(dim)
    while x.shape[dim] > 1:
        n = x.shape[dim]
        half = (n + 1) // 2
        low, high = x.narrow(dim, 0, half), x.narrow(dim, half, n - half)
        if n - half < half:
            high = torch.cat([high, torch.zeros_like(low.narrow(dim, 0, half - (n - half)))], dim=dim)
        x = low | high
    return x.squeeze(dim)
