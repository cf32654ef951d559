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
    series_description: str = Field("AI {model}", description="{model} is replaced by the model name")
    content_creator_name: str = "DICOM^Node"
    manufacturer: str = "dicom-node"
    device_serial_number: str = "0"
    software_version: str = "0.1.0"
    uid_root: str | None = Field(
        None, pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$", max_length=40,
        description="the site's UID root for result UIDs, ending in '.'; default: pydicom's root",
    )

    def describe(self, model: str, kind: str) -> str:
        return f"{self.series_description.format(model=model)} {kind}"[:64]

    @property
    def variant(self) -> str:
        """Distinguishes SEG objects whose content differs (hence their UIDs must too)."""
        return f"{self.segmentation_type}-{'sparse' if self.omit_empty_frames else 'full'}"
