"""`dicom-node`: run the node and talk to it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.presentation import build_context

from node.config import NodeConfig, load_config
from node.yamlfile import ConfigError

app = typer.Typer(
    help="DICOM analysis node: receives studies (C-STORE), runs models, returns SEG and SR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = typer.Option(None, "--config", "-c", help="Node configuration YAML (default: config/node.yaml).")


def _config(path: Optional[Path], overrides: dict[str, object] | None = None) -> NodeConfig:
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        typer.echo("configuration error:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: Optional[Path] = ConfigOption,
    aet: Optional[str] = typer.Option(None, "--aet", help="Our AE title (scp.ae_title)."),
    port: Optional[int] = typer.Option(None, "--port", help="Listening port (scp.port)."),
    bind: Optional[str] = typer.Option(None, "--bind", help="Bind address (scp.bind)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Spool and index folder (storage.data_dir)."),
    quiet_period: Optional[float] = typer.Option(
        None, "--quiet-period", help="Seconds without arrivals after which a study is complete."
    ),
    workers: Optional[int] = typer.Option(None, "--workers", help="Receiver processes (0: one per core)."),
) -> None:
    """Run the node until SIGTERM/SIGINT."""
    from node import logs
    from node.service import NodeService

    cfg = _config(
        config,
        {
            "scp.ae_title": aet,
            "scp.port": port,
            "scp.bind": bind,
            "storage.data_dir": str(data_dir.resolve()) if data_dir else None,
            "completion.quiet_period_s": quiet_period,
            "scp.workers": workers,
        },
    )
    logs.setup(cfg.logging.level)
    try:
        service = NodeService(cfg)
    except ConfigError as exc:
        typer.echo("configuration error:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"cannot start: {exc.strerror or exc} ({cfg.scp.bind}:{cfg.scp.port})", err=True)
        raise typer.Exit(1) from None
    service.run_forever()


@app.command()
def echo(
    host: str = typer.Argument("127.0.0.1", help="Peer host."),
    port: Optional[int] = typer.Argument(None, help="Peer port (default: this node's port)."),
    aet: str = typer.Option("ECHOSCU", "--aet", help="Calling AE title."),
    called_aet: Optional[str] = typer.Option(None, "--called-aet", help="Called AE title (default: ours)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Send a C-ECHO (verification) and report the status."""
    from node.send.scu import associate

    cfg = _config(config)
    assoc = associate(host, port or cfg.scp.port, aet, called_aet or cfg.scp.ae_title, [build_context(Verification)])
    if not assoc.is_established:
        typer.echo(f"association failed: {_why_not(assoc)}", err=True)
        raise typer.Exit(1)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    typer.echo(f"C-ECHO status 0x{code:04X}" if code is not None else "C-ECHO: no response")
    raise typer.Exit(0 if code == 0 else 1)


@app.command()
def send(
    host: str = typer.Argument(..., help="Peer host."),
    port: int = typer.Argument(..., help="Peer port."),
    paths: list[Path] = typer.Argument(..., help="DICOM files or folders (searched recursively)."),
    aet: str = typer.Option("DICOM-NODE", "--aet", help="Calling AE title."),
    called_aet: str = typer.Option("ANY-SCP", "--called-aet", help="Called AE title."),
) -> None:
    """C-STORE files and folders over one association."""
    from node.send.scu import associate, storage_contexts

    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()})
    if not files:
        typer.echo("no files to send", err=True)
        raise typer.Exit(1)
    try:
        contexts = storage_contexts(files)
    except Exception as exc:  # not DICOM part-10 files
        typer.echo(f"cannot read DICOM file meta: {exc}", err=True)
        raise typer.Exit(1) from None
    assoc = associate(host, port, aet, called_aet, contexts)
    if not assoc.is_established:
        typer.echo(f"association failed: {_why_not(assoc)}", err=True)
        raise typer.Exit(1)
    failed = 0
    started = time.monotonic()
    try:
        for path in files:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code is None or code not in (0x0000, 0xB000, 0xB006, 0xB007):
                failed += 1
                typer.echo(f"{path}: " + (f"status 0x{code:04X}" if code is not None else "no response"), err=True)
    finally:
        assoc.release()
    seconds = time.monotonic() - started
    typer.echo(f"sent {len(files) - failed}/{len(files)} instances in {seconds:.2f} s")
    raise typer.Exit(1 if failed else 0)


