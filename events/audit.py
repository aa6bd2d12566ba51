"""`python -m relay audit` and `python -m relay rebuild`: the command lines and reports.

The replay itself (pages, hash chain, parallel workers, the checks against the head and
the cache tables) is events/replay.py; here are the options, the text and JSON reports,
and `rebuild`, which folds the log the same way and rewrites `devices` and `runs` from it
in one transaction, holding the head lock so no append interleaves. A bad log is exit
status 1, naming the first bad position.
"""

from __future__ import annotations

import argparse
import json
import json.scanner
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import psycopg

from events import checkpoint, projection
from events.projection import RunRow, State
from events.replay import (
    PARALLEL_MIN_EVENTS,
    Replay,
    check_head,
    check_prefix_against_head,
    check_tables,
    device_rows,
    event_count,
    read_only_snapshot,
    replay,
    replay_parallel,
    token_replay,
    workers_can_start,
)
from events.types import iso_ms, parse_iso_ms
from relay.database import connect
from relay.exits import ExitStatus
from relay.tokens import InvalidToken, normalize_token

PROGRESS_MIN_EVENTS = 200_000  # a bar only for logs long enough to wait for
TEXT_RUNS_SHOWN = 20  # the text summary lists the latest runs only


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total < PROGRESS_MIN_EVENTS:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", unit_scale=True, desc="replaying", file=sys.stderr)


# --- the commands ----------------------------------------------------------------------


def _parse_time(text: str) -> int:
    """Epoch ms of `--until`: ISO 8601 (UTC unless an offset is given) or epoch seconds."""
    try:
        return round(float(text) * 1000)
    except ValueError:
        pass
    try:
        return parse_iso_ms(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time or epoch seconds, got {text!r}") from None


def _token(text: str) -> str:
    try:
        return normalize_token(text)
    except InvalidToken as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _processes(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, "
                                         f"got {text!r}")
    return count


def _audit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay audit",
        description="Replay the event log from the start and summarise it.")
    parser.add_argument("--until", metavar="TIME", type=_parse_time,
                        help="stop at the first event stamped after TIME "
                             "(ISO 8601, e.g. 2026-11-25T19:00:00Z, or epoch seconds)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--token", metavar="T", type=_token,
                        help="that token's whole history")
    parser.add_argument("--jobs", type=_processes, metavar="N",
                        help="processes replaying slices of the log, this one and N-1 "
                             "workers (default: 1 "
                             f"below {PARALLEL_MIN_EVENTS:,} events, else the CPU count)")
    parser.add_argument("--verify", action="store_true",
                        help="check the hash chain, the positions, every body's shape and "
                             "bytes, and the cached tables; exit 1 naming the first bad "
                             "position on any mismatch")
    parser.add_argument("--checkpoint", metavar="FILE_OR_DIR", type=Path, action="append",
                        help="(repeatable; implies --verify) signed checkpoints (a file, or "
                             "every *.json in a directory) the log must agree with: exit 1 "
                             "naming the checkpoint if the log was rolled back behind it or "
                             "rewritten up to it, or if its signature does not verify")
    parser.add_argument("--public-key", metavar="FILE", type=Path,
                        help="the PEM public key checkpoints must be signed with (default: "
                             "that of the relay's own audit.signing_key)")
    parser.add_argument("--html", metavar="FILE",
                        help="write a self-contained HTML report with charts (needs the "
                             "`report` extra); the log is verified for it")
    return parser


def _rebuild_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m relay rebuild",
        description="Rebuild the cached tables (devices, runs) from the event log.")


_PARSERS = {"audit": _audit_parser, "rebuild": _rebuild_parser}


def _parse(command: str, argv: list[str]) -> argparse.Namespace | int:
    """The arguments, or the exit status once help or a usage error is printed."""
    parser = _PARSERS[command]()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "checkpoint", None):
            if args.until is not None or args.token is not None:
                parser.error("--checkpoint checks the whole log: not with --until or --token")
            args.verify = True
        return args
    except SystemExit as exc:
        return ExitStatus.OK if exc.code == 0 else ExitStatus.USAGE


def usage_status(command: str, argv: list[str]) -> int | None:
    """For `audit` or `rebuild`: the exit status when `argv` asks for help or is wrong
    (printed), else None. Checked before the database starts, so neither starts one."""
    parsed = _parse(command, argv)
    if isinstance(parsed, int):
        return parsed
    if getattr(parsed, "html", None):
        from events.report import ReportUnavailable, require_plotting

        if parsed.token or parsed.json:
            print("python -m relay audit: --html reports on the whole log; it cannot be "
                  "combined with --token or --json", file=sys.stderr)
            return ExitStatus.USAGE
        try:
            require_plotting()
        except ReportUnavailable as exc:
            print(f"python -m relay audit: {exc}", file=sys.stderr)
            return ExitStatus.USAGE
    return None


