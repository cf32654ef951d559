"""Where a result came from, inside the result: the model version as Contributing Equipment
(PS3.3 C.7.5.1.1.1, purpose "Processing Equipment", DCM 109102) with its import's SHA-256 and
model card, and the algorithm's source in SEG's Algorithm Identification (PS3.3 C.8.20.2.1).

A radiologist or auditor holding only the object can tell which model file made it: the
`DeviceSerialNumber` of the model's entry is the SHA-256 of the ONNX file the node ran (64
hexadecimal characters: exactly LO's maximum).
"""

from __future__ import annotations

import unicodedata

import highdicom as hd
from pydicom.sr.codedict import codes

from inference.spec import ModelSpec
from node.config import OutputOptions
from node.encode.concepts import coded


def _text(value: str, limit: int) -> str | None:
    """A DICOM string of at most `limit` characters in the default repertoire (results inherit the
    source's character set, often none), backslash-free (LO/ST are single-valued here)."""
    ascii_only = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode()
    value = " ".join(ascii_only.replace("\\", "/").split())[:limit]
    return value or None


def algorithm_source(spec: ModelSpec) -> str | None:
    """AlgorithmSource (LO): the bundle or file the version was imported from."""
    p = spec.provenance
    if p is None:
        return None
    return _text(f"{'MONAI bundle' if p.source == 'monai-bundle' else 'TorchScript'} {p.source_name}"
                 f" {p.source_version}", 64)


def sr_algorithm(spec: ModelSpec) -> hd.sr.AlgorithmIdentification:
    """TID 4019 (SR): name, version and family; for an imported version also, as algorithm
    parameters, its source and the SHA-256 of the file the node ran. (Not the row "Algorithm
    Manufacturer": validators of 2022 (pixelmed) do not know it; Contributing Equipment names the
    manufacturer.)"""
    p = spec.provenance
    parameters = [v for v in (algorithm_source(spec), f"model.onnx SHA-256 {p.sha256}") if v] if p else None
    return hd.sr.AlgorithmIdentification(name=spec.name, version=str(spec.version), family=coded(spec.algorithm_family),
                                         parameters=parameters)


def contributing_equipment(spec: ModelSpec, options: OutputOptions) -> list[hd.ContributingEquipment]:
    """The model version that produced the result (one entry)."""
    p = spec.provenance
    versions = [f"{spec.name} version {spec.version}"]
    description = spec.description
    if p is not None:
        if p.source_version:
            versions.append(f"{p.source_name} {p.source_version}")
        card = p.model_card
        description = "; ".join(f"{k.replace('_', ' ')}: {card[k]}" for k in
                                ("description", "intended_use", "data_source", "eval_metrics", "copyright")
                                if card.get(k)) or description
    return [hd.ContributingEquipment(
        manufacturer=_text(p.manufacturer if p and p.manufacturer else options.manufacturer, 64) or "unknown",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_text(p.source_name if p else spec.name, 64),
        software_versions=[v for v in (_text(v, 64) for v in versions) if v],
        device_serial_number=p.sha256 if p else None,
        contribution_description=_text(description, 1024),
    )]
