"""What memory the node may still take (common.memory): the machine's, or less under a cgroup
limit, read from this process's own cgroup and its ancestors; and a model whose output would not
fit, or a series whose volume would not, fails its job saying so, instead of the kernel killing the
service (inference.room).
Fake /proc trees for the formats of Docker and systemd; real cgroups with a memory limit for
what the node then does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import RLELossless

from common.memory import MemoryRoom, memory_room
from inference.export.repository import export_onnx, write_entry
from node.jobs.store import JobState
from tests.cgroups import fake_proc, memory_limit_cgroup, write_files
from tests.models import threshold_spec
from tests.orthanc import Orthanc
from tests.peers import NodeProcess, storescu, wait_for
from tests.test_jobs import ROUTING, jobs_of, send, sphere_study, wait_results

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GiB = 1 << 30


def _meminfo(tmp_path: Path, total_kib: int = 16_000_000, available_kib: int = 8_000_000, hugetlb_kib: int = 0) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {total_kib} kB\nMemFree:         1000 kB\nMemAvailable:   {available_kib} kB\n"
                    f"HugePages_Total:   0\nHugetlb:        {hugetlb_kib} kB\n")
    return path


def test_docker_on_cgroup_v1_the_containers_limit_less_its_use_with_its_clean_file_pages(tmp_path):
    """What the container uses less its page cache that is neither dirty nor being written: a
    node reads back every study it wrote, so most of its cache is on the active list (counted as
    used, a job that fits would wait for memory that never frees). The process's own anonymous
    memory is what it cannot give back."""
    proc = fake_proc(tmp_path, "4:memory:/docker/abc\n0::/\n", [("/docker/abc", "memory", "cgroup", "rw,memory")])
    (proc / "status").write_text("Name:\tdicom-node\nRssAnon:\t  409600 kB\nRssFile:\t 9 kB\n")
    write_files(tmp_path / "memory", memory_limit_in_bytes=str(2 * GiB), memory_usage_in_bytes=str(1536 * MiB),
                memory_stat=f"cache 9\ninactive_file 7\ntotal_inactive_file {256 * MiB}\ntotal_active_file"
                            f" {640 * MiB}\ntotal_dirty {32 * MiB}\ntotal_writeback {16 * MiB}")
    assert memory_room(proc, _meminfo(tmp_path)) == MemoryRoom(available=(2048 - 1536 + 256 + 640 - 48) * MiB,
                                                               limit=2 * GiB, own=400 * MiB)
    (tmp_path / "memory" / "memory.stat").unlink()  # unreadable: no page counted free, the limit holds
    assert memory_room(proc, _meminfo(tmp_path)) == MemoryRoom(available=512 * MiB, limit=2 * GiB, own=400 * MiB)


def test_a_systemd_slices_limit_above_the_service_and_the_machines_room_both_bound_it(tmp_path):
    """The tightest of every level: the slice's limit over the service's cgroup (which has
    none), then the machine's MemAvailable once it is the least."""
    proc = fake_proc(tmp_path, "0::/system.slice/node.service\n", [("/", "unified", "cgroup2", "rw")])
    write_files(tmp_path / "unified" / "system.slice", memory_max=str(GiB), memory_current=str(900 * MiB),
                memory_stat=f"anon 1\ninactive_file {100 * MiB}\nactive_file {20 * MiB}\nfile_dirty {20 * MiB}")
    write_files(tmp_path / "unified" / "system.slice" / "node.service", memory_max="max",
                memory_current=str(800 * MiB), memory_stat="inactive_file 0")
    assert memory_room(proc, _meminfo(tmp_path)) == MemoryRoom(available=224 * MiB, limit=GiB)
    assert memory_room(proc, _meminfo(tmp_path, available_kib=100 * 1024)) == MemoryRoom(available=100 * MiB,
                                                                                         limit=GiB)


