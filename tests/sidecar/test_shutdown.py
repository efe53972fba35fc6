"""SIGTERM: stop accepting, refuse the queued with 503, let in-flight streams finish, exit 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.sidecar.conftest import (
    HEADWAY,
    Process,
    content_chunks,
    content_of,
    document,
    read_events,
    start_stack,
    wait_load,
    write_json,
)

# Each answer takes about 2 s: 40 tokens of 50 ms.
SIM_FLAGS = ("--ttft", "50ms", "--tpot", "50ms", "--output-tokens", "40")
AUTH = {"authorization": "Bearer sk-team-a"}


def _two_slots(data: dict[str, Any]) -> None:
    data["capacity"]["maxConcurrency"] = 2


def _chat(stream: bool) -> dict[str, Any]:
    return {"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


async def test_sigterm_refuses_the_queued_and_drains_the_inflight(
    processes: list[Process], tmp_path: Path
) -> None:
    stack = await start_stack(processes, tmp_path, *SIM_FLAGS, edit=_two_slots)
    url = f"{stack.url}/v1/chat/completions"

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def stream() -> tuple[int, list[Any]]:
            async with http.post(url, json=_chat(True), headers=AUTH) as r:
                return r.status, await read_events(r)

        async def queued(stream: bool) -> tuple[int, CIMultiDict[str], Any]:
            async with http.post(url, json=_chat(stream), headers=AUTH) as r:
                return r.status, CIMultiDict(r.headers), await r.json()

        inflight = [asyncio.create_task(stream()) for _ in range(2)]
        await wait_load(http, stack.admin_url, lambda load: load["inflight"]["realtime"] == 2)
        waiting = [asyncio.create_task(queued(stream=i % 2 == 0)) for i in range(3)]
        await wait_load(http, stack.admin_url, lambda load: load["queueDepth"]["realtime"] == 3)

        stack.sidecar.process.send_signal(signal.SIGTERM)

        for status, headers, body in await asyncio.gather(*waiting):
            assert status == 503
            assert int(headers["retry-after"]) >= 1
            assert body["error"]["code"] == "shutting_down"

        # No new connection is accepted while the in-flight streams drain.
        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(aiohttp.ClientConnectionError):
                async with fresh.post(url, json=_chat(False), headers=AUTH) as r:
                    await r.read()

        for status, events in await asyncio.gather(*inflight):
            assert status == 200
            assert events[-1] == "[DONE]"
            assert not any(isinstance(e, dict) and "error" in e for e in events)
            assert content_of(events).endswith("dog.") and content_chunks(events) == 40

    assert await asyncio.wait_for(stack.sidecar.process.wait(), 30) == 0
    log = "".join(stack.sidecar.log)
    assert "Traceback" not in log


async def test_sidecar_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    data = document(8000)
    data["capacity"]["batchMaxShare"] = 2
    config = write_json(tmp_path / "config.json", data)
    process = await asyncio.create_subprocess_exec(
        str(HEADWAY),
        "sidecar",
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 2
    log = stderr.decode()
    assert "capacity.batchMaxShare" in log and "Traceback" not in log
