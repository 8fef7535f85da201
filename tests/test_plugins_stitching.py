"""Stitching and refinement: vectorised batches equal the per-frame path, positions from
attributes or the plan (by uniqueId, or by order with gaps), offsets registered, the map
refined against the frames with a known probe, bad input refused per frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from ptychostream.batch import FrameBatch
from ptychostream.geometry import frame_corner_px, place_on_grid, snap
from ptychostream.plugins.stitching import StitchingPlugin
from ptychostream.refine import ProbeError, Refiner, check_probe, load_probe
from ptychostream.simulation import make_probe, simulate_scan, spiral_positions
from ptychostream.stitch import Stitcher, frame_weights, stitch

PIXEL = 12.9e-9


@pytest.fixture
def scan():
    rng = np.random.default_rng(5)
    pos = spiral_positions(12, 150e-9) + rng.normal(0, 3e-9, (12, 2))
    phases = rng.uniform(-1, 1, (12, 128, 128)).astype(np.float32)
    return pos, phases


def reference_stitch(phases, positions, pixel, weights):
    """The per-frame path, written independently with scipy: each image and its weights shifted
    by the sub-pixel part of its position (bilinear), then accumulated."""
    n = phases.shape[-1]
    half = (n - 1) / 2 * pixel
    origin = (snap(positions[:, 0].min() - half, pixel) - pixel * 2,
              snap(positions[:, 1].min() - half, pixel) - pixel * 2)
    size = int(np.ceil(np.ptp(positions) / pixel)) + n + 8
    acc, wsum = np.zeros((size, size)), np.zeros((size, size))
    for img, p in zip(phases, positions, strict=True):
        r, c = frame_corner_px(p, origin, pixel, n)
        ri, ci = int(np.floor(r)), int(np.floor(c))
        x = ndimage.shift(np.pad(img.astype(float), ((0, 1), (0, 1)), mode="edge"),
                          (r - ri, c - ci), order=1, mode="nearest", prefilter=False)
        w = ndimage.shift(np.pad(weights.astype(float), ((0, 1), (0, 1))), (r - ri, c - ci),
                          order=1, mode="grid-constant", prefilter=False)
        acc[ri:ri + n + 1, ci:ci + n + 1] += x * w
        wsum[ri:ri + n + 1, ci:ci + n + 1] += w
    out = np.full(acc.shape, np.nan)
    ok = wsum >= 0.1
    out[ok] = acc[ok] / wsum[ok]
    return out, origin


@pytest.mark.parametrize("weighting", ["uniform", "crop", "probe"])
def test_vectorised_batches_equal_the_per_frame_path(scan, weighting):
    pos, phases = scan
    w = frame_weights(128, PIXEL, weighting, crop=64)
    ref, ref_origin = reference_stitch(phases, pos, PIXEL, w)
    for batch in (1, 5, 12):
        s = Stitcher(PIXEL, weighting=weighting, crop=64 if weighting == "crop" else None)
        s.add_many(phases, pos, batch=batch)
        live = s.resample_to(ref.shape, ref_origin)
        np.testing.assert_allclose(live, ref, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_offset_registration_recovers_known_offsets():
    s = simulate_scan(n_positions=40, step_m=100e-9, seed=3)
    rng = np.random.default_rng(1)
    offsets = rng.normal(0, 0.5, s.n_frames).astype(np.float32)
    offsets[0] = 0.0  # the first image anchors the map
    shifted = s.truth_crops + offsets[:, None, None]
    kw = dict(weighting="probe", probe=s.probe)
    plain, origin = stitch(shifted, s.positions_m, s.object_pixel_size_m, **kw)
    reg, origin2 = stitch(shifted, s.positions_m, s.object_pixel_size_m, register_offsets=True,
                          **kw)
    truth = place_on_grid(s.truth_phase, s.truth_origin_m, s.object_pixel_size_m, plain.shape,
                          origin)
    lit = np.isfinite(plain) & np.isfinite(truth)
    err_plain = np.abs(plain[lit] - truth[lit]).mean()
    err_reg = np.abs(reg[lit] - truth[lit]).mean()
    assert err_reg < 0.25 * err_plain and err_reg < 0.05, (err_reg, err_plain)


def test_registration_looks_only_where_the_beam_is_and_finds_the_same_offsets():
    """The offsets are computed on the box where a frame's weight can pass the threshold; the
    whole window gives the same map (to float rounding) and a smaller box for a probe."""
    s = simulate_scan(n_positions=40, step_m=100e-9, seed=3)
    shifted = s.truth_crops + np.random.default_rng(1).normal(0, 0.5, (s.n_frames, 1, 1))
    maps = []
    for whole in (False, True):
        st = Stitcher(s.object_pixel_size_m, weighting="probe", probe=s.probe,
                      register_offsets=True, positions_m=s.positions_m)
        if whole:
            st._reg_box = (0, 129, 0, 129)
        else:
            r0, r1, c0, c1 = st._reg_box
            assert (r1 - r0) * (c1 - c0) < 0.5 * 129 * 129  # the beam is narrower than a frame
        st.add_many(shifted.astype(np.float32), s.positions_m, batch=8)
        maps.append(st.image())
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-5, atol=1e-5, equal_nan=True)


def frames_batch(phases, pos, uids=None, pixel=PIXEL, data=None) -> FrameBatch:
    b = FrameBatch.from_arrays(phases if data is None else data, uids, pos, pixel,
                               phase=phases)
    return b


def test_attributes_with_plan_equal_offline_stitch(scan):
    pos, phases = scan
    plugin = StitchingPlugin(register_offsets=False)
    plugin.set_positions(pos)
    order = np.random.default_rng(0).permutation(12)  # arrival order does not matter
    plugin.process(frames_batch(phases[order], pos[order], order + 1))
    live = plugin.image()
    offline, origin = stitch(phases, pos, PIXEL, weighting="probe")
    assert live.attributes["NumFrames"] == 12 and plugin.n_frames == 12
    assert (live.attributes["OriginX"], live.attributes["OriginY"]) == pytest.approx(origin)
    np.testing.assert_allclose(live.data, offline, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_positions_from_table_by_unique_id_and_by_order_with_gaps(scan):
    pos, phases = scan
    nopos = np.full((12, 2), np.nan)
    by_uid = StitchingPlugin(pixel_m=PIXEL, register_offsets=False)
    by_uid.set_positions(pos, unique_ids=np.arange(101, 113))
    by_uid.process(frames_batch(phases[::-1], nopos, np.arange(112, 100, -1), pixel=0.0))
    offline, _ = stitch(phases, pos, PIXEL, weighting="probe")
    np.testing.assert_allclose(by_uid.image().data, offline, rtol=1e-6, atol=1e-6,
                               equal_nan=True)
    # by arrival order, one frame lost (uniqueId 5 never came): the rest keep their positions
    by_order = StitchingPlugin(pixel_m=PIXEL, register_offsets=False)
    by_order.set_positions(pos)
    keep = np.arange(12) != 4
    out = by_order.process(frames_batch(phases[keep], nopos[keep], np.arange(1, 13)[keep],
                                        pixel=0.0))
    assert len(out) == 11
    np.testing.assert_allclose(out.positions, pos[keep])
    late = by_order.process(frames_batch(phases[:1], nopos[:1], [13], pixel=0.0))
    assert len(late) == 0 and "more frames than the 12 planned" in late.problems[0][0]
    unknown = by_uid.process(frames_batch(phases[:1], nopos[:1], [5], pixel=0.0))
    assert len(unknown) == 0 and "not in Stitch:Positions" in unknown.problems[0][0]


def test_malformed_for_stitching(scan):
    pos, phases = scan
    plugin = StitchingPlugin()
    out = plugin.process(frames_batch(phases[:1], np.full((1, 2), np.nan), pixel=0.0))
    assert len(out) == 0 and "no PosX/PosY" in out.problems[0][0]
    out = plugin.process(frames_batch(phases[:1], pos[:1], pixel=0.0))
    assert len(out) == 0 and "PixelSize" in out.problems[0][0]
    with pytest.raises(ValueError):
        plugin.set_positions(np.zeros((3, 2)), unique_ids=[1, 2])
    # a frame far outside the planned scan is refused alone; the map lives on
    plugin.set_positions(pos)
    far = pos.copy()
    far[3] = (1e3, 1e3)  # metres: a unit mistake
    out = plugin.process(frames_batch(phases, far))
    assert len(out) == 11 and "far outside the planned scan" in out.problems[0][0]
    assert plugin.image() is not None and plugin.n_frames == 11


def test_map_bound_refuses_a_frame_that_would_make_the_map_huge(scan):
    pos, phases = scan
    plugin = StitchingPlugin(max_px=1024)  # no plan: the map grows, within its bound
    far = pos.copy()
    far[0] = (1.0, 1.0)  # 1 m from the rest: a map of 10^8 pixels a side
    out = plugin.process(frames_batch(phases, far))
    assert len(out) == 11 and plugin.n_frames == 11
    assert max(plugin.image().data.shape) <= 1024


def test_reset_starts_a_new_map(scan):
    pos, phases = scan
    plugin = StitchingPlugin(pixel_m=PIXEL, register_offsets=False)
    plugin.set_positions(pos)
    plugin.process(frames_batch(phases[:1], pos[:1]))
    assert plugin.n_frames == 1
    plugin.reset()
    assert plugin.n_frames == 0 and plugin.image() is None
    plugin.process(frames_batch(phases[:3], pos[:3]))
    ref = Stitcher(PIXEL, positions_m=pos, weighting="probe")
    ref.add_many(phases[:3], pos[:3])
    np.testing.assert_allclose(plugin.image().data, ref.image(), rtol=1e-6, equal_nan=True)


# --------------------------------------------------------------------------- refinement
@pytest.fixture(scope="module")
def letters():
    return simulate_scan(n_positions=120, step_m=50e-9, seed=4242, sample_kind="test")


def figures(phase_map, origin, s):
    from ptychostream.hpc.reconstruct import illumination_map

    g = place_on_grid(phase_map, origin, s.object_pixel_size_m, s.truth_phase.shape,
                      s.truth_origin_m)
    ill = illumination_map(s.probe, s.positions_m, s.truth_origin_m, s.object_pixel_size_m,
                           s.truth_phase.shape)
    m = (ill >= 0.1 * ill.max()) & np.isfinite(g)
    d = g[m] - s.truth_phase[m]
    return np.corrcoef(g[m], s.truth_phase[m])[0, 1], np.abs(d - np.median(d)).mean()


def test_refinement_without_a_network_shows_the_sample(letters):
    s = letters
    plugin = StitchingPlugin(probe_step=0.0)
    plugin.set_probe(s.probe, "simulation")
    out = plugin.process(FrameBatch.from_arrays(s.frames, None, s.positions_m,
                                                s.object_pixel_size_m))  # no phase: no model
    assert len(out) == s.n_frames and plugin.refining
    img = plugin.image()
    assert img.attributes["Refined"] == 1
    corr, mae = figures(img.data, (img.attributes["OriginX"], img.attributes["OriginY"]), s)
    # the 2 rad W film (the paper's sample): one pass over these 120 positions gives 0.90,
    # 400 positions 0.97, two passes 0.96 (refine_scan, exact probe); it was 0.95 on 1 rad
    assert corr > 0.85, corr
    assert plugin.amplitude() is not None and plugin.probe_image().data.shape == (1, 128, 128, 2)
    passes = plugin.passes
    plugin.max_passes = 2.0
    while plugin.idle():  # further passes while idle, up to max_passes
        pass
    assert plugin.passes > passes and plugin.passes <= plugin.max_passes + 1
    assert "simulation" in plugin.probe_status()


def test_idle_passes_stop_at_the_live_cap_until_the_stream_pauses(letters):
    """A slow detector leaves time for every idle pass between two frames: while frames still
    arrive the passes stop at LIVE_MAX_PASSES (early frames refined over and over before their
    neighbours arrive leave the map worse, bench_refine.py --arrival-caps), and go on to
    Stitch:MaxPasses once every planned position has its frame or the stream has paused."""
    import time

    from ptychostream.refine import LIVE_MAX_PASSES

    s = letters.subset(slice(0, 12))
    for planned in (True, False):
        plugin = StitchingPlugin(probe_step=0.0, max_passes=LIVE_MAX_PASSES + 4)
        plugin.set_probe(s.probe, "simulation")
        if planned:
            plugin.set_positions(s.positions_m)
        for i in range(s.n_frames - 1):
            plugin.process(FrameBatch.from_arrays(s.frames[i:i + 1], [i + 1],
                                                  s.positions_m[i:i + 1], s.object_pixel_size_m))
            while plugin.idle():
                pass
            assert plugin.passes <= LIVE_MAX_PASSES + 1, (planned, i, plugin.passes)
        assert plugin.passes >= LIVE_MAX_PASSES - 1  # the cap, not a lack of idle time, held them
        if not planned:  # no plan: the stream pauses when no frame came for a while
            plugin.clock = lambda: time.monotonic() + 3600.0
        else:  # a pause in a planned scan (a fly scan's turnaround) is no end; its last frame is
            plugin.clock = lambda: time.monotonic() + 2.0
            assert not plugin.stream_paused()
            plugin.clock = time.monotonic
            i = s.n_frames - 1
            plugin.process(FrameBatch.from_arrays(s.frames[i:], [i + 1], s.positions_m[i:],
                                                  s.object_pixel_size_m))
        assert plugin.stream_paused()
        while plugin.idle():
            pass
        assert plugin.passes >= plugin.max_passes - 1, (planned, plugin.passes)


def test_a_stage_behind_inference_seeds_at_once_and_refines_when_there_is_time(letters):
    """While frames wait for inference the map stage only seeds the map (the network's phases
    show at once) and keeps the frames; once inference has caught up they are refined first,
    to the map that refining them as they came would give."""
    s = letters
    waiting = [100]  # frames queued for inference, as the IOC's backlog callable reports
    plugin = StitchingPlugin(probe_step=0.0, backlog=lambda: waiting[0],
                             idle_gate=lambda: waiting[0] == 0)
    plugin.set_probe(s.probe, "simulation")
    seeds = s.truth_crops  # a perfect network
    plugin.process(FrameBatch.from_arrays(s.frames, None, s.positions_m, s.object_pixel_size_m,
                                          phase=seeds))
    assert plugin.passes == 0.0  # nothing refined yet: Passes_RBV says the stage is behind
    img = plugin.image()
    corr, _ = figures(img.data, (img.attributes["OriginX"], img.attributes["OriginY"]), s)
    assert corr > 0.97, corr  # but the seeds show the sample already (0.984)
    assert not plugin.idle()  # inference still busy: no further passes
    waiting[0] = 0
    while plugin.passes < 1.0 and plugin.idle():
        pass
    assert plugin.passes == 1.0
    live = StitchingPlugin(probe_step=0.0)  # the same frames refined as they came
    live.set_probe(s.probe, "simulation")
    live.process(FrameBatch.from_arrays(s.frames, None, s.positions_m, s.object_pixel_size_m,
                                        phase=seeds))
    later, _ = figures(plugin.image().data, (img.attributes["OriginX"],
                                             img.attributes["OriginY"]), s)
    now, _ = figures(live.image().data, (live.image().attributes["OriginX"],
                                         live.image().attributes["OriginY"]), s)
    assert later > now - 0.02, (later, now)


def test_refinement_off_gives_exactly_the_plain_stitch(letters):
    s = letters
    phases = s.truth_crops
    plugin = StitchingPlugin(refine=False, register_offsets=False)
    plugin.set_probe(s.probe, "simulation")
    plugin.set_positions(s.positions_m)
    plugin.process(FrameBatch.from_arrays(s.frames, None, s.positions_m, s.object_pixel_size_m,
                                          phase=phases))
    offline, _ = stitch(phases, s.positions_m, s.object_pixel_size_m, weighting="probe",
                        probe=s.probe)
    img = plugin.image()
    assert img.attributes["Refined"] == 0
    np.testing.assert_allclose(img.data, offline, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_non_finite_update_leaves_the_map_as_it_was(letters):
    s = letters
    r = Refiner(s.probe, s.object_pixel_size_m, positions_m=s.positions_m, probe_step=0.0)
    r.update(s.frames[:40], s.positions_m[:40])
    before = r.complex_image()
    bad = s.frames[40:48].astype(np.float32)
    bad[:, 0, 0] = np.inf
    used = r.update(bad, s.positions_m[40:48])
    assert not used.any()
    np.testing.assert_array_equal(r.complex_image(), before)
    dark = np.zeros_like(s.frames[40:48])  # shutter closed: would wipe the map
    assert not r.update(dark, s.positions_m[40:48]).any() and r.n_dark == 8
    np.testing.assert_array_equal(r.complex_image(), before)


def test_probes_are_checked_and_read_from_files(tmp_path, letters):
    s = letters
    for bad, why in [(np.zeros((128, 128), np.complex64), "all zero"),
                     (np.full((128, 128), np.nan, np.complex64), "non-finite"),
                     (np.ones((3, 64), np.complex64), "shape"),
                     (s.probe * 1e20, "absurd scale")]:
        with pytest.raises(ProbeError, match=why):
            check_probe(bad)
    with pytest.raises(ProbeError, match="frames are 128"):
        check_probe(make_probe(64, PIXEL), frame_size=128)
    np.save(tmp_path / "p.npy", s.probe)
    p, source = load_probe(tmp_path / "p.npy")
    assert p.shape == (1, 128, 128) and ".npy" in source
    from ptychostream.scanfile import write_scan

    path = write_scan(tmp_path / "scan.h5", s)
    p, source = load_probe(path.read_bytes())
    np.testing.assert_allclose(p[0], s.probe) and None
    assert "scan file" in source
    with pytest.raises(ProbeError, match="neither"):
        load_probe(b"hello world, not a probe")


def test_the_gpu_window_path_gives_the_cpu_maps(letters):
    """Windows as one indexed kernel per batch (the GPU's path) run here on the CPU: the
    stitched map (offsets registered) and the refined map, seeded and revisited, are those of
    the slice-per-frame path."""
    s = letters
    phases = s.truth_crops.astype(np.float32) + 0.3
    maps = {}
    for by_index in (False, True):
        st = Stitcher(s.object_pixel_size_m, weighting="probe", probe=s.probe,
                      register_offsets=True, positions_m=s.positions_m)
        st.canvas.index_windows = by_index
        st.add_many(phases, s.positions_m, batch=16)
        r = Refiner(s.probe, s.object_pixel_size_m, positions_m=s.positions_m, batch=16,
                    probe_start=40)
        r.canvas.index_windows = by_index
        for k in range(0, s.n_frames, 16):
            r.update(s.frames[k:k + 16], s.positions_m[k:k + 16], seed_phase=phases[k:k + 16],
                     defer=k >= 64)
        for _ in range(s.n_frames // 16):  # a second pass, deferred frames first
            r.revisit(16)
        maps[by_index] = st.image(), r.phase_image()
    np.testing.assert_allclose(maps[True][0], maps[False][0], rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    np.testing.assert_allclose(maps[True][1], maps[False][1], rtol=1e-4, atol=1e-4,
                               equal_nan=True)


def test_a_learning_probe_takes_the_maps_phase_ramp(letters):
    """A probe given with a phase ramp draws the opposite ramp into the map, and a learning
    probe drifts into more; frames cannot tell (the pair fits them as well). While the probe
    learns, once per pass the refiner moves the map's ramp into the probe: less ramp is left,
    and the move leaves the model's intensity of every frame as it was."""
    from ptychostream.metrics import illuminated_mask, remove_ramp
    from ptychostream.refine import Refiner, torch_abs2

    s = letters
    n = s.frame_size
    k = np.arange(n) - n / 2
    tilted = s.probe * np.exp(1j * 3e-3 * k[:, None])  # 3e-3 rad/px along rows
    mask = illuminated_mask(s.positions_m, s.truth_phase.shape, s.truth_origin_m,
                            s.object_pixel_size_m, s.beam_fwhm_m)
    left, refiners = {}, {}
    for move in (False, True):
        r = Refiner(tilted, s.object_pixel_size_m, probe_step=0.5, seed="none",
                    positions_m=s.positions_m, history=s.n_frames, move_ramp=move)
        r.update(s.frames, s.positions_m)
        while r.passes < 4:
            r.revisit()
        est = place_on_grid(r.phase_image(), r.origin, s.object_pixel_size_m,
                            s.truth_phase.shape, s.truth_origin_m)
        left[move], refiners[move] = remove_ramp(est, s.truth_phase, mask)[1], r
    assert left[False] > 2e-3, left  # measured 3.1e-3
    assert left[True] < 0.6 * left[False], left  # measured 1.4e-3
    assert refiners[True].ramp_moved[0] < -1e-3, refiners[True].ramp_moved  # the rows tilt
    assert refiners[False].ramp_moved == (0.0, 0.0)

    r = refiners[True]
    corners = np.rint(r.canvas.corners(s.positions_m[[10, 60, 110]])).astype(int)

    def model():
        obj = r.canvas.layers["obj"]
        w = torch.stack([obj[y:y + n, x:x + n] for x, y in corners])
        return torch_abs2(torch.fft.fft2(r._P[None] * w[:, None], norm="ortho")).sum(1)

    before, moved = model(), r.ramp_moved
    r._ramp_at = (0, r.probe_updates - 1)  # let it move once more, now
    r._move_ramp_to_probe()
    assert r.ramp_moved != moved
    torch.testing.assert_close(model(), before, rtol=1e-4, atol=1e-5 * float(before.max()))


def test_further_passes_take_ever_smaller_probe_steps(letters):
    """Beyond PROBE_ANNEAL_PASSES a revisit's probe step shrinks as that over the passes (the
    probe has learnt from every frame several times over; its noise settles: MAE 0.0229 ->
    0.0217 rad on the demo's test scan), and the revisit takes that step, not ProbeStep."""
    from ptychostream.refine import PROBE_ANNEAL_PASSES, Refiner

    s = letters.subset(slice(0, 12))
    r = Refiner(s.probe, s.object_pixel_size_m, probe_step=0.5, probe_start=0, seed="none",
                positions_m=s.positions_m, history=s.n_frames)
    r.update(s.frames, s.positions_m)
    taken = []
    step = r._step

    def spy(*a, **kw):
        taken.append((r.passes, r._probe_step_now))
        return step(*a, **kw)

    r._step = spy
    while r.passes < 2 * PROBE_ANNEAL_PASSES:
        r.revisit()
    early = [st for p, st in taken if p <= PROBE_ANNEAL_PASSES]
    late = [(p, st) for p, st in taken if p > PROBE_ANNEAL_PASSES]
    assert early and all(st == 0.5 for st in early)
    assert late and all(st == pytest.approx(0.5 * PROBE_ANNEAL_PASSES / p) for p, st in late)
    assert r.revisit_probe_step() < 0.5 * 0.6 and r._probe_step_now is None
    assert r.probe_updates > len(taken)  # the probe learnt on every step, live and revisits


def test_a_new_alpha_takes_effect_at_the_next_frame(letters):
    """Stitch:RefineAlpha sets the refiner's alpha: the next live update uses it, with no
    further pass in between (a map with Stitch:MaxPasses 1 has none)."""
    from ptychostream.refine import Refiner

    s = letters.subset(slice(0, 6))
    maps = []
    for first in (0.1, 0.9):
        r = Refiner(s.probe, s.object_pixel_size_m, alpha=first, probe_step=0.0, seed="none",
                    positions_m=s.positions_m, history=s.n_frames)
        r.alpha = 0.9  # what StitchingPlugin.configure does on a RefineAlpha write
        r.update(s.frames, s.positions_m)
        maps.append(r.complex_image())
    np.testing.assert_array_equal(maps[0], maps[1])
