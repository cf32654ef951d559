"""The node's configuration: one validated model, loaded from YAML, overridable by CLI flags."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from urllib.parse import urlparse
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from common.cpus import usable_cpus
from common.yamlfile import ConfigError, Problem, load_yaml, validate

MIN_TOKEN_LENGTH = 16  # http.token and DICOM_NODE_HTTP_TOKEN alike
ACCOUNT_TOKEN_PREFIX = "dnt_"  # an account's API token (node/store/accounts.py): never the shared admin token
API_TOKEN_ENV = "DICOM_NODE_API_TOKEN"  # the CLI's token for the node's API (an account's), not the node's own
AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"  # DICOM AE VR: no backslash, no control chars
AE_TITLE_RULE = "1 to 16 characters, not all spaces, no backslash or control characters (PS3.5 AE)"


def _ae_title(value: str) -> str:
    """A plain message for a bad AE title (pydantic's would print the regular expression)."""
    if not re.match(AE_TITLE_PATTERN, value) or not value.strip():
        raise ValueError(f"not an AE title ({AE_TITLE_RULE}): {value!r}")
    return value


AeTitle = Annotated[str, AfterValidator(_ae_title)]
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "node.yaml"
HTTP_TOKEN_ENV = "DICOM_NODE_HTTP_TOKEN"
OIDC_SECRET_ENV = "DICOM_NODE_OIDC_CLIENT_SECRET"
INDEX_URL_ENV = "DICOM_NODE_INDEX_URL"  # keeps the database password out of node.yaml


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a config file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


def _ip_address(value: str) -> str:
    ipaddress.ip_address(value)
    return value


def _ip_network(value: str) -> str:
    ipaddress.ip_network(value, strict=False)
    return value


IpAddress = Annotated[str, AfterValidator(_ip_address)]  # where a server binds
IpNetwork = Annotated[str, AfterValidator(_ip_network)]  # an address or a CIDR network a peer must be in


def in_network(peer: str, network: str) -> bool:
    try:
        return ipaddress.ip_address(peer) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


class AllowedCaller(Strict):
    ae_title: AeTitle
    host: IpNetwork | None = Field(
        default=None, description="IP address or network (CIDR) the caller must connect from"
    )

    def admits_host(self, peer: str) -> bool:
        return self.host is None or in_network(peer, self.host)


class TlsConfig(Strict):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    client_ca: Path | None = Field(
        default=None, description="CA bundle; when set, callers must present a certificate"
    )


class Timeouts(Strict):
    acse: float = Field(30.0, gt=0, description="a connection must complete its A-ASSOCIATE-RQ within this "
                        "time from connecting")
    dimse: float = Field(
        60.0, gt=0, description="a DIMSE message (command and data set) must arrive whole within this time "
        "from its first fragment, plus one second per 64 KiB it carries; else A-ABORT")
    network: float = Field(60.0, gt=0, description="a read that makes no progress, or an idle association, "
                           "ends the connection after this long")
    pdu: float = Field(
        60.0, gt=0, description="a PDU must arrive whole within this time from its first byte, plus one second "
        "per 64 KiB it carries; else A-ABORT (a peer trickling bytes keeps no slot)")
    drain: float = Field(
        300.0, gt=0, description="when the node stops (SIGTERM, Ctrl-C), or a reload changed receiver settings, "
        "open associations may go on this long (under the old settings); then they are aborted (their sender "
        "resends what was not acknowledged)")


class ScpConfig(Strict):
    ae_title: AeTitle = "DICOM-NODE"
    ae_titles: list[str] = Field(
        default_factory=list,
        description="every AE title the node answers to; default [ae_title]; ae_title is always one of them",
    )
    bind: IpAddress = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(16, ge=1)
    max_pdu: int = Field(0, ge=0, description="0 means: up to max_pdu_cap")
    max_pdu_cap: int = Field(
        64 << 20, ge=1 << 16, le=1 << 30,
        description="largest PDU accepted (and announced) when max_pdu is 0",
    )
    max_instance_mb: int = Field(
        2048, ge=1, description="largest data set one C-STORE may carry (pynetdicom holds it in memory); "
        "a larger one is aborted as it arrives")
    workers: int = Field(0, ge=0, description="receiver processes; 0 = two per usable CPU "
                         "(the affinity, or a smaller CPU quota)")
    require_called_ae_title: bool = False
    allowed_callers: list[AllowedCaller] = Field(
        default_factory=list, description="empty: any calling AE is accepted"
    )
    timeouts: Timeouts = Field(default_factory=Timeouts)
    tls: TlsConfig = Field(default_factory=TlsConfig)

    @field_validator("ae_titles")
    @classmethod
    def _titles_are_ae_titles(cls, value: list[str]) -> list[str]:
        for title in value:
            _ae_title(title)
        return list(dict.fromkeys(t.strip() for t in value))

    @model_validator(mode="after")
    def _own_title_listed(self) -> "ScpConfig":
        """`ae_titles` alone: the first is our own title. Both: `ae_title` is added if missing."""
        if self.ae_titles:
            if "ae_title" not in self.model_fields_set:
                self.ae_title = self.ae_titles[0]
            elif self.ae_title.strip() not in self.ae_titles:
                self.ae_titles = [self.ae_title.strip(), *self.ae_titles]
        return self

    def called_ae_titles(self) -> list[str]:
        """The AE titles this node answers to (checked when require_called_ae_title is set)."""
        return self.ae_titles or [self.ae_title.strip()]

    def pdu_limit(self) -> int:
        """The largest P-DATA PDU we accept, and announce as our maximum length."""
        return self.max_pdu or self.max_pdu_cap

    def worker_count(self) -> int:
        """Receiver processes. Two per usable CPU by default (common.cpus: the affinity, or a
        smaller CPU quota): a pynetdicom association waits on the network or the disk about half
        of the time, and associations in separate processes do not contend for one GIL."""
        return self.workers or 2 * usable_cpus()


class RetentionConfig(Strict):
    """What the node deletes by itself (README, "Retention"). Nothing is deleted by default.

    A study is *finished* when it is complete, every job of it is done or ignored and every
    delivery of it is delivered; only finished studies are ever deleted. Failed jobs and dead
    letters keep their study until they are retried and finish.
    """

    instances_days: float | None = Field(
        None, gt=0, description="delete a finished study's instances this many days after it finished")
    results_days: float | None = Field(
        None, gt=0, description="delete result files (SEG, SR) this many days after they were all delivered")
    max_store_gb: float | None = Field(
        None, gt=0, description="size cap for stored instances: evict the oldest finished studies first")
    interval_s: float = Field(3600.0, gt=0, description="how often the retention job runs")


class StorageConfig(Strict):
    data_dir: Path = Path("data")
    min_free_mb: float = Field(
        1024, ge=0, description="below this much free disk, C-STORE answers 0xA700"
    )
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    index_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the index: null is SQLite in data_dir (one node);"
        " postgresql+psycopg://user@host/db lets several replicas share one index and one data_dir;"
        " the environment variable DICOM_NODE_INDEX_URL overrides it",
    )
    lease_s: float = Field(
        30.0, gt=1, description="how long a claimed job or delivery stays with its replica without a heartbeat"
        " before another replica takes it over",
    )
    journal_mb: float = Field(
        64.0, ge=0, le=4096, description="each receiving process's intake journal (data_dir/journal, two segments of half"
        " this, zero-filled as used): a new instance is acknowledged once its bytes are there (one fdatasync) and"
        " its file is synced behind the acknowledgement; an instance larger than a segment, and 0, fsync the file"
        " and its folder before the acknowledgement instead",
    )

    def effective_index_url(self) -> str | None:
        return os.environ.get(INDEX_URL_ENV) or self.index_url