@pytest.mark.parametrize("limit", ["max", "9223372036854771712", "garbage", ""])
def test_no_limit_or_an_unreadable_one_leaves_the_machines(tmp_path, limit):
    """v2's `max`, v1's "no limit" (the largest page count, in bytes), a malformed or empty file."""
    proc = fake_proc(tmp_path, "4:memory:/\n0::/\n", [("/", "memory", "cgroup", "rw,memory"),
                                                      ("/", "unified", "cgroup2", "rw")])
    write_files(tmp_path / "memory", memory_limit_in_bytes=limit, memory_usage_in_bytes="1", memory_stat="")
    write_files(tmp_path / "unified", memory_max=limit, memory_current="1", memory_stat="")
    assert memory_room(proc, _meminfo(tmp_path)) == MemoryRoom(available=8_000_000 * 1024, limit=16_000_000 * 1024)
    # the huge pages' pool is not memory a process's ordinary allocations can have
    assert memory_room(proc, _meminfo(tmp_path, hugetlb_kib=4_000_000)).limit == 12_000_000 * 1024


def test_a_cgroup_over_its_limit_has_no_room_and_no_meminfo_is_no_answer(tmp_path):
    """A limit lowered below what the cgroup holds: 0, not a negative room. Without /proc/meminfo
    (not Linux) nothing is known, and nothing is refused."""
    proc = fake_proc(tmp_path, "0::/\n", [("/", "unified", "cgroup2", "rw")])
    write_files(tmp_path / "unified", memory_max=str(GiB), memory_current=str(2 * GiB), memory_stat="inactive_file 0")
    assert memory_room(proc, _meminfo(tmp_path)) == MemoryRoom(available=0, limit=GiB)
    assert memory_room(proc, tmp_path / "no-meminfo") is None
    (tmp_path / "meminfo").write_text("MemTotal: 16 MB\nMemAvailable: 8 MB\n")  # not the kernel's unit
    assert memory_room(proc, tmp_path / "meminfo") is None


ROOM = """
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
import numpy
import torch
from inference.pipeline import to_model_space
from inference.room import ARRAYS, check_room
from inference.volume import read_volumes
from tests.models import threshold_spec
from tests.test_jobs import sphere_study

spec = threshold_spec()  # 2 classes, windows of 32^3: an output of 8 MiB per plane of 1024x1024

def outcome(planes):
    try:
        check_room(spec, (planes, 1024, 1024))
        return "fits"
    except Exception as exc:
        return f"{type(exc).__name__}{' beyond its limit' if getattr(exc, 'beyond_limit', False) else ''}: {exc}"

found = {"alone": outcome(64), "beyond": outcome(384), "beside_own": outcome(240)}
# another job's output of 1 GiB held in this process (pipeline.workers 2): it goes, so a need that
# would fit without it waits
output, held = ARRAYS.allocate(spec, (128, 1024, 1024), torch.float32)
try:
    ARRAYS.allocate(spec, (115, 1024, 1024), torch.float32)
    found["beside_job"] = "fits"
except Exception as exc:
    found["beside_job"] = f"{type(exc).__name__}: {exc}"
del output
ARRAYS.release(held)

def allocated(planes):
    try:
        output, held = ARRAYS.allocate(spec, (planes, 1024, 1024), torch.float32)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    del output
    ARRAYS.release(held)
    return "fits"

# another job reading a series' volume of 1 GiB, half of it read so far: an output of 0.9 GiB that
# fits beside the half waits, as does a second volume; once that read ends, the output fits
with ARRAYS.loading("the series' volume", "give the node more memory") as fits:
    fits(1 << 30, "another series")
    half = numpy.ones(512 << 20, numpy.uint8)
    found["beside_reading"] = allocated(115)
    with ARRAYS.loading("the series' volume", "give the node more memory") as second:
        try:
            second(900 << 20, "a second series")
            found["volume_beside_reading"] = "fits"
        except Exception as exc:
            found["volume_beside_reading"] = f"{type(exc).__name__}: {exc}"
    del half
found["after_reading"] = allocated(115)
# a model whose grid is much finer than the series' (0.04 mm): its input alone is beyond the limit
folder = Path(tempfile.mkdtemp())
[volume] = read_volumes(sphere_study(folder, "PAT-G")[0])
shutil.rmtree(folder)
fine = threshold_spec(preprocessing={"orientation": "RAS", "spacing": [0.04] * 3, "intensity": {"window": [0.0, 1.0]},
                                     "patch_size": [32, 32, 32], "overlap": 0.25, "batch_size": 1})
try:
    to_model_space(volume, fine)
    found["input"] = "fits"
except Exception as exc:
    found["input"] = f"{type(exc).__name__}{' beyond its limit' if getattr(exc, 'beyond_limit', False) else ''}: {exc}"
# 1.5 GiB held by another process in the cgroup (a receiver, a second job), written: resident
other = subprocess.Popen([sys.executable, "-c", "import numpy, sys; b = numpy.ones(1536 << 20, numpy.uint8);"
                          " print('held', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
assert other.stdout.readline().strip() == "held"
found["beside_other"] = outcome(64)
other.stdin.close()
other.wait()
found["after"] = outcome(64)
print(json.dumps(found))
"""