@app.command()
def studies(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: Optional[Path] = ConfigOption,
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Spool and index folder."),
) -> None:
    """List received studies and their state."""
    from node.store.index import Index

    cfg = _config(config, {"storage.data_dir": str(data_dir.resolve()) if data_dir else None})
    index_path = Path(cfg.storage.data_dir) / "index.sqlite"
    rows = Index(index_path).study_summaries() if index_path.exists() else []
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no studies")
        return
    typer.echo(f"{'STUDY INSTANCE UID':64}  {'STATE':9}  {'SERIES':>6}  {'INSTANCES':>9}  {'CALLING AE':16}  LAST RECEIVED")
    for r in rows:
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_received"]))
        typer.echo(
            f"{r['study_uid']:64}  {r['state']:9}  {r['series']:>6}  {r['instances']:>9}  {r['calling_ae'] or '':16}  {last}"
        )


outbox_app = typer.Typer(help="Results waiting for, or done with, delivery.", invoke_without_command=True,
                         add_completion=False)
app.add_typer(outbox_app, name="outbox")


def _index(config: Optional[Path], data_dir: Optional[Path] = None):
    from node.store.index import Index

    cfg = _config(config, {"storage.data_dir": str(data_dir.resolve()) if data_dir else None})
    path = Path(cfg.storage.data_dir) / "index.sqlite"
    if not path.exists():
        typer.echo(f"no index at {path}: the node has not run with this configuration", err=True)
        raise typer.Exit(1)
    return cfg, Index(path)


@outbox_app.callback()
def outbox_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """List result deliveries (pending, delivered, dead) per destination."""
    if ctx.invoked_subcommand:
        return
    from node.send.outbox import Outbox, list_items

    cfg, index = _index(config)
    Outbox.ensure_schema(index)
    _print_rows(list_items(index), as_json, "outbox is empty", [
        ("ID", ">5", lambda r: r["id"]), ("STATE", "9", lambda r: r["state"]),
        ("DESTINATION", "16", lambda r: r["destination"]), ("TRIES", ">5", lambda r: r["attempts"]),
        ("JOB", "10", lambda r: r["job_key"]), ("LAST ERROR", "", lambda r: r["last_error"] or ""),
    ])