class SignalSettings(Strict):
    """Which completion signals complete a caller's studies (README, "Completion signals")."""

    mpps: bool = Field(True, description="an MPPS step this caller ended (COMPLETED or DISCONTINUED)")
    ian: bool = Field(True, description="an Instance Availability Notification this caller sent")
    hl7: bool = Field(True, description="an HL7 order-complete or final-result message for the study's accession"
                                        " number completes this caller's studies")
    image_counts: bool = Field(False, description="the counts this caller's images carry (ImagesInAcquisition,"
                               " InConcatenationTotalNumber): complete when every series has reached them")
    source_count: str | None = Field(None, description="a destination (the sending PACS) to ask with C-FIND for"
                                     " the study's NumberOfStudyRelatedInstances: complete when that many are here")
    discontinued: Literal["complete", "cancel"] = Field(
        "complete", description="an MPPS step DISCONTINUED: complete the study as for COMPLETED, or complete it"
        " without running anything (its job is ignored, saying why)")


class CompletionConfig(Strict):
    quiet_period_s: float = Field(60.0, gt=0)
    quiet_period_by_calling_ae: dict[str, float] = Field(default_factory=dict)
    after_complete: Literal["reprocess", "ignore"] = "reprocess"
    mpps_grace_s: float = Field(
        120.0, gt=0, description="a study with a completion signal (an MPPS step COMPLETED or DISCONTINUED, "
        "an IAN) completes once every instance it lists has arrived, or this long after the signal (a warning "
        "counts the instances that never came)")
    sweep_s: float = Field(
        30.0, gt=0, description="how often the index is scanned for receiving studies without a timer here"
        " (after a restart, or a replica's studies after it died)",
    )
    signals: SignalSettings = Field(default_factory=SignalSettings)
    signals_by_calling_ae: dict[str, SignalSettings] = Field(
        default_factory=dict, description="per calling AE title: the keys given replace those of `signals`")
    hl7_settle_s: float = Field(
        2.0, ge=0, description="an HL7 signal completes its study once no instance arrived for this long")
    count_settle_s: float = Field(
        2.0, ge=0, description="an expected count reached completes the study once no instance arrived for this long")
    signal_keep_s: float = Field(
        7 * 86400.0, gt=0, description="a signal for a study never received (an HL7 message for an unknown"
        " accession), or a step left IN PROGRESS, is forgotten after this long")
    mpps_forward: list[str] = Field(
        default_factory=list, description="destinations that get every MPPS N-CREATE and N-SET the node"
        " accepts (a RIS or PACS that keeps tracking the steps)")

    def quiet_period_for(self, calling_ae: str) -> float:
        return self.quiet_period_by_calling_ae.get(calling_ae, self.quiet_period_s)

    def signals_for(self, calling_ae: str) -> SignalSettings:
        """The signal settings for a caller: `signals`, with what its `signals_by_calling_ae` entry sets."""
        override = self.signals_by_calling_ae.get(calling_ae)
        if override is None:
            return self.signals
        return self.signals.model_copy(update=override.model_dump(include=override.model_fields_set))

    def destinations_named(self) -> list[tuple[str, str]]:
        """(setting, destination name) for every destination these settings name."""
        named = [("completion.mpps_forward", name) for name in self.mpps_forward]
        for key, settings in [("completion.signals", self.signals)] + [
                (f"completion.signals_by_calling_ae.{ae}", s) for ae, s in self.signals_by_calling_ae.items()]:
            if settings.source_count:
                named.append((f"{key}.source_count", settings.source_count))
        return named


