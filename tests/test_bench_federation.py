"""The federation benchmark's pure helpers (no Ray, no processes): the model size d, the
bytes-against-raw figures and the printed tables."""

from __future__ import annotations

import pytest

from lepton_ray.bench.federation import (TimeRow, format_times, format_wire, job, mlp_dim,
                                         wire_rows)


@pytest.mark.parametrize("hidden", [1, 128, 1500])
def test_mlp_dim_counts_torch_parameters(hidden):
    from torch import nn  # the oracle: torch's own parameter count of the model

    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    assert mlp_dim(hidden) == sum(p.numel() for p in model.parameters())


def test_mlp_dim_of_the_two_widths_the_bench_quotes():
    assert mlp_dim(1500) == 112_510
    assert mlp_dim(133_333) == 9_999_985  # 75 * 133333 + 10: ~10.0M


def test_mlp_dim_refuses_a_width_below_one():
    with pytest.raises(ValueError, match="hidden=0"):
        mlp_dim(0)


def test_wire_rows_against_raw_update():
    wire = {"south": {"to_site": 4_500, "from_site": 4_100},
            "north": {"to_site": 4_000, "from_site": 3_900}}
    rows = wire_rows(1_000, wire)
    assert [r.site for r in rows] == ["north", "south"]
    south = rows[1]
    assert south.raw == 4_000  # d ring elements of 4 bytes
    assert south.from_ratio == pytest.approx(1.025) and south.from_overhead == 100
    assert south.to_ratio == pytest.approx(1.125) and south.to_overhead == 500
    assert rows[0].from_overhead == -100  # smaller than raw shows as negative, not hidden


def test_tables_print_the_figures():
    wire = format_wire(wire_rows(112_510, {"east": {"to_site": 452_642, "from_site": 452_496}}))
    head, rule, row = wire.splitlines()
    assert head.split()[:2] == ["d", "site"] and set(rule.replace(" ", "")) == {"-"}
    assert row.split() == ["112,510", "east", "450,040", "452,496", "1.0055", "+2,456",
                           "452,642", "1.0058", "+2,602"]
    times = format_times([TimeRow(d=112_510, rounds=3, federation_seconds=0.4,
                                  simulate_seconds=0.2, federation_accuracy=0.93,
                                  simulate_accuracy=0.94)])
    assert times.splitlines()[2].split() == ["112,510", "3", "0.400", "0.200", "2.00",
                                             "0.9300", "0.9400"]


def test_job_is_a_valid_spec_with_the_benchmark_settings(tmp_path):
    from lepton_ray.config import load_spec

    raw = job(tmp_path, hidden=1500, rounds=3)
    raw["data"]["party_paths"] = [str(tmp_path / f"{s}.csv") for s in ("north", "south", "east")]
    spec = load_spec(raw)
    assert spec.secure_aggregation.mode.value == "secagg+"
    assert spec.privacy.mode.value == "none"
    assert spec.training.lr == 0.05 and spec.training.batch_size == 32
