"""The agent's main loop: sample on a drift-free schedule, spool, deliver, follow policy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from agent import __version__
from agent.config import AgentConfig
from agent.errors import AgentError, TransportError
from agent.identity import load_or_create_agent_id
from agent.sensors.interfaces import InterfaceSample, InterfaceSampler
from agent.spool import Spool
from agent.transport import PolicyUpdate, Transport
from agent.wire import batch_request, hello_request

log = logging.getLogger(__name__)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        sampler: InterfaceSampler | None = None,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.config = config
        self.agent_id = load_or_create_agent_id(config.state_dir)
        self.spool = Spool(config.spool_path, max_bytes=config.spool_max_bytes, clock_ms=clock_ms)
        self._sampler = sampler or InterfaceSampler(include=config.interfaces)
        self._clock_ms = clock_ms
        self.interval_s = config.interval_s
        self.policy_version = ""
        self._policy_refresh_s = 60.0
        self.transport = Transport(
            config.collector,
            self.spool,
            self._hello,
            window=config.window,
            ack_timeout_s=config.ack_timeout_s,
        )

    def _hello(self) -> bytes:
        c = self.config
        request = hello_request(
            self.agent_id, c.hostname, __version__, c.labels, self.policy_version, self._clock_ms()
        )
        return request.SerializeToString()

    def sample_once(self) -> list[InterfaceSample]:
        return self._sampler.sample()

    def spool_samples(self, samples: list[InterfaceSample]) -> int:
        """Put one batch of samples (and any unreported spool loss) into the spool; return its seq."""
        time_ms = self._clock_ms()
        dropped = self.spool.take_drop_report()

        def build(seq: int) -> tuple[bytes, int, int, int]:
            request = batch_request(seq, time_ms, time_ms, samples, dropped)
            return request.SerializeToString(), len(request.batch.facts), time_ms, time_ms

        seq = self.spool.append(build)
        if dropped is not None:
            self.spool.clear_drop_report(dropped)
        self.transport.notify()
        return seq

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "agent %s reporting to %s every %.1f s", self.agent_id, self.config.collector, self.interval_s
        )
        tasks = [
            asyncio.create_task(self._sample_loop(stop), name="sample"),
            asyncio.create_task(self.transport.run(stop), name="transport"),
            asyncio.create_task(self._policy_loop(stop), name="policy"),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.transport.close()
            self.spool.close()

    async def _sample_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._sampler.sample()  # prime the counters
        next_at = loop.time() + self.interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            if stop.is_set():
                return
            # Schedule from the plan, not from now: no drift, and a late tick does not shift the next.
            next_at += self.interval_s
            if next_at < loop.time():
                next_at = loop.time() + self.interval_s
            samples = self._sampler.sample()
            if samples:
                try:
                    self.spool_samples(samples)
                except AgentError as exc:
                    log.error("cannot spool samples: %s", exc)

    async def _policy_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                update = await self.transport.get_policy(self.policy_version, self.agent_id)
                if update is not None:
                    self.apply_policy(update)
                    continue  # ask again at once: that confirms to the collector what we now run
            except TransportError as exc:
                log.debug("policy not refreshed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._policy_refresh_s)

    def apply_policy(self, update: PolicyUpdate) -> None:
        """Take a new policy without restart; the next hello reports its version."""
        if update.sample_interval_s > 0:
            self.interval_s = float(update.sample_interval_s)
        if update.policy_refresh_s > 0:
            self._policy_refresh_s = float(update.policy_refresh_s)
        self._sampler.set_interfaces(update.interfaces)
        self.policy_version = update.version
        log.info("policy %s applied: interval %.0f s", update.version, self.interval_s)
