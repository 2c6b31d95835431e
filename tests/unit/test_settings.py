"""Settings: YAML overlaid by the environment, validated with errors that name the field."""

from pathlib import Path

import pytest

from policies.loader import ConfigError
from proxy.settings import load_settings


def test_defaults_without_file_or_environment() -> None:
    settings = load_settings(env={})
    assert settings.port == 8000 and settings.upstreams[0].url == "http://127.0.0.1:8001"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "capgate.yaml"
    config.write_text("port: 9000\nredis_url: redis://file:6379/0\ntimeouts:\n  read_s: 30\n")
    env = {
        "CAPGATE_REDIS_URL": "redis://env:6379/1",
        "CAPGATE_UPSTREAMS": "http://a:8000, http://b:8000",
        "CAPGATE_TIMEOUTS__CONNECT_S": "2.5",
        "CAPGATE_REDIS_CLUSTER": "true",
        "CAPGATE_VLLM_VENV": "/not/a/setting",
    }
    settings = load_settings(str(config), env)
    assert settings.port == 9000 and settings.redis_url == "redis://env:6379/1" and settings.redis_cluster
    assert [u.url for u in settings.upstreams] == ["http://a:8000", "http://b:8000"]
    assert (settings.timeouts.read_s, settings.timeouts.connect_s) == (30, 2.5)


@pytest.mark.parametrize(
    ("text", "env", "path", "line"),
    [
        ("port: 70000\n", {}, "port", 1),
        ("timeouts:\n  read_s: -1\n", {}, "timeouts.read_s", 2),
        ("upstreams:\n  - url: vllm:8000\n", {}, "upstreams[0].url", 2),
        ("prot: 1\n", {}, "prot", 1),
        ("", {"CAPGATE_ADMISSION__MAX_WAITING": "-3"}, "admission.max_waiting", None),
    ],
)
def test_bad_settings_name_the_field(
    tmp_path: Path, text: str, env: dict, path: str, line: int | None
) -> None:
    config = tmp_path / "capgate.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(str(config), env)
    assert [(p.path, p.line) for p in caught.value.problems] == [(path, line)]
