"""`dicom-node`: run the node and talk to it."""

from __future__ import annotations

import json
from enum import Enum
import logging
import os
import sys
import time
from pathlib import Path
from datetime import datetime
from typing import Any, Optional

import typer
from node.config import API_TOKEN_ENV, DEFAULT_CONFIG, NodeConfig, load_config
from common.yamlfile import ConfigError

app = typer.Typer(rich_markup_mode=None, 
    help="DICOM analysis node: receives studies (C-STORE), runs models, returns SEG and SR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"dicom-node {version('dicom-node')}")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="Print the version and exit.")) -> None:
    """DICOM analysis node: receives studies (C-STORE), runs models, returns SEG and SR."""


ConfigOption = typer.Option(None, "--config", "-c", help="Node configuration YAML (default: config/node.yaml).")
DataDirOption = typer.Option(None, "--data-dir", help="Spool and index folder (default: node.yaml's storage.data_dir).")


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
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="Listening port (scp.port)."),
    bind: Optional[str] = typer.Option(None, "--bind", help="Bind address (scp.bind)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Spool and index folder (storage.data_dir)."),
    quiet_period: Optional[float] = typer.Option(
        None, "--quiet-period", help="Seconds without arrivals after which a study is complete."
    ),
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                         help="Receiver processes (scp.workers; 0: two per usable CPU)."),
    http_port: Optional[int] = typer.Option(
        None, "--http-port", min=0, max=65535, help="Console, API, health and metrics port (http.port; 0: no HTTP server)."),
) -> None:
    """Run the node until SIGTERM/SIGINT."""
    from common import logs
    from node.receive.launch import LaunchedReceiver, LaunchFailed, launch_receiver, launched_ahead

    overrides: dict[str, object] = {
        "scp.ae_title": aet,
        "scp.port": port,
        "scp.bind": bind,
        "storage.data_dir": str(data_dir.resolve()) if data_dir else None,
        "completion.quiet_period_s": quiet_period,
        "scp.workers": workers,
        "http.port": http_port,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = _config(config, overrides)
    logs.setup(cfg.logging.level)
    # First: receivers import their modules while the service imports its own (launch.py)
    launched: list[LaunchedReceiver] = []
    try:
        try:
            for _ in range(launched_ahead(cfg.scp.worker_count())):
                launched.append(launch_receiver())
            from node.service import NodeService

            service = NodeService(cfg, config or DEFAULT_CONFIG, overrides, launched=launched)
        except BaseException:  # (from here the service's receiver pool stops what it did not use)
            for receiver in launched:
                receiver.discard()
            raise
    except ConfigError as exc:
        typer.echo("configuration error:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(2) from None
    except LaunchFailed as exc:
        typer.echo(f"cannot start: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"cannot start: {exc.strerror or exc} ({cfg.scp.bind}:{cfg.scp.port})", err=True)
        raise typer.Exit(1) from None
    from node.receive.reconcile import SpoolNotMounted

    try:
        service.run_forever()
    except OSError as exc:  # the console's port, or a receiver the pool could not launch
        typer.echo(f"cannot start: {exc.strerror or exc}", err=True)
        service.stop()
        raise typer.Exit(1) from None
    except SpoolNotMounted as exc:
        typer.echo(f"cannot start: {exc}", err=True)
        service.stop()
        raise typer.Exit(1) from None
    # Stopped in order: every acknowledged instance, job state and delivery is on disk. Skip the
    # interpreter's teardown of torch and ONNX Runtime (1-1.5 s here), so a stop takes ~1 s.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def echo(
    host: str = typer.Argument("127.0.0.1", help="Peer host, or the name of a configured destination."),
    port: Optional[int] = typer.Argument(None, help="Peer port (default: the running node's port, else scp.port)."),
    aet: Optional[str] = typer.Option(None, "--aet", help="Calling AE title (default: ECHOSCU; ours for a destination)."),
    called_aet: Optional[str] = typer.Option(None, "--called-aet", help="Called AE title (default: ours, or the destination's)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Send a C-ECHO (verification) and report the result in one line."""
    from node.send.echo import echo as c_echo, echo_destination

    cfg = _config(config)
    peer = cfg.destinations.get(host) if port is None else None
    if peer is not None:  # `dicom-node echo pacs`: the destination as the outbox would reach it
        if called_aet and peer.dicomweb is None:
            peer = peer.model_copy(update={"ae_title": called_aet})
        result = echo_destination(aet or cfg.scp.ae_title, peer, timeout=cfg.sending.timeout_s)
    else:
        result = c_echo(host, port or _running_port(cfg), aet or "ECHOSCU", called_aet or cfg.scp.ae_title,
                        timeout=cfg.sending.timeout_s)
    typer.echo(result.message, err=not result.ok)
    raise typer.Exit(0 if result.ok else 1)


def _running_port(cfg: NodeConfig) -> int:
    """The DICOM port of the node running on this data folder (its --port), else scp.port."""
    from node.liveconfig import read_snapshot

    snapshot = read_snapshot(Path(cfg.storage.data_dir)) or {}
    port = ((snapshot.get("in_force") or {}).get("scp") or {}).get("port")
    return int(port) if isinstance(port, int) and port > 0 else cfg.scp.port


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
    from node.send.status import classify_status, delivered

    import socket

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        typer.echo(f"no such file or folder: {', '.join(missing)}", err=True)
        raise typer.Exit(1)
    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()})
    if not files:
        typer.echo("no files to send", err=True)
        raise typer.Exit(1)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        typer.echo(f"unknown host {host!r}", err=True)
        raise typer.Exit(1) from None
    try:
        contexts = storage_contexts(files)
    except Exception as exc:  # not DICOM part-10 files
        typer.echo(f"cannot read DICOM file meta: {exc}", err=True)
        raise typer.Exit(1) from None
    assoc = associate(host, port, aet, called_aet, contexts)
    if not assoc.is_established:
        typer.echo(f"association failed: {_why_not(assoc, host, port)}", err=True)
        raise typer.Exit(1)
    failed = 0
    started = time.monotonic()
    try:
        for path in files:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if not delivered(code):
                failed += 1
                typer.echo(f"{path}: " + (f"status 0x{code:04X} ({classify_status(code)} failure)" if code is not None
                                          else "no response"), err=True)
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
    """List received studies, newest first: UID, state, modalities, counts, sender, dates (no patient data)."""
    from node.console.summary import studies as study_rows

    cfg = _config_in_force(config, data_dir)
    index = _existing_index(cfg)
    rows = study_rows(index, cfg.http.show_descriptions) if index else []
    _print_rows(rows, as_json, "no studies", [
        ("STUDY INSTANCE UID", "64", lambda r: r["study_uid"]), ("STATE", "9", lambda r: r["outcome"]),
        ("MODALITY", "8", lambda r: ",".join(r["modalities"]) or "-"), ("SERIES", ">6", lambda r: r["series"]),
        ("INSTANCES", ">9", lambda r: r["instances"]), ("CALLING AE", "16", lambda r: r["calling_ae"] or ""),
        ("FIRST RECEIVED", "19", lambda r: _when(r["first_received"])),
        ("LAST RECEIVED", "", lambda r: _when(r["last_received"])),
    ])


outbox_app = typer.Typer(rich_markup_mode=None, help="Results waiting for, or done with, delivery.", invoke_without_command=True,
                         add_completion=False)
app.add_typer(outbox_app, name="outbox")


def _existing_index(cfg: NodeConfig, migrate: bool = True):
    """The configured index; None for a SQLite file that does not exist (the node never ran)."""
    from node.store.index import SQLITE_FILE, Index

    if not cfg.storage.effective_index_url() and not (Path(cfg.storage.data_dir) / SQLITE_FILE).exists():
        return None
    return Index.open(cfg.storage, migrate)


def _config_in_force(path: Optional[Path], data_dir: Optional[Path] = None) -> NodeConfig:
    """For commands that only read: node.yaml, or, when it has problems (an edit in progress,
    which the running node refused), the configuration in force that the node wrote to its data
    folder, with a warning. Read-only tools must not go blind while the node runs on."""
    overrides = {"storage.data_dir": str(data_dir.resolve()) if data_dir else None}
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        from node.liveconfig import read_snapshot

        folder = data_dir.resolve() if data_dir else _data_dir_of(path)
        snapshot = read_snapshot(folder)
        if snapshot is None or not isinstance(snapshot.get("in_force"), dict):
            return _config(path, overrides)  # reports the problems, exit 2
        in_force = snapshot["in_force"]
        in_force.setdefault("storage", {})["data_dir"] = str(folder)  # where it was read: this index
        http = in_force.get("http") or {}
        http["token"] = None  # written as a digest: the environment's token still applies
        if isinstance(http.get("oidc"), dict):
            http["oidc"]["client_secret"] = None
        try:
            cfg = NodeConfig.model_validate(in_force)
        except ValueError:  # written by another release: the file's problems are what to fix
            return _config(path, overrides)
        written = snapshot.get("written_at")
        age = f", written {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(written))}" if written else ""
        typer.echo(f"warning: {path or 'node.yaml'} has {len(exc.problems)} problem(s) (`dicom-node config check`"
                   f" lists them); using the configuration in force that the node wrote to {folder}{age}", err=True)
        return cfg


def _data_dir_of(path: Optional[Path]) -> Path:
    """storage.data_dir as node.yaml says it, read leniently (the file may not validate)."""
    from common.yamlfile import load_yaml
    from node.config import StorageConfig

    file = Path(path) if path else DEFAULT_CONFIG
    try:
        data = load_yaml(file).data
    except ConfigError:  # not even YAML (an edit in progress): find the line itself
        data = {"storage": {"data_dir": _data_dir_line(file)}}
    folder = (data.get("storage") or {}).get("data_dir") if isinstance(data, dict) else None
    folder = Path(folder or StorageConfig().data_dir)
    return folder if folder.is_absolute() else (file.resolve().parent / folder).resolve()


def _data_dir_line(file: Path) -> str | None:
    """`data_dir:` in the `storage:` block of a file YAML cannot parse, by its lines."""
    import re

    try:
        lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    in_storage = False
    for line in lines:
        if re.match(r"^\S", line):
            in_storage = bool(re.match(r"^storage:\s*(#.*)?$", line))
            continue
        found = re.match(r"^\s+data_dir:\s*(['\"]?)([^'\"#]+?)\1\s*(#.*)?$", line) if in_storage else None
        if found:
            return found.group(2)
    return None


def _index(config: Optional[Path], data_dir: Optional[Path] = None, migrate: bool = True, read_only: bool = False):
    """`read_only`: a command that changes nothing may run on the configuration in force."""
    cfg = _config_in_force(config, data_dir) if read_only else \
        _config(config, {"storage.data_dir": str(data_dir.resolve()) if data_dir else None})
    index = _existing_index(cfg, migrate and not read_only)  # reading never changes the schema
    if index is None:
        typer.echo(f"no index in {cfg.storage.data_dir}: the node has not run with this configuration", err=True)
        raise typer.Exit(1)
    return cfg, index


@outbox_app.callback()
def outbox_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: Optional[Path] = ConfigOption,
    data_dir: Optional[Path] = DataDirOption,
) -> None:
    """List result deliveries (pending, delivered, dead) per destination."""
    if ctx.invoked_subcommand:
        return
    from node.send.outbox import list_items

    cfg, index = _index(config, data_dir, read_only=True)
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
    from node.send.outbox import delivery_state, retry

    if (item is None) == (not all_dead):
        typer.echo("give an outbox ID or --all", err=True)
        raise typer.Exit(2)
    cfg, index = _index(config)
    if item is not None:
        state = delivery_state(index, item)
        if state is None:
            typer.echo(f"no outbox item {item}", err=True)
            raise typer.Exit(1)
        if state not in ("dead", "pending"):
            typer.echo(f"outbox item {item} is {state}: only dead or pending items are retried", err=True)
            raise typer.Exit(1)
    count = retry(index, item, cfg.sending.deadline_s)
    typer.echo(f"{count} item(s) queued for delivery")
    raise typer.Exit(0 if count or all_dead else 1)


@outbox_app.command("resend")
def outbox_resend(
    item: int = typer.Argument(..., help="Outbox ID of a delivered item."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Send a delivered result set again (the PACS lost it): the same files, the same UIDs."""
    from node.jobs.store import JobStore
    from node.send.outbox import resend

    cfg, index = _index(config)
    refused = resend(index, item, cfg.sending.deadline_s, JobStore(index).newer_job)
    if refused:
        typer.echo(refused, err=True)
        raise typer.Exit(1)
    typer.echo(f"outbox item {item} queued to be sent again")


jobs_app = typer.Typer(rich_markup_mode=None, help="Pipeline jobs (one per completed study).", invoke_without_command=True,
                       add_completion=False)
app.add_typer(jobs_app, name="jobs")


@jobs_app.callback()
def jobs_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: Optional[Path] = ConfigOption,
    data_dir: Optional[Path] = DataDirOption,
) -> None:
    """List jobs: state (and stage), attempts, next attempt, rules, time per stage, reason."""
    if ctx.invoked_subcommand:
        return
    from node.console.summary import job_row
    from node.jobs.store import JobStore

    cfg, index = _index(config, data_dir, read_only=True)
    rows = [job_row(job) for job in JobStore(index).all_jobs()]
    _print_rows(rows, as_json, "no jobs", [
        ("ID", ">5", lambda r: r["id"]),
        ("STATE", "16", lambda r: r["state"] + (f"({r['stage']})" if r["state"] == "running" and r["stage"] else "")),
        ("TRIES", ">5", lambda r: r["attempts"]),
        ("NEXT ATTEMPT", "19", lambda r: _when(r["next_attempt"])),
        ("RULES", "20", lambda r: ",".join(r["rules"]) or "-"),
        ("MODELS", "16", lambda r: ",".join(r["models"]) or "-"),
        ("STAGES (s)", "44", lambda r: " ".join(f"{k}={v:.2f}" for k, v in r["stage_seconds"].items())),
        ("STUDY / REASON", "", lambda r: r["study_uid"] + (f"  {r['reason']}" if r["reason"] else "")),
    ])


def _when(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


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
    job: Optional[int] = typer.Argument(None, help="Job ID (see `dicom-node jobs`)."),
    all_jobs: bool = typer.Option(False, "--all", help="Every failed and waiting job."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Run a failed, ignored or waiting job again now (same result UIDs); the running node picks it up."""
    from node.jobs.store import IllegalTransition, JobStore, UnknownJob

    if (job is None) == (not all_jobs):
        typer.echo("give a job ID or --all", err=True)
        raise typer.Exit(2)
    cfg, index = _index(config)
    try:
        count = JobStore(index).retry(job)
    except (UnknownJob, IllegalTransition) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{count} job(s) queued")
    raise typer.Exit(0 if count or all_jobs else 1)


index_app = typer.Typer(rich_markup_mode=None, help="The index's schema version (Alembic migrations).", no_args_is_help=True,
                        add_completion=False)
app.add_typer(index_app, name="index")


@index_app.command("version")
def index_version(config: Optional[Path] = ConfigOption) -> None:
    """The index's schema version and this release's; exit 1 when they differ."""
    from node.store.migrations import HEAD, schema_version

    cfg, index = _index(config, migrate=False)
    current = schema_version(index)
    typer.echo(f"{index.display_url}: schema {current or 'without a version (written before 0001)'};"
               f" this release: {HEAD}")
    raise typer.Exit(0 if current == HEAD else 1)


@index_app.command("upgrade")
def index_upgrade(config: Optional[Path] = ConfigOption) -> None:
    """Bring the index to this release's schema. Every node process also does it when it opens the
    index; run it once before a rolling upgrade of replicas (migrations only add, so replicas of
    the previous release keep working on the upgraded schema)."""
    from node.store.migrations import schema_version

    cfg, index = _index(config)
    typer.echo(f"{index.display_url}: schema {schema_version(index)}")


config_app = typer.Typer(rich_markup_mode=None, help="Configuration tools.", no_args_is_help=True, add_completion=False)
app.add_typer(config_app, name="config")
route_app = typer.Typer(rich_markup_mode=None, help="Routing rules.", no_args_is_help=True, add_completion=False)
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
    """Check a node configuration and its routing rules together (as the running node reloads them);
    print every problem, and the changed keys that the running node applies only after a restart."""
    from node.liveconfig import check, read_snapshot, restart_needed

    routing_only = path is not None and _is_routing_file(path)
    node_yaml = config if routing_only else path
    checked = check(node_yaml, None, path if routing_only else None)
    if checked.config is not None:
        snapshot = read_snapshot(checked.config.storage.data_dir)
        if snapshot and snapshot.get("overrides"):  # the running node's flags apply to the file too
            checked = check(node_yaml, snapshot["overrides"], path if routing_only else None)
    for problem in checked.problems:
        typer.echo(str(problem), err=True)
    if not checked.ok:
        typer.echo(f"{len(checked.problems)} problem(s)", err=True)
        raise typer.Exit(2)  # as every command that meets a bad configuration (README, "Command line")
    assert checked.rules is not None and checked.config is not None
    typer.echo(f"{checked.rules_path}: {len(checked.rules.file.rules)} rules, version {checked.rules.version}")
    snapshot = read_snapshot(checked.config.storage.data_dir)
    if snapshot and not routing_only:
        pending = restart_needed(snapshot["started"], checked.config)
        if pending:
            typer.echo(f"the running node applies these changes only after a restart: {', '.join(pending)}")
    typer.echo("configuration OK")


models_app = typer.Typer(rich_markup_mode=None, help="The model repository: versions, where they came from, imports.",
                         no_args_is_help=True, add_completion=False)
app.add_typer(models_app, name="models")


def _rule_uses(cfg: NodeConfig) -> dict[str, list[str]]:
    """{model@version: rules running it} for node.yaml's routing file (none when it is unreadable)."""
    from inference.repository import ModelRepository
    from node.route.rules import load_rules

    models = ModelRepository(cfg.inference.model_repository)
    try:
        rules = load_rules(cfg.pipeline.routing_file).file
    except ConfigError:
        return {}
    return rules.model_uses(lambda name: (models.versions(name) or [None])[-1])


@models_app.command("list")
def models_list(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Every model and version: task, where it came from (bundle, version, checksum), whether its
    file is intact, and which rules run it (live or in shadow)."""
    from inference.repository import ModelRepository

    cfg = _config_in_force(config)
    models = ModelRepository(cfg.inference.model_repository)
    uses = _rule_uses(cfg)
    rows = []
    for name, versions in models.catalog().items():
        for version in versions:
            spec = models.spec(f"{name}@{version}")
            try:
                models.verified_file(spec)
                status = "ok"
            except ConfigError as exc:
                status = "; ".join(p.message for p in exc.problems)
            p = spec.provenance
            rows.append({"model": name, "version": version, "latest": version == versions[-1], "task": spec.task,
                         "source": f"{p.source} {p.source_name} {p.source_version}".strip() if p else "repository",
                         "sha256": p.sha256 if p else None, "imported_at": p.imported_at if p else None,
                         "status": status, "rules": uses.get(f"{name}@{version}", [])})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'MODEL':20} {'VER':>4}  {'TASK':13} {'SOURCE':34} {'SHA-256':14} {'FILE':6} RULES")
    for r in rows:
        typer.echo(f"{r['model'][:20]:20} {r['version']:>4}{'*' if r['latest'] else ' '} {r['task']:13} "
                   f"{r['source'][:34]:34} {(r['sha256'] or '-')[:12]:14} {r['status'][:60]:6} "
                   f"{', '.join(r['rules']) or '-'}")
    typer.echo("* latest: what a rule naming the model without @version runs")


def _import(cfg: NodeConfig, imported_of: Any, name: str) -> None:
    """Read, refuse or export, and report (shared by the bundle and TorchScript imports)."""
    from inference.bundle import ImportRefused
    from inference.export.repository import ExportMismatch, VersionRefused, add_version
    from inference.repository import ModelRepository

    repository = Path(cfg.inference.model_repository)
    existing = ModelRepository(repository).versions(name)
    try:
        imported = imported_of(existing[-1] + 1 if existing else 1)
    except ImportRefused as exc:
        typer.echo("import refused:", err=True)
        for problem in exc.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(2) from None
    except (ValueError, RuntimeError, OSError) as exc:  # a spec that does not validate, weights torch cannot read
        typer.echo(f"import refused: {type(exc).__name__}: {str(exc)[:800]}", err=True)
        raise typer.Exit(2) from None
    for line in imported.report:
        typer.echo(f"  {line}")
    try:
        folder = add_version(repository, imported.spec, imported.network)
    except (VersionRefused, ExportMismatch) as exc:
        typer.echo(f"import refused: {exc}", err=True)
        raise typer.Exit(2) from None
    except (RuntimeError, ValueError) as exc:  # the network does not export to ONNX
        typer.echo(f"import refused: the network does not export to ONNX: {type(exc).__name__}: {str(exc)[:800]}",
                   err=True)
        raise typer.Exit(2) from None
    spec = imported.spec
    typer.echo(f"imported {spec.name} version {spec.version} into {folder}")
    typer.echo(f"rules: `run: [{spec.name}@{spec.version}]` pins it; `shadow: [{spec.name}@{spec.version}]` tries it"
               f" beside the live version; a rule naming `{spec.name}` alone runs the latest version from its next job")


def _codes(path: Optional[Path]) -> dict[str, Any]:
    from common.yamlfile import load_yaml

    if path is None:
        return {}
    try:
        data = load_yaml(path).data
    except ConfigError as exc:
        typer.echo(f"codes file not usable:\n{exc}", err=True)
        raise typer.Exit(2) from None
    if not isinstance(data, dict):
        typer.echo(f"{path}: a mapping of label name to category/type codes", err=True)
        raise typer.Exit(2)
    return data


class FindingsMode(str, Enum):
    PER_LABEL = "per_label"
    PER_COMPONENT = "per_component"


NameOption = typer.Option(None, "--name", help="Model name in the repository (default: the folder's or file's name).")
VersionOption = typer.Option(None, "--version", min=1, help="Version number (default: the next one).")


@models_app.command("import-bundle")
def models_import_bundle(
    bundle: Path = typer.Argument(..., exists=True, file_okay=False, help="A MONAI bundle folder (configs/, models/)."),
    name: Optional[str] = NameOption,
    version: Optional[int] = VersionOption,
    codes: Optional[Path] = typer.Option(None, "--codes", exists=True, dir_okay=False,
                                         help="YAML: label name -> {category, type[, region, color]} codes."),
    findings: FindingsMode = typer.Option(FindingsMode.PER_LABEL, "--findings",
                                          help="per_component: each connected component is a finding (lesions);"
                                          " per_label: one finding per label (organs)."),
    min_component_voxels: int = typer.Option(0, "--min-component-voxels", min=0,
                                             help="Smaller components are dropped (on the source grid)."),
    only: Optional[list[str]] = typer.Option(None, "--only", help=(
        "A channel to report, by its channel_def name (repeat for more); the others are left unnamed:"
        " where one wins, background. Default: every channel, each with a code.")),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Import a MONAI bundle as a new version: its transforms become the node's spec (or the import
    is refused, naming what has no equivalent), its network is exported to ONNX and checked."""
    from inference.bundle import read_bundle

    cfg = _config(config)
    model = _model_name(name or bundle.resolve().name)
    mapping = _codes(codes)
    reporting = {"findings": findings.value, "min_component_voxels": min_component_voxels}
    _import(cfg, lambda next_version: read_bundle(bundle, model, version or next_version, mapping, reporting,
                                                  only or None), model)


@models_app.command("import-torchscript")
def models_import_torchscript(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A TorchScript file (torch.jit.save)."),
    settings: Path = typer.Option(..., "--settings", exists=True, dir_okay=False,
                                  help="YAML: task, preprocessing, postprocessing and labels (README, 'Model spec')."),
    name: Optional[str] = NameOption,
    version: Optional[int] = VersionOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Import a TorchScript network with a small settings file as a new version."""
    from common.yamlfile import load_yaml
    from inference.bundle import read_torchscript

    cfg = _config(config)
    model = _model_name(name or file.stem)
    try:
        data = load_yaml(settings).data
    except ConfigError as exc:
        typer.echo(f"settings not usable:\n{exc}", err=True)
        raise typer.Exit(2) from None
    _import(cfg, lambda next_version: read_torchscript(file, data if isinstance(data, dict) else {}, model,
                                                       version or next_version), model)


def _model_name(name: str) -> str:
    import re

    if not re.match(r"^[A-Za-z0-9_.-]+$", name) or name.startswith("."):
        typer.echo(f"not a model name (letters, digits, '_', '.', '-'): {name!r}; give one with --name", err=True)
        raise typer.Exit(2)
    return name


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

    cfg = _config(config)
    try:
        ruleset = load_rules(rules or cfg.pipeline.routing_file, ModelRepository(cfg.inference.model_repository).catalog(),
                             set(cfg.destinations), set(cfg.deidentification))
    except ConfigError as exc:
        typer.echo(f"rules not usable:\n{exc}", err=True)
        raise typer.Exit(2) from None
    if Path(study).is_dir():
        views = study_from_folder(Path(study), calling_ae, called_ae, peer)
    else:
        index = _existing_index(cfg)
        view = study_from_index(index, study, Path(cfg.storage.data_dir)) if index else None
        views = [view] if view else []
    if not views:
        typer.echo(f"no study {study!r} (not received, and not a folder of DICOM files)", err=True)
        raise typer.Exit(1)
    for view in views:
        typer.echo(f"study {view.study_uid} ({len(view.series)} series, calling AE {view.calling_ae or '?'}, "
                   f"peer {view.peer or '?'})")
        typer.echo(ruleset.evaluate(view).explain(cfg.sender_warning(view.calling_ae)))


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: Optional[Path] = ConfigOption,
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Spool and index folder."),
) -> None:
    """The dashboard's summary: readiness, queues, jobs, outbox, disk, recent associations."""
    from node.console.summary import attention, dashboard, format_status
    from node.jobs.store import JobStore
    from node.retention import Retention

    cfg, index = _index(config, data_dir, read_only=True)
    summary = _running_summary(cfg)
    answered = summary is not None
    if summary is None:
        summary = dashboard(index, JobStore(index), Retention(index, Path(cfg.storage.data_dir)), cfg)
        summary["attention"] = attention(index, Path(cfg.storage.data_dir), None, monitoring=cfg.inference.monitoring)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_status(summary))
    if not answered:  # figures from the index only: say so to a script too
        raise typer.Exit(1)


def _running_summary(cfg: NodeConfig) -> dict[str, Any] | None:
    """The running node's own summary over its HTTP API (live state included), if it answers."""
    import ssl
    import urllib.error
    import urllib.request

    from node.liveconfig import read_snapshot

    http = cfg.http
    snapshot = read_snapshot(Path(cfg.storage.data_dir))  # the running node's port, as its flags set it
    running = ((snapshot or {}).get("in_force") or {}).get("http") or {}
    if isinstance(running.get("port"), int) and 0 <= running["port"] <= 65535:
        # the port only: the address and TLS stay node.yaml's, so that no file in the data folder
        # can send the token elsewhere
        http = http.model_copy(update={"port": running["port"]})
    if not http.port:
        return None
    host = "127.0.0.1" if http.bind in ("0.0.0.0", "::") else http.bind
    scheme = "https" if http.tls.certificate else "http"
    request = urllib.request.Request(f"{scheme}://{host}:{http.port}/api/summary")
    token = os.environ.get(API_TOKEN_ENV) or http.effective_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    # Our own console, reached by the address in our own config: its certificate may be self-signed.
    context = ssl._create_unverified_context() if scheme == "https" else None
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            typer.echo(f"the node answers at {scheme}://{host}:{http.port} but refuses this tool's token: set"
                       f" {API_TOKEN_ENV} to an API token (`dicom-node users token NAME`)", err=True)
        return None
    except (urllib.error.URLError, OSError, ValueError):
        return None


@app.command()
def audit(
    since: str = typer.Option("1d", "--since", help="From when: a date (2026-11-23, 2026-11-23T08:00) or an age"
                              " (30m, 12h, 7d)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array of records."),
    config: Optional[Path] = ConfigOption,
    data_dir: Optional[Path] = DataDirOption,
) -> None:
    """The audit trail: DICOM transfers in and out, refused associations, starts and stops."""
    from node.store.audit import AuditTrail, since_time

    try:
        start = since_time(since)
    except ValueError:
        typer.echo(f"--since: not a date or an age: {since!r}", err=True)
        raise typer.Exit(2) from None
    _, index = _index(config, data_dir, read_only=True)
    records = [r.as_json() for r in AuditTrail(index).since(start)]
    _print_rows(records, as_json, "no audit records", [
        ("ID", ">6", lambda r: r["id"]),
        ("WHEN", "19", lambda r: _when(r["recorded_at"])),
        ("EVENT", "6", lambda r: r["event_id"]),
        ("TYPE", "6", lambda r: r["event_type"] or "-"),
        ("ACTION", "6", lambda r: r["action"]),
        ("OUTCOME", ">7", lambda r: r["outcome"]),
        ("ACTOR", "16", lambda r: r["actor"] or "-"),
        ("PEER / DETAIL", "", lambda r: " ".join([*filter(None, [r["peer"], r["destination"], r["reason"]]),
                                                 *(f"{uid}:{n}" for uid, n in r["studies"].items())])),
    ])


users_app = typer.Typer(rich_markup_mode=None, help="Console accounts (local; OIDC users appear at their first sign-in) and API tokens.",
                        no_args_is_help=True, add_completion=False)
app.add_typer(users_app, name="users")


def _account_change(config: Optional[Path], reason: str, change: Any) -> Any:
    """Run an account change on the index and record it in the audit trail, the operating
    system's user as the actor (PS3.15 A.5.3.11, User Security Attributes Changed)."""
    import getpass
    import time

    from node.store.accounts import AccountError, Accounts
    from node.store.audit import AuditEvent, AuditEventType, AuditRecord, AuditTrail, Outcome

    _, index = _index(config)
    trail = AuditTrail(index)
    actor = f"{getpass.getuser()}@cli"

    def audit(outcome: Outcome, detail: str) -> None:
        trail.record(AuditRecord(AuditEvent.SECURITY_ALERT, "E", outcome, actor=actor, person=True,
                                 event_type=AuditEventType.USER_SECURITY_ATTRIBUTES_CHANGED, target="dicom-node users",
                                 reason=detail), time.time())

    try:
        result = change(Accounts(index))
    except AccountError as exc:
        audit(Outcome.MINOR_FAILURE, f"{reason}: {exc}")
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    audit(Outcome.SUCCESS, reason)
    return result


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="The account's name (what the audit trail shows)."),
    role: str = typer.Option("viewer", "--role", help="viewer, operator or admin."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from standard input."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Add a local account (its password hashed with argon2id)."""
    from node.store.accounts import Role

    if role not in {r.value for r in Role}:
        typer.echo(f"--role: one of {', '.join(r.value for r in Role)}", err=True)
        raise typer.Exit(2)
    password = sys.stdin.readline().rstrip("\n") if password_stdin else typer.prompt(
        "Password", hide_input=True, confirmation_prompt=True)
    _account_change(config, f"account {name} added as {role}", lambda a: a.add(name, Role(role), password))
    typer.echo(f"account {name} added ({role})")


@users_app.command("list")
def users_list(
    as_json: bool = typer.Option(False, "--json", help="One JSON array of accounts."),
    config: Optional[Path] = ConfigOption,
    data_dir: Optional[Path] = DataDirOption,
) -> None:
    """Accounts with their roles, state and API tokens (never the tokens themselves)."""
    from node.store.accounts import Accounts

    _, index = _index(config, data_dir, read_only=True)
    accounts = Accounts(index)
    rows = [{**a.as_json(), "tokens": [t["id"] for t in accounts.tokens(a.name) if not t["revoked_at"]]}
            for a in accounts.all()]
    _print_rows(rows, as_json, "no accounts", [
        ("NAME", "24", lambda r: r["name"]), ("ROLE", "8", lambda r: r["role"]), ("SOURCE", "6", lambda r: r["source"]),
        ("STATE", "8", lambda r: "disabled" if r["disabled"] else "enabled"),
        ("LAST LOGIN", "19", lambda r: _when(r["last_login"]) if r["last_login"] else "-"),
        ("TOKENS", "", lambda r: ",".join(map(str, r["tokens"])) or "-"),
    ])


@users_app.command("disable")
def users_disable(name: str, config: Optional[Path] = ConfigOption) -> None:
    """Disable an account: its logins, sessions and API tokens stop working at once."""
    from node.console.sessions import Sessions

    _account_change(config, f"account {name} disabled", lambda a: a.set_disabled(name, True))
    Sessions(_index(config)[1]).end_all(name)  # ended, not only hidden: enabling it again revives none
    typer.echo(f"account {name} disabled")


@users_app.command("enable")
def users_enable(name: str, config: Optional[Path] = ConfigOption) -> None:
    """Enable a disabled account again."""
    _account_change(config, f"account {name} enabled", lambda a: a.set_disabled(name, False))
    typer.echo(f"account {name} enabled")


@users_app.command("token")
def users_token(
    name: str = typer.Argument(..., help="The account the token acts as (with its role)."),
    label: str = typer.Option("", "--label", help="What the token is for (shown in listings)."),
    revoke: Optional[int] = typer.Option(None, "--revoke", help="Revoke the token with this id instead."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Issue an API token for an account (printed once, stored hashed), or revoke one."""
    if revoke is not None:
        _account_change(config, f"API token {revoke} revoked", lambda a: a.revoke_token(revoke))
        typer.echo(f"token {revoke} revoked")
        return
    token_id, token = _account_change(config, f"API token issued to {name}", lambda a: a.issue_token(name, label))
    typer.echo(f"token {token_id} for {name} (shown once; send it as 'Authorization: Bearer <token>'):", err=True)
    typer.echo(token)


@app.command()
def cleanup(
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be deleted; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (with --dry-run)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Apply storage.retention now (the running node also does it on its own schedule)."""
    from node.retention import Retention, describe_plan, to_json

    cfg, index = _index(config)
    policy = cfg.storage.retention
    if not (policy.instances_days or policy.results_days or policy.max_store_gb):
        typer.echo("no storage.retention policy is set: nothing is ever deleted")
        return
    retention = Retention(index, Path(cfg.storage.data_dir))
    if dry_run:
        plan = retention.plan(policy)
        typer.echo(to_json(plan) if as_json else describe_plan(plan))
        return
    done = retention.run(policy)
    typer.echo(f"deleted {done['studies']} studies ({done['instances']} instances, {done['bytes'] / 1e6:.1f} MB)"
               f" and {done['result_files']} result files")


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", help="Where the node runs."),
    slices: int = typer.Option(96, help="Phantom CT slices."),
    size: int = typer.Option(256, help="Phantom image size (pixels)."),
    seed: int = typer.Option(0, help="Phantom seed (lesion sizes and places)."),
    timeout: float = typer.Option(300, help="Seconds to wait for results after the quiet period."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535,
                                       help="The node's DICOM port (default: the running node's, else scp.port)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Send a phantom CT study to the running node, receive its SEG and SR, compare with the truth."""
    from node.demo import run_demo

    cfg = _config_in_force(config)
    raise typer.Exit(run_demo(cfg, host, slices, size, seed, timeout, port or _running_port(cfg)))


def _why_not(assoc: object, host: str, port: int) -> str:
    from node.send.echo import why_no_connection
    from node.send.scu import rejection

    refused = rejection(assoc)  # type: ignore[arg-type]
    if refused is not None:
        return f"rejected by the peer ({refused.text})"
    return why_no_connection(host, port, 5.0)


def main() -> None:  # pragma: no cover - for `python -m node.cli`
    app(prog_name="dicom-node")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
