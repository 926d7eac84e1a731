"""`SweepApi`: the sweep endpoints of the server, on top of the run client's `ApiClient`
(same retries, timeouts and errors)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from ..client.api import ApiClient


def _q(value: str) -> str:
    return quote(value, safe="")


class SweepApi:
    """One method per sweep endpoint of ``docs/http-api.md``."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.client.request(method, f"/api/v1/sweeps{path}", json=body)

    def create(self, config: dict[str, Any]) -> dict[str, Any]:
        """``POST /sweeps``: a new sweep from a W&B-format config; returns the sweep."""
        sweep: dict[str, Any] = self._call("POST", "", {"config": config})
        return sweep

    def list(self) -> list[dict[str, Any]]:
        """``GET /sweeps``: the project's sweeps, newest first."""
        sweeps: list[dict[str, Any]] = self._call("GET", "")["sweeps"]
        return sweeps

    def get(self, sweep_id: str) -> dict[str, Any]:
        """``GET /sweeps/{id}``: the sweep with its counts."""
        sweep: dict[str, Any] = self._call("GET", f"/{_q(sweep_id)}")
        return sweep

    def transition(self, sweep_id: str, action: str) -> dict[str, Any]:
        """``POST /sweeps/{id}/{pause|resume|cancel}``."""
        if action not in ("pause", "resume", "cancel"):
            raise ValueError(f"unknown sweep action {action!r}")
        sweep: dict[str, Any] = self._call("POST", f"/{_q(sweep_id)}/{action}", {})
        return sweep

    def register_agent(
        self, sweep_id: str, host: str | None = None, pid: int | None = None
    ) -> dict[str, Any]:
        """``POST /sweeps/{id}/agents``: ``{"id", "sweep", "heartbeat_timeout"}``."""
        body = {"host": host, "pid": pid}
        agent: dict[str, Any] = self._call("POST", f"/{_q(sweep_id)}/agents", body)
        return agent

    def _agent(self, sweep_id: str, agent_id: str) -> str:
        return f"/{_q(sweep_id)}/agents/{_q(agent_id)}"

    def heartbeat(self, sweep_id: str, agent_id: str) -> dict[str, Any]:
        """Agent heartbeat: ``{"sweep_state", "stop"}``."""
        answer: dict[str, Any] = self._call(
            "POST", self._agent(sweep_id, agent_id) + "/heartbeat", {}
        )
        return answer

    def next_run(self, sweep_id: str, agent_id: str) -> dict[str, Any]:
        """Claim the next run: ``{"run": {...} | None, "sweep_state"}``."""
        answer: dict[str, Any] = self._call("POST", self._agent(sweep_id, agent_id) + "/next", {})
        return answer

    def report_exit(
        self, sweep_id: str, agent_id: str, run_id: str, exit_code: int
    ) -> dict[str, Any]:
        """The child running ``run_id`` ended with ``exit_code``."""
        path = self._agent(sweep_id, agent_id) + f"/runs/{_q(run_id)}/exit"
        answer: dict[str, Any] = self._call("POST", path, {"exit_code": exit_code})
        return answer
