"""Two processes on this machine, each with 2 CPU devices, joined by momjax.distributed_init (jax.distributed, CPU
collectives over gloo): a model split tensor-parallel over the 4 devices gives the greedy tokens of one process
on one device, for every policy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import random_tokens

import momjax

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_tokens_of_one(zoo):
    folder = zoo.folder("llama31-mha")  # 4 KV heads: split over the 4 devices of the two processes
    one = zoo.model("llama31-mha")
    prompt = random_tokens(one.config.vocab_size, (30,), 5).tolist()
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = lambda pid: [sys.executable, os.path.join(HERE, "distributed_worker.py"), folder, port, str(pid),
                       json.dumps(prompt)]
    procs = [subprocess.Popen(cmd(pid), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for pid in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 4
    # Each process placed the pieces of its own 2 devices, and together they cover the 4.
    assert len(results[0]["local"]) == len(results[1]["local"]) == 2
    assert len(set(results[0]["local"]) | set(results[1]["local"])) == 4
    for policy in ("baseline", "mom", "mom-stream"):
        expected = momjax.generate(one, [prompt], 8, policy=policy, stop_tokens=[]).as_lists()[0]
        assert results[0]["tokens"][policy] == results[1]["tokens"][policy] == expected, policy


def test_distributed_init_refuses_bad_arguments():
    with pytest.raises(momjax.InputError, match="coordinator must be 'HOST:PORT'"):
        momjax.distributed_init("localhost", 2, 0)
    with pytest.raises(momjax.InputError, match="process_id 2 is out of range for 2 processes"):
        momjax.distributed_init("127.0.0.1:1234", 2, 2)
    with pytest.raises(momjax.InputError, match="num_processes must be an integer >= 1"):
        momjax.distributed_init("127.0.0.1:1234", 0, 0)
