"""`engram table create --from-config`, `import --checkpoint`, `export --checkpoint`, `quantize`: FP8 tables in
DeepSeek-V4.1's layout, on one service or a pool (through a TableAdmin, like every table command)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from tqdm import tqdm

from memory_service.admin.table_admin import TableAdmin
from memory_service.errors import InvalidArgument, NotFound
from memory_service.row_dtypes import FP8_BLOCK_SCALED, is_trainable
from memory_service.table_io import RowSource


def config_path(path: str) -> Path:
    """config.json itself, or the checkpoint directory holding it."""
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def spec_for_config(args):
    """(spec, compressor or None) of `table create --from-config`: rows counted and checked against the config, the
    tokenizer's compressed vocabulary checked against engram_compressed_vocab_size."""
    from memory_service.compression import CompressedTokenizer
    from memory_service.v4_config import check_compressed_vocab, load_config, spec_from_config

    config = load_config(config_path(args.from_config))
    spec = spec_from_config(config, seed=args.seed, dtype=args.dtype or FP8_BLOCK_SCALED)
    compressor = None
    if args.compression_map:
        compressor = CompressedTokenizer.load(args.compression_map)
    elif args.tokenizer:
        compressor = CompressedTokenizer.from_tokenizer_file(args.tokenizer)
    if compressor is not None:
        check_compressed_vocab(config, len(compressor))
        spec = spec.with_compression(compressor.lookup_table, len(compressor))
    elif "engram_compressed_vocab_size" in config:
        # no map to hash token ids with here (Lookup by row id works; LookupTokens needs --tokenizer)
        spec = dataclasses.replace(spec, compressed_vocab_size=int(config["engram_compressed_vocab_size"]))
    return spec, compressor


def import_checkpoint(admin: TableAdmin, args) -> int:
    """Every Engram layer of a V4.1-layout checkpoint into one new version (or --version), swapped in with --activate."""
    from memory_service.v4_checkpoint import EngramCheckpoint

    checkpoint = EngramCheckpoint(args.checkpoint, args.weight_pattern, args.scale_pattern)
    info = admin.info(args.table)
    if is_trainable(info.spec.dtype):
        raise InvalidArgument(f"table {args.table!r} stores {info.spec.dtype} rows; a checkpoint's FP8 tables import "
                              f"into an {FP8_BLOCK_SCALED} table (engram table create --from-config)")
    extra = sorted(set(checkpoint.layers()) - set(info.layer_rows))
    if extra:
        raise InvalidArgument(f"the checkpoint has Engram layers {extra} that table {args.table!r} lacks (its layers "
                              f"are {sorted(info.layer_rows)}): create the table from the checkpoint's config")
    sources = {layer: checkpoint.layer(layer) for layer in sorted(info.layer_rows)}
    for layer, source in sources.items():
        if source.shape != (info.layer_rows[layer], info.row_width):
            raise InvalidArgument(f"layer {layer} of the checkpoint is {source.shape[0]:,} records of {source.shape[1]} "
                                  f"bytes; table {args.table!r} has {info.layer_rows[layer]:,} rows of {info.row_width}")
    total = sum(s.shape[0] * s.shape[1] for s in sources.values())
    version = args.version or admin.create_version(args.table)  # empty: every layer is written below
    started = time.perf_counter()
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="import", dynamic_ncols=True,
                  disable=args.no_progress or None) as bar:
            for layer, source in sources.items():
                admin.import_rows(args.table, layer, source, version=version,
                                  progress=lambda n, w=source.shape[1]: bar.update(n * w))
    except BaseException:
        if not args.version:
            admin.drop_version(args.table, version)  # no half-imported version stays behind
        raise
    seconds = time.perf_counter() - started
    if args.activate:
        admin.swap(args.table, version)
    result = {"table": args.table, "version": version, "active": bool(args.activate), "layers": sorted(sources),
              "bytes": total, "seconds": round(seconds, 3), "mb_per_s": round(total / 1e6 / seconds, 1)}
    print(json.dumps(result) if args.json else
          f"imported layers {sorted(sources)} of {args.checkpoint} ({total / 2**20:,.0f} MiB) into {args.table!r} "
          f"version {version} in {seconds:.1f} s ({total / 1e6 / seconds:,.0f} MB/s)" + (" (now active)" if args.activate else ""))
    return 0