class Hl7Config(Strict):
    """The HL7 v2 listener (MLLP): order-complete and final-result messages complete studies."""

    port: int | None = Field(None, ge=0, le=65535, description="null: no HL7 listener; 2575 is HL7's registered"
                             " port; 0 lets the system choose (tests)")
    bind: IpAddress = "0.0.0.0"
    allowed_hosts: list[IpNetwork] = Field(default_factory=list, description="addresses or networks (CIDR) that may"
                                     " connect; empty: any")
    max_message_kb: int = Field(1024, ge=1, description="a larger message is refused (AR) and the connection closed")
    max_connections: int = Field(16, ge=1)
    timeout_s: float = Field(60.0, gt=0, description="a connection that sends nothing for this long is closed")

    def admits(self, peer: str) -> bool:
        return not self.allowed_hosts or any(in_network(peer, network) for network in self.allowed_hosts)


# The result objects a rule or a destination can ask for (README, "Outputs per destination").
OutputKind = Literal["SEG", "SR", "RTSTRUCT", "SC", "SALIENCY", "KOS"]


# How result objects are labelled: series numbers, descriptions, creator, SEG variant (node.encode
# builds them with these; a destination may override some, see DestinationConfig.output).
class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    omit_empty_frames: bool = Field(
        False, description="true: only frames with segmented voxels (smaller; some viewers misplace these)"
    )
    seg_series_number: int = Field(9101, ge=1)
    sr_series_number: int = Field(9102, ge=1)
    rtstruct_series_number: int = Field(9103, ge=1)
    sc_series_number: int = Field(9104, ge=1)
    notice_series_number: int = Field(9105, ge=1, description="the SR that says a job failed")
    saliency_series_number: int = Field(9106, ge=1, description="SALIENCY: the classifier's saliency maps")
    kos_series_number: int = Field(9107, ge=1, description="KOS: the images with findings, flagged as key images")
    key_images: int = Field(5, ge=1, description=(
        "SC output: at most this many slices, those with the largest finding area (a detector's: its findings' centres)"))
    outputs: tuple[OutputKind, ...] | None = Field(
        None, description="set by a destination's `outputs`: replaces the rule's outputs for that destination"
    )
    series_description: str = Field("AI {model}", description="{model} is replaced by the model name")
    content_creator_name: str = "DICOM^Node"
    manufacturer: str = "dicom-node"
    device_serial_number: str = "0"
    software_version: str = "0.1.0"
    uid_root: str | None = Field(
        None, pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$", max_length=32,
        description="the site's UID root for result UIDs, ending in '.' (at most 32 characters, so that "
        "32 digits, ~106 bits, stay for the hash); default: pydicom's root",
    )

    def describe(self, model: str, kind: str) -> str:
        return f"{self.series_description.format(model=model)} {kind}"[:64]

    @property
    def variant(self) -> str:
        """Distinguishes SEG objects whose content differs (hence their UIDs must too)."""
        return f"{self.segmentation_type}-{'sparse' if self.omit_empty_frames else 'full'}"


