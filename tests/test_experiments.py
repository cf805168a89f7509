"""engram experiment iso | allocation at a tiny size: the reports are written, well-formed and consistent."""

import json

import pytest

from model_worker.presets import allocation, build_preset, count_parameters, iso_parameter_pair, model_config_for
from orchestration.cli import main


def test_allocation_keeps_the_total_and_moves_parameters_from_experts_to_rows():
    config = build_preset("tiny", 1024, 0)
    baseline, engram = iso_parameter_pair(config)
    assert allocation(config, 1.0) == baseline and model_config_for("tiny", 1024, 0, "moe") == baseline
    total = count_parameters(baseline)["total"]
    experts, rows = [], []
    for rho in (0.875, 0.75, 0.5, 0.375):
        point = allocation(config, rho)
        counts = count_parameters(point)
        assert abs(counts["total"] / total - 1) < 0.02
        assert abs(counts["activated"] / count_parameters(engram)["activated"] - 1) < 0.02
        experts.append(point.moe.num_routed_experts)
        rows.append(counts["engram_tables"])
    assert experts == sorted(experts, reverse=True) and rows == sorted(rows) and len(set(rows)) == 4
    with pytest.raises(ValueError, match="rho"):
        allocation(config, 0.0)
    with pytest.raises(ValueError, match="MoE baseline is rho = 1"):
        model_config_for("tiny", 1024, 0, "moe", rho=0.5)


@pytest.mark.slow
def test_both_experiments_write_their_reports_at_a_tiny_size(tmp_path, small_corpus, small_tokenizer, capsys):
    common = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--out-dir", str(tmp_path),
              "--runs-dir", str(tmp_path / "runs"), "--data", str(small_corpus), "--tokenizer", str(small_tokenizer),
              "--no-progress"]
    assert main(["experiment", "iso", "--seeds", "0,1", *common]) == 0
    printed = capsys.readouterr().out
    assert "engram - moe" in printed
    iso = json.loads((tmp_path / "iso.json").read_text())
    assert iso["preset"] == "tiny" and iso["steps"] == 3 and iso["tokens_per_run"] == 3 * 2 * 32
    assert sorted((r["model"], r["seed"]) for r in iso["runs"]) == [("engram", 0), ("engram", 1), ("moe", 0), ("moe", 1)]
    for run in iso["runs"]:
        assert [step for step, _ in run["val_curve"]] == [0, 2, 3] and run["final_val_loss"] == run["val_curve"][-1][1]
        assert run["params_total"] > run["params_activated"] > 0 and run["seconds"] > 0
        assert run["num_routed_experts"] == (18 if run["model"] == "moe" else 4)
    engram0, moe0 = (next(r for r in iso["runs"] if r["model"] == m and r["seed"] == 0) for m in ("engram", "moe"))
    assert abs(engram0["params_total"] / moe0["params_total"] - 1) < 0.02
    assert engram0["final_val_loss"] != moe0["final_val_loss"]  # two different models were trained
    assert (tmp_path / "iso.png").stat().st_size > 0

    assert main(["experiment", "allocation", "--rhos", "1,0.5", *common]) == 0
    report = json.loads((tmp_path / "allocation.json").read_text())
    first, second = report["points"]
    assert (first["rho"], first["engram_rows"]) == (1.0, 0) and second["engram_rows"] > 0
    assert second["num_routed_experts"] < first["num_routed_experts"]
    assert report["best_rho"] in (1.0, 0.5) and (tmp_path / "allocation.png").stat().st_size > 0
    assert first["rho_effective"] == 1.0 and 0 < second["rho_effective"] < 1
    for rhos in ("1.5,0.5", "1,0.5,1.5", "0.4,0.375", "1"):  # refused before anything trains
        assert main(["experiment", "allocation", "--rhos", rhos, *common]) == 2


@pytest.mark.slow
def test_the_iso_experiment_runs_on_a_memory_pool_and_drops_its_tables(make_pool, tmp_path, small_corpus, small_tokenizer):
    pool = make_pool(num_shards=2)
    assert main(["experiment", "iso", "--seeds", "0", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--eval-every", "2", "--out-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--data",
                 str(small_corpus), "--tokenizer", str(small_tokenizer), "--no-progress", "--memory",
                 f"pool:{pool.config.name}", "--token", "tok"]) == 0
    iso = json.loads((tmp_path / "iso.json").read_text())
    assert len(iso["runs"]) == 2 and all(r["final_val_loss"] > 0 for r in iso["runs"])
    assert sum(s["rows_served"] for s in pool.state()["shards"]) > 0  # the Engram run read its rows from the pool
    assert pool.tables() == []  # and its table is gone
