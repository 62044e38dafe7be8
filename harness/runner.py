"""The runner: cases x oracles x branches -> ``DIR/results.jsonl``.

Per case the parent computes the float64 truth and the same-dtype baseline once
(``comparator.CaseTruth``); each oracle runs in its own worker process (``harness.worker``), reused
across cases, so that an exception (ERROR), a segfault (CRASH) or a hang (TIMEOUT) costs only that
oracle's cells. A case whose truth is large (``comparator.held_truth_bytes`` over ``HELD_TRUTH_LIMIT``)
is judged with a ``StreamedTruth``: every oracle's reply is collected first, then one pass computes the
truth window by window and judges all the replies against it, so that the parent never holds the whole
truth beside the replies (same verdicts and metrics, bit for bit). ``timeout`` bounds each cell, the truth's
time in the parent included (``late_reply``).
Every cell is written (and flushed) as soon as it is judged.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.harness import comparator
from nsaconf.harness.comparator import (CaseTruth, Job, StreamedTruth, TruthFailed, Verdict, grad_truth_skip_reason,
                                          judge, judge_many)
from nsaconf.harness.diagnosis import DEFAULT_BUDGET_S, Diagnoser
from nsaconf.harness.environment import versions as environment_versions
from nsaconf.harness.results import BAD_STATUSES, CellResult, ResultWriter, done_keys
from nsaconf.harness.tolerance import ToleranceTable
from nsaconf.harness.worker import Reply, Worker, plain_outputs, release_cuda_cache
from nsaconf.oracles.base import GRAD_BRANCHES, Oracle, convention_support, get_oracle


@dataclass
class RunConfig:
    """Everything a run needs (the CLI builds one)."""

    cases: list[Case]
    oracles: list[str]
    device: str = "cpu"
    out: Path = Path("out/run")
    plugins: list[str] = field(default_factory=list)
    save_tensors: bool = False
    resume: bool = False
    timeout: float = 300.0
    table: ToleranceTable = field(default_factory=ToleranceTable)
    isolate: bool = True       # False: run oracles in this process (pytest items, repro)
    progress: bool = True
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
    truth_cache: Optional[dict] = None  # case id -> CaseTruth, shared across runs (pytest items)
    diagnosis_budget: float = DEFAULT_BUDGET_S  # seconds per case to diagnose its FAIL cells (0: off)
    checks: tuple[str, ...] = ()  # checks that need no truth (``harness.checks``), one cell each per case x oracle


def branch_skip_reason(case: Case, branch: str) -> Optional[str]:
    """Why a declared branch has nothing to compare on this case (None: compare it)."""
    if branch == "swa_o" and case.window == 0:
        return "case has window=0 (no sliding-window branch)"
    if branch == "dg_swa" and case.window == 0:
        return "case has window=0 (no sliding-window branch, no g_swa gradient)"
    if branch in GRAD_BRANCHES:
        return grad_truth_skip_reason(case)
    return None


def _record(case: Case, oracle: Oracle, branch: str, device: str, status: str, reason: str = "",
            metrics: Optional[dict] = None, tolerance: Optional[dict] = None, seconds: Optional[float] = None,
            versions: Optional[dict] = None, error_map: Optional[dict] = None) -> CellResult:
    return CellResult(case_id=case.id, case=case.to_dict(), oracle=oracle.name, layer=oracle.layer, branch=branch,
                      dtype=case.dtype, device=device, status=status, reason=reason, metrics=metrics or {},
                      tolerance=tolerance or {}, seconds=seconds, versions=versions or {}, error_map=error_map)


def run_in_process(oracle: Oracle, case: Case, device: str, block_indices: Optional[torch.Tensor]) -> Reply:
    """Run an oracle in this process (no crash isolation) on its own inputs and its own copy of the given
    block indices: what it writes into them never reaches the truth."""
    from nsaconf.cases.tensors import materialize

    try:
        inputs = materialize(case, device)
        idx = None if block_indices is None else block_indices.to(device, copy=True)
        t0 = time.perf_counter()
        out = oracle.run(case, inputs, device, block_indices=idx)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        return Reply("ok", outputs={k: v.cpu() for k, v in plain_outputs(out).items()}, seconds=secs)
    except Exception as e:  # noqa: BLE001
        return Reply("error", message=f"{type(e).__name__}: {e}".strip())


def late_reply(reply: Reply, truth_secs: float, judge_secs: float, timeout: float, concurrent: bool) -> Optional[Reply]:
    """The TIMEOUT reply of a cell whose time is over ``timeout`` seconds, else None. A cell's time: the
    truth's (in the main process) and the oracle's run, the longer of the two when they ran at the same
    time (``concurrent``: an oracle that computes its own selection), else their sum; then its judging."""
    oracle = reply.seconds or 0.0
    took = (max(truth_secs, oracle) if concurrent else truth_secs + oracle) + judge_secs
    if took <= timeout:
        return None
    return Reply("timeout", message=f"the cell took {took:.1f}s, over the {timeout:g}s timeout (truth {truth_secs:.1f}s in "
                                    f"the main process, oracle {oracle:.1f}s{' at the same time' if concurrent else ''}, "
                                    f"judging {judge_secs:.1f}s)", seconds=reply.seconds)


def cells_for_reply(case: Case, oracle: Oracle, device: str, branches: list[str], reply: Reply, ct: Optional[CaseTruth],
                    table: ToleranceTable, versions: dict, verdicts: Optional[list[Verdict]] = None) -> list[CellResult]:
    """Turn one oracle reply into cell records (judged against the truth when the run succeeded; ``verdicts``:
    already judged)."""
    if reply.status != "ok":
        status = {"error": "ERROR", "fatal": "ERROR", "crash": "CRASH", "timeout": "TIMEOUT"}[reply.status]
        return [_record(case, oracle, b, device, status, reply.message, seconds=reply.seconds, versions=versions) for b in branches]
    if ct is None:
        return [_record(case, oracle, b, device, "ERROR", "the truth could not be computed for this case", versions=versions) for b in branches]
    if verdicts is None:
        try:
            verdicts = judge(ct, oracle.name, oracle.layer, tuple(branches), reply.outputs or {}, table,
                             needs_block_indices=oracle.needs_block_indices)
        except Exception as e:  # noqa: BLE001 - a comparator failure is reported, never raised
            verdicts = [Verdict(b, "ERROR", f"comparator failed: {type(e).__name__}: {e}") for b in branches]
    return [_record(case, oracle, v.branch, device, v.status, v.reason, v.metrics, v.tolerance, reply.seconds, versions,
                    v.error_map)
            for v in verdicts]


def diagnose_cells(diagnoser: Diagnoser, oracle: Oracle, recs: list[CellResult], outputs: dict) -> None:
    """Attach a ``diagnosis`` to each FAIL cell of ``recs`` (outside the cells' timed part; a diagnosis
    that fails is left out, never the cell)."""
    # the branches of one knob first (compression, window), then the selection, o, the gradients: each tries
    # the causes found before it first
    order = {b: i for i, b in enumerate(("cmp_o", "cmp_lse", "swa_o", "topk_idx", "slc_o", "o"))}
    for rec in sorted(recs, key=lambda r: order.get(r.branch, len(order))):
        if rec.status != "FAIL":
            continue
        try:
            rec.diagnosis = diagnoser.diagnose(oracle.name, oracle.layer, rec.branch, outputs,
                                               oracle.needs_block_indices, rec.metrics.get("err_ratio"))
        except Exception:  # noqa: BLE001 - the cell stands without its diagnosis
            rec.diagnosis = None


def console_line(rec: CellResult) -> str:
    """The console line of a bad cell: status, case, oracle.branch, the diagnosis first when there is one,
    then the reason."""
    head = f"{rec.status} {rec.case_id} {rec.oracle}.{rec.branch}"
    text = (rec.diagnosis or {}).get("text")
    return f"{head} — {text}; {rec.reason}" if text else f"{head}: {rec.reason}"


@dataclass
class RunSummary:
    counts: dict[str, int]
    out: Path
    results: list[CellResult]

    @property
    def ok(self) -> bool:
        return not any(self.counts.get(s, 0) for s in BAD_STATUSES)


class Runner:
    """Executes a ``RunConfig``; ``run()`` returns the summary of this invocation's cells."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.oracles = {n: get_oracle(n) for n in cfg.oracles}
        self.workers: dict[str, Worker] = {}
        self.base_versions = environment_versions()
        self.diagnosed: dict = {}  # (oracle, branch) -> diagnosis keys matched on earlier cases (tried first)

    def _threads(self) -> int:
        """CPU threads of each worker and of the truth: the cores shared by the oracles and the truth,
        which run at the same time (0: a GPU run, torch's default)."""
        return max(1, (os.cpu_count() or 2) // (len(self.oracles) + 1)) if self.cfg.device == "cpu" else 0

    def _worker(self, name: str) -> Worker:
        if name not in self.workers:
            self.workers[name] = Worker(name, self.cfg.device, list(self.cfg.plugins), self._threads())
        return self.workers[name]

    def _versions(self, name: str) -> dict:
        w = self.workers.get(name)
        return {**self.base_versions, **(w.versions if w else {})}

    def run(self) -> RunSummary:
        cfg = self.cfg
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        done = done_keys(out) if cfg.resume else set()
        results: list[CellResult] = []
        counts: dict[str, int] = {}
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(cfg.cases) * len(self.oracles), file=sys.stderr, unit="check", dynamic_ncols=True)
        writer = ResultWriter(out, resume=cfg.resume)

        def emit(rec: CellResult) -> None:
            writer.write(rec)
            results.append(rec)
            counts[rec.status] = counts.get(rec.status, 0) + 1
            if rec.status in BAD_STATUSES:
                line = console_line(rec)
                (bar.write(line, file=sys.stderr) if bar is not None else cfg.echo(line))

        try:
            for case in cfg.cases:
                self._run_case(case, done, emit, out)
                if bar is not None:
                    bar.update(len(self.oracles))
                    bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in sorted(counts.items())), refresh=False)
        finally:
            if bar is not None:
                bar.close()
            writer.close()
            for w in self.workers.values():
                w.stop()
        return RunSummary(counts=counts, out=out, results=results)

    def _run_case(self, case: Case, done: set, emit: Callable[[CellResult], None], out: Path) -> None:
        self._run_truth_cells(case, done, emit, out)
        if self.cfg.checks:
            self._run_checks(case, done, emit)

    def _run_truth_cells(self, case: Case, done: set, emit: Callable[[CellResult], None], out: Path) -> None:
        cfg = self.cfg
        pending: dict[str, list[str]] = {}
        for name, oracle in self.oracles.items():
            todo = [b for b in oracle.branches if (case.id, name, b, cfg.device) not in done]
            if not todo:
                continue
            try:
                why = oracle.check_support(case, cfg.device)
            except Exception as e:  # noqa: BLE001
                why, err = None, f"supports() raised {type(e).__name__}: {e}"
                for b in todo:
                    emit(_record(case, oracle, b, cfg.device, "ERROR", err, versions=self.base_versions))
                continue
            if why:
                for b in todo:
                    emit(_record(case, oracle, b, cfg.device, "SKIP", why, versions=self.base_versions))
                continue
            live = []
            for b in todo:
                r = branch_skip_reason(case, b) or convention_support(oracle, case, b) or oracle.branch_supports(case, b)
                if r:
                    emit(_record(case, oracle, b, cfg.device, "SKIP", r, versions=self.base_versions))
                else:
                    live.append(b)
            if live:
                pending[name] = live
        if not pending:
            return
        replies: dict[str, Reply] = {}
        budget: dict[str, float] = {}  # oracle -> seconds its worker has, from its submission

        def submit(name: str, idx: Optional[torch.Tensor], spent: float) -> None:
            failed = self._worker(name).submit(case.to_json(), idx)
            if failed is None:
                budget[name] = cfg.timeout - spent
            else:
                replies[name] = failed

        # oracles that compute their own selection start before the truth is ready
        concurrent = [n for n in pending if cfg.isolate and not self.oracles[n].needs_block_indices]
        for name in concurrent:
            submit(name, None, 0.0)
        if self._streamed(case, pending):
            self._run_streamed(case, pending, replies, budget, emit)
            return
        t0 = time.monotonic()
        ct, truth_error = self._truth(case, pending)
        truth_secs = time.monotonic() - t0
        late_truth = None
        if truth_secs > cfg.timeout:
            late_truth = Reply("timeout", message=f"the truth took {truth_secs:.1f}s in the main process, over the "
                                                  f"{cfg.timeout:g}s timeout")
        if cfg.save_tensors and ct is not None:
            self._save(lambda: _save_truth(out, case, ct, pending))
        for name in pending:
            oracle = self.oracles[name]
            if name in budget or name in replies or late_truth is not None:
                continue
            idx = None
            if oracle.needs_block_indices:
                idx = ct.given_indices if ct is not None else None
                if idx is None and case.block_indices == "topk":
                    replies[name] = Reply("error", message=truth_error or "no block indices")
                    continue
            if cfg.isolate:
                submit(name, idx, truth_secs)
            else:
                replies[name] = run_in_process(oracle, case, cfg.device, idx)
        diagnoser: Optional[Diagnoser] = None  # made on the case's first FAIL; its variant truths serve every oracle
        for name, branches in pending.items():
            oracle = self.oracles[name]
            if name in budget:
                reply = self._worker(name).collect(max(0.0, budget[name]))
                if reply.status == "timeout" and budget[name] < cfg.timeout:
                    reply = Reply("timeout", message=f"{reply.message}: the truth took {truth_secs:.1f}s of the "
                                                     f"{cfg.timeout:g}s timeout in the main process", seconds=reply.seconds)
            else:
                reply = replies.pop(name, late_truth)
            if late_truth is not None and reply.status in ("ok", "timeout"):
                reply = late_truth
            if reply.status == "ok" and cfg.save_tensors:
                from nsaconf.harness.tensors_io import save_outputs

                self._save(lambda: save_outputs(out, case, name, reply.outputs or {}))
            if reply.status == "ok" and ct is None:
                reply = Reply("error", message=truth_error, seconds=reply.seconds)
            t1 = time.monotonic()
            recs = cells_for_reply(case, oracle, cfg.device, branches, reply, ct, cfg.table, self._versions(name))
            late = None
            if reply.status == "ok":
                late = late_reply(reply, truth_secs, time.monotonic() - t1, cfg.timeout, name in concurrent)
            if late is not None:
                recs = cells_for_reply(case, oracle, cfg.device, branches, late, ct, cfg.table, self._versions(name))
            elif reply.status == "ok":
                diagnoser = self._diagnose(diagnoser, ct, oracle, recs, reply.outputs or {})
            del reply
            for rec in recs:
                emit(rec)
        if cfg.device.startswith("cuda") and cfg.truth_cache is None:
            del ct
            release_cuda_cache()  # the truth's temporaries: the workers need the card too

    def _diagnose(self, diagnoser: Optional[Diagnoser], ct: "Optional[CaseTruth | StreamedTruth]", oracle: Oracle,
                  recs: list[CellResult], outputs: dict) -> Optional[Diagnoser]:
        """Diagnose the FAIL cells of one oracle's reply (held or streamed truth alike). The case's
        ``Diagnoser`` is made on its first FAIL and returned, so that the next oracles reuse its variant truths."""
        if ct is None or self.cfg.diagnosis_budget <= 0 or not any(r.status == "FAIL" for r in recs):
            return diagnoser
        if diagnoser is None:
            diagnoser = Diagnoser(ct, self.cfg.table, self.cfg.diagnosis_budget, known=self.diagnosed)
        diagnose_cells(diagnoser, oracle, recs, outputs)
        return diagnoser

    def _run_checks(self, case: Case, done: set, emit: Callable[[CellResult], None]) -> None:
        """The ``checks`` of every oracle on ``case``: each a cell whose branch is the check's name (SKIP with the
        reason where the oracle does not support the case), in the oracle's worker (a crash or timeout is that
        oracle's CRASH / TIMEOUT cells)."""
        import json

        from nsaconf.harness.checks import run_checks, serve_checks

        cfg = self.cfg
        tol = {"rule": "no truth", "text": "runs of the oracle compared with each other (harness.checks)"}
        for name, oracle in self.oracles.items():
            todo = tuple(c for c in cfg.checks if (case.id, name, c, cfg.device) not in done)
            if not todo:
                continue
            try:
                why = oracle.check_support(case, cfg.device)
            except Exception as e:  # noqa: BLE001
                why = f"supports() raised {type(e).__name__}: {e}"
            if why:
                for c in todo:
                    emit(_record(case, oracle, c, cfg.device, "SKIP", why, versions=self.base_versions))
                continue
            t0 = time.monotonic()
            if cfg.isolate:
                w = self._worker(name)
                reply = w.submit_call(serve_checks, case.to_json(), json.dumps(list(todo))) or w.collect(cfg.timeout)
            else:
                try:
                    reply = Reply("ok", value=[r.to_dict() for r in run_checks(oracle, cfg.device, case, todo)])
                except Exception as e:  # noqa: BLE001
                    reply = Reply("error", message=f"{type(e).__name__}: {e}")
            secs = time.monotonic() - t0
            if reply.status != "ok":
                status = {"error": "ERROR", "fatal": "ERROR", "crash": "CRASH", "timeout": "TIMEOUT"}[reply.status]
                for c in todo:
                    emit(_record(case, oracle, c, cfg.device, status, reply.message, seconds=secs, versions=self._versions(name)))
                continue
            got = {r.get("check"): r for r in reply.value if isinstance(r, dict)} if isinstance(reply.value, list) else {}
            for c in todo:
                r = got.get(c)
                if r is None or r.get("status") not in ("PASS", "FAIL", "SKIP", "ERROR"):
                    emit(_record(case, oracle, c, cfg.device, "ERROR", "the worker returned no result for this check",
                                 seconds=secs, versions=self._versions(name)))
                    continue
                emit(_record(case, oracle, c, cfg.device, r["status"], str(r.get("reason", "")),
                             r.get("metrics") if isinstance(r.get("metrics"), dict) else {}, tol, secs, self._versions(name)))

    def judge(self, case: Case, emit: Callable[[CellResult], None], out: Path) -> None:
        """Judge one case on every oracle (and its checks), cells to ``emit``; the workers stay up for the next
        case until ``close`` (``nsaconf search`` judges its draws one by one)."""
        self._run_case(case, set(), emit, out)

    def close(self) -> None:
        """Stop the worker processes."""
        for w in self.workers.values():
            w.stop()
        self.workers.clear()

    def _streamed(self, case: Case, pending: dict[str, list[str]]) -> bool:
        """Whether ``case`` is judged with a ``StreamedTruth``: a large truth, every oracle in a worker and
        computing its own selection, no truth to save or to share across runs."""
        cfg = self.cfg
        return (cfg.isolate and cfg.truth_cache is None and not cfg.save_tensors
                and not any(self.oracles[n].needs_block_indices for n in pending)
                and comparator.held_truth_bytes(case) > comparator.HELD_TRUTH_LIMIT)

    def _run_streamed(self, case: Case, pending: dict[str, list[str]], replies: dict[str, Reply],
                      budget: dict[str, float], emit: Callable[[CellResult], None]) -> None:
        """The replies of every oracle of ``case`` (already submitted), then one ``judge_many`` pass over a
        ``StreamedTruth``; a cell's time: its oracle's, then the truth and the judging in the main process."""
        cfg = self.cfg
        for name in pending:
            if name in budget:
                replies[name] = self._worker(name).collect(max(0.0, budget[name]))
        ok = [n for n in pending if replies[n].status == "ok"]
        # the workers are idle now: the truth may use every core
        ct = StreamedTruth(case, device=cfg.device, threads=(os.cpu_count() or 1) if cfg.device == "cpu" else 0)
        t0 = time.monotonic()
        verdicts: dict[str, list[Verdict]] = {}
        if ok:
            jobs = [Job(n, self.oracles[n].layer, tuple(pending[n]), replies[n].outputs or {}, cfg.table,
                        self.oracles[n].needs_block_indices) for n in ok]
            try:
                verdicts = dict(zip(ok, judge_many(ct, jobs)))
            except TruthFailed as e:
                for n in ok:
                    replies[n] = Reply("error", message=str(e), seconds=replies[n].seconds)
            except Exception as e:  # noqa: BLE001 - a comparator failure is reported, never raised
                verdicts = {n: [Verdict(b, "ERROR", f"comparator failed: {type(e).__name__}: {e}") for b in pending[n]]
                            for n in ok}
            del jobs
        secs = time.monotonic() - t0
        diagnoser: Optional[Diagnoser] = None  # made on the case's first FAIL (it holds the whole truth)
        for name, branches in pending.items():
            oracle, reply = self.oracles[name], replies.pop(name)
            late = late_reply(reply, secs, 0.0, cfg.timeout, False) if reply.status == "ok" else None
            recs = cells_for_reply(case, oracle, cfg.device, branches, late or reply, ct, cfg.table, self._versions(name),
                                   None if late is not None else verdicts.get(name))
            if late is None and reply.status == "ok":
                diagnoser = self._diagnose(diagnoser, ct, oracle, recs, reply.outputs or {})
            del reply
            for rec in recs:
                emit(rec)
        if cfg.device.startswith("cuda"):
            release_cuda_cache()

    def _truth(self, case: Case, pending: dict[str, list[str]]) -> tuple[Optional[CaseTruth], str]:
        """The case's truth (cached across runs when ``truth_cache`` is given), with its gradients when
        a live branch needs them, or None and why not."""
        cache = self.cfg.truth_cache
        threads, ours = torch.get_num_threads(), self._threads()
        if ours and self.cfg.isolate:
            torch.set_num_threads(ours)
        try:
            ct = cache.get(case.id) if cache is not None else None
            if ct is None:
                ct = CaseTruth.compute(case, device=self.cfg.device)
                if cache is not None:
                    cache[case.id] = ct
            if any(b in GRAD_BRANCHES for live in pending.values() for b in live):
                try:
                    ct.grads()  # computed once here, inside the cells' time; judge() reuses it
                except Exception:  # noqa: BLE001 - judge() reports the failure per cell
                    pass
        except Exception as e:  # noqa: BLE001
            return None, f"truth failed: {type(e).__name__}: {e}"
        finally:
            torch.set_num_threads(threads)
        return ct, ""

    def _save(self, write: Callable[[], Any]) -> None:
        """One ``--save-tensors`` write; a failure is reported on one line, the run and its cells go on."""
        try:
            write()
        except (OSError, ValueError, RuntimeError) as e:
            self.cfg.echo(f"--save-tensors: not written: {type(e).__name__}: {e}")


