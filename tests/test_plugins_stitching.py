"""Stitching plugin: positions from attributes or the planned table, equal to the offline stitch."""

from __future__ import annotations

import numpy as np
import pytest

from ptychostream.ntndarray import Frame
from ptychostream.plugins.driver import FrameError
from ptychostream.plugins.stitching import StitchingPlugin
from ptychostream.simulation import spiral_positions
from ptychostream.stitch import Stitcher, stitch

PIXEL = 12.9e-9


@pytest.fixture
def scan():
    rng = np.random.default_rng(5)
    pos = spiral_positions(12, 150e-9) + rng.normal(0, 3e-9, (12, 2))
    phases = rng.uniform(-1, 1, (12, 128, 128)).astype(np.float32)
    return pos, phases


def run(plugin: StitchingPlugin, frames: list[Frame]) -> None:
    plugin.process([plugin.check(f) for f in frames])


def test_attributes_with_plan_equal_offline_stitch(scan):
    pos, phases = scan
    plugin = StitchingPlugin()
    plugin.set_positions(pos)
    order = np.random.default_rng(0).permutation(12)  # arrival order does not matter
    run(plugin, [Frame(phases[i], int(i) + 1, 0.0,
                       {"PosX": pos[i, 0], "PosY": pos[i, 1], "PixelSize": PIXEL}) for i in order])
    live = plugin.image()
    offline, origin = stitch(phases, pos, PIXEL)
    assert live.attributes["NumFrames"] == 12 and plugin.n_frames == 12
    assert (live.attributes["OriginX"], live.attributes["OriginY"]) == pytest.approx(origin)
    np.testing.assert_allclose(live.data, offline, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_growing_map_without_plan_equals_stitcher_fed_alike(scan):
    pos, phases = scan
    plugin = StitchingPlugin(pixel_m=PIXEL)  # no PixelSize attribute: the plugin's own
    run(plugin, [Frame(phases[i], i + 1, 0.0, {"PosX": pos[i, 0], "PosY": pos[i, 1]})
                 for i in range(12)])
    ref = Stitcher(PIXEL)
    ref.add_many(phases, pos)
    np.testing.assert_allclose(plugin.image().data, ref.image(), rtol=1e-6, equal_nan=True)
    assert plugin.image().attributes["OriginX"] == pytest.approx(ref.origin[0])


def test_positions_from_table_by_unique_id_and_by_order(scan):
    pos, phases = scan
    by_uid = StitchingPlugin(pixel_m=PIXEL)
    by_uid.set_positions(pos, unique_ids=np.arange(101, 113))
    run(by_uid, [Frame(phases[i], 101 + i) for i in reversed(range(12))])
    by_order = StitchingPlugin(pixel_m=PIXEL)
    by_order.set_positions(pos)
    run(by_order, [Frame(phases[i], 0) for i in range(12)])
    offline, _ = stitch(phases, pos, PIXEL)
    for p in (by_uid, by_order):
        np.testing.assert_allclose(p.image().data, offline, rtol=1e-6, equal_nan=True)
    with pytest.raises(FrameError, match="more frames"):
        by_order.check(Frame(phases[0], 0))
    with pytest.raises(FrameError, match="not in Stitch:Positions"):
        by_uid.check(Frame(phases[0], 5))


def test_malformed_for_stitching():
    plugin = StitchingPlugin()
    img = np.zeros((128, 128), np.float32)
    with pytest.raises(FrameError, match="no PosX/PosY"):
        plugin.check(Frame(img, 1))
    with pytest.raises(FrameError, match="PixelSize"):
        plugin.check(Frame(img, 1, 0.0, {"PosX": 0.0, "PosY": 0.0}))
    with pytest.raises(FrameError, match="square"):
        plugin.check(Frame(np.zeros((4, 5)), 1, 0.0, {"PosX": 0.0, "PosY": 0.0, "PixelSize": 1e-8}))
    with pytest.raises(ValueError):
        plugin.set_positions(np.zeros((3, 2)), unique_ids=[1, 2])


def test_reset_starts_a_new_map(scan):
    pos, phases = scan
    plugin = StitchingPlugin(pixel_m=PIXEL)
    plugin.set_positions(pos)
    run(plugin, [Frame(phases[0], 0)])
    assert plugin.n_frames == 1
    plugin.reset()
    assert plugin.n_frames == 0 and plugin.image() is None
    run(plugin, [Frame(phases[i], 0) for i in range(3)])  # the plan is kept, from its first row
    ref = Stitcher(PIXEL, positions_m=pos)
    ref.add_many(phases[:3], pos[:3])
    np.testing.assert_allclose(plugin.image().data, ref.image(), rtol=1e-6, equal_nan=True)
