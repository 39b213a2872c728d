"""One process of tests/test_distributed.py: joins a 2-process run through momjax.distributed_init (2 CPU devices
each, collectives over gloo), loads the checkpoint split over all 4 devices and prints its greedy tokens for
every policy as one JSON line.

    python distributed_worker.py CHECKPOINT COORDINATOR_PORT PROCESS_ID PROMPT_JSON
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import momjax  # noqa: E402  (after XLA_FLAGS: JAX reads it when its CPU backend starts)


def main():
    folder, port, pid, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    momjax.distributed_init(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax

    model = momjax.load(folder, dtype="float32", progress=False, mesh=momjax.make_mesh(tp=4))
    local = [s.device.id for s in model.params.layers[0].wq.addressable_shards]
    out = {p: momjax.generate(model, [prompt], 8, policy=p, stop_tokens=[]).as_lists()[0]
           for p in ("baseline", "mom", "mom-stream")}
    print("RESULT " + json.dumps(dict(processes=jax.process_count(), devices=len(jax.devices()), local=local,
                                      tokens=out)), flush=True)


if __name__ == "__main__":
    main()
