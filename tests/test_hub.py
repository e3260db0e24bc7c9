import os
import socket

from ftprof.hub import configure_offline_mode, hub_reachable


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once the socket is


def test_unreachable_endpoint_switches_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert not hub_reachable(timeout=1)
    assert configure_offline_mode(timeout=1) is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_reachable_endpoint_stays_online(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert configure_offline_mode(timeout=1) is False
        assert "HF_HUB_OFFLINE" not in os.environ
