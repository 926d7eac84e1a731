"""The Azure source against the Scheduled Events simulator, over real HTTP, inside a real
Watcher; and the simulator's own protocol."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from source_helpers import Sim as SimThread
from source_helpers import simulator_cli, until

from preemptwatch import Notice, Watcher
from preemptwatch.notice import utcnow
from preemptwatch.simulate.azure import AzureSimulator
from preemptwatch.sources import make_source
from preemptwatch.sources.azure import URL_ENV, AzureSource, parse_not_before

H = {"Metadata": "true"}
EVENTS = "/metadata/scheduledevents"
API = {"api-version": "2020-07-01"}
OTHER_VM = "preemptwatch-sim_1"

pytestmark = pytest.mark.usefixtures("no_crash")


class Sim(SimThread[AzureSimulator]):
    """The Azure simulator on its own thread."""

    def events(self) -> list[dict[str, Any]]:
        return list(self.call(self.sim.document)["Events"])


@pytest.fixture
def azure() -> Iterator[Sim]:
    sim = Sim(AzureSimulator())
    yield sim
    sim.thread.stop()


def source(sim: Sim, **kwargs: Any) -> AzureSource:
    options: dict[str, Any] = {"interval": 0.05, "max_backoff": 0.2, "request_timeout": 1.0}
    options.update(kwargs)
    return AzureSource(sim.url, **options)


async def polled(w: Watcher, times: int = 2) -> None:
    """Wait until the source has polled ``times`` more times successfully."""
    start = w.health["azure"].polls
    await until(lambda: w.health["azure"].polls >= start + times)


# --------------------------------------------------------------- notices, end to end


async def test_preempt_event_is_a_preempt_notice_due_at_not_before(azure: Sim) -> None:
    src = source(azure)
    async with Watcher([src], mark=False) as w:
        await polled(w)
        azure.call(azure.sim.schedule, "preempt")
        assert await w.wait_async(2)
    [event] = azure.events()
    notice = w.notice
    assert notice is not None and notice.source == "azure" and notice.kind == "preempt"
    assert notice.id == event["EventId"] and notice.raw["EventType"] == "Preempt"
    assert notice.deadline is not None
    assert notice.deadline == parse_not_before(event["NotBefore"])
    assert timedelta(seconds=28) < notice.deadline - utcnow() <= timedelta(seconds=30)


async def test_preempt_with_empty_not_before_gets_30_seconds(azure: Sim) -> None:
    azure.call(azure.sim.schedule, "preempt", 0.0, not_before="")
    async with Watcher([source(azure)], mark=False) as w:
        assert await w.wait_async(2)
    assert w.notice is not None and w.notice.deadline is not None
    assert (w.notice.deadline - w.notice.detected_at) == timedelta(seconds=30)


@pytest.mark.parametrize("event_type", ["Freeze", "Reboot", "Redeploy", "Terminate"])
async def test_platform_events_are_maintenance_counted_by_the_watcher_policy(
    azure: Sim, event_type: str
) -> None:
    async with Watcher([source(azure)], mark=False) as w:
        await polled(w)
        # Fifteen minutes ahead: advisory under the default 10-minute lead.
        azure.call(azure.sim.schedule, "maintenance", 0.0, event_type=event_type, not_before=900)
        await until(lambda: len(w.notices) == 1)
        notice = w.notices[0]
        assert notice.kind == "maintenance" and notice.raw["EventType"] == event_type
        assert notice.deadline == parse_not_before(azure.events()[0]["NotBefore"])
        assert not await w.wait_async(0.2)
        # One due in a minute counts at once.
        azure.call(azure.sim.schedule, "maintenance", 0.0, event_type=event_type, not_before=60)
        assert await w.wait_async(2)
    assert w.notice is not None and w.notice.id != notice.id


async def test_events_for_another_vm_of_the_scale_set_are_ignored(azure: Sim) -> None:
    src = source(azure)
    async with Watcher([src], mark=False) as w:
        await polled(w)
        azure.call(azure.sim.schedule, "preempt", 0.0, resources=[OTHER_VM])
        await polled(w, 3)
        assert src.vm_name == "preemptwatch-sim_0"
        assert w.notices == [] and not w.preempting
        azure.call(azure.sim.schedule, "preempt", 0.0, resources=[OTHER_VM, "PreemptWatch-Sim_0"])
        assert await w.wait_async(2)
    assert w.notice is not None and w.notice.raw["Resources"] == [OTHER_VM, "PreemptWatch-Sim_0"]


async def test_a_cancelled_event_clears(azure: Sim) -> None:
    cleared: list[Any] = []
    async with Watcher([source(azure)], mark=False) as w:
        w.add_listener(lambda event, data: cleared.append(data) if event == "clear" else None)
        azure.call(azure.sim.schedule, "maintenance", 0.0, event_type="Reboot")
        await until(lambda: len(w.notices) == 1)
        event_id = w.notices[0].id
        azure.call(azure.sim.clear, "maintenance")
        await until(lambda: cleared == [("azure", event_id)])
        assert not w.preempting


async def test_acknowledge_after_delivery_starts_the_event(azure: Sim) -> None:
    # What the simulator had been told when each notice reached the watcher.
    acked_at_delivery: list[list[str]] = []

    def on_event(event: str, data: Any) -> None:
        if event == "notice":
            acked_at_delivery.append(list(azure.sim.acknowledged))

    async with Watcher([source(azure, ack=True)], mark=False) as w:
        w.add_listener(on_event)
        azure.call(azure.sim.schedule, "maintenance", 0.0, event_type="Freeze")
        await until(lambda: azure.call(lambda: list(azure.sim.acknowledged)) != [])
        await polled(w, 3)
    [event] = azure.events()
    assert azure.call(lambda: azure.sim.acknowledged) == [event["EventId"]]
    assert event["EventStatus"] == "Started" and acked_at_delivery == [[]]


async def test_without_ack_nothing_is_acknowledged(azure: Sim) -> None:
    async with Watcher([source(azure)], mark=False) as w:
        azure.call(azure.sim.schedule, "maintenance", 0.0, event_type="Freeze")
        await until(lambda: len(w.notices) == 1)
        await polled(w, 3)
    assert azure.call(lambda: azure.sim.acknowledged) == []
    assert azure.events()[0]["EventStatus"] == "Scheduled"


async def test_unchanged_documents_are_not_parsed_again(
    azure: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = source(azure)
    parsed: list[int] = []
    original = src._parse

    def counting(events: list[Any], name: str) -> dict[str, Notice]:
        parsed.append(1)
        return original(events, name)

    monkeypatch.setattr(src, "_parse", counting)
    async with Watcher([src], mark=False) as w:
        await polled(w, 5)
        assert len(parsed) == 1
        azure.call(azure.sim.schedule, "maintenance", 0.0)
        await until(lambda: len(w.notices) == 1)
        await polled(w, 5)
    assert len(parsed) == 2


async def test_vm_name_is_read_once_and_retried_on_failure(azure: Sim) -> None:
    azure.call(azure.sim.fault, 500, 2)
    async with Watcher([source(azure)], mark=False) as w:
        await polled(w, 5)
        assert w.health["azure"].errors >= 1 and "VM's name" in str(w.health["azure"].last_error)
    served = azure.call(lambda: dict(azure.sim.served))
    assert served["/metadata/instance/compute/name"] == 3  # two failures, one answer


async def test_slow_first_call_gets_a_generous_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = Sim(AzureSimulator(first_call_delay=1.0))
    try:
        monkeypatch.setenv(URL_ENV, slow.url)
        src = make_source("azure", interval=0.05, request_timeout=0.3, first_timeout=5)
        assert isinstance(src, AzureSource) and src.url == slow.url
        async with Watcher([src], mark=False) as w:
            await until(lambda: w.health["azure"].polls >= 1, timeout=4)
            assert w.health["azure"].errors == 0
            slow.call(slow.sim.schedule, "preempt")
            assert await w.wait_async(2)
    finally:
        slow.thread.stop()


# ----------------------------------------------------------------------- failures


@pytest.mark.parametrize("status", [400, 403, 404, 500, 503])
async def test_error_statuses_are_retried_without_a_notice(azure: Sim, status: int) -> None:
    async with Watcher([source(azure)], mark=False) as w:
        await polled(w)
        azure.call(azure.sim.fault, status, 3)
        azure.call(azure.sim.schedule, "preempt", 0.0, resources=[OTHER_VM])
        await until(lambda: w.health["azure"].errors >= 1)
        assert f"HTTP {status}" in (w.health["azure"].last_error or "")
        assert w.notices == []
        azure.call(azure.sim.schedule, "preempt", 0.0)
        assert await w.wait_async(5)


@pytest.mark.parametrize("mode", ["garbage", "reset", "timeout"])
async def test_bad_answers_are_errors_not_notices(azure: Sim, mode: str) -> None:
    azure.call(azure.sim.schedule, "maintenance", 0.0, event_type="Freeze")
    async with Watcher([source(azure, first_timeout=0.5, request_timeout=0.3)], mark=False) as w:
        await until(lambda: len(w.notices) == 1)
        azure.call(azure.sim.fault, None, 6, mode)
        azure.call(azure.sim.clear)  # a bad answer must not clear the notice either
        await until(lambda: azure.call(azure.sim.state)["faults"] == [], timeout=8)
        assert w.health["azure"].errors >= 1
        azure.call(azure.sim.schedule, "preempt", 0.0)
        assert await w.wait_async(5)
    assert [n.kind for n in w.notices] == ["maintenance", "preempt"]


async def test_malformed_events_are_skipped_and_the_rest_reported(azure: Sim) -> None:
    src = source(azure, vm_name="vm0")
    good = {"EventId": "E1", "EventType": "Preempt", "Resources": ["vm0"], "NotBefore": ""}
    events: list[Any] = [
        "junk",
        {"EventType": "Preempt", "Resources": ["vm0"]},
        {"EventId": "E2", "EventType": "Reboot", "Resources": "vm0"},
        {**good, "EventId": "E3", "NotBefore": "not a date", "EventType": "Freeze"},
        good,
    ]
    notices = src._parse(events, "vm0")
    assert sorted(notices) == ["E1", "E3"]
    assert notices["E3"].deadline is None and notices["E1"].kind == "preempt"


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        AzureSource("http://127.0.0.1:1", interval=0)
    with pytest.raises(ValueError):
        AzureSource("http://127.0.0.1:1", first_timeout=0)


# ------------------------------------------------------------------ detect, identity


async def test_detect_and_instance_id_against_the_simulator(
    azure: Sim, http: aiohttp.ClientSession
) -> None:
    assert await AzureSource.detect(http, url=azure.url)
    assert await AzureSource.fetch_instance_id(http, url=azure.url) == azure.sim.vm_id


async def test_detect_is_false_and_quick_against_a_closed_port(
    http: aiohttp.ClientSession,
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    assert not await AzureSource.detect(http, url=url)
    assert await AzureSource.fetch_instance_id(http, url=url) is None
    assert time.monotonic() - started < 1.0


# ------------------------------------------------------------- the simulator itself


async def test_simulator_requires_metadata_header_and_api_version(
    azure: Sim, http: aiohttp.ClientSession
) -> None:
    url = azure.url + EVENTS
    async with http.get(url, params=API) as resp:
        assert resp.status == 400 and "metadata header" in (await resp.json())["error"]
    async with http.get(url, headers=H) as resp:
        assert resp.status == 400 and "api-version" in (await resp.json())["error"]
    async with http.get(url, headers=H, params={"api-version": "1999-01-01"}) as resp:
        assert resp.status == 400
    async with http.get(url, headers={**H, "X-Forwarded-For": "1.2.3.4"}, params=API) as resp:
        assert resp.status == 403
    async with http.get(url, headers=H, params=API) as resp:
        assert resp.status == 200 and await resp.json() == {"DocumentIncarnation": 1, "Events": []}
    name = azure.url + "/metadata/instance/compute/name"
    async with http.get(name, headers=H, params={"api-version": "2021-02-01"}) as resp:
        assert resp.status == 400  # a leaf needs format=text
    async with http.get(
        name, headers=H, params={"api-version": "2021-02-01", "format": "text"}
    ) as r:
        assert await r.text() == "preemptwatch-sim_0"


async def test_simulator_incarnation_start_and_acknowledge(
    azure: Sim, http: aiohttp.ClientSession
) -> None:
    url = azure.url + EVENTS

    async def document() -> dict[str, Any]:
        async with http.get(url, headers=H, params=API) as resp:
            return dict(await resp.json())

    azure.call(azure.sim.schedule, "maintenance", 0.0, event_type="Redeploy", event_id="ev-1")
    azure.call(azure.sim.schedule, "preempt", 0.0, not_before=3, event_id="ev-2")
    doc = await document()  # NotBefore has whole seconds: at least 2 s ahead now
    assert doc["DocumentIncarnation"] == 3
    by_id = {e["EventId"]: e for e in doc["Events"]}
    assert by_id["ev-1"]["EventType"] == "Redeploy" and by_id["ev-1"]["EventStatus"] == "Scheduled"
    assert by_id["ev-1"]["Resources"] == ["preemptwatch-sim_0"]
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", by_id["ev-2"]["NotBefore"])
    # NotBefore passes (within 3 s): Started, and a new incarnation.
    for _ in range(40):
        await asyncio.sleep(0.1)
        doc = await document()
        if {e["EventId"]: e["EventStatus"] for e in doc["Events"]}["ev-2"] == "Started":
            break
    assert {e["EventId"]: e["EventStatus"] for e in doc["Events"]}["ev-2"] == "Started"
    assert doc["DocumentIncarnation"] == 4
    # Acknowledge.
    bad_bodies: list[Any] = [{"StartRequests": [{"EventId": "nope"}]}, {"Start": []}, [1]]
    for bad in bad_bodies:
        async with http.post(url, headers=H, params=API, json=bad) as resp:
            assert resp.status == 400
    body = {"StartRequests": [{"EventId": "ev-1"}]}
    async with http.post(url, headers=H, params=API, json=body) as resp:
        assert resp.status == 200
    doc = await document()
    assert all(e["EventStatus"] == "Started" for e in doc["Events"])
    assert doc["DocumentIncarnation"] == 5 and azure.sim.acknowledged == ["ev-1"]
    azure.call(azure.sim.clear)
    assert await document() == {"DocumentIncarnation": 6, "Events": []}


async def test_simulator_control_api_over_http(azure: Sim, http: aiohttp.ClientSession) -> None:
    ctl = azure.url + "/_control/"
    body = {"kind": "maintenance", "after": 30, "event_type": "Reboot"}
    async with http.post(ctl + "schedule", json=body) as resp:
        assert resp.status == 200 and (await resp.json())["scheduled"][0]["kind"] == "maintenance"
    bad_bodies: list[Any] = [
        {"kind": "preempt", "event_type": "Reboot"},
        {"kind": "maintenance", "event_type": "Explode"},
        {"kind": "preempt", "resources": "vm"},
        {"kind": "preempt", "colour": "red"},
    ]
    for bad in bad_bodies:
        async with http.post(ctl + "schedule", json=bad) as resp:
            assert resp.status == 400
    async with http.post(ctl + "fault", json={"mode": "no-header"}) as resp:
        assert resp.status == 400
    async with http.post(ctl + "fault", json={"status": 503}) as resp:
        assert resp.status == 200
    async with http.get(azure.url + EVENTS, headers=H, params=API) as resp:
        assert resp.status == 503
    async with http.post(ctl + "schedule", json={"kind": "preempt"}) as resp:
        state = await resp.json()
    assert [e["EventType"] for e in state["document"]["Events"]] == ["Preempt"]
    async with http.post(ctl + "clear", json={"kind": "maintenance"}) as resp:
        state = await resp.json()
    assert state["scheduled"] == [] and len(state["document"]["Events"]) == 1
    assert state["requests"] == 1


def test_simulate_azure_cli_serves_a_scheduled_eviction() -> None:
    with simulator_cli("azure", "--notice-after", "0.3", "--vm-name", "trainer-7") as root:
        url = root + EVENTS

        async def check() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                async with http.get(url, headers=H, params=API) as resp:
                    assert (await resp.json())["Events"] == []
                await asyncio.sleep(0.6)
                async with http.get(url, headers=H, params=API) as resp:
                    [event] = (await resp.json())["Events"]
                assert event["EventType"] == "Preempt" and event["Resources"] == ["trainer-7"]

        asyncio.run(check())