def export_checkpoint(admin: TableAdmin, args) -> int:
    """An FP8 table's layers written back in V4.1's layout (one shard per layer and the index)."""
    from memory_service.v4_checkpoint import export_layers

    info = admin.info(args.table)
    if is_trainable(info.spec.dtype):
        raise InvalidArgument(f"table {args.table!r} stores {info.spec.dtype} rows: export it with --out (.npy or "
                              f".safetensors), or quantize it first (engram table quantize)")
    version = args.version or info.active_version  # pinned: a swap meanwhile does not mix versions into the files
    client = admin.data_client(args.table, version)
    try:
        layers = [args.layer] if args.layer is not None else sorted(info.layer_rows)
        readers = {layer: (info.layer_rows[layer], lambda a, b, layer=layer: client.read_layer(layer, start=a, stop=b))
                   for layer in layers}
        paths = export_layers(args.checkpoint, readers, info.head_dim, args.weight_pattern, args.scale_pattern)
    finally:
        client.close()
    print(f"exported layers {layers} of {args.table!r} version {version} to {', '.join(str(p) for p in paths)}")
    return 0


def quantize_table(admin: TableAdmin, args) -> int:
    """A float table's rows (--version, default the active one) quantized into a new version of an FP8 table (created
    with the same hashing if absent); prints the error the quantization introduced."""
    from memory_service.fp8_rows import QuantizationError

    source = admin.info(args.table)
    if not is_trainable(source.spec.dtype):
        raise InvalidArgument(f"table {args.table!r} is already {source.spec.dtype}")
    try:
        target = admin.info(args.into)
    except NotFound:  # the same hashing, FP8 rows; a compression map (for token lookups) when one is given
        compression = None
        if args.compression_map or args.tokenizer:
            from memory_service.compression import CompressedTokenizer
            from memory_service.spec import compression_digest

            compressor = (CompressedTokenizer.load(args.compression_map) if args.compression_map
                          else CompressedTokenizer.from_tokenizer_file(args.tokenizer))
            compression = compressor.lookup_table
            if source.spec.compression_digest and compression_digest(compression) != source.spec.compression_digest:
                raise InvalidArgument(f"that compression map is not the one {args.table!r} was hashed with") from None
        target = admin.create_table(args.into, dataclasses.replace(source.spec, dtype=FP8_BLOCK_SCALED), compression,
                                    init_std=0.0)
    if is_trainable(target.spec.dtype) or target.spec.hashing() != source.spec.hashing():
        raise InvalidArgument(f"table {args.into!r} ({target.spec.dtype}, fingerprint {target.fingerprint}) does not "
                              f"hash like {args.table!r}, or is not {FP8_BLOCK_SCALED}: its rows would not be "
                              "where lookups look")
    error = QuantizationError()
    client = admin.data_client(args.table, args.version or source.active_version)  # pinned: one version throughout
    version = admin.create_version(args.into)
    try:
        for layer, rows in sorted(source.layer_rows.items()):
            reader = RowSource((rows, source.head_dim), client.dtype,  # the layer, a block of rows at a time
                               lambda a, b, layer=layer: client.read_layer(layer, start=a, stop=b))
            admin.import_rows(args.into, layer, reader, version=version, quantization=error)
    except BaseException:
        admin.drop_version(args.into, version)
        raise
    finally:
        client.close()
    if args.activate:
        admin.swap(args.into, version)
    report = {"table": args.into, "version": version, "source": args.table, "active": bool(args.activate), **error.report()}
    print(json.dumps(report) if args.json else
          f"quantized {args.table!r} into {args.into!r} version {version}: {report['values']:,} values, max abs error "
          f"{report['max_abs_error']:.4g}, RMS error {report['rms_error']:.4g} ({100 * report['relative_rms_error']:.2f}% "
          "of the RMS value)" + (" (now active)" if args.activate else ""))
    return 0

