"""The `engram` command as a user runs it (a real subprocess each time)."""

import json
import subprocess
import sys

import pytest


def engram(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_then_generate(tmp_path, small_corpus, small_tokenizer):
    out = tmp_path / "run"
    result = engram("train", "--preset", "tiny", "--steps", 12, "--batch-size", 4, "--seq-len", 32, "--eval-every", 6,
                    "--data", small_corpus, "--tokenizer", small_tokenizer, "--out", out, "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["step"] == 12 and summary["val_loss"] < summary["val_loss_start"]
    resumed = engram("train", "--resume", "--steps", 16, "--out", out, "--no-progress", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["step"] == 16 and "resumed" in resumed.stderr
    gen = engram("generate", "--checkpoint", out / "checkpoint", "--prompt", "import ", "--max-new-tokens", 20)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("import ") and len(gen.stdout) > 10


def test_clear_errors(tmp_path):
    missing = engram("train", "--tokenizer", tmp_path / "missing.json", "--steps", 1)
    assert missing.returncode == 2
    assert "tokenizer file not found" in missing.stderr and "missing.json" in missing.stderr
    no_ckpt = engram("generate", "--checkpoint", tmp_path / "none")
    assert no_ckpt.returncode == 2 and "not a complete checkpoint" in no_ckpt.stderr
    preset = engram("train", "--preset", "huge")
    assert preset.returncode == 2 and "unknown preset 'huge'" in preset.stderr
    no_data = engram("train", "--data", tmp_path / "nowhere")
    assert no_data.returncode == 2 and "data path not found" in no_data.stderr


def test_compress_and_hash_bench(data_dir):
    result = engram("compress", "--tokenizer", data_dir / "tokenizer_bytelevel.json", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"vocab_size": 1026, "compressed_vocab_size": 789, "reduction": 1 - 789 / 1026}
    bench = engram("bench", "hash", "--tokens", 8192, "--repeats", 1, "--json")
    assert bench.returncode == 0, bench.stderr
    figures = json.loads(bench.stdout)
    assert figures["identical"] and figures["ours_tokens_per_s"] > 0 and figures["speedup_vs_baseline"] > 0


@pytest.mark.slow
def test_step_bench_runs():
    result = engram("bench", "step", "--preset", "tiny", "--steps", 2, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)["results"]
    assert set(figures) == {"in_process", "service_prefetch", "service_no_prefetch", "service_prefetch_async"}
    assert all(r["step_ms"] > 0 for r in figures.values())
