"""DeepSeek-V4.1's Engram tables: FP8 records with block scales, imported from a V4.1-layout checkpoint (a synthetic
one, written by the safetensors library with the real tensor names and dtypes) into one service and into a 2-shard
pool, looked up and dequantized, exported byte for byte, swapped under lookups; float tables quantized into them."""

import filecmp
import json
import threading

import numpy as np
import pytest
import torch
from helpers.v41_checkpoint import HEAD_DIM, scaled_config, torch_dequantized, write_checkpoint

from memory_service import fp8_rows
from memory_service.admin import ServiceAdmin
from memory_service.client import MemoryClient
from memory_service.errors import FailedPrecondition, InvalidArgument
from memory_service.hashing import NgramHasher
from memory_service.safetensors_io import read_header, read_rows
from memory_service.server import build_server
from memory_service.spec import EngramSpec
from memory_service.store import TableStore
from orchestration.cli import build_parser, main

TOKEN = "fp8"
WIDTH = HEAD_DIM + HEAD_DIM // 32  # bytes of one FP8 record


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of one config (different rows): (config, {seed: (directory, {layer: (weight, scale)})})."""
    config = scaled_config()
    root = tmp_path_factory.mktemp("v41")
    return config, {seed: (root / f"ckpt{seed}", write_checkpoint(root / f"ckpt{seed}", config, seed)) for seed in (0, 1)}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    store = TableStore(tmp_path_factory.mktemp("fp8_store"), max_delta_rows=4000)
    server, port, _ = build_server(store, token=TOKEN)
    server.start()
    yield store, f"127.0.0.1:{port}"
    server.stop(0)
    store.close()


def engram(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def records_of(weight: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    return fp8_rows.join(weight.view(torch.uint8).numpy(), scale.view(torch.uint8).numpy())


def test_fp8_records_dequantize_like_torch_and_quantizing_bounds_the_error():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((500, 256)) * np.exp(rng.uniform(-12, 4, (500, 1)))).astype(np.float32)
    values[7] = 0.0
    records = fp8_rows.quantize(values)  # [500, 264]
    assert records.shape == (500, 264) and records.dtype == np.uint8
    weight = torch.from_numpy(records[:, :256].copy()).view(torch.float8_e4m3fn)
    scale = torch.from_numpy(records[:, 256:].copy()).view(torch.float8_e8m0fnu)
    expected = (weight.to(torch.float32) * scale.to(torch.float32).repeat_interleave(32, dim=1)).numpy()
    np.testing.assert_array_equal(fp8_rows.dequantize(records, 256), expected)
    np.testing.assert_array_equal(fp8_rows.dequantize_torch(records, 256).numpy(), expected)
    assert torch.equal(fp8_rows.dequantize_torch(records, 256, torch.bfloat16), torch.from_numpy(expected).to(torch.bfloat16))
    error = fp8_rows.QuantizationError()
    error.add(values, records)
    report = error.report()
    assert 0 < report["relative_rms_error"] < 0.04  # 3 mantissa bits: at most 1/16 relative per value
    block_scale = scale.to(torch.float32).repeat_interleave(32, dim=1).numpy()
    # E4M3: 3 mantissa bits (half a step: 1/16 relative); below its normals, steps of 2^-9 of the block's scale
    assert np.all(np.abs(expected - values) <= np.abs(values) / 16 + block_scale * 2.0 ** -10)
    assert not expected[7].any()
    # float32's extremes: values near its largest stay finite; a stored record beyond it is refused
    huge = np.full((2, 256), 3.4e38, np.float32)
    huge[1] *= -1
    assert np.isfinite(fp8_rows.dequantize(fp8_rows.quantize(huge), 256)).all()
    over = fp8_rows.quantize(huge)
    over[0, 256] = 254  # a scale of 2^127 on codes near 448
    with pytest.raises(InvalidArgument, match="2\\^128"):
        fp8_rows.check_records(over, 256)
    bad = records.copy()
    bad[3, 10] = 0x7F
    with pytest.raises(InvalidArgument, match="NaN codes"):
        fp8_rows.check_records(bad, 256)
    bad = records.copy()
    bad[3, 260] = 0xFF
    with pytest.raises(InvalidArgument, match="NaN scales"):
        fp8_rows.check_records(bad, 256)


def test_safetensors_files_are_written_as_the_library_writes_them_and_malformed_ones_refused(tmp_path):
    from helpers.v41_checkpoint import random_layer
    from safetensors.torch import save_file

    from memory_service.v4_checkpoint import export_layers

    weight, scale = random_layer(1000, seed=9)
    names = {"model.layers.3.engram.w": weight, "model.layers.3.engram.w_scale_inv": scale}
    save_file(names, str(tmp_path / "library.safetensors"), metadata={"format": "pt"})
    records = records_of(weight, scale)
    [ours] = export_layers(tmp_path / "ours", {3: (1000, lambda a, b: records[a:b])}, HEAD_DIM,
                           "model.layers.{layer}.engram.w", "model.layers.{layer}.engram.w_scale_inv", metadata={"format": "pt"})
    assert filecmp.cmp(ours, tmp_path / "library.safetensors", shallow=False)

    def file_with(header: dict, data: bytes = bytes(64)) -> str:
        blob = json.dumps(header).encode()
        path = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}.safetensors"
        path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
        return path

    for header, match in [({"t": {"dtype": "U8", "shape": [-2, 4], "data_offsets": [16, 8]}}, "non-negative"),
                          ({"t": {"dtype": "U8", "shape": [2, 4], "data_offsets": ["0", "8"]}}, "non-negative"),
                          ({"t": {"dtype": "U8", "shape": [2, 4], "data_offsets": [0, 9]}}, "do not fit"),
                          ({"t": {"dtype": "U8", "shape": [2, 4], "data_offsets": [0, 800]}}, "do not fit"),
                          ({"t": {"dtype": "X9", "shape": [2], "data_offsets": [0, 2]}}, "unknown dtype"),
                          ({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                            "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}, "overlap"),
                          ({"t": [1, 2]}, "malformed")]:
        with pytest.raises(InvalidArgument, match=match):
            read_header(file_with(header))
    (tmp_path / "short.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(InvalidArgument, match="shorter than 8 bytes"):
        read_header(tmp_path / "short.safetensors")


def test_a_v41_checkpoint_imports_into_one_service_and_exports_byte_identical(service, checkpoints, capsys, tmp_path):
    store, address = service
    config, ckpts = checkpoints
    directory, layers = ckpts[0]
    where = ["--address", address, "--token", TOKEN, "--table", "v41"]
    code, out, err = engram(capsys, "table", "create", *where, "--from-config", directory)
    assert code == 0, err
    loaded_before = store.counters["rows_loaded"]
    code, out, err = engram(capsys, "table", "import", *where, "--checkpoint", directory, "--activate", "--no-progress",
                            "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["layers"] == [1, 14] and report["active"] and report["mb_per_s"] > 0
    assert store.counters["rows_loaded"] - loaded_before == sum(config["engram_num_embeddings"])

    client = MemoryClient(address, "v41", token=TOKEN)
    try:
        assert client.row_width == WIDTH and client.dtype == np.uint8
        for layer, (weight, scale) in layers.items():
            ids = np.arange(weight.shape[0])
            stored, version = client.lookup_raw(layer, ids)
            assert version == report["version"]
            np.testing.assert_array_equal(stored, records_of(weight, scale))  # the records, bit for bit
            np.testing.assert_array_equal(client.lookup(layer, ids), torch_dequantized(weight, scale))

        # LookupTokens hashes V4.1's geometry (3 orders x 8 heads) over compressed ids
        spec = client.spec
        assert spec.num_heads == 24 and spec.compressed_vocab_size == config["engram_compressed_vocab_size"]
        tokens = np.random.default_rng(3).integers(0, spec.compressed_vocab_size, (2, 9))
        rows, row_ids, _ = client.lookup_tokens(14, tokens, compressed=True)
        expected_ids = NgramHasher(spec, spec.compressed_vocab_size).row_ids(tokens, layers=(14,))[14]
        np.testing.assert_array_equal(row_ids, expected_ids)
        assert rows.shape == (2, 9, 24, WIDTH)
        np.testing.assert_array_equal(client.values(rows), torch_dequantized(*layers[14])[expected_ids])
    finally:
        client.close()

    code, out, err = engram(capsys, "query", *where, "--layer", 1, "--row-ids", "0,17,25000", "--full")
    assert code == 0, err
    reply = json.loads(out)
    assert reply["shape"] == [3, HEAD_DIM] and reply["dtype"] == "fp8_e4m3_b32"
    np.testing.assert_array_equal(np.asarray(reply["rows"], dtype=np.float32), torch_dequantized(*layers[1])[[0, 17, 25000]])

    code, out, err = engram(capsys, "table", "export", *where, "--checkpoint", tmp_path / "out")
    assert code == 0, err
    # layer 1's shard held only its Engram tensors: the exported file is that file, byte for byte
    assert filecmp.cmp(tmp_path / "out" / "engram-layer-1.safetensors", directory / "model-00002-of-00003.safetensors",
                       shallow=False)
    source = read_header(directory / "model-00003-of-00003.safetensors")  # layer 14 shares a shard: compare its tensors
    exported = read_header(tmp_path / "out" / "engram-layer-14.safetensors")
    for name in ("layers.14.engram.embed.weight", "layers.14.engram.embed.scale"):
        assert (exported[name].dtype, exported[name].shape) == (source[name].dtype, source[name].shape)
        rows = source[name].shape[0]
        assert np.array_equal(read_rows(tmp_path / "out" / "engram-layer-14.safetensors", exported[name], 0, rows),
                              read_rows(directory / "model-00003-of-00003.safetensors", source[name], 0, rows))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["layers.14.engram.embed.scale"] == "engram-layer-14.safetensors"


def test_fp8_tables_refuse_training_bad_records_and_mismatched_checkpoints(service, checkpoints, capsys, tmp_path):
    store, address = service
    config, ckpts = checkpoints
    where = ["--address", address, "--token", TOKEN]
    bad = {**config, "engram_num_embeddings": [config["engram_num_embeddings"][0] + 1, config["engram_num_embeddings"][1]]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, _, err = engram(capsys, "table", "create", *where, "--table", "bad", "--from-config", tmp_path / "bad.json")
    assert code == 2 and "our hashing layout gives rows" in err
    # a table of another geometry: the checkpoint's layers do not fit it, and no version is left behind
    other = {**config, "engram_vocab_size": 2003}
    other["engram_num_embeddings"] = scaled_config(vocab=2003)["engram_num_embeddings"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert engram(capsys, "table", "create", *where, "--table", "other", "--from-config", tmp_path / "other.json")[0] == 0
    code, _, err = engram(capsys, "table", "import", *where, "--table", "other", "--checkpoint", ckpts[0][0], "--no-progress")
    assert code == 2 and "records of 66 bytes" in err
    assert engram(capsys, "table", "import", *where, "--table", "other", "--checkpoint", ckpts[0][0], "--weight-pattern",
                  "model.layers.{layer}.engram.weight", "--no-progress")[2].count("names no tensor") == 1

    admin = ServiceAdmin(address, token=TOKEN)
    client = admin.data_client("other")
    try:
        assert [v.version for v in admin.info("other").versions] == [1]
        ids = np.array([3, 9])
        with pytest.raises(FailedPrecondition, match="for serving") as refused:
            client.apply_gradients(1, ids, np.ones((2, HEAD_DIM), np.float32), lr=0.1)
        assert refused.value.reason == "NOT_TRAINABLE"
        records = fp8_rows.quantize(np.ones((2, HEAD_DIM), np.float32))
        client.write_rows(1, ids, records)  # whole records are written (a repair), and read back as they went in
        np.testing.assert_array_equal(client.lookup(1, ids), np.ones((2, HEAD_DIM), np.float32))
        records[1, 5] = 0xFF
        with pytest.raises(InvalidArgument, match="NaN codes"):
            client.write_rows(1, ids, records)
        with pytest.raises(InvalidArgument, match=f"\\[2, {WIDTH}\\]"):
            client.write_rows(1, ids, np.ones((2, HEAD_DIM), np.float32))
        np.testing.assert_array_equal(client.lookup(1, ids), np.ones((2, HEAD_DIM), np.float32))  # nothing changed
        # enough written records to fold the recent rows into the chunks (max_delta_rows 4000): read back the same
        many = np.arange(100, 6100)
        values = np.random.default_rng(1).standard_normal((many.size, HEAD_DIM)).astype(np.float32)
        flushes = store.counters["flushes"]
        client.write_rows(1, many, fp8_rows.quantize(values))
        store.compactor.wait()
        assert store.counters["flushes"] > flushes
        np.testing.assert_array_equal(client.lookup(1, many), fp8_rows.dequantize(fp8_rows.quantize(values), HEAD_DIM))
    finally:
        client.close()
        admin.close()


def test_float_rows_import_into_an_fp8_table_quantized_and_export_out_is_refused(service, checkpoints, capsys, tmp_path):
    store, address = service
    config, ckpts = checkpoints
    where = ["--address", address, "--token", TOKEN, "--table", "from-file"]
    assert engram(capsys, "table", "create", *where, "--from-config", ckpts[0][0])[0] == 0
    values = np.random.default_rng(2).standard_normal((config["engram_num_embeddings"][1], HEAD_DIM)).astype(np.float32)
    np.save(tmp_path / "layer14.npy", values)
    code, _, err = engram(capsys, "table", "import", *where, "--layer", 14, "--file", tmp_path / "layer14.npy",
                          "--activate", "--no-progress")
    assert code == 0, err
    client = MemoryClient(address, "from-file", token=TOKEN)
    try:
        ids = np.arange(0, values.shape[0], 7)
        np.testing.assert_array_equal(client.lookup(14, ids), fp8_rows.dequantize(fp8_rows.quantize(values[ids]), HEAD_DIM))
    finally:
        client.close()
    code, _, err = engram(capsys, "table", "export", *where, "--out", tmp_path / "x.safetensors")
    assert code == 2 and "--checkpoint" in err
    code, _, err = engram(capsys, "table", "import", *where, "--layer", 1, "--file",
                          ckpts[0][0] / "model-00002-of-00003.safetensors", "--key", "layers.1.engram.embed.weight")
    assert code == 2 and "FP8 tensors" in err


def test_a_bf16_table_quantizes_into_a_new_fp8_version_with_its_error_reported(service, capsys):
    store, address = service
    spec = EngramSpec(engram_vocab_size=[3001, 3001], max_ngram_size=3, n_embed_per_ngram=2 * HEAD_DIM,
                      n_head_per_ngram=2, layer_ids=[0, 2], dtype="bfloat16")
    admin = ServiceAdmin(address, token=TOKEN)
    admin.create_table("trained", spec, init_std=0.02, init_seed=1)
    where = ["--address", address, "--token", TOKEN, "--table", "trained"]
    code, out, err = engram(capsys, "table", "quantize", *where, "--into", "served", "--activate", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["version"] == 2 and 0 < report["relative_rms_error"] < 0.04 and report["max_abs_error"] > 0
    other = EngramSpec(engram_vocab_size=[3011, 3001], max_ngram_size=3, n_embed_per_ngram=2 * HEAD_DIM,
                       n_head_per_ngram=2, layer_ids=[0, 2], dtype="fp8_e4m3_b32")
    admin.create_table("hashed-otherwise", other, init_std=0.0)
    code, _, err = engram(capsys, "table", "quantize", *where, "--into", "hashed-otherwise")
    assert code == 2 and "does not hash like" in err
    source, served = admin.data_client("trained"), admin.data_client("served")
    try:
        assert served.spec.dtype == "fp8_e4m3_b32" and served.spec.layer_ids == spec.layer_ids
        for layer, rows in source.layer_rows.items():
            ids = np.arange(rows)
            original = source.lookup(layer, ids)
            np.testing.assert_array_equal(served.lookup(layer, ids),
                                          fp8_rows.dequantize(fp8_rows.quantize(original), HEAD_DIM))
    finally:
        source.close()
        served.close()
        admin.close()


@pytest.mark.slow
def test_a_pool_imports_two_versions_and_swaps_between_them_under_lookups(make_pool, checkpoints):
    """Each shard receives only its own rows; the swap fails no lookup, and no reply mixes the versions."""
    from orchestration.commands_checkpoint import import_checkpoint, spec_for_config
    from orchestration.pool_admin import PoolAdmin

    config, ckpts = checkpoints
    pool = make_pool(2)
    admin = PoolAdmin(pool)
    parse = build_parser().parse_args
    spec, _ = spec_for_config(parse(["table", "create", "--table", "v41", "--from-config", str(ckpts[0][0])]))
    admin.create_table("v41", spec, init_std=0.0)
    versions = {}
    for seed, (directory, _) in ckpts.items():
        args = parse(["table", "import", "--table", "v41", "--checkpoint", str(directory), "--no-progress", "--json"]
                     + (["--activate"] if seed == 0 else []))
        before = admin.info("v41").versions
        import_checkpoint(admin, args)
        versions[seed] = max(v.version for v in admin.info("v41").versions if v not in before)
    assert admin.info("v41").active_version == versions[0]
    loaded = [stats["rows_loaded"] for stats in admin.data_client("v41").stats()]
    total = sum(config["engram_num_embeddings"])
    assert sum(loaded) == 2 * total and all(0 < n < 2 * total for n in loaded)  # each shard its own ranges only

    expected = {seed: {layer: records_of(*tensors) for layer, tensors in layers.items()} for seed, (_, layers) in ckpts.items()}
    failures, mixed, seen, stop = [], [], set(), threading.Event()

    def reader(seed: int):
        client = admin.data_client("v41")  # follows the active version through the swap
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                layer = int(rng.choice([1, 14]))
                ids = rng.integers(0, expected[0][layer].shape[0], 3000)
                try:
                    rows, version = client.lookup_raw(layer, ids)
                except Exception as e:  # noqa: BLE001 - counted, and the test fails on it
                    failures.append(repr(e))
                    continue
                matches = [s for s in expected if np.array_equal(rows, expected[s][layer][ids])]
                if matches != [next(s for s, v in versions.items() if v == version)]:
                    mixed.append(version)
                seen.add(version)
        finally:
            client.close()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    def wait_for(version: int) -> None:
        for _ in range(1200):  # 60 s at most: readers that died fail the test, not hang it
            if version in seen or failures:
                return
            stop.wait(0.05)

    try:
        wait_for(versions[0])
        admin.swap("v41", versions[1])
        wait_for(versions[1])
        stop.wait(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures and not mixed and seen == {versions[0], versions[1]}
    client = admin.data_client("v41")
    try:
        weight, scale = ckpts[1][1][14]
        np.testing.assert_array_equal(client.lookup(14, np.arange(weight.shape[0])), torch_dequantized(weight, scale))
    finally:
        client.close()
        admin.close()


def test_a_float_model_decodes_from_its_fp8_table_as_from_the_dequantized_rows(service, capsys):
    """A model trained on float rows reads them from the FP8 table quantized from them: the worker dequantizes the
    records (prefetched, cached or not) and decodes exactly what it decodes from those values held in process."""
    import dataclasses

    from test_engine import mixed_requests, tiny_model

    from memory_service.local_table import LocalTable
    from model_worker.engine import DecodingEngine
    from model_worker.engram_rows import EngramRowFetcher
    from model_worker.model import EngramMoEModel
    from model_worker.row_cache import CachedTables, RowCache

    _, spec, compressor = tiny_model()
    spec = dataclasses.replace(spec, n_embed_per_ngram=spec.n_head_per_ngram * 64)  # head_dim 64: two scales a row
    model = EngramMoEModel(dataclasses.replace(tiny_model()[0].config, engram=spec))
    store, address = service
    admin = ServiceAdmin(address, token=TOKEN)
    admin.create_table("float-model", spec, compressor.lookup_table, init_std=1.0, init_seed=0)
    code, _, err = engram(capsys, "table", "quantize", "--address", address, "--token", TOKEN, "--table", "float-model",
                          "--into", "fp8-model", "--activate")
    assert code == 0, err
    hasher = NgramHasher.from_compressor(spec, compressor)
    served = MemoryClient(address, "fp8-model", token=TOKEN, spec=spec)  # the model's float spec: a serving copy of it
    source = MemoryClient(address, "float-model", token=TOKEN)
    local = LocalTable.for_hasher(hasher)
    for layer in spec.layer_ids:
        ids = np.arange(local.num_rows(layer))
        records, _ = served.lookup_raw(layer, ids)
        weight = torch.from_numpy(records[:, :64].copy()).view(torch.float8_e4m3fn).to(torch.float32)
        scale = torch.from_numpy(records[:, 64:].copy()).view(torch.float8_e8m0fnu).to(torch.float32)
        values = (weight * scale.repeat_interleave(32, dim=1)).numpy()  # torch's decode, not ours
        trained = source.lookup(layer, ids)
        assert np.all(np.abs(values - trained) <= np.abs(trained) / 16 + scale.repeat_interleave(32, dim=1).numpy() / 1024)
        local.table(layer)[:] = values  # the dequantized values, in process
    source.close()
    with pytest.raises(FailedPrecondition, match="for serving"):
        served.apply_gradients(spec.layer_ids[0], np.array([1, 2]), np.ones((2, 64), np.float32), lr=0.1)
    with pytest.raises(FailedPrecondition, match="SPEC_MISMATCH|fingerprint"):
        MemoryClient(address, "fp8-model", token=TOKEN, spec=dataclasses.replace(spec, seed=3))
    prompts, counts = mixed_requests(6, seed=4)
    expected = [c.tokens for c in DecodingEngine(model, EngramRowFetcher(local, compressor, hasher), max_batch=3)
                .generate(prompts, counts)]
    cached = CachedTables(served, RowCache(1 << 20, list(spec.layer_ids), served.row_width, served.dtype))
    for backend, prefetch in ((served, True), (served, False), (cached, True), (cached, False)):
        engine = DecodingEngine(model, EngramRowFetcher(backend, compressor, hasher), max_batch=3, prefetch=prefetch)
        assert [c.tokens for c in engine.generate(prompts, counts)] == expected
    assert cached.cache.stats()["hits"] > 0
    for layer in spec.layer_ids:  # the tokens do depend on the rows: without them the model says something else
        local.table(layer)[:] = 0
    zeroed = DecodingEngine(model, EngramRowFetcher(local, compressor, hasher), max_batch=3).generate(prompts, counts)
    assert [c.tokens for c in zeroed] != expected
    served.close()
    admin.close()