def audit_main(dsn: str, argv: list[str], *, signing_key: Path | None = None,
               warnings: Sequence[str] = (), interval: float | None = None) -> int:
    """`signing_key`: the relay's own key, whose public half checks checkpoints when no
    --public-key is given; `warnings`: printed with the report (e.g. that the runtime
    role could rewrite the log, relay/privilege.py); `interval`: the configured
    wakeup.interval, which the HTML report draws."""
    args = _parse("audit", argv)
    if isinstance(args, int):
        return args
    if args.html:
        from events.report import html_main

        return html_main(dsn, args.html, until_ms=args.until, interval=interval)
    public = None
    if args.checkpoint:
        key_file = args.public_key or signing_key
        try:
            if key_file is None:
                raise checkpoint.CheckpointError("no key to check checkpoints with")
            public = checkpoint.load_public_key(key_file)
        except (checkpoint.CheckpointError, FileNotFoundError) as exc:
            print(f"audit: {exc}: pass --public-key FILE", file=sys.stderr)
            return ExitStatus.USAGE
    token: str | None = args.token
    with connect(dsn, application_name="relay-audit") as conn:
        read_only_snapshot(conn)
        with conn.cursor() as cur:
            if token is not None and not args.verify:
                result = token_replay(cur, token, args.until)
            else:
                total = event_count(cur)
                jobs = args.jobs or (1 if total < PARALLEL_MIN_EVENTS else os.cpu_count() or 1)
                if not workers_can_start():
                    jobs = 1
                progress = _progress(total, sys.stderr.isatty())
                check_all = args.verify and args.until is None
                devices_table: list[tuple[Any, ...]] = []

                def read_devices_table() -> None:
                    devices_table.extend(device_rows(cur))

                try:
                    if jobs > 1:
                        result = replay_parallel(
                            conn, dsn, jobs, verify=args.verify, until_ms=args.until,
                            token=token, progress=progress,
                            meanwhile=read_devices_table if check_all else None)
                    else:
                        result = replay(conn, verify=args.verify, until_ms=args.until,
                                        token=token, progress=progress)
                        if check_all:
                            read_devices_table()
                finally:
                    if progress is not None:
                        progress.close()
            report = _token_report(token, result) if token is not None else _summary(result)
            if args.verify:
                if args.until is None:
                    check_head(cur, result)
                    check_tables(cur, result, devices_table)
                else:
                    check_prefix_against_head(cur, result)
                if public is not None:
                    for position, what in checkpoint.verify(
                            cur, result.last_position, checkpoint.load(args.checkpoint), public):
                        result.chain_problem(position, what)
    if args.verify:
        report["verified"] = result.verified
        report["first_bad_position"] = result.first_bad_position
        report["problems"] = [{"position": p.position, "problem": p.what}
                              for p in result.chain_problems + result.table_problems]
        if args.until is not None:
            report["tables_checked"] = False
        if args.checkpoint:
            report["checkpoints_checked"] = True
    elif result.chain_problem_count:  # events the fold could not read: never a traceback
        report["problems"] = [{"position": p.position, "problem": p.what}
                              for p in result.chain_problems]
    if warnings:
        report["warnings"] = list(warnings)
    if args.json:
        json.dump(report, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        _print_text(report, sys.stdout)
    return ExitStatus.FAILURE if not result.verified else ExitStatus.OK


def _summary(result: Replay) -> dict[str, Any]:
    registrations = result.state.registrations.values()
    active = sum(1 for row in registrations if row[0])
    unregistered = sum(1 for row in registrations if not row[0] and row[2] is not None)
    return {
        "events": result.events,
        "head": result.last_hash.hex() if result.events else None,
        "last_position": result.last_position,
        "devices": {"active": active, "unregistered": unregistered},
        "runs": [_run_json(number, row, result.state.run_apns.get(number),
                           _drivers(result.state, number))
                 for number, row in sorted(result.state.runs.items())],
    }


def _drivers(state: State, run: int) -> list[dict[str, Any]]:
    """Which processes drove which shards of `run` (from the leases its outcomes carry)."""
    shards: dict[tuple[str, str], set[int]] = {}
    for shard, epoch in state.run_fences.get(run, ()):
        holder = state.leases.get((shard, epoch), ("unknown", "unknown"))
        shards.setdefault(holder, set()).add(shard)
    return [{"process": process, "host": host, "shards": sorted(held)}
            for (process, host), held in sorted(shards.items())]


def _run_json(number: int, row: RunRow, apns: Any,
              processes: list[dict[str, Any]]) -> dict[str, Any]:
    """`apns`: where the run sent ({"environment", "endpoint"}; environment "simulator"
    for the built-in simulator), None when its run_started did not record it.
    `processes`: which relay processes drove which token shards of it (empty for runs
    sent before shards existed)."""
    started, finished, tokens, delivered, failed, abandoned, dead, unregistered, kept = row
    return {
        "run": number,
        "started_at": None if started is None else iso_ms(started),
        "finished_at": None if finished is None else iso_ms(finished),
        "tokens": tokens, "delivered": delivered, "failed": failed, "abandoned": abandoned,
        "dead": dead, "unregistered": unregistered, "kept": kept, "apns": apns,
        "simulated": isinstance(apns, dict) and apns.get("environment") == "simulator",
        "processes": processes,
    }


def _token_report(token: str, result: Replay) -> dict[str, Any]:
    row = result.state.device(token)
    return {"token": token, "active": bool(row and row[0]), "history": result.history}


def _print_text(report: dict[str, Any], out: TextIO) -> None:
    if "history" in report:
        state = "active" if report["active"] else "not active"
        out.write(f"token {report['token']}: {state}, {len(report['history'])} events\n")
        for doc in report["history"]:
            details = ", ".join(f"{k}={v}" for k, v in doc.items()
                                if k not in ("position", "type", "at", "token") and v is not None)
            out.write(f"  {doc['position']:>10}  {doc.get('at', '')}  {doc['type']}"
                      f"{'  ' + details if details else ''}\n")
    else:
        head = report["head"] or "(empty log)"
        out.write(f"events        {report['events']:,}\n")
        out.write(f"head          {head}\n")
        out.write(f"devices       {report['devices']['active']:,} active, "
                  f"{report['devices']['unregistered']:,} unregistered\n")
        runs = report["runs"]
        out.write(f"runs          {len(runs):,}\n")
        if len(runs) > TEXT_RUNS_SHOWN:
            out.write(f"  (the latest {TEXT_RUNS_SHOWN}; --json lists all)\n")
        for run in runs[-TEXT_RUNS_SHOWN:]:
            out.write(f"  run {run['run']}: {run['started_at'] or '?'} .. "
                      f"{run['finished_at'] or 'unfinished'}  tokens {run['tokens']}, "
                      f"delivered {run['delivered']}, failed attempts {run['failed']}, "
                      f"abandoned {run['abandoned']}, dead {run['dead']} (unregistered "
                      f"{run['unregistered']}, kept {run['kept']})"
                      f"{_sent_to(run['apns'])}\n")
            if run["processes"]:
                drivers = ", ".join(f"{p['process']} ({len(p['shards'])} shards)"
                                    for p in run["processes"])
                out.write(f"    driven by {drivers}\n")
    if "verified" in report:
        if report["verified"]:
            scope = ("the hash chain and positions" if report.get("tables_checked") is False
                     else "the hash chain, positions, head and cached tables")
            if report.get("checkpoints_checked"):
                scope += ", and every checkpoint given,"
            out.write(f"verified      yes: {scope} match the log\n")
        else:
            out.write(f"verified      NO: first bad position {report['first_bad_position']}\n")
    if report.get("problems") and ("verified" not in report or not report["verified"]):
        if "verified" not in report:
            out.write("unreadable    events the audit could not read (run --verify):\n")
        for problem in report["problems"]:
            out.write(f"  - {problem['problem']}\n")
    for warning in report.get("warnings", ()):
        out.write(f"WARNING       {warning}\n")


def _sent_to(apns: Any) -> str:
    if not isinstance(apns, dict):
        return ""
    if apns.get("environment") == "simulator":
        return f"  SIMULATED (built-in APNs simulator at {apns.get('endpoint')})"
    return f"  APNs {apns.get('environment')} ({apns.get('endpoint')})"


def rebuild_main(dsn: str, argv: list[str] | None = None) -> int:
    """Rewrite the cache tables from the log, in one transaction."""
    status = usage_status("rebuild", argv or [])
    if status is not None:
        return status
    with connect(dsn, application_name="relay-rebuild") as conn, conn.cursor() as cur:
        # The head lock keeps the Journal out until COMMIT, so no append is missed.
        cur.execute("SELECT position FROM log_head FOR UPDATE")
        progress = _progress(event_count(cur), sys.stderr.isatty())
        try:
            result = replay(conn, verify=False, progress=progress)
        finally:
            if progress is not None:
                progress.close()
        devices = write_tables(cur, result.state)
        conn.commit()
    print(f"rebuilt devices ({devices:,} rows) and runs "
          f"({len(result.state.runs):,} rows) from {result.events:,} events")
    return ExitStatus.OK


DEVICE_COPY_TYPES = ["text", "bool", "int8", "int8", "text", "int8", "int4", "int8", "text",
                     "text"]


def write_tables(cur: psycopg.Cursor[Any], state: State) -> int:
    """Replace the cache tables' contents with `state`; returns the number of devices."""
    cur.execute("TRUNCATE devices, runs")
    columns = ", ".join(projection.DEVICE_COLUMNS)
    with cur.copy(f"COPY devices (token, {columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(DEVICE_COPY_TYPES)
        devices = state.devices
        for token, row in devices.items():
            copy.write_row((token, *row))
    projection.write_runs(cur, state.runs.items())
    return len(devices)
