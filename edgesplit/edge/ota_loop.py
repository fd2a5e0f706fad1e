"""The agent's frame loop with bundle updates: fetch, verify, switch between two frames, health
check, commit or roll back (docs/PROTOCOL.md §14.6).

:class:`UpdateManager` holds the :class:`~edgesplit.edge.agent_core.Agent` that new frames go to
(one agent per bundle: its heads, its fallback, its session) and, around a switch, the others:

- the **candidate**: a downloaded bundle, verified, loaded and warmed up in a worker thread
  (:mod:`edgesplit.edge.ota_stage`), whose connection says ``hello`` with the new hash while the old
  bundle keeps serving; no frame waits for any of it;
- the **switch**, once the candidate is welcomed, between two frames: the next frame runs the new
  bundle's head; the old agent stays connected and answers its frames in flight (the server serves
  both hashes), and is kept, loaded, for a rollback;
- the **trial**: the new bundle's first ``health_frames`` answers; more than ``max_error_rate`` of
  them refused by the server or timed out (frames the agent answers locally by its own choice do
  not count), or a frame the new head cannot run, switches back to the old agent between two
  frames and refuses that bundle hash for good; otherwise it is **committed** (recorded in
  ``state.json``, atomically, so a restart starts on it) and the old agent retires (closes once it
  has nothing in flight).

Every frame is answered exactly once, by the agent it was submitted to. Every decision is logged
with its reason (``ota_*`` events).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..bundle import Bundle
from .fallback import RTT_OVER_DEADLINE
from .frame_loop import stream_frames
from .ota_fetch import UpdateFetcher
from .ota_stage import BundleStore, StageError, load_candidate, stage_archive
from .results import FrameResult

MAX_ATTEMPTS = 3  # trials that ended with the agent dying before the verdict, before a bundle is refused
_BY_CHOICE = {"POLICY", RTT_OVER_DEADLINE}  # local answers the agent chose: not failures of the bundle


@dataclass(frozen=True)
class OtaSettings:
    group: str
    ota_dir: Path
    pubkey: Any  # the pinned publisher's Ed25519 public key
    poll_s: float = 300.0
    chunk_bytes: int = 16384
    kbps: float | None = None
    max_bytes: int = 256 << 20
    health_frames: int = 20
    max_error_rate: float = 0.1
    timeout_s: float = 10.0


def failed(r: FrameResult) -> bool:
    """Does this answer count against a bundle on trial?"""
    return r.error is not None or (r.source == "local" and r.fallback_reason not in _BY_CHOICE)


class UpdateManager:
    def __init__(
        self,
        agent: Any,
        make_agent: Callable[[Bundle], Any],
        settings: OtaSettings,
        store: BundleStore,
        say: Callable[..., None],
    ):
        self.agent, self.make_agent, self.s, self.store, self.say = agent, make_agent, settings, store, say
        self.fetcher = UpdateFetcher(
            settings.group,
            settings.ota_dir,
            say,
            poll_s=settings.poll_s,
            chunk_bytes=settings.chunk_bytes,
            kbps=settings.kbps,
            max_bytes=settings.max_bytes,
            timeout_s=settings.timeout_s,
        )
        self.fetcher.current = agent.bundle.hash
        self.fetcher.skip = lambda h: store.rejected(h) is not None or h == self._working_on
        self.fetcher.attach(agent)
        self.retiring: list = []  # old agents answering their frames in flight
        self.previous: Any = None  # the old agent while a new bundle is on trial
        self.candidate: Any = None  # loaded, waiting for its welcome
        self._cand_since = 0.0
        self._trial = [0, 0]  # answers, failures of the bundle on trial
        self._working_on: str | None = None  # the bundle the worker stages and loads
        self._work: dict[str, Any] | None = None
        self.bundle_of: dict[int, str] = {}  # frame id -> the bundle hash of the agent that answers it
        self.figures = {"switches": 0, "commits": 0, "rollbacks": 0, "refused": 0}
        t = store.state["trying"]
        if isinstance(t, dict) and t.get("bundle") not in (None, agent.bundle.hash):
            h = t["bundle"]
            if t.get("attempts", 0) >= MAX_ATTEMPTS:
                self._refuse(h, f"the agent stopped {t['attempts']} times while trying it")
            elif store.staged(h) and store.rejected(h) is None:
                self.say(
                    f"update: resuming the trial of bundle {h[:16]} after a restart", logging.INFO, event="ota_retry"
                )
                self._start_work(h, None)

    # -- the worker: stage (unpack, verify) and load, next to inference ----------------------------
    def _start_work(self, bundle_hash: str, ready: tuple | None) -> None:
        self._working_on, self.fetcher.paused = bundle_hash, True
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                if ready is None:
                    path = self.store.path(bundle_hash)
                else:
                    path = stage_archive(ready[1], ready[0], self.store, self.s.pubkey, self.s.max_bytes)
                box["agent"] = load_candidate(path, self.s.pubkey, self.make_agent)
            except StageError as e:
                box["error"], box["retry"] = str(e), e.retry
            except Exception as e:  # a bug or an engine crash: still refuse, with the reason
                box["error"] = f"{type(e).__name__}: {e}"
            box["done"] = True

        self._work = box
        threading.Thread(target=work, name="edgesplit-ota-stage", daemon=True).start()

    def _step(self) -> None:
        """Update housekeeping, once per turn of the frame loop."""
        now = time.monotonic()
        box = self._work
        if box is not None and box.get("done"):
            h, self._work = self._working_on or "", None
            self.fetcher.clear_downloads()
            if "error" in box:
                self._working_on = None
                if box.get("retry"):  # the download's fault, not the bundle's: fetched again at the next query
                    self.say(
                        f"update to bundle {h[:16]} abandoned: {box['error']}; running bundle {self.agent.bundle.hash[:16]}",
                        logging.WARNING,
                        event="ota_abandoned",
                        bundle=h,
                        reason=box["error"],
                    )
                else:
                    self._refuse(h, box["error"])
            else:
                try:
                    attempt = self.store.mark_trying(h)
                except OSError as e:
                    box["agent"].close(bye=False)
                    self._working_on = None
                    self._refuse(h, f"cannot record the trial: {e}")
                else:
                    self.candidate, self._cand_since = box["agent"], now
                    self.candidate.conn.open()
                    self.candidate.conn.hello()
                    self.say(
                        f"update: bundle {h[:16]} verified (signature, files), loaded and warmed up; "
                        f"connecting (attempt {attempt})",
                        logging.INFO,
                        event="ota_staged",
                        bundle=h,
                    )
        c = self.candidate
        if c is not None:
            if c.session.welcome is not None:
                pass  # welcomed: submit() switches before the next frame
            elif c.outcomes.connection_errors_total:
                name, message = list(c.outcomes.connection_errors)[-1]
                self._drop_candidate(f"the server refused its hello: {name}: {message}")
            elif now - self._cand_since > self.s.timeout_s:
                self._drop_candidate(f"no welcome for it within {self.s.timeout_s:.0f} s")
        busy = self._work is not None or self.candidate is not None or self.previous is not None
        self.fetcher.paused = busy
        if not busy and self.fetcher.ready is not None:
            self._start_work(self.fetcher.ready[0].bundle or "", self.fetcher.ready)
        else:
            self.fetcher.tick(time.perf_counter_ns())
        for a in list(self.retiring):
            if not a.session.outstanding and not a.outcomes.done:
                a.close()
                self.retiring.remove(a)

    def _drop_candidate(self, reason: str) -> None:
        c, self.candidate = self.candidate, None
        h = c.bundle.hash
        c.close(bye=False)
        self._working_on = None
        self._refuse(h, reason)

    def _switch(self) -> None:
        old, new = self.agent, self.candidate
        self.candidate = None
        new.session._next_id = max(new.session.next_id, old.session.next_id)  # frame ids stay unique
        self.previous, self.agent, self._trial = old, new, [0, 0]
        self.fetcher.attach(new)
        self.figures["switches"] += 1
        self.say(
            f"update: switched to bundle {new.bundle.hash[:16]} between two frames; bundle "
            f"{old.bundle.hash[:16]} answers its {len(old.session.outstanding)} frames in flight and stays loaded "
            f"for the first {self.s.health_frames} frames",
            logging.INFO,
            event="ota_switched",
            bundle=new.bundle.hash,
            previous=old.bundle.hash,
            in_flight=len(old.session.outstanding),
        )

    def _judge(self, r: FrameResult) -> None:
        self._trial[0] += 1
        self._trial[1] += failed(r)
        n, bad = self._trial
        if bad > self.s.max_error_rate * self.s.health_frames:
            self._rollback(f"{bad} of its first {n} frames failed (the last: {r.error or r.fallback_reason})")
        elif n >= self.s.health_frames:
            self._commit()

    def _commit(self) -> None:
        h = self.agent.bundle.hash
        try:
            self.store.commit(h)
        except OSError as e:  # it runs, but a restart would start on the old bundle and try again
            self.say(f"update: cannot record bundle {h[:16]} as current: {e}", logging.WARNING, event="ota_state")
        self.retiring.append(self.previous)
        self.previous, self._working_on = None, None
        self.fetcher.current = h
        self.figures["commits"] += 1
        n, bad = self._trial
        self.say(
            f"update: bundle {h[:16]} passed its health check ({bad} of {n} frames failed): committed",
            logging.INFO,
            event="ota_committed",
            bundle=h,
        )

    def _rollback(self, reason: str) -> None:
        bad = self.agent
        self.agent, self.previous, self._working_on = self.previous, None, None
        self.agent.session._next_id = max(self.agent.session.next_id, bad.session.next_id)
        self.fetcher.attach(self.agent)
        self.retiring.append(bad)
        self.figures["rollbacks"] += 1
        self._refuse(bad.bundle.hash, f"health check failed: {reason}; rolled back", event="ota_rolled_back")

    def _refuse(self, h: str, reason: str, event: str = "ota_rejected") -> None:
        self.figures["refused"] += 1
        try:
            self.store.reject(h, reason)
        except OSError as e:
            reason += f" (not recorded: {e})"
        self.say(
            f"update to bundle {h[:16]} refused: {reason}; running bundle {self.agent.bundle.hash[:16]}",
            logging.WARNING,
            event=event,
            bundle=h,
            reason=reason,
        )

    # -- frames ------------------------------------------------------------------------------------
    def _agents(self) -> list:
        return [a for a in (self.previous, *self.retiring, self.candidate) if a is not None]

    def poll(self, timeout_s: float) -> Iterator[FrameResult]:
        """Results from every agent (waiting on the active one), each tagged with its bundle."""
        for a in self._agents():
            for r in a.poll(0.0):
                self.bundle_of[r.id] = a.bundle.hash
                yield r
        active = self.agent
        for r in active.poll(timeout_s):
            self.bundle_of[r.id] = active.bundle.hash
            if self.previous is not None and active is self.agent:
                self._judge(r)
            yield r
        self._step()

    def submit(self, sample: Any) -> None:
        c = self.candidate
        if c is not None and c.session.welcome is not None:
            self._switch()  # between two frames: this one is the first on the new bundle
        try:
            self.agent.submit(sample)
        except Exception as e:
            if self.previous is None:
                raise
            self._rollback(f"the new bundle failed on a frame: {type(e).__name__}: {e}")
            self.agent.submit(sample)  # the same frame, answered by the old bundle

    # The frame loop's view (edgesplit.edge.frame_loop.FrameTarget): the active agent's window and
    # wait budget; every agent's frames in flight.
    def window_full(self) -> bool:
        return self.agent.window_full()

    def wait_budget(self) -> float:
        return self.agent.wait_budget()

    def busy(self) -> bool:
        return any(a.busy() for a in (self.agent, *self._agents()))

    def hand_off(self) -> int:
        return sum(a.hand_off() for a in (self.agent, *self._agents()))

    def run_frames(self, agent: Any, frames: Iterator, *, fps: float | None, stop: Any, grace_s: float, notifier: Any):
        """:func:`edgesplit.edge.service_run.run_frames` across bundle switches (``agent``: the one
        it started with, :attr:`agent` from then on)."""
        yield from stream_frames(self, frames, fps=fps, stop=stop, grace_s=grace_s, each_turn=notifier.watchdog)
        self.close_others()

    def close_others(self) -> None:
        """Close every agent but the active one (the caller closes that)."""
        for a in self._agents():
            a.close()
        self.retiring, self.previous, self.candidate = [], None, None
        self.fetcher.attach(self.agent)

    def summary(self) -> dict[str, Any]:
        f = self.fetcher.figures
        return {
            "bundle": self.agent.bundle.hash,
            "group": self.s.group,
            **self.figures,
            "downloads": f.downloads,
            "chunks": f.chunks,
            "bytes_received": f.bytes_received,
            "bad_chunks": f.bad_chunks,
            "overloaded": f.overloaded,
            "resumed_from": f.resumed_from,
            "queries": f.queries,
        }
