"""Result UIDs for encoder tests, where there is no node installation or job."""

from __future__ import annotations

import zlib

from node.encode.uids import ResultUIDs, SourceIdentity

TEST_INSTALLATION = "2.25.1"


def uids_for(job: str, model: str, installation: str = TEST_INSTALLATION) -> ResultUIDs:
    """The UIDs a job named `job` would mint for `model` in a fixed test installation."""
    source = SourceIdentity.of("1.2.3", "1.2.3.4", ["1.2.3.4.5"])
    return ResultUIDs(installation_uid=installation, job_id=zlib.crc32(job.encode()), source=source, model=model,
                      model_version="1")