def test_a_need_partly_allocated_is_named_whole_and_judged_by_what_is_left(monkeypatch):
    """A need told with `taken` bytes of it allocated already (a series' files read whole, a model's
    input before its intensity transform): what is left is compared with what is free, the whole
    with the limit less what the service holds besides; the message names the whole."""
    from inference import room as room_module
    from inference.errors import NotEnoughMemory

    monkeypatch.setattr(room_module, "memory_room", lambda: MemoryRoom(available=256 * MiB, limit=2 * GiB,
                                                                       own=1843 * MiB))
    room_module.check_fits(GiB, "the series' volume", "mixed", "more", taken=GiB - 200 * MiB)  # 200 MiB left: fits
    with pytest.raises(NotEnoughMemory) as caught:
        room_module.check_fits(3 * GiB, "the series' volume", "mixed", "more", taken=1536 * MiB)
    assert caught.value.beyond_limit and str(caught.value) == (
        "the series' volume needs 3.00 GiB (mixed); the node's machine or container allows 2.00 GiB, of which its"
        " service holds 0.30 GiB: run, it would be killed for memory; more")


def test_under_a_real_memory_limit_an_output_beyond_it_fails_and_one_beside_other_use_waits():
    """A process in a real cgroup of 2 GiB: an output of 0.5 GiB fits; one of 3 GiB never can,
    nor one of 1.88 GiB beside the 0.3-0.4 GiB the process itself holds (NotEnoughMemory: the job
    fails); 0.5 GiB while another process holds 1.5 GiB does not fit now (MemoryTaken: the job
    waits and tries again), and fits once that is let go; 0.9 GiB beside another job's output of
    1 GiB in the same process waits too (that output goes: not the service's for good), as do 0.9
    GiB and a second series' volume beside a volume of 1 GiB another job is reading, half of it
    read (its other half is counted: without, the output would pass and the read be killed). A
    model's input of 6.1 GiB (a grid of 0.04 mm) fails before it is built."""
    with memory_limit_cgroup(2 * GiB) as prefix:
        run = subprocess.run([*prefix, sys.executable, "-c", ROOM], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert (found["alone"], found["after"], found["after_reading"]) == ("fits", "fits", "fits")
    assert re.fullmatch(r"NotEnoughMemory beyond its limit: model threshold's output on this series needs 3\.00 GiB"
                        r" \(2 classes x"
                        r" 384x1024x1024 voxels, float32\); the node's machine or container allows 2\.00 GiB, of which"
                        r" its service holds 0\.\d\d GiB: run, it would be killed for memory; give the node more"
                        r" memory, or the model a coarser grid", found["beyond"]), found
    assert found["beside_own"].startswith("NotEnoughMemory: model threshold's output on this series needs 1.88 GiB"), found
    assert found["beside_job"].startswith("MemoryTaken: model threshold's output on this series needs 0.90 GiB"), found
    reading = r", and 1\.\d\d GiB are free now, while other jobs load arrays foreseen at 1\.00 GiB"
    assert re.fullmatch(r"MemoryTaken: model threshold's output on this series needs 0\.90 GiB \(2 classes x"
                        r" 115x1024x1024 voxels, float32\)" + reading, found["beside_reading"]), found
    assert re.fullmatch(r"MemoryTaken: the series' volume needs 0\.88 GiB \(a second series\)" + reading,
                        found["volume_beside_reading"]), found
    assert re.fullmatch(r"NotEnoughMemory beyond its limit: model threshold's input on this series needs 6\.\d\d GiB"
                        r" \(1176x1176x1151 voxels, float32\); the node's machine or container allows 2\.00 GiB, of"
                        r" which its service holds 0\.\d\d GiB: run, it would be killed for memory; give the node"
                        r" more memory, or the model a coarser grid", found["input"]), found
    assert re.fullmatch(r"MemoryTaken: model threshold's output on this series needs 0\.50 GiB \(2 classes x"
                        r" 64x1024x1024 voxels, float32\), and 0\.[0-4]\d GiB are free now", found["beside_other"]), found


INPUT = """
import json
import re
import sys
from pathlib import Path
import numpy as np
from inference.pipeline import _intensity_need, input_need, to_model_space
from inference.volume import SeriesVolume
from tests.models import threshold_spec

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) << 10

case, intensity = sys.argv[1], json.loads(sys.argv[2])
affine = np.eye(4)
if case == "radiograph":  # one plane of 3000x2500 in image-plane mm, on its own grid
    affine[:3, :3] = [[0.0, 0.0, 0.15], [0.0, 0.15, 0.0], [1.0, 0.0, 0.0]]
    volume = SeriesVolume(np.full((1, 3000, 2500), 100, np.int16), affine, [], None, patient_space=False)
    spacing = None
else:  # a small CT (24 slices of 48x48 at 2 mm) on a 0.15 mm grid; tilted: 120 of 256x256, step 1 mm and 0.5 mm
    shape, step = ((24, 48, 48), (0.0, 0.0, 2.0)) if case == "ct" else ((120, 256, 256), (0.0, 0.5, 1.0))
    affine[:3, :3] = np.array([step, (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)]).T
    volume = SeriesVolume(np.full(shape, -1000, np.int16), affine, [], "1.2.3")
    spacing = [0.15] * 3 if case == "ct" else [1.0] * 3
    assert volume.sheared == (case == "tilted")
spec = threshold_spec(preprocessing={"orientation": "RAS", "spacing": spacing, "intensity": intensity,
                                     "patch_size": [32, 32, 32], "overlap": 0.25, "batch_size": 1})
# once first on a tenth of it: what the first run of the transforms sets up once (thread pools, their
# arenas) is the process's, not the input's
small = volume.array[tuple(slice(0, max(1, n // 10)) for n in volume.array.shape)].copy()
to_model_space(SeriesVolume(small, affine, [], volume.frame_of_reference_uid, patient_space=volume.patient_space),
               spec)
Path("/proc/self/clear_refs").write_text("5")  # the resident peak (VmHWM) from now
before = status("VmRSS")
image = to_model_space(volume, spec)
moved = image[0].as_tensor()
print(json.dumps({"need": input_need(tuple(moved.shape))[0] + _intensity_need(spec, moved),
                  "input": moved.numel() * 4, "peak": status("VmHWM") - before}))
"""


@pytest.mark.parametrize("case, intensity", [
    ("ct", {"window": [-1000.0, 1000.0]}), ("ct", {"normalize": "zscore"}), ("ct", {}),
    ("radiograph", {"window": [0.0, 1000.0]}), ("tilted", {"window": [-1000.0, 1000.0]})])
def test_a_models_input_is_built_within_what_was_foreseen_for_it(tmp_path, case, intensity):
    """The input's need (`input_need`, `_intensity_need`) against what building it takes at its
    peak (the process's resident peak, reset first, in a process of its own), and not more than
    twice that: a 0.15 mm grid over a small CT (120 MiB of input) with an intensity window (applied
    slab by slab), z-score normalisation (MONAI's, whole) and neither; a radiograph of one plane (a
    window's slab is that plane, not sixteen); a tilted stack (onto the model's grid in one
    interpolation: its regular grid's voxels are not made)."""
    from inference.pipeline import INPUT_OVERHEAD

    run = subprocess.run([sys.executable, "-c", INPUT, case, json.dumps(intensity)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["input"] > 20 * MiB and found["input"] <= found["peak"] <= found["need"], found
    assert found["need"] < 2 * found["peak"] + INPUT_OVERHEAD, found  # (not grossly over)


class _ManyClasses(torch.nn.Module):
    """128 classes, each a copy of the input: what matters is the size of its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 128, -1, -1, -1).contiguous()


def _failed_alive(node: NodeProcess, study_uid: str) -> object:
    """The study's job once it has ended, failed, with the service alive: killed for memory, the
    service would leave the job running (the wait ends then too)."""
    wait_for(lambda: node.process.poll() is not None or jobs_of(node, study_uid) and jobs_of(
        node, study_uid)[0].state in (JobState.FAILED, JobState.DONE, JobState.WAITING), timeout=180)
    assert node.process.poll() is None, "the service was killed"
    failed = jobs_of(node, study_uid)[0]
    assert failed.state is JobState.FAILED, failed.reason
    return failed


def _big_compressed_series(folder: Path, patient_id: str, images: int, size: int) -> tuple[list[Path], str]:
    """A CT series of `images` RLE-compressed blank images of `size`x`size`: little to store and
    send, `images` x `size`^2 x 4 bytes to decode into a float32 volume."""
    files, study_uid = sphere_study(folder, patient_id, slices=images, size=16)
    blank = pydicom.dcmread(files[0])
    blank.Rows = blank.Columns = size
    blank.compress(RLELossless, np.zeros((size, size), np.uint16), encoding_plugin="pydicom")
    for file in files:
        ds = pydicom.dcmread(file)
        ds.Rows = ds.Columns = size
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds["PixelData"] = blank["PixelData"]
        ds.save_as(file, enforce_file_format=True)
    return files, study_uid


def test_a_node_under_a_memory_limit_fails_jobs_whose_volume_or_output_cannot_fit_and_lives_on(tmp_path,
                                                                                                 model_repository):
    """A node in a real cgroup of 2 GiB (a container's limit): a 128-class model on a 0.25 mm grid
    needs 3.4 GiB for its output, and a series of 160 compressed 2048x2048 images 2.5 GiB to
    decode. Allocated, the kernel killed the service; now each job fails at once saying what it
    needs (the series before any of it is read), and the same node processes the next study."""
    models = tmp_path / "models"
    models.mkdir()
    for entry in model_repository.iterdir():
        (models / entry.name).symlink_to(entry)
    spec = threshold_spec(name="wide", output={"name": "logits", "channels": 128}, preprocessing={
        "orientation": "RAS", "spacing": [0.25, 0.25, 0.25], "intensity": {"window": [-1000.0, 1000.0]},
        "patch_size": [32, 32, 32], "overlap": 0.25, "batch_size": 1})
    export_onnx(_ManyClasses(), models / "wide.onnx", spec, (16, 16, 16))
    write_entry(models, spec, models / "wide.onnx")
    routing = {"rules": [{"name": "wide", "match": {"tag": "SeriesDescription", "equals": "Wide"},
                          "actions": {"run": ["wide"], "send_to": ["pacs"]}}, ROUTING["rules"][0]]}
    pacs = Orthanc(tmp_path / "pacs")
    pacs.start()
    try:
        with memory_limit_cgroup(2 * GiB) as prefix:
            node = NodeProcess(tmp_path / "node", routing=routing, launcher=tuple(prefix), scp={"workers": 1},
                               completion={"quiet_period_s": 1.0}, inference={"model_repository": str(models)},
                               destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1",
                                                      "port": pacs.dicom_port}})
            node.receivers = 1
            try:
                node.start()
                service = node.process.pid
                files, study_uid = sphere_study(tmp_path / "wide", "PAT-W", series_description="Wide")
                send(node, files)
                failed = _failed_alive(node, study_uid)
                assert re.fullmatch(
                    r"inference: model wide's output on this series needs 3\.\d\d GiB \(128 classes x \d+x\d+x\d+"
                    r" voxels, float32\); the node's machine or container allows 2\.00 GiB, of which its service"
                    r" holds 0\.\d\d GiB: run, it would be killed for memory; give the node more memory, or the"
                    r" model a coarser grid", failed.reason), failed.reason
                big_files, big_uid = _big_compressed_series(tmp_path / "big", "PAT-B", images=160, size=2048)
                sent = storescu(node.port, big_files, "MODALITY", "-xr")  # (RLE proposed: sent as they are)
                assert sent.returncode == 0, sent.stdout + sent.stderr
                failed = _failed_alive(node, big_uid)
                assert re.fullmatch(
                    r"load: the series' volume needs 2\.5\d GiB \(160 images of 2048x2048, decoded to float32\); the"
                    r" node's machine or container allows 2\.00 GiB, of which its service holds 0\.\d\d GiB: run, it"
                    r" would be killed for memory; give the node more memory", failed.reason), failed.reason
                other_files, other_uid = sphere_study(tmp_path / "other", "PAT-O")
                send(node, other_files)
                assert len(wait_results(pacs, other_uid)["SEG"]) == 1
                assert (node.process.poll(), node.process.pid) == (None, service)  # never killed
                assert [j.state for j in jobs_of(node)] == [JobState.FAILED, JobState.FAILED, JobState.DONE]
            finally:
                node.stop()
    finally:
        pacs.discard()
