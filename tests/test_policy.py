"""MemoryPolicy validation and the named policies (momjax.policy)."""

from __future__ import annotations

import pytest

import momjax
import momjax.cli
import momjax.convert
from momjax import MemoryPolicy

# ---------------------------------------------------------------------- memory policies


def test_named_policies():
    P = momjax.POLICIES
    assert set(P) == {"baseline", "mom", "mom-stream", "mom-host"}
    assert P["mom-host"].on_host and not any(P[n].on_host for n in ("baseline", "mom", "mom-stream"))
    assert P["baseline"].minisequence is None and not P["baseline"].last_position_only
    assert (P["baseline"].kv_prefill, P["baseline"].kv_decode) == ("device", "device")
    assert P["mom"].minisequence and P["mom"].last_position_only
    assert (P["mom"].kv_prefill, P["mom"].kv_decode) == ("pinned_host", "device")
    assert (P["mom-stream"].kv_prefill, P["mom-stream"].kv_decode) == ("pinned_host", "pinned_host")
    for name, policy in P.items():
        assert policy.name == name and momjax.get_policy(name) is policy
        hash(policy)
    custom = P["mom"].replace(minisequence=8)
    assert momjax.get_policy(custom) is custom and custom.kv_prefill == "pinned_host"


@pytest.mark.parametrize("kwargs, words", [
    ({"minisequence": 0}, "minisequence"),
    ({"minisequence": -4}, "minisequence"),
    ({"minisequence_scope": "attention"}, "minisequence_scope"),
    ({"kv_prefill": "gpu"}, "KV placement"),
    ({"kv_prefill": "pinned_host", "kv_decode": "unpinned_host"}, "KV placement"),
    ({"kv_prefill": "device", "kv_decode": "pinned_host"}, "kv_decode"),
    ({"q_block": 0}, "blocks"),
    ({"kv_block": -1}, "blocks"),
    ({"residual": "gpu"}, "residual"),
    ({"residual": "pinned_host"}, "minisequence"),  # mom-host runs whole layers in mini-sequences
])
def test_policy_validation(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MemoryPolicy(**kwargs)
    with pytest.raises(ValueError, match=words):
        momjax.POLICIES["baseline"].replace(**kwargs)


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="unknown policy") as e:
        momjax.get_policy("nope")
    assert all(name in str(e.value) for name in ("baseline", "mom", "mom-stream"))
