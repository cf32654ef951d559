"""How result objects are labelled: series numbers, descriptions, creator, SEG variant."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    key_images: int = Field(5, ge=1, description="SC output: at most this many slices, those with the largest finding area")
    outputs: tuple[Literal["SEG", "SR", "RTSTRUCT", "SC", "SALIENCY"], ...] | None = Field(
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
