"""The node's configuration: one validated model, loaded from YAML, overridable by CLI flags."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from node.encode.options import OutputOptions
from node.yamlfile import ConfigError, Problem, load_yaml, validate

AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"  # DICOM AE VR: no backslash, no control chars
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "node.yaml"


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a config file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class AllowedCaller(Strict):
    ae_title: str = Field(pattern=AE_TITLE_PATTERN)
    host: str | None = Field(
        default=None, description="IP address or network (CIDR) the caller must connect from"
    )

    @field_validator("host")
    @classmethod
    def _host_is_network(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_network(value, strict=False)
        return value

    def admits_host(self, peer: str) -> bool:
        if self.host is None:
            return True
        try:
            return ipaddress.ip_address(peer) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


class TlsConfig(Strict):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    client_ca: Path | None = Field(
        default=None, description="CA bundle; when set, callers must present a certificate"
    )


class Timeouts(Strict):
    acse: float = Field(30.0, gt=0)
    dimse: float = Field(60.0, gt=0)
    network: float = Field(60.0, gt=0)


class ScpConfig(Strict):
    ae_title: str = Field("DICOM-NODE", pattern=AE_TITLE_PATTERN)
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(16, ge=1)
    max_pdu: int = Field(0, ge=0, description="0 means unlimited")
    workers: int = Field(0, ge=0, description="receiver processes; 0 = two per CPU core")
    require_called_ae_title: bool = False
    allowed_callers: list[AllowedCaller] = Field(
        default_factory=list, description="empty: any calling AE is accepted"
    )
    timeouts: Timeouts = Field(default_factory=Timeouts)
    tls: TlsConfig = Field(default_factory=TlsConfig)

    @field_validator("bind")
    @classmethod
    def _bind_is_address(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value

    def worker_count(self) -> int:
        """Receiver processes. Two per core by default: a pynetdicom association waits on the
        network or the disk about half of the time, and associations in separate processes
        do not contend for one GIL."""
        return self.workers or 2 * (os.cpu_count() or 1)


class StorageConfig(Strict):
    data_dir: Path = Path("data")
    min_free_mb: float = Field(
        1024, ge=0, description="below this much free disk, C-STORE answers 0xA700"
    )


class CompletionConfig(Strict):
    quiet_period_s: float = Field(60.0, gt=0)
    quiet_period_by_calling_ae: dict[str, float] = Field(default_factory=dict)
    after_complete: Literal["reprocess", "ignore"] = "reprocess"

    def quiet_period_for(self, calling_ae: str) -> float:
        return self.quiet_period_by_calling_ae.get(calling_ae, self.quiet_period_s)


class ClientTls(Strict):
    enabled: bool = False
    ca: Path | None = Field(None, description="PEM CA bundle that signed the peer's certificate")
    certificate: Path | None = Field(None, description="our client certificate, if the peer asks for one")
    private_key: Path | None = None


class DestinationConfig(Strict):
    """A DICOM peer that receives results (a PACS, a viewer, a research archive)."""

    ae_title: str = Field(pattern=AE_TITLE_PATTERN)
    host: str
    port: int = Field(ge=1, le=65535)
    tls: ClientTls = Field(default_factory=ClientTls)
    omit_empty_frames: bool | None = Field(None, description="overrides output.omit_empty_frames")
    segmentation_type: Literal["BINARY", "LABELMAP"] | None = Field(None, description="overrides output.segmentation_type")

    def output(self, defaults: OutputOptions) -> OutputOptions:
        changes = {k: v for k, v in (("omit_empty_frames", self.omit_empty_frames),
                                     ("segmentation_type", self.segmentation_type)) if v is not None}
        return defaults.model_copy(update=changes)


class SendingConfig(Strict):
    """Result delivery: transient failures are retried with exponential backoff and jitter."""

    retry_initial_s: float = Field(10.0, gt=0)
    retry_max_s: float = Field(600.0, gt=0)
    deadline_s: float = Field(86400.0, gt=0, description="give up (dead letter) after this long")
    timeout_s: float = Field(30.0, gt=0, description="connect, ACSE and DIMSE timeout")
    sweep_s: float = Field(5.0, gt=0, description="how often due items (and CLI retries) are picked up")


class TritonConfig(Strict):
    url: str | None = Field(None, description="host:port; null runs models in-process (LocalBackend)")
    protocol: Literal["grpc", "http"] = "grpc"
    shared_memory: Literal["auto", "system", "none"] = "auto"
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(4, ge=1)


class InferenceConfig(Strict):
    model_repository: Path = Path("../models")
    triton: TritonConfig = Field(default_factory=TritonConfig)


class PipelineConfig(Strict):
    workers: int = Field(1, ge=1, description="studies processed at the same time")
    routing_file: Path = Path("routing.yaml")


class LoggingConfig(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class NodeConfig(Strict):
    scp: ScpConfig = Field(default_factory=ScpConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    completion: CompletionConfig = Field(default_factory=CompletionConfig)
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    output: OutputOptions = Field(default_factory=OutputOptions)
    sending: SendingConfig = Field(default_factory=SendingConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def destination_for_caller(self, calling_ae: str) -> str | None:
        """'Return to sender': the destination whose AE title is the study's calling AE."""
        return next((name for name, d in self.destinations.items() if d.ae_title == calling_ae), None)

    def resolve_paths(self, base: Path) -> NodeConfig:
        """Relative paths in a config file are relative to that file's folder."""
        storage = self.storage.model_copy(update={"data_dir": _under(base, self.storage.data_dir)})
        inference = self.inference.model_copy(
            update={"model_repository": _under(base, self.inference.model_repository)})
        pipeline = self.pipeline.model_copy(update={"routing_file": _under(base, self.pipeline.routing_file)})
        destinations = {
            name: d.model_copy(update={"tls": d.tls.model_copy(update={
                key: _under(base, getattr(d.tls, key)) for key in ("ca", "certificate", "private_key")
                if getattr(d.tls, key) is not None})})
            for name, d in self.destinations.items()
        }
        tls = self.scp.tls.model_copy(
            update={
                key: _under(base, getattr(self.scp.tls, key))
                for key in ("certificate", "private_key", "client_ca")
                if getattr(self.scp.tls, key) is not None
            }
        )
        scp = self.scp.model_copy(update={"tls": tls})
        return self.model_copy(update={"storage": storage, "scp": scp, "inference": inference,
                                       "pipeline": pipeline, "destinations": destinations})


def _under(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def load_config(path: str | Path | None = None, overrides: dict[str, object] | None = None) -> NodeConfig:
    """Load and validate the node configuration.

    `overrides` maps dotted key paths ("scp.port") to values from the command line; they are
    applied before validation so that a bad flag is reported like a bad key.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError([Problem(doc.file, 1, "", "the top level must be a mapping")])
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        target = doc.data
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    config = validate(doc, NodeConfig)
    problems = _check_tls(config, doc.file)
    if problems:
        raise ConfigError(problems)
    return config.resolve_paths(path.resolve().parent)


def _check_tls(config: NodeConfig, file: str) -> list[Problem]:
    tls = config.scp.tls
    if not tls.enabled:
        return []
    return [
        Problem(file, None, f"scp.tls.{key}", "required when scp.tls.enabled is true")
        for key in ("certificate", "private_key")
        if getattr(tls, key) is None
    ]