@outbox_app.command("retry")
def outbox_retry(
    item: Optional[int] = typer.Argument(None, help="Outbox ID to retry."),
    all_dead: bool = typer.Option(False, "--all", help="Retry every dead-lettered item."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Queue a dead (or waiting) delivery again, now; the running node picks it up."""
    from node.send.outbox import Outbox, retry

    if (item is None) == (not all_dead):
        typer.echo("give an outbox ID or --all", err=True)
        raise typer.Exit(2)
    cfg, index = _index(config)
    Outbox.ensure_schema(index)
    count = retry(index, item, cfg.sending.deadline_s)
    typer.echo(f"{count} item(s) queued for delivery")
    raise typer.Exit(0 if count else 1)


jobs_app = typer.Typer(help="Pipeline jobs (one per completed study).", invoke_without_command=True,
                       add_completion=False)
app.add_typer(jobs_app, name="jobs")


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """List jobs with their state, rules version and time per stage."""
    if ctx.invoked_subcommand:
        return
    cfg, index = _index(config)
    rows = [dict(r) for r in index.query(
        "SELECT id, study_uid, state, priority, rules_version, created_at, updated_at, reason, stages, explanation"
        " FROM work_items ORDER BY id")]
    for row in rows:
        row["stages"] = json.loads(row["stages"] or "{}")
    _print_rows(rows, as_json, "no jobs", [
        ("ID", ">5", lambda r: r["id"]), ("STATE", "8", lambda r: r["state"]),
        ("RULES", "12", lambda r: r["rules_version"] or "-"),
        ("STAGES (s)", "40", lambda r: " ".join(f"{k}={v[1] - v[0]:.2f}" for k, v in r["stages"].items())),
        ("STUDY / REASON", "", lambda r: r["study_uid"] + (f"  {r['reason']}" if r["reason"] else "")),
    ])


def _print_rows(rows: list[dict], as_json: bool, empty: str, columns: list) -> None:
    """Rows as JSON, or as a table of (title, format, getter) columns."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(empty)
        return
    typer.echo("  ".join(f"{title:{fmt}}" for title, fmt, _ in columns))
    for row in rows:
        typer.echo("  ".join(f"{get(row)!s:{fmt}}" for _, fmt, get in columns))


@jobs_app.command("retry")
def jobs_retry(
    job: int = typer.Argument(..., help="Job ID (see `dicom-node jobs`)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Run a failed (or ignored) job again; the running node picks it up."""
    from node.assemble.workqueue import WorkQueue

    cfg, index = _index(config)
    if not WorkQueue(index, Path(cfg.storage.data_dir)).retry(job):
        typer.echo(f"job {job} is not failed or ignored", err=True)
        raise typer.Exit(1)
    typer.echo(f"job {job} queued")


config_app = typer.Typer(help="Configuration tools.", no_args_is_help=True, add_completion=False)
app.add_typer(config_app, name="config")
route_app = typer.Typer(help="Routing rules.", no_args_is_help=True, add_completion=False)
app.add_typer(route_app, name="route")


def _is_routing_file(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and bool({"rules", "fallback", "mode"} & set(data))


@config_app.command("check")
def config_check(
    path: Optional[Path] = typer.Argument(None, help="node.yaml (default config/node.yaml) or a routing rule file."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Check a node configuration and its routing rules (or one rule file); print every problem."""
    from inference.repository import ModelRepository
    from node.route.rules import load_rules

    routing_only = path is not None and _is_routing_file(path)
    problems = []
    try:
        cfg = load_config(config if routing_only else path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        cfg = None
    if cfg is not None:
        rules_path = path if routing_only else cfg.pipeline.routing_file
        models = ModelRepository(cfg.inference.model_repository).names()
        try:
            rules = load_rules(rules_path, models, set(cfg.destinations))
            typer.echo(f"{rules_path}: {len(rules.file.rules)} rules, version {rules.version}")
        except ConfigError as exc:
            problems.extend(exc.problems)
    for problem in problems:
        typer.echo(str(problem), err=True)
    if problems:
        typer.echo(f"{len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo("configuration OK")


@route_app.command("explain")
def route_explain(
    study: str = typer.Argument(..., help="A received StudyInstanceUID, or a folder of DICOM files."),
    config: Optional[Path] = ConfigOption,
    rules: Optional[Path] = typer.Option(None, "--rules", help="Rule file (default: the configured one)."),
    calling_ae: str = typer.Option("", "--calling-ae", help="For a folder: the sender's AE title to assume."),
    called_ae: str = typer.Option("", "--called-ae", help="For a folder: the called AE title to assume."),
    peer: str = typer.Option("", "--peer", help="For a folder: the sender's IP address to assume."),
) -> None:
    """Show each rule, matched or not, the condition that decided, and the series each model gets."""
    from inference.repository import ModelRepository
    from node.route.rules import load_rules
    from node.route.study import study_from_folder, study_from_index
    from node.store.index import Index

    cfg = _config(config)
    try:
        ruleset = load_rules(rules or cfg.pipeline.routing_file, ModelRepository(cfg.inference.model_repository).names(),
                             set(cfg.destinations))
    except ConfigError as exc:
        typer.echo(f"rules not usable:\n{exc}", err=True)
        raise typer.Exit(2) from None
    if Path(study).is_dir():
        views = study_from_folder(Path(study), calling_ae, called_ae, peer)
    else:
        index_path = Path(cfg.storage.data_dir) / "index.sqlite"
        view = study_from_index(Index(index_path), study, Path(cfg.storage.data_dir)) if index_path.exists() else None
        views = [view] if view else []
    if not views:
        typer.echo(f"no study {study!r} (not received, and not a folder of DICOM files)", err=True)
        raise typer.Exit(1)
    for view in views:
        typer.echo(f"study {view.study_uid} ({len(view.series)} series, calling AE {view.calling_ae or '?'}, "
                   f"peer {view.peer or '?'})")
        typer.echo(ruleset.evaluate(view).explain())


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", help="Where the node runs."),
    slices: int = typer.Option(96, help="Phantom CT slices."),
    size: int = typer.Option(256, help="Phantom image size (pixels)."),
    seed: int = typer.Option(0, help="Phantom seed (lesion sizes and places)."),
    timeout: float = typer.Option(300, help="Seconds to wait for results after the quiet period."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Send a phantom CT study to the running node, receive its SEG and SR, compare with the truth."""
    from node.demo import run_demo

    raise typer.Exit(run_demo(_config(config), host, slices, size, seed, timeout))


def _why_not(assoc: object) -> str:
    if getattr(assoc, "is_rejected", False):
        return "rejected by the peer"
    if getattr(assoc, "is_aborted", False):
        return "aborted"
    return "no connection (refused or timed out)"


def main() -> None:  # pragma: no cover - for `python -m node.cli`
    app(prog_name="dicom-node")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
