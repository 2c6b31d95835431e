"""The harness starts real servers that answer: Redis, a Redis Cluster and vLLM."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.harness import RedisCluster, RedisServer, VllmServer, sample_sum

pytestmark = pytest.mark.integration


def test_redis_server_answers(redis_server: RedisServer) -> None:
    client = redis_server.client()
    try:
        assert client.ping()
        client.set("harness:smoke", "ok")
        assert client.get("harness:smoke") == b"ok"
    finally:
        client.close()


def test_redis_cluster_serves_hash_tagged_keys(redis_cluster: RedisCluster) -> None:
    for node in redis_cluster.nodes:
        node_client = node.client()
        try:
            assert node_client.cluster("INFO")["cluster_state"] == "ok"
        finally:
            node_client.close()
    client = redis_cluster.client()
    try:
        client.set("{user:1}:spent", "42")
        assert client.get("{user:1}:spent") == b"42"
    finally:
        client.close()


def test_vllm_chat_completion_reports_usage(vllm_server: VllmServer) -> None:
    response = httpx.post(
        f"{vllm_server.base_url}/v1/chat/completions",
        json={
            "model": vllm_server.model_name,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8


def test_vllm_stream_carries_cumulative_usage(vllm_server: VllmServer) -> None:
    generated_before = sample_sum(vllm_server.metrics(), "vllm:generation_tokens_total")
    request = {
        "model": vllm_server.model_name,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 300,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "priority": 1,
    }
    with httpx.stream(
        "POST", f"{vllm_server.base_url}/v1/chat/completions", json=request, timeout=120
    ) as response:
        assert response.status_code == 200
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line]

    assert data[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in data[:-1]]
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts)
    final = chunks[-1]
    assert final["choices"] == []
    assert final["usage"]["completion_tokens"] == 300
    generated = sample_sum(vllm_server.metrics(), "vllm:generation_tokens_total")
    assert generated - generated_before == 300
