"""The GCP source against the GCP metadata simulator, over real HTTP, inside a real Watcher;
and the simulator's own protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from source_helpers import Sim as SimThread
from source_helpers import simulator_cli, until

from preemptwatch import Notice, Watcher
from preemptwatch.simulate.gcp import GCPSimulator, etag
from preemptwatch.sources import make_source
from preemptwatch.sources.gcp import URL_ENV, GCPSource

H = {"Metadata-Flavor": "Google"}
V1 = "/computeMetadata/v1/"

pytestmark = pytest.mark.usefixtures("no_crash")


class Sim(SimThread[GCPSimulator]):
    """The GCP simulator on its own thread."""

    def served(self, key: str) -> int:
        return int(self.call(lambda: self.sim.served[key]))


@pytest.fixture
def spot() -> Iterator[Sim]:
    sim = Sim(GCPSimulator())
    yield sim
    sim.thread.stop()


@pytest.fixture
def standard() -> Iterator[Sim]:
    sim = Sim(GCPSimulator(provisioning_model="STANDARD"))
    yield sim
    sim.thread.stop()


def source(sim: Sim, **kwargs: Any) -> GCPSource:
    options: dict[str, Any] = {"timeout_sec": 5, "interval": 0.05, "max_backoff": 0.2}
    options.update(kwargs)
    return GCPSource(sim.url, **options)


async def watching(w: Watcher, src: GCPSource) -> None:
    """Wait until the source has read both keys once and knows the VM's scheduling."""
    await until(lambda: len(src._values) == 2 and src.spot is not None)


# --------------------------------------------------------------- notices, end to end


async def test_spot_preemption_is_seen_at_once_with_a_30s_deadline(spot: Sim) -> None:
    src = source(spot)
    async with Watcher([src], mark=False) as w:
        await watching(w, src)
        assert not w.preempting
        started = time.monotonic()
        spot.call(spot.sim.schedule, "preempt")
        assert await w.wait_async(2)
        elapsed = time.monotonic() - started
    notice = w.notice
    assert notice is not None and notice.source == "gcp" and notice.kind == "preempt"
    assert notice.deadline is not None
    assert abs((notice.deadline - notice.detected_at).total_seconds() - 30) < 0.01
    assert elapsed < 0.2, f"the hanging GET took {elapsed:.3f}s to report the change"


async def test_standard_vm_gets_the_120s_of_a_standard_shutdown(standard: Sim) -> None:
    src = source(standard)
    async with Watcher([src], mark=False) as w:
        await watching(w, src)
        assert src.spot is False
        standard.call(standard.sim.schedule, "preempt", 0.05)
        assert await w.wait_async(2)
    assert w.notice is not None and w.notice.deadline is not None
    assert abs((w.notice.deadline - w.notice.detected_at).total_seconds() - 120) < 0.01


async def test_already_preempted_at_start_is_reported_from_the_first_plain_get(
    spot: Sim,
) -> None:
    spot.call(spot.sim.schedule, "preempt")
    async with Watcher([source(spot)], mark=False) as w:
        assert await w.wait_async(2)
    assert w.notice is not None and w.notice.kind == "preempt"


async def test_terminate_maintenance_counts_at_once_with_60s_deadline(spot: Sim) -> None:
    src = source(spot)
    async with Watcher([src], mark=False) as w:
        await watching(w, src)
        spot.call(spot.sim.schedule, "maintenance", 0.0, event="TERMINATE_ON_HOST_MAINTENANCE")
        assert await w.wait_async(2)
    notice = w.notice
    assert notice is not None and notice.kind == "maintenance"
    assert notice.raw == {"maintenance-event": "TERMINATE_ON_HOST_MAINTENANCE"}
    assert notice.deadline is not None
    assert abs((notice.deadline - notice.detected_at).total_seconds() - 60) < 0.01


async def test_live_migration_is_advisory_and_clears_when_back_to_none(spot: Sim) -> None:
    events: list[tuple[str, Any]] = []
    advisories: list[Notice] = []
    src = source(spot)
    async with Watcher([src], mark=False, on_advisory=advisories.append) as w:
        w.add_listener(lambda event, data: events.append((event, data)))
        await watching(w, src)
        spot.call(spot.sim.schedule, "maintenance", 0.0, event="MIGRATE_ON_HOST_MAINTENANCE")
        await until(lambda: len(w.notices) == 1)
        assert w.notices[0].kind == "migrate" and w.notices[0].advisory
        assert w.notices[0].deadline is None
        spot.call(spot.sim.clear, "maintenance")
        await until(lambda: any(e == "clear" for e, _ in events))
        # It comes back: news again, and still advisory.
        spot.call(spot.sim.schedule, "maintenance", 0.0, event="MIGRATE_ON_HOST_MAINTENANCE")
        await until(lambda: len(w.notices) == 2)
        assert not await w.wait_async(0.2)
    assert ("clear", ("gcp", w.notices[0].id)) in events
    assert len(advisories) == 2 and not w.preempting