class ClientTls(Strict):
    enabled: bool = False
    ca: Path | None = Field(None, description="PEM CA bundle that signed the peer's certificate")
    certificate: Path | None = Field(None, description="our client certificate, if the peer asks for one")
    private_key: Path | None = None


class DicomwebAuth(Strict):
    """How the node authenticates to a DICOMweb destination. Secrets are read from files (a
    Docker or Kubernetes secret), never written in node.yaml, and re-read at each attempt so a
    rotated secret is used without a restart."""

    kind: Literal["none", "bearer", "basic", "oauth2"] = Field(
        "none", description="bearer: a static token; basic: user and password (RFC 7617); oauth2: the client"
                            " credentials grant (RFC 6749 4.4) at token_url, the token renewed before it expires")
    token_file: Path | None = Field(None, description="bearer: file holding the token")
    username: str | None = Field(None, description="basic")
    password_file: Path | None = Field(None, description="basic: file holding the password")
    token_url: str | None = Field(None, description="oauth2: the provider's token endpoint")
    client_id: str | None = Field(None, description="oauth2")
    client_secret_file: Path | None = Field(None, description="oauth2: file holding the client secret")
    scope: str | None = Field(None, description="oauth2: the scope asked for, if the provider wants one")

    @model_validator(mode="after")
    def _complete(self) -> "DicomwebAuth":
        needed = {"none": (), "bearer": ("token_file",), "basic": ("username", "password_file"),
                  "oauth2": ("token_url", "client_id", "client_secret_file")}[self.kind]
        missing = [key for key in needed if getattr(self, key) is None]
        if missing:
            raise ValueError(f"auth kind {self.kind} needs {', '.join(missing)}")
        if self.token_url is not None:
            _secure_url(self.token_url)
        return self

    SECRET_FILES: ClassVar[tuple[str, ...]] = ("token_file", "password_file", "client_secret_file")


def _secure_url(value: str) -> str:
    """https, or http on loopback only (tests, a sidecar proxy): credentials never go out in clear."""
    parsed = urlparse(value)
    if parsed.scheme != "https" and not (parsed.scheme == "http" and parsed.hostname in ("127.0.0.1", "localhost", "::1")):
        raise ValueError(f"{value} must be an https URL (http only on loopback)")
    if parsed.username or parsed.password or parsed.query or parsed.fragment:
        raise ValueError("the URL carries no credentials, query or fragment (credentials go in auth)")
    return value.rstrip("/")


class DicomwebDestination(Strict):
    """A DICOMweb service that takes STOW-RS (PS3.18 10.5): a cloud DICOM store, a modern PACS."""

    url: Annotated[str, AfterValidator(_secure_url)] = Field(
        description="the service root: results are POSTed to {url}/studies")
    auth: DicomwebAuth = Field(default_factory=DicomwebAuth)
    max_request_mb: float = Field(
        256.0, gt=0, description="a result set larger than this goes in several requests (a file larger than"
                                 " this alone in one)")


