"""Case 39 (a): a watch that silently stops delivering is noticed within the watch timeouts.

A TCP proxy between the operator and the API server stops forwarding without
closing anything (no RST, no FIN), the way a dead NAT entry or a frozen load
balancer behaves. A change made meanwhile must reach the config once the path
works again, within the server and client watch timeouts, well before kopf's
own 70 s inactivity fallback.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fixtures.kube import ControlPlane, Scratch
from tests.operator import operating
from tests.operator.operating import poll
from tests.operator.test_operator_cases import _pool, _quota, _route, _tenants

pytestmark = pytest.mark.cluster

SERVER_TIMEOUT = 5
CLIENT_TIMEOUT = 8


class BlackHoleProxy:
    """Forwards TCP to ``target`` until :meth:`black_hole`; then drops every byte silently.

    Connections opened before :meth:`restore` stay dead after it, as a lost
    NAT entry would leave them; only new connections work again.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.epoch = 0
        self.holing = False
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pipe, args=(src, dst, self.epoch), daemon=True
                ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, epoch: int) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.holing or epoch != self.epoch:
                    continue  # swallowed: the peer sees a live but silent connection
                dst.sendall(data)

    def black_hole(self) -> None:
        self.holing = True
        self.epoch += 1

    def restore(self) -> None:
        self.holing = False
        self.epoch += 1

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_case39_a_dead_watch_is_noticed_within_the_timeouts(
    cluster: ControlPlane, scratch_namespace: Scratch, tmp_path: Path
) -> None:
    operating.install_crds(cluster)
    namespace = scratch_namespace("watch")
    token = operating.operator_token(cluster)
    address = urlsplit(cluster.url)
    proxy = BlackHoleProxy((str(address.hostname), int(address.port or 443)))
    operator = operating.Operator(
        cluster, namespace, token, tmp_path, url=f"https://127.0.0.1:{proxy.port}"
    )
    operator.start(
        f"--watch-server-timeout={SERVER_TIMEOUT}s",
        f"--watch-client-timeout={CLIENT_TIMEOUT}s",
        "--api-timeout=5s",
    )
    try:
        cluster.apply([_pool(namespace), _route(namespace), _quota(namespace, "a")])
        poll(lambda: "a" in _tenants(cluster, namespace), "a served", 120, operator)

        proxy.black_hole()
        time.sleep(SERVER_TIMEOUT + CLIENT_TIMEOUT + 2)
        cluster.apply(_quota(namespace, "b"))  # straight to the API server
        time.sleep(2)
        assert "b" not in _tenants(cluster, namespace)  # the operator is cut off
        proxy.restore()
        restored = time.monotonic()

        poll(lambda: "b" in _tenants(cluster, namespace), "b served", 120, operator)
        took = time.monotonic() - restored
        print(f"change applied {took:.1f} s after the path came back")
        # Within the two timeouts (plus a generous margin for a loaded machine),
        # and so not merely by kopf's 70 s inactivity fallback.
        assert took < SERVER_TIMEOUT + CLIENT_TIMEOUT + 30
    finally:
        operator.stop()
        proxy.close()
