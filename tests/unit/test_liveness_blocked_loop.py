"""Liveness on a real event loop: blocking the loop turns /livez unhealthy, and it recovers after."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

from consumer.health import HEARTBEAT_INTERVAL_S, LIVENESS_PATH, HealthState, heartbeat, serve


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_blocked_event_loop_fails_liveness_and_recovers() -> None:
    stall_after = HEARTBEAT_INTERVAL_S * 1.5
    state = HealthState(stall_after_s=stall_after)
    server = serve(state, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}{LIVENESS_PATH}"
    beat = asyncio.create_task(heartbeat(state))
    try:
        await asyncio.sleep(0.1)
        assert await asyncio.to_thread(status, url) == 200
        seen: list[int] = []
        prober = threading.Thread(target=lambda: (time.sleep(stall_after + 1.0), seen.append(status(url))))
        prober.start()
        time.sleep(stall_after + 2.0)  # noqa: ASYNC251 - blocking the loop is the point of this test
        prober.join()
        assert seen == [503]
        await asyncio.sleep(HEARTBEAT_INTERVAL_S * 0.5)
        assert await asyncio.to_thread(status, url) == 200
    finally:
        beat.cancel()
        server.shutdown()
