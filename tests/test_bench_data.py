"""``staralign bench data`` runs and prints one valid JSON object."""

from __future__ import annotations

import json

from staralign.cli import main


def test_bench_data_prints_json(capsys):
    status = main(["bench", "data", "--json", "--images", "3", "--size", "128", "--samples", "4",
                   "--batch-size", "2", "--workers", "0", "--profile-samples", "2",
                   "--definition", "COFW"])
    assert status == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert result["bench"] == "data" and result["definition"] == "COFW" and result["workers"] == 0
    for mode in ("worker_targets", "mixed_targets", "device_targets"):
        r = result[mode]
        assert r["bytes_per_sample"] > 0
        assert r["samples"] == 4 and r["samples_per_s"] > 0
        assert r["samples_per_s_per_core"] == r["samples_per_s"]  # 0 workers: one core
    # 8-bit images and no point maps: each mode sends less than the one before.
    sizes = [result[m]["bytes_per_sample"] for m in ("worker_targets", "mixed_targets", "device_targets")]
    assert sizes[0] > sizes[1] > sizes[2]
    assert set(result["profile_ms_per_sample"]) >= {"decode", "point_maps", "edge_maps", "total"}
    assert result["device_targets_ms_per_batch"]["ms_median"] > 0
