"""A user's reader process: looks the same rows up again and again until told to stop, logging what it got.

    python lookup_reader.py (--address HOST:PORT | --ray ADDRESS --pool NAME) --table T --layer L --out FILE --stop FILE

Each line of FILE is {"version": v, "digest": sha256 of the rows} or {"error": "..."}.
"""

import argparse
import hashlib
import json
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address")
    parser.add_argument("--ray")
    parser.add_argument("--pool", default="default")
    parser.add_argument("--table", required=True)
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stop", required=True)
    args = parser.parse_args()
    if args.ray:
        from orchestration.pool import MemoryPool
        from orchestration.ray_cluster import connect_ray

        connect_ray(args.ray)
        client = MemoryPool.attach(args.pool).client(args.table, retry_budget_s=120)
    else:
        from memory_service.client import MemoryClient

        client = MemoryClient(args.address, args.table, retry_budget_s=120)
    ids = np.arange(0, client.num_rows(args.layer), 7, dtype=np.int64)
    with open(args.out, "w") as out:
        while not os.path.exists(args.stop):
            try:
                rows, version = client.lookup_raw(args.layer, ids)
                line = {"version": version, "digest": hashlib.sha256(rows.tobytes()).hexdigest()}
            except Exception as e:  # noqa: BLE001 - every failure is reported to the test
                line = {"error": repr(e)}
            out.write(json.dumps(line) + "\n")
            out.flush()
            time.sleep(0.02)


if __name__ == "__main__":
    main()
