"""`engram serve` in one process, `engram table ...` and `engram query` from others, as a user runs them."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from memory_service.compression import CompressedTokenizer
from memory_service.hashing import NgramHasher
from memory_service.row_init import init_rows
from memory_service.spec import EngramSpec
from orchestration.local_server import start_server

pytestmark = pytest.mark.slow


def engram(*args):
    result = subprocess.run([sys.executable, "-m", "orchestration.cli", *map(str, args)], capture_output=True, text=True, timeout=120)
    return result


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_store")
    proc, address = start_server(path, token="tok")
    yield address
    proc.terminate()
    proc.wait(timeout=30)


def test_query_text_returns_the_rows_the_table_holds(served, tmp_path, data_dir):
    tokenizer_file = data_dir / "tokenizer_bytelevel.json"
    spec = EngramSpec(engram_vocab_size=[3001, 3001], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1, 2], pad_id=1)
    (tmp_path / "spec.json").write_text(spec.to_json())
    created = engram("table", "create", "--address", served, "--token", "tok", "--table", "code",
                     "--spec-json", tmp_path / "spec.json", "--tokenizer", tokenizer_file, "--init-std", "0.5", "--seed", "4")
    assert created.returncode == 0, created.stderr
    result = engram("query", "--address", served, "--table", "code", "--layer", 1, "--text", "def main():",
                    "--tokenizer", tokenizer_file, "--full")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    # what the table holds for those hashed ids, computed independently of the service
    compressor = CompressedTokenizer.from_tokenizer_file(tokenizer_file)
    bound = spec.with_compression(compressor.lookup_table, len(compressor))
    hasher = NgramHasher.from_compressor(bound, compressor)
    tokens = Tokenizer.from_file(str(tokenizer_file)).encode("def main():", add_special_tokens=False).ids
    row_ids = hasher.row_ids(compressor(np.asarray([tokens])))[1][0]
    assert reply["row_ids"] == row_ids.tolist() and reply["version"] == 1
    table = init_rows(hasher.layer_num_rows(1), spec.head_dim, 1, 0, hasher.layer_num_rows(1), 0.5, 4)
    np.testing.assert_array_equal(np.asarray(reply["rows"], dtype=np.float32), table[row_ids])
    summary = json.loads(engram("query", "--address", served, "--table", "code", "--layer", 2, "--row-ids", "0,5,7").stdout)
    assert summary["shape"] == [3, spec.head_dim] and "summary" in summary


def test_table_lifecycle_from_the_command_line(served, tmp_path):
    spec = EngramSpec(engram_vocab_size=[1009], max_ngram_size=2, n_embed_per_ngram=8, n_head_per_ngram=1, layer_ids=[0, 4],
                      compressed_vocab_size=100)
    (tmp_path / "spec.json").write_text(spec.to_json())
    base = ("--address", served, "--token", "tok", "--table", "life")
    assert engram("table", "create", *base, "--spec-json", tmp_path / "spec.json").returncode == 0
    listed = json.loads(engram("table", "list", "--address", served, "--json").stdout)
    assert "life" in [t["name"] for t in listed]
    exported = engram("table", "export", *base, "--layer", 0, "--out", tmp_path / "l0.npy")
    assert exported.returncode == 0, exported.stderr
    rows0 = np.load(tmp_path / "l0.npy")
    np.testing.assert_array_equal(rows0, init_rows(1009, 8, 0, 0, 1009, 1.0, 0))
    # import a reference-layout torch state dict into a new version and activate it
    torch.save({"multi_head_embedding.embedding.weight": torch.from_numpy(rows0 * 2)}, tmp_path / "ref.pt")
    imported = engram("table", "import", *base, "--layer", 0, "--file", tmp_path / "ref.pt", "--activate")
    assert imported.returncode == 0, imported.stderr
    info = json.loads(engram("table", "info", *base).stdout)
    assert info["active_version"] == 2 and info["swap_history"] == [1]
    q = json.loads(engram("query", *base, "--layer", 0, "--row-ids", "3", "--full").stdout)
    np.testing.assert_allclose(q["rows"][0], rows0[3] * 2)
    # safetensors into an explicit version, then roll back and drop
    from safetensors.numpy import save_file

    save_file({"layer.4": np.full((1013, 8), 1.5, np.float32)}, str(tmp_path / "l4.safetensors"))
    assert engram("table", "import", *base, "--layer", 4, "--file", tmp_path / "l4.safetensors", "--key", "layer.4",
                  "--version", 2).returncode == 0
    np.testing.assert_array_equal(json.loads(engram("query", *base, "--layer", 4, "--row-ids", "9", "--full").stdout)["rows"], [[1.5] * 8])
    assert engram("table", "rollback", *base).returncode == 0
    assert json.loads(engram("query", *base, "--layer", 0, "--row-ids", "3", "--full").stdout)["version"] == 1
    assert engram("table", "drop", *base, "--version", 2).returncode == 0
    assert [v["version"] for v in json.loads(engram("table", "info", *base).stdout)["versions"]] == [1]
    assert engram("table", "export", *base, "--out", tmp_path / "all.safetensors").returncode == 0
    # clear errors
    wrong = engram("table", "import", *base, "--layer", 0, "--file", tmp_path / "l4.safetensors")
    assert wrong.returncode == 2 and "needs" in wrong.stderr
    missing = engram("query", "--address", served, "--table", "nope", "--layer", 0, "--row-ids", "1")
    assert missing.returncode == 2 and "no table named 'nope'" in missing.stderr
    no_token = engram("table", "swap", "--address", served, "--table", "life", "--version", 1)
    assert no_token.returncode == 2 and "authorization" in no_token.stderr


def test_a_bf16_checkpoint_creates_a_float32_table_with_the_same_values(served, tmp_path):
    """train --table-dtype bfloat16 saves bf16 rows; table create --from-checkpoint --dtype float32 casts them (it read
    the checkpoint's own dtype, not the new table's)."""
    from memory_service.local_table import saved_rows
    from memory_service.row_dtypes import BFLOAT16

    out = tmp_path / "run"
    trained = engram("train", "--preset", "tiny", "--steps", 2, "--eval-every", 100, "--out", out, "--table-dtype",
                     "bfloat16", "--optimizer-state", "compact", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    created = engram("table", "create", "--address", served, "--token", "tok", "--table", "from-bf16",
                     "--from-checkpoint", out / "checkpoint", "--dtype", "float32")
    assert created.returncode == 0, created.stderr
    with np.load(out / "checkpoint" / "tables.npz") as z:
        spec = EngramSpec.from_json(bytes(z["spec"]).decode())
        assert spec.dtype == "bfloat16" and spec.optimizer_state == "compact"
        layer = spec.layer_ids[0]
        expected = saved_rows(z, spec, layer)
    assert expected.dtype == BFLOAT16
    exported = engram("table", "export", "--address", served, "--table", "from-bf16", "--layer", layer,
                      "--out", tmp_path / "rows.npy")
    assert exported.returncode == 0, exported.stderr
    rows = np.load(tmp_path / "rows.npy")
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, expected.astype(np.float32))