class DestinationConfig(Strict):
    """A peer that receives results (a PACS, a viewer, a research archive): a DICOM AE reached
    by C-STORE (ae_title, host, port) or a DICOMweb service reached by STOW-RS (dicomweb)."""

    ae_title: AeTitle | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    dicomweb: DicomwebDestination | None = None
    tls: ClientTls = Field(default_factory=ClientTls, description="DIMSE: enabled for DICOM TLS; DICOMweb: the"
                           " CA and client certificate for its https URL (enabled is implied by the scheme)")
    omit_empty_frames: bool | None = Field(None, description="overrides output.omit_empty_frames")
    segmentation_type: Literal["BINARY", "LABELMAP"] | None = Field(None, description="overrides output.segmentation_type")
    outputs: list[OutputKind] | None = Field(
        None, description="what this peer can show: replaces the rule's outputs for it (e.g. [RTSTRUCT, SC, SR])")

    @model_validator(mode="after")
    def _one_kind(self) -> "DestinationConfig":
        dimse = [key for key in ("ae_title", "host", "port") if getattr(self, key) is not None]
        if self.dicomweb is not None and dimse:
            raise ValueError(f"a destination is DIMSE (ae_title, host, port) or DICOMweb (dicomweb), not both:"
                             f" drop {', '.join(dimse)} or dicomweb")
        if self.dicomweb is None and len(dimse) < 3:
            missing = [key for key in ("ae_title", "host", "port") if getattr(self, key) is None]
            raise ValueError(f"a DIMSE destination needs ae_title, host and port (missing {', '.join(missing)});"
                             f" a DICOMweb one needs dicomweb.url")
        if self.dicomweb is not None and self.tls.enabled and not self.dicomweb.url.startswith("https:"):
            raise ValueError("tls.enabled with an http URL: use https")
        return self

    @property
    def kind(self) -> str:
        """dicomweb (STOW-RS) or dimse (C-STORE)."""
        return "dicomweb" if self.dicomweb is not None else "dimse"

    @property
    def where(self) -> str:
        """How logs, the console and the audit trail name the peer (never a credential)."""
        if self.dicomweb is not None:
            return self.dicomweb.url
        return f"{self.ae_title}@{self.host}:{self.port}"

    def output(self, defaults: OutputOptions) -> OutputOptions:
        changes = {k: v for k, v in (("omit_empty_frames", self.omit_empty_frames),
                                     ("segmentation_type", self.segmentation_type)) if v is not None}
        if self.outputs is not None:
            changes["outputs"] = tuple(self.outputs)
        return defaults.model_copy(update=changes)


class SendingConfig(Strict):
    """Result delivery: transient failures are retried with exponential backoff and jitter."""

    retry_initial_s: float = Field(10.0, gt=0)
    retry_max_s: float = Field(600.0, gt=0)
    deadline_s: float = Field(86400.0, gt=0, description="give up (dead letter) after this long")
    timeout_s: float = Field(30.0, gt=0, description="connect, ACSE and DIMSE timeout")
    sweep_s: float = Field(5.0, gt=0, description="how often due items (and CLI retries) are picked up")
    sender_fallback: str | None = Field(None, description=(
        "the destination for results and notices sent to @sender when no destination has the study's calling AE"
        " title (unset: such a job fails, saying which AE title)"))


class TritonConfig(Strict):
    url: str | None = Field(None, description="host:port of one server; null (and no urls) runs models"
                                             " in-process (LocalBackend)")
    urls: list[str] = Field(default_factory=list, description="host:port of each server of a pool: requests go to"
                            " the ready server with the fewest outstanding, and to another when one goes away")
    protocol: Literal["grpc", "http"] = "grpc"
    shared_memory: Literal["auto", "system", "none"] = "auto"
    timeout_s: float = Field(120.0, gt=0, description="an inference's deadline (the other calls, readiness,"
                             " metadata and shared-memory regions, have 10 s, or this if less)")
    retries: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _one_way_to_name_servers(self) -> "TritonConfig":
        if self.url and self.urls:
            raise ValueError("give either url (one server) or urls (a pool), not both")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError("urls lists a server twice")
        return self

    @property
    def servers(self) -> list[str]:
        """Every configured server; empty: models run in-process."""
        return list(self.urls) or ([self.url] if self.url else [])


class MonitoringConfig(Strict):
    """The drift alarm per model version (README, "Monitoring models")."""

    baseline_runs: int = Field(20, ge=1, description="a version's first live runs: the range its later runs are"
                               " judged against")
    window_runs: int = Field(10, ge=1, description="the latest runs checked; most of them outside the range is drift")
    tolerance: float = Field(0.1, ge=0, description="the range widened by this share of its magnitude")


class InferenceConfig(Strict):
    model_repository: Path = Path("../models")
    triton: TritonConfig = Field(default_factory=TritonConfig)
    retry_initial_s: float = Field(10.0, gt=0, description="first wait after a transient failure (Triton down)")
    retry_max_s: float = Field(300.0, gt=0, description="longest wait between attempts")
    retry_deadline_s: float = Field(3600.0, gt=0, description="after this long the job fails")
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)


class PipelineConfig(Strict):
    workers: int = Field(1, ge=1, description="studies processed at the same time")
    routing_file: Path = Path("routing.yaml")
    read_ahead_headers: int = Field(
        1000, ge=0, description="headers of the series a rule will run a model on, parsed while their study"
        " waits out its quiet period and held for its job (at most this many in all; 0: none)")
    interrupted_runs: int = Field(
        2, ge=1, description="a job its node died running this many times (killed for memory, a crash) fails"
        " instead of running again at every start (`dicom-node jobs retry` runs it again)")


