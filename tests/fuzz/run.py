"""One coverage-guided fuzz target under atheris (libFuzzer):

    python -m tests.fuzz.run TARGET [libFuzzer flags] [corpus folders]

The parsers a target reaches are instrumented as they are imported (its `modules`); the harness
runs with tracemalloc on, so that its allocation ceiling costs a reset per input, not a start.
libFuzzer writes an input that breaks an invariant to -artifact_prefix and exits non-zero;
tests/fuzz/campaign.py runs this and reads what it printed.
"""

from __future__ import annotations

import sys
import tracemalloc

import atheris

# Kept apart from the targets' module (which imports the parsers): instrumentation applies only
# to modules imported after it is switched on. tests/test_fuzz.py checks the two agree.
INSTRUMENTED = {
    "pdu_stream": ("node.receive.pynetdicom_internals", "pynetdicom.dul", "pynetdicom.pdu", "pynetdicom.pdu_items"),
    "data_set_check": ("node.receive.validate",),
    "routing_tags": ("node.receive.tags", "node.routing_tags", "pydicom.filereader", "pydicom.values"),
    "deflate": ("node.deflate", "node.receive.validate"),
    "file_meta": ("node.store.filemeta",),
    "stow_body": ("node.receive.stow", "python_multipart.multipart"),
    "console_upload": ("node.console.limits", "starlette.formparsers", "python_multipart.multipart"),
    "hl7_message": ("node.receive.hl7", "hl7.parser", "hl7.containers"),
}


def main() -> None:
    name = sys.argv[1]
    with atheris.instrument_imports(include=list(INSTRUMENTED[name])):
        from tests.fuzz.targets import TARGETS, quiet
    target = TARGETS[name]
    quiet()
    tracemalloc.start()

    def one_input(data: bytes) -> None:
        target.harness(data)

    atheris.Setup([sys.argv[0], f"-max_len={target.max_len}", *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