async def test_source_follows_the_new_etag_instead_of_spinning(spot: Sim) -> None:
    src = source(spot, timeout_sec=1, interval=0.5)
    async with Watcher([src], mark=False) as w:
        await watching(w, src)
        spot.call(spot.sim.schedule, "maintenance", 0.0, event="MIGRATE_ON_HOST_MAINTENANCE")
        await until(lambda: len(w.notices) == 1)
        before = spot.served("instance/maintenance-event")
        await asyncio.sleep(2.2)
        after = spot.served("instance/maintenance-event")
    # Following the new ETag, each hanging GET lasts timeout_sec: about two in 2.2 s.
    assert 1 <= after - before <= 3, f"{after - before} requests in 2.2 s"
    assert w.health["gcp"].errors == 0


async def test_env_var_names_the_metadata_server(
    spot: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(URL_ENV, spot.url + "/")
    src = make_source("gcp", interval=0.05)
    assert isinstance(src, GCPSource) and src.url == spot.url
    spot.call(spot.sim.schedule, "preempt", 0.1)
    async with Watcher([src], mark=False) as w:
        assert await w.wait_async(3)


# ----------------------------------------------------------------------- failures


@pytest.mark.parametrize("status", [403, 404, 500, 503])
async def test_error_statuses_are_retried_without_a_notice(spot: Sim, status: int) -> None:
    src = source(spot, timeout_sec=1)
    async with Watcher([src], mark=False) as w:
        await watching(w, src)
        spot.call(spot.sim.fault, status, 3)  # met by the next hanging GETs
        await until(lambda: w.health["gcp"].errors >= 1)
        assert str(status) in (w.health["gcp"].last_error or "")
        assert not w.preempting and w.notices == []
        spot.call(spot.sim.schedule, "preempt", 0.0)
        assert await w.wait_async(5), "the source did not recover"


@pytest.mark.parametrize("mode", ["garbage", "no-header", "reset"])
async def test_bad_answers_are_errors_not_notices(spot: Sim, mode: str) -> None:
    src = source(spot)
    spot.call(spot.sim.fault, None, 8, mode)
    async with Watcher([src], mark=False) as w:
        await until(lambda: spot.call(spot.sim.state)["faults"] == [])
        assert w.health["gcp"].errors >= 1
        assert not w.preempting and w.notices == []
        await watching(w, src)
        spot.call(spot.sim.schedule, "preempt", 0.0)
        assert await w.wait_async(5)
    if mode == "no-header":
        assert "Metadata-Flavor" in (w.health["gcp"].last_error or "")


async def test_a_hanging_metadata_server_times_out_and_is_retried(spot: Sim) -> None:
    src = source(spot, timeout_sec=1, request_timeout=0.3)
    async with Watcher([src], mark=False) as w:
        await watching(w, src)
        spot.call(spot.sim.fault, None, 2, "timeout")  # met by the next hanging GETs
        await until(lambda: w.health["gcp"].errors >= 1, timeout=4)
        assert "no answer within 1.3s" in (w.health["gcp"].last_error or "")
        assert w.notices == []
        spot.call(spot.sim.schedule, "preempt", 0.0)
        assert await w.wait_async(5)


async def test_unknown_maintenance_value_is_ignored(spot: Sim) -> None:
    src = source(spot)
    async with Watcher([src], mark=False) as w:
        await watching(w, src)
        spot.call(spot.sim.set, "instance/maintenance-event", "SOMETHING_NEW")
        await until(lambda: src._values.get("instance/maintenance-event") == "SOMETHING_NEW")
        assert w.notices == [] and w.health["gcp"].errors == 0


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        GCPSource("http://127.0.0.1:1", timeout_sec=0)
    with pytest.raises(ValueError):
        GCPSource("http://127.0.0.1:1", interval=0)


# ------------------------------------------------------------------ detect, identity


async def test_detect_and_instance_id_against_the_simulator(
    spot: Sim, http: aiohttp.ClientSession
) -> None:
    assert await GCPSource.detect(http, url=spot.url)
    assert await GCPSource.fetch_instance_id(http, url=spot.url) == "4520031799277581759"


async def test_detect_is_false_and_quick_against_a_closed_port(
    http: aiohttp.ClientSession,
) -> None:
    with socket_closed() as url:
        started = time.monotonic()
        assert not await GCPSource.detect(http, url=url)
        assert await GCPSource.fetch_instance_id(http, url=url) is None
        assert time.monotonic() - started < 1.0


async def test_detect_is_false_for_a_server_without_the_flavor_header(
    spot: Sim, http: aiohttp.ClientSession
) -> None:
    spot.call(spot.sim.fault, None, 1, "no-header")
    assert not await GCPSource.detect(http, url=spot.url)


class socket_closed:
    """A loopback URL on which nothing listens."""

    def __enter__(self) -> str:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        pass


# ------------------------------------------------------------- the simulator itself


async def test_simulator_requires_and_echoes_the_flavor_header(
    spot: Sim, http: aiohttp.ClientSession
) -> None:
    url = spot.url + V1 + "instance/id"
    async with http.get(url) as resp:
        assert resp.status == 403 and resp.headers["Metadata-Flavor"] == "Google"
    async with http.get(url, headers={**H, "X-Forwarded-For": "10.0.0.1"}) as resp:
        assert resp.status == 403
    async with http.get(url, headers=H) as resp:
        assert resp.status == 200 and resp.headers["Metadata-Flavor"] == "Google"
        assert await resp.text() == "4520031799277581759"
    async with http.get(spot.url + V1 + "instance/nothing", headers=H) as resp:
        assert resp.status == 404
    async with http.get(spot.url + V1 + "instance/scheduling/provisioning-model", headers=H) as r:
        assert await r.text() == "SPOT"


async def test_simulator_hanging_get_etag_semantics(spot: Sim, http: aiohttp.ClientSession) -> None:
    url = spot.url + V1 + "instance/preempted"
    async with http.get(url, headers=H) as resp:
        first = resp.headers["ETag"]
        assert await resp.text() == "FALSE" and first == etag("FALSE")
    # Unchanged: the same value after timeout_sec.
    started = time.monotonic()
    params = {"wait_for_change": "true", "last_etag": first, "timeout_sec": "1"}
    async with http.get(url, headers=H, params=params) as resp:
        assert await resp.text() == "FALSE" and resp.headers["ETag"] == first
    assert 0.9 < time.monotonic() - started < 1.5
    # A change wakes the hanging GET at once.
    params["timeout_sec"] = "10"
    spot.call(spot.sim.schedule, "preempt", 0.3)
    started = time.monotonic()
    async with http.get(url, headers=H, params=params) as resp:
        assert await resp.text() == "TRUE"
        changed = resp.headers["ETag"]
    assert changed != first and 0.25 < time.monotonic() - started < 0.6
    # An old ETag returns at once with the new value.
    started = time.monotonic()
    async with http.get(url, headers=H, params=params) as resp:
        assert await resp.text() == "TRUE"
    assert time.monotonic() - started < 0.2
    params["timeout_sec"] = "zero"
    async with http.get(url, headers=H, params=params) as resp:
        assert resp.status == 400


async def test_simulator_control_api_and_faults_over_http(
    spot: Sim, http: aiohttp.ClientSession
) -> None:
    ctl = spot.url + "/_control/"
    async with http.post(ctl + "schedule", json={"kind": "maintenance", "after": 30}) as resp:
        assert resp.status == 200
        state = await resp.json()
        assert state["scheduled"][0]["kind"] == "maintenance"
    for bad in ({"kind": "terminate"}, {"kind": "preempt", "after": -1}, [1]):
        async with http.post(ctl + "schedule", json=bad) as resp:
            assert resp.status == 400 and "error" in await resp.json()
    async with http.post(ctl + "clear", json={}) as resp:
        assert (await resp.json())["scheduled"] == []
    async with http.post(ctl + "fault", json={"status": 503, "count": 2}) as resp:
        assert resp.status == 200
    async with http.post(ctl + "fault", json={"mode": "sideways"}) as resp:
        assert resp.status == 400
    url = spot.url + V1 + "instance/preempted"
    statuses = []
    for _ in range(3):
        async with http.get(url, headers=H) as resp:
            statuses.append(resp.status)
    assert statuses == [503, 503, 200]
    async with http.post(ctl + "schedule", json={"kind": "preempt"}) as resp:
        assert (await resp.json())["preempted"] == "TRUE"
    async with http.get(ctl + "state") as resp:
        state = await resp.json()
    assert state["requests"] == 3 and state["served"] == {"instance/preempted": 3}
    assert spot.sim.requests == 3


def test_simulate_gcp_cli_serves_a_scheduled_preemption() -> None:
    args = ("--notice-after", "0.5", "--provisioning-model", "STANDARD")
    with simulator_cli("gcp", *args) as root:
        base = root + V1

        async def check() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                async with http.get(
                    base + "instance/scheduling/provisioning-model", headers=H
                ) as r:
                    assert await r.text() == "STANDARD"
                params = {"wait_for_change": "true", "last_etag": etag("FALSE"), "timeout_sec": "5"}
                async with http.get(base + "instance/preempted", headers=H, params=params) as r:
                    assert r.status == 200 and await r.text() == "TRUE"

        asyncio.run(check())