def _save_truth(out: Path, case: Case, ct: CaseTruth, pending: dict[str, list[str]]) -> None:
    from nsaconf.harness.tensors_io import save_inputs, save_truth

    save_inputs(out, case, ct.inputs.to("cpu"))
    saved = {k: v for k, v in ct.truth.items() if k != "importance"}
    if any(b in GRAD_BRANCHES for live in pending.values() for b in live):
        try:
            saved.update(ct.grads()[0])
        except Exception:  # noqa: BLE001 - judge() reports the failure per cell
            pass
    save_truth(out, case, saved)


def evaluate(case: Case, oracle_names: list[str], device: str = "cpu", table: Optional[ToleranceTable] = None,
             isolate: bool = False, timeout: float = 300.0, plugins: Optional[list[str]] = None,
             out: Optional[Path] = None, save_tensors: bool = False, truth_cache: Optional[dict] = None,
             diagnosis_budget: float = DEFAULT_BUDGET_S, checks: tuple[str, ...] = ()) -> list[CellResult]:
    """Judge one case against some oracles and return the cells (used by ``repro`` and pytest); FAIL cells
    carry their ``diagnosis`` (``diagnosis_budget`` seconds for the case, 0: none); ``checks``: the checks that
    need no truth to judge too."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(cases=[case], oracles=oracle_names, device=device, out=Path(out or tmp), save_tensors=save_tensors,
                        plugins=list(plugins or []), table=table or ToleranceTable(), isolate=isolate,
                        timeout=timeout, progress=False, echo=lambda s: None, truth_cache=truth_cache,
                        diagnosis_budget=diagnosis_budget, checks=tuple(checks))
        return Runner(cfg).run().results


def run(cases: list[Case], oracles: list[str], device: str = "cpu", out: str | Path = "out/run", *,
        table: Optional[ToleranceTable] = None, plugins: Optional[list[str]] = None, timeout: float = 300.0,
        resume: bool = False, save_tensors: bool = False, progress: bool = False) -> RunSummary:
    """Judge ``oracles`` on ``cases`` as ``nsaconf run`` does (each oracle in its worker process), cells
    appended to ``out/results.jsonl``; ``nsaconf.write_reports(out)`` then writes the reports."""
    cfg = RunConfig(cases=list(cases), oracles=list(oracles), device=device, out=Path(out),
                    plugins=[str(Path(p).resolve()) for p in plugins or []], save_tensors=save_tensors, resume=resume,
                    timeout=timeout, table=table or ToleranceTable(), progress=progress)
    return Runner(cfg).run()