class LoggingConfig(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class HttpTls(Strict):
    certificate: Path | None = Field(None, description="PEM certificate; with private_key, the console serves HTTPS")
    private_key: Path | None = None


ConsoleRole = Literal["viewer", "operator", "admin"]


class OidcConfig(Strict):
    """Single sign-on with the site's OpenID Connect provider (Keycloak, Entra ID, ...): the pages
    log in with the authorization code flow and PKCE; the API takes the provider's JWTs as bearer
    tokens. Roles come from a claim, mapped by `role_map`."""

    issuer: str = Field(description="the provider's issuer URL (its /.well-known/openid-configuration is read)")
    client_id: str
    client_secret: str | None = Field(
        None, description=f"for a confidential client; the environment variable {OIDC_SECRET_ENV} overrides it")
    scopes: str = "openid profile email"
    username_claim: str = Field(
        "sub", description="the account's name (audit trail, disabling): sub is stable; preferred_username reads"
                           " better but only where users cannot change it at the provider")
    roles_claim: str = Field("groups", description="where the roles are, a dotted path (Keycloak: realm_access.roles)")
    role_map: dict[str, ConsoleRole] = Field(
        default_factory=dict, description="claim value -> viewer, operator or admin; the highest one applies")
    default_role: ConsoleRole | None = Field(None, description="for users with no mapped value (none: refused)")
    audience: str | None = Field(None, description="the aud an API bearer JWT must carry (default: client_id)")
    redirect_url: str | None = Field(
        None, description="the callback URL as registered at the provider (default: this console's /login/oidc/callback)")
    leeway_s: int = Field(30, ge=0, le=300, description="clock skew allowed on exp, iat and nbf")
    timeout_s: float = Field(10.0, gt=0, le=120, description="for each request to the provider")

    @field_validator("issuer")
    @classmethod
    def _secure_issuer(cls, value: str) -> str:
        return _secure_url(value)

    def effective_secret(self) -> str | None:
        return os.environ.get(OIDC_SECRET_ENV) or self.client_secret


class HttpConfig(Strict):
    """The operator console: web pages, REST API, health and metrics (node/console)."""

    bind: IpAddress = Field("127.0.0.1", description="address of the console; beyond loopback every page needs a login")
    port: int = Field(8080, ge=0, le=65535, description="0 = no HTTP server")
    token: str | None = Field(
        None, min_length=MIN_TOKEN_LENGTH,
        description="DEPRECATED shared admin token (use accounts and API tokens; removed in the next release); "
                    "the environment variable DICOM_NODE_HTTP_TOKEN overrides it")
    oidc: OidcConfig | None = None
    session_idle_minutes: float = Field(30.0, gt=0, le=24 * 60, description="a console session ends after this idle time")
    session_max_hours: float = Field(12.0, gt=0, le=7 * 24, description="and at the latest this long after its login")
    login_failures: int = Field(5, ge=1, le=100, description="failed logins per name or address in login_window_minutes"
                                                              " before logins from them are refused")
    login_window_minutes: float = Field(15.0, gt=0, le=24 * 60)
    tls: HttpTls = Field(default_factory=HttpTls)
    show_descriptions: bool = Field(
        False, description="show series descriptions in listings (off: UIDs, modality, dates and counts only)")
    max_stow_mb: float = Field(
        1024.0, gt=0, description="largest STOW-RS request body (POST /dicomweb/studies): refused with 413 as its"
                                  " Content-Length says so or its streamed body passes it; each part at most"
                                  " scp.max_instance_mb")
    max_upload_mb: float = Field(
        64.0, gt=0, description="largest request body the console takes (the rule tester's uploads, "
                                "POST /api/explain): a larger one is refused with 413 as soon as its "
                                "Content-Length says so or its streamed body passes the limit")

    def effective_token(self) -> str | None:
        return os.environ.get(HTTP_TOKEN_ENV) or self.token

    def on_loopback(self) -> bool:
        return ipaddress.ip_address(self.bind).is_loopback


class AuditRepository(Strict):
    """An IHE ATNA audit record repository: a syslog server taking DICOM audit messages."""

    host: str
    port: int = Field(6514, ge=1, le=65535, description="6514: syslog over TLS (RFC 5425); 514 for UDP")
    protocol: Literal["tls", "tcp", "udp"] = Field(
        "tls", description="tls (RFC 5425, ATNA's choice), tcp (octet-counted, RFC 6587), udp (RFC 5426: no"
        " delivery confirmation, a repository that is down loses what is sent meanwhile)")
    tls: ClientTls = Field(default_factory=lambda: ClientTls(enabled=True))

    @property
    def key(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}"


class AuditConfig(Strict):
    """The audit trail (README, "Audit trail"): its retention is its own, not the data's."""

    keep_days: float = Field(3650.0, gt=0, description="audit records older than this are deleted (hourly)")
    repository: AuditRepository | None = Field(None, description="where the trail is sent as ATNA syslog; null: kept"
                                                                 " in the index only")
    site_id: str | None = Field(None, max_length=64, description="AuditEnterpriseSiteID of the messages")
    sweep_s: float = Field(5.0, gt=0, description="how often records not yet sent are sent")


# The PS3.15 Annex E options a de-identification project may choose (node/deid/profile.py): the
# three that ask for free text to be cleaned by its meaning are not offered.
DeidOptionName = Literal["retain_safe_private", "retain_uids", "retain_device_identity",
                         "retain_institution_identity", "retain_patient_characteristics",
                         "retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"]


class SafePrivateElement(Strict):
    """A private element kept under retain_safe_private: its block's creator and its element byte."""

    creator: str = Field(min_length=1, max_length=64)
    element: int = Field(ge=0x00, le=0xFF, description="the low byte of the element, e.g. 0x10 for (gggg,xx10)")


class DeidProject(Strict):
    """Where de-identified copies go (README, "De-identification"): the Basic Application Level
    Confidentiality Profile with these options; pseudonyms and the sealed mapping derive from
    the project's key."""

    key_file: Path = Field(description="the project's secret (32 random bytes or more; `openssl rand -hex 32`);"
                                       " its pseudonyms are stable while the key stays, so keep it like a password")
    options: list[DeidOptionName] = Field(default_factory=list)
    safe_private: list[SafePrivateElement] = Field(default_factory=list)
    allow_burned_in: bool = Field(False, description="send instances whose pixels may show identifying text")
    mapping_days: float = Field(365.0, gt=0, description="how long the pseudonym -> source mapping is kept (the"
                                                         " return path of results needs it)")
    return_ae_title: AeTitle | None = Field(None, description=(
        "the called AE title the project's service sends its results to (one of scp.ae_titles): a study that comes"
        " in there and matches no round trip is quarantined, never routed"))

    @model_validator(mode="after")
    def _consistent(self) -> "DeidProject":
        if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(self.options):
            raise ValueError("retain_longitudinal_full_dates and retain_longitudinal_modified_dates exclude each other")
        if self.safe_private and "retain_safe_private" not in self.options:
            raise ValueError("safe_private needs the retain_safe_private option")
        return self

    def key(self) -> bytes:
        """The key, read at each use (rotation means new pseudonyms: say so to the project)."""
        try:
            key = self.key_file.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the de-identification key {self.key_file}: {exc.strerror}") from None
        if len(key) < 32:
            raise ValueError(f"the de-identification key {self.key_file} has {len(key)} bytes; it needs 32 or more")
        return key


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
    http: HttpConfig = Field(default_factory=HttpConfig)
    hl7: Hl7Config = Field(default_factory=Hl7Config)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    deidentification: dict[str, DeidProject] = Field(
        default_factory=dict, description="projects that routing rules' deidentify action sends to, by name")

    @model_validator(mode="after")
    def _signal_destinations_exist(self) -> "NodeConfig":
        fallback = self.sending.sender_fallback
        if fallback is not None and fallback not in self.destinations:
            raise ValueError(f"sending.sender_fallback: no destination named {fallback!r}")
        for key, name in self.completion.destinations_named():
            if name not in self.destinations:
                raise ValueError(f"{key}: no destination named {name!r}")
            if self.destinations[name].dicomweb is not None:
                raise ValueError(f"{key}: {name!r} is a DICOMweb destination; this needs a DICOM AE")
        return self

    @model_validator(mode="after")
    def _return_titles_are_ours(self) -> "NodeConfig":
        titles: dict[str, str] = {}
        for name, project in self.deidentification.items():
            title = project.return_ae_title
            if title is None:
                continue
            if title not in self.scp.called_ae_titles():
                raise ValueError(f"deidentification.{name}.return_ae_title: {title!r} is not one of scp.ae_titles"
                                 f" ({', '.join(self.scp.called_ae_titles())}); add it there")
            if title in titles:
                raise ValueError(f"deidentification.{name}.return_ae_title: {title!r} is project {titles[title]}'s")
            titles[title] = name
        return self

    def project_returning_to(self, called_ae: str) -> str | None:
        """The project whose results come in at this called AE title."""
        return next((name for name, p in self.deidentification.items() if p.return_ae_title == called_ae), None)

    def destination_for_caller(self, calling_ae: str) -> str | None:
        """'Return to sender': the destination whose AE title is the study's calling AE."""
        return next((name for name, d in self.destinations.items() if d.ae_title == calling_ae), None)

    def sender_warning(self, calling_ae: str) -> str | None:
        """What explain says when @sender does not name a destination for this caller."""
        if self.destination_for_caller(calling_ae) is not None:
            return None
        if self.sending.sender_fallback:
            return (f"! @sender: no destination has AE title {calling_ae!r}; results and notices go to"
                    f" sending.sender_fallback {self.sending.sender_fallback!r}")
        return (f"! @sender: no destination has AE title {calling_ae!r}; a job sending there fails (add a destination"
                " with that AE title, or set sending.sender_fallback)")

    def resolve_paths(self, base: Path) -> NodeConfig:
        """Relative paths in a config file are relative to that file's folder."""
        storage = self.storage.model_copy(update={"data_dir": _under(base, self.storage.data_dir)})
        inference = self.inference.model_copy(
            update={"model_repository": _under(base, self.inference.model_repository)})
        pipeline = self.pipeline.model_copy(update={"routing_file": _under(base, self.pipeline.routing_file)})
        destinations = {name: _destination_under(base, d) for name, d in self.destinations.items()}
        tls = self.scp.tls.model_copy(
            update={
                key: _under(base, getattr(self.scp.tls, key))
                for key in ("certificate", "private_key", "client_ca")
                if getattr(self.scp.tls, key) is not None
            }
        )
        scp = self.scp.model_copy(update={"tls": tls})
        http = self.http.model_copy(update={"tls": self.http.tls.model_copy(update={
            key: _under(base, getattr(self.http.tls, key)) for key in ("certificate", "private_key")
            if getattr(self.http.tls, key) is not None})})
        audit = self.audit
        if audit.repository is not None:
            tls = audit.repository.tls
            audit = audit.model_copy(update={"repository": audit.repository.model_copy(update={"tls": tls.model_copy(
                update={key: _under(base, getattr(tls, key)) for key in ("ca", "certificate", "private_key")
                        if getattr(tls, key) is not None})})})
        projects = {name: p.model_copy(update={"key_file": _under(base, p.key_file)})
                    for name, p in self.deidentification.items()}
        return self.model_copy(update={"storage": storage, "scp": scp, "inference": inference,
                                       "pipeline": pipeline, "destinations": destinations, "http": http,
                                       "audit": audit, "deidentification": projects})


def _under(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def _destination_under(base: Path, destination: DestinationConfig) -> DestinationConfig:
    tls = destination.tls.model_copy(update={key: _under(base, getattr(destination.tls, key))
                                             for key in ("ca", "certificate", "private_key")
                                             if getattr(destination.tls, key) is not None})
    web = destination.dicomweb
    if web is not None:
        auth = web.auth.model_copy(update={key: _under(base, getattr(web.auth, key)) for key in web.auth.SECRET_FILES
                                           if getattr(web.auth, key) is not None})
        web = web.model_copy(update={"auth": auth})
    return destination.model_copy(update={"tls": tls, "dicomweb": web})


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
    problems = [] if not tls.enabled else [
        Problem(file, None, f"scp.tls.{key}", "required when scp.tls.enabled is true")
        for key in ("certificate", "private_key")
        if getattr(tls, key) is None
    ]
    return problems + _check_http(config.http, file)


def _check_http(http: HttpConfig, file: str) -> list[Problem]:
    problems = []
    if (http.tls.certificate is None) != (http.tls.private_key is None):
        problems.append(Problem(file, None, "http.tls", "certificate and private_key go together"))
    from_env = os.environ.get(HTTP_TOKEN_ENV)
    if from_env and len(from_env) < MIN_TOKEN_LENGTH:  # (set but empty: unset, as effective_token reads it)  # the same rule as http.token's in the file
        problems.append(Problem("environment", None, HTTP_TOKEN_ENV,
                                f"has {len(from_env)} characters; a token needs at least {MIN_TOKEN_LENGTH}"))
    # The shared token is an admin's: an account's API token there would make that account an admin
    # that revoking or disabling it does not stop. Tools take theirs from DICOM_NODE_API_TOKEN.
    for where, key, value in (("environment", HTTP_TOKEN_ENV, from_env), (file, "http.token", http.token)):
        if value and value.startswith(ACCOUNT_TOKEN_PREFIX):
            problems.append(Problem(where, None, key, f"is an account's API token ({ACCOUNT_TOKEN_PREFIX}...); the"
                                    f" shared token is the node's own admin secret: give the CLI an API token in"
                                    f" {API_TOKEN_ENV} instead"))
    return problems
