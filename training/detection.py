"""Train, evaluate and export a 3D nodule detector: a small MONAI RetinaNet (``monai.apps.detection``).

Data: any MSD-layout dataset whose label marks the findings (synthetic chest phantoms from
``synth-chest``; a site's CT with DICOM SEG annotations through ``from-dicom-seg``). Each
volume goes through the spec's transforms, as segmentation training does (the node's grid,
orientation and window); each connected component of the label is one finding, its box the
component's extent. Training samples fixed patches (the spec's patch size), most of them
around a finding.

The exported ONNX file answers, for every anchor of a patch, the decoded box and its score
(``inference.detection`` describes the interface); anchors and box coding stay inside the
model, the node does the thresholding and non-maximum suppression.

Evaluation runs the exported file through the node's own detection code on held-out volumes:
FROC (sensitivity at 1/8 ... 8 false positives per scan, a finding found when a detection's
centre lies inside its box; MONAI's ``compute_froc_curve_data``), and COCO mAP at IoU 0.1
(MONAI's ``COCOMetric``).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.data.box_utils import COMPUTE_DTYPE, box_iou
from monai.metrics import compute_froc_curve_data, compute_froc_score
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from monai.networks.nets import resnet
from monai.transforms import Compose
from monai.utils import set_determinism
from scipy import ndimage
from torch import Tensor, nn

from inference.backends.local import LocalBackend
from inference.detection import model_boxes
from inference.spec import ModelSpec
from training.data.msd import load_msd, write_dataset_json, write_pair
from training.train import spec_transforms

FROC_RATES = (0.125, 0.25, 0.5, 1, 2, 4, 8)  # false positives per scan (LUNA16)
EVALUATION_THRESHOLD = 0.02  # detections kept for FROC and mAP: the curve needs the low scores too

# The network: sized for nodules of 3-8 voxels on 64^3 patches, and for 2 CPU cores.
CONV1_STRIDE = 2  # the stem halves the grid; no max-pool
RETURNED_LAYERS = (2, 3)  # pyramid levels at strides 4 and 8
BLOCK_INPLANES = (16, 32, 64, 128)
FPN_CHANNELS = 32  # divisible by 8: the heads use GroupNorm(8, C)
# Even sizes: MONAI rounds half an anchor to even, so 3 and 5 would silently become 4.
BASE_ANCHOR_SHAPES = ((4, 4, 4), (6, 6, 6))
FEATURE_MAP_SCALES = (1, 2)


class PyramidFeatures(nn.Module):
    """ResNet stem and layers feeding MONAI's FeaturePyramidNetwork. Written here because MONAI's
    BackboneWithFPN needs torchvision (not a dependency) and fixes 256 channels, too many for CPU."""

    def __init__(self, backbone: resnet.ResNet, returned_layers: Sequence[int], in_channels: Sequence[int],
                 out_channels: int):
        super().__init__()
        self.returned_layers = tuple(returned_layers)
        self.stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.act)
        self.layers = nn.ModuleList([getattr(backbone, f"layer{i}") for i in range(1, max(self.returned_layers) + 1)])
        self.fpn = FeaturePyramidNetwork(3, list(in_channels), out_channels, extra_blocks=None)
        self.out_channels = out_channels  # RetinaNet reads it

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.stem(x)
        features: OrderedDict[str, Tensor] = OrderedDict()
        for number, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if number in self.returned_layers:
                features[str(len(features))] = x
        return self.fpn(features)


def build_network(num_classes: int) -> tuple[RetinaNet, AnchorGeneratorWithAnchorShape]:
    backbone = resnet.ResNet(block=resnet.ResNetBlock, layers=[1, 1, 1, 1], block_inplanes=list(BLOCK_INPLANES),
                             spatial_dims=3, n_input_channels=1, conv1_t_size=3, conv1_t_stride=CONV1_STRIDE,
                             no_max_pool=True, feed_forward=False)
    features = PyramidFeatures(backbone, RETURNED_LAYERS, [BLOCK_INPLANES[i - 1] for i in RETURNED_LAYERS],
                               FPN_CHANNELS)
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=FEATURE_MAP_SCALES,
                                             base_anchor_shapes=BASE_ANCHOR_SHAPES)
    network = RetinaNet(spatial_dims=3, num_classes=num_classes, num_anchors=anchors.num_anchors_per_location()[0],
                        feature_extractor=features, size_divisible=CONV1_STRIDE * 2 ** (max(RETURNED_LAYERS) - 1))
    return network, anchors


class AtssDetector(RetinaNetDetector):
    """RetinaNetDetector whose anchor matching runs without torchvision: MONAI 1.6.1 checks the
    matcher against torchvision's Matcher class before it looks at ATSS."""

    def compute_anchor_matched_idxs(self, anchors, targets, num_anchor_locs_per_level):  # type: ignore[no-untyped-def]
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            boxes = target[self.target_box_key]
            if boxes.numel() == 0:
                matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64))
                continue
            _, found = self.proposal_matcher(boxes, anchors_per_image, num_anchor_locs_per_level,
                                             self.num_anchors_per_loc)
            matched.append(found)
        return matched


def build_detector(num_classes: int) -> AtssDetector:
    network, anchors = build_network(num_classes)
    detector = AtssDetector(network=network, anchor_generator=anchors)
    detector.set_target_keys(box_key="boxes", label_key="labels")
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    assert isinstance(detector.proposal_matcher, ATSSMatcher)
    return detector


class DetectionsHead(nn.Module):
    """The exported model: a patch in, every anchor's decoded box and score out, (N, anchors, 6 + classes).

    The anchors of the fixed patch are computed once (a buffer); decoding is BoxCoder.decode_single's
    arithmetic without its data-dependent NaN check (which does not export), and boxes are clipped to
    the patch as MONAI's box selector does. Checked against the detector on export."""

    def __init__(self, network: RetinaNet, anchor_generator: AnchorGeneratorWithAnchorShape, box_coder: BoxCoder,
                 patch: tuple[int, int, int]):
        super().__init__()
        self.network = network.eval()
        self.per_location = anchor_generator.num_anchors_per_location()[0]
        with torch.no_grad():
            probe = torch.zeros((1, 1, *patch))
            anchors = anchor_generator(probe, network(probe)[network.cls_key])[0].to(COMPUTE_DTYPE)
        self.register_buffer("centre", (anchors[:, :3] + anchors[:, 3:]) / 2)
        self.register_buffer("size", anchors[:, 3:] - anchors[:, :3])
        self.register_buffer("limit", torch.tensor(list(patch) * 2, dtype=torch.float32))
        self.register_buffer("weights", torch.tensor([float(w) for w in box_coder.weights]))
        self.clip = float(box_coder.boxes_xform_clip)

    def _flat(self, maps: list[Tensor]) -> Tensor:
        """(N, anchors x C, X, Y, Z) per level -> (N, X Y Z anchors, C), levels in order (as the detector)."""
        out = []
        for m in maps:
            n, c = m.shape[0], m.shape[1] // self.per_location
            out.append(m.view(n, self.per_location, c, *m.shape[2:]).permute(0, 3, 4, 5, 1, 2).reshape(n, -1, c))
        return torch.cat(out, dim=1)

    def forward(self, image: Tensor) -> Tensor:
        out = self.network(image)
        logits = self._flat(out[self.network.cls_key])
        relative = self._flat(out[self.network.box_reg_key]).to(COMPUTE_DTYPE) / self.weights
        centre = relative[..., :3] * self.size + self.centre
        half = 0.5 * torch.exp(torch.clamp(relative[..., 3:], max=self.clip)) * self.size
        boxes = torch.minimum(torch.clamp(torch.cat([centre - half, centre + half], dim=-1), min=0), self.limit)
        return torch.cat([boxes.to(torch.float32), torch.sigmoid(logits.to(torch.float32))], dim=-1)


# -- data ---------------------------------------------------------------------------------------


def make_chest_set(root: Path, count: int, seed: int = 0,
                   field_of_view: tuple[float, float, float] | None = None) -> Path:
    """`count` chest phantoms (label 1: nodules) as an MSD dataset, each on its own CT-like grid
    (0.7-1.4 mm pixels, 1-2 mm slices), so that training sees what resampling does to small nodules;
    each of its own size (200-260 mm across, 96-128 mm long) unless `field_of_view` is given."""
    from phantom.chest import chest_phantom
    from phantom.dicom import SeriesGeometry

    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        pixel, thickness = float(rng.uniform(0.7, 1.4)), float(rng.uniform(1.0, 2.0))
        fov = (float(rng.uniform(200, 260)),) * 2 + (float(rng.uniform(96, 128)),)
        fov = field_of_view or fov
        phantom = chest_phantom(rng, fov, nodules=(0, 4))
        geometry = SeriesGeometry(spacing=(thickness, pixel, pixel), origin=(-fov[0] / 2, -fov[1] / 2, -fov[2] / 2))
        shape = (int(fov[2] / thickness), int(fov[1] / pixel), int(fov[0] / pixel))
        hu, labels = phantom.sample(shape, geometry, seed=seed * 100_000 + i)
        pairs.append(write_pair(root, f"chest_{i:04d}", hu, labels, geometry.affine()))
    write_dataset_json(root, "synthetic-chest-nodules", pairs, {0: "background", 1: "nodule"})
    return root


@dataclass
class Volume:
    """A training volume on the model's grid (channel-first image) and its findings' boxes."""

    image: np.ndarray  # (1, X, Y, Z) float32
    boxes: np.ndarray  # (N, 6): x0 y0 z0 x1 y1 z1, voxel centres at integers
    labels: np.ndarray  # (N,) int64: index into spec.labels


def finding_boxes(label: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """Each connected component of each label value: its box (the voxels' extent) and its label index."""
    boxes, classes = [], []
    for index, spec_label in enumerate(spec.labels):
        components, _ = ndimage.label(label == spec_label.value)
        for where in ndimage.find_objects(components):
            lo = np.array([s.start for s in where], dtype=np.float32) - 0.5
            hi = np.array([s.stop - 1 for s in where], dtype=np.float32) + 0.5
            boxes.append(np.concatenate([lo, hi]))
            classes.append(index)
    return np.array(boxes, dtype=np.float32).reshape(-1, 6), np.array(classes, dtype=np.int64)


def load_volumes(data: Path, spec: ModelSpec) -> list[Volume]:
    pairs, _ = load_msd(data)
    transforms = Compose(spec_transforms(spec))
    volumes = []
    for pair in pairs:
        item = transforms(pair)
        image = np.asarray(item["image"], dtype=np.float32)
        boxes, classes = finding_boxes(np.asarray(item["label"])[0], spec)
        pad = [(0, 0)] + [(0, max(0, p - n)) for n, p in zip(image.shape[1:], spec.preprocessing.patch_size)]
        volumes.append(Volume(np.pad(image, pad, constant_values=float(image.min())), boxes, classes))
    return volumes


def sample_patch(volume: Volume, patch: tuple[int, int, int], rng: np.random.Generator,
                 positive: float = 0.7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A patch (around a random finding with probability `positive`, else anywhere), randomly
    flipped left-right and front-back, with the boxes whose centres it holds (clipped to it).
    (MONAI's RandCropBoxByPosNegLabeld does this on dictionaries with box masks; a patch from
    an array and a box list is these few lines.)"""
    size = np.array(volume.image.shape[1:])
    high = size - np.array(patch)
    if len(volume.boxes) and rng.random() < positive:
        box = volume.boxes[rng.integers(len(volume.boxes))]
        centre = (box[:3] + box[3:]) / 2
        origin = np.clip(np.round(centre - np.array(patch) / 2 + rng.uniform(-20, 20, 3)), 0, high).astype(int)
    else:
        origin = np.array([rng.integers(0, h + 1) for h in high])
    image = volume.image[(slice(None), *(slice(o, o + p) for o, p in zip(origin, patch)))].copy()
    boxes = volume.boxes - np.tile(origin, 2)
    centres = (boxes[:, :3] + boxes[:, 3:]) / 2
    inside = ((centres >= 0) & (centres < np.array(patch))).all(axis=1)
    boxes, classes = np.clip(boxes[inside], 0, np.tile(patch, 2)), volume.labels[inside]  # as the head clips
    for axis in (0, 1):
        if rng.random() < 0.5:
            image = np.flip(image, axis=axis + 1)
            lo, hi = boxes[:, axis].copy(), boxes[:, axis + 3].copy()
            boxes[:, axis], boxes[:, axis + 3] = patch[axis] - 1 - hi, patch[axis] - 1 - lo
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    return np.ascontiguousarray(image, dtype=np.float32), boxes.astype(np.float32), classes


# -- training -----------------------------------------------------------------------------------


def train_detector(data: Path, out: Path, spec: ModelSpec, iterations: int = 1500, batch_size: int = 4,
                   learning_rate: float = 1e-3, seed: int = 0) -> dict:
    """Train from an MSD dataset; `out`/last.pt and metrics.json (the loss every 50 iterations)."""
    set_determinism(seed=seed)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    volumes = load_volumes(data, spec)
    detector = build_detector(len(spec.labels))
    optimizer = torch.optim.Adam(detector.network.parameters(), lr=learning_rate, weight_decay=3e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=iterations,
                                                   pct_start=0.1)
    patch = spec.preprocessing.patch_size
    history, losses, started = [], [], time.perf_counter()
    detector.train()
    for iteration in range(1, iterations + 1):
        samples = [sample_patch(volumes[rng.integers(len(volumes))], patch, rng) for _ in range(batch_size)]
        images = torch.from_numpy(np.stack([s[0] for s in samples]))
        targets = [{"boxes": torch.from_numpy(s[1]), "labels": torch.from_numpy(s[2])} for s in samples]
        optimizer.zero_grad(set_to_none=True)
        parts = detector(images, targets)
        loss = parts[detector.cls_key] + parts[detector.box_reg_key]
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if iteration % 50 == 0 or iteration == iterations:
            history.append({"iteration": iteration, "loss": float(np.mean(losses[-50:])),
                            "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(history[-1]), flush=True)
    torch.save({"network": detector.network.state_dict(), "iterations": iterations, "seed": seed}, out / "last.pt")
    summary = {"iterations": iterations, "batch_size": batch_size, "volumes": len(volumes), "history": history}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def export_detector(checkpoint: Path, onnx_file: Path, spec: ModelSpec, tolerance: float = 1e-3) -> float:
    """The ONNX file (dynamic batch) of a checkpoint; returns its largest difference from PyTorch."""
    import onnxruntime as ort
    from torch.export import Dim

    detector = build_detector(len(spec.labels))
    detector.network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["network"])
    head = DetectionsHead(detector.network, detector.anchor_generator, detector.box_coder,
                          spec.preprocessing.patch_size).eval()
    example = torch.rand(2, 1, *spec.preprocessing.patch_size)
    onnx_file.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(head, (example,), str(onnx_file), input_names=[spec.input.name],
                      output_names=[spec.output.name], dynamic_shapes=({0: Dim("batch", min=1, max=64)},),
                      opset_version=18, external_data=False, verbose=False)
    probe = torch.rand(3, 1, *spec.preprocessing.patch_size)
    with torch.no_grad():
        expected = head(probe).numpy()
    got = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(
        [spec.output.name], {spec.input.name: probe.numpy()})[0]
    error = float(np.abs(got - expected).max())
    if got.shape != expected.shape or error > tolerance:
        raise RuntimeError(f"ONNX output differs from PyTorch: {got.shape} vs {expected.shape}, max error {error:.1e}")
    _check_against_detector(detector, head, spec, tolerance)
    return error


def _check_against_detector(detector: AtssDetector, head: DetectionsHead, spec: ModelSpec, tolerance: float,
                            floor: float = 0.05) -> None:
    """The head's boxes are the detector's own: MONAI's box selector with nothing suppressed (no
    top-k cut, NMS only of identical boxes) keeps what the head scores above `floor`, a side of a
    voxel or more. A nodule-like sphere in the probe gives the detector something to find."""
    patch = spec.preprocessing.patch_size
    grid = np.indices(patch).transpose(1, 2, 3, 0) - (np.array(patch) - 1) / 2
    probe = np.where(np.linalg.norm(grid, axis=-1) <= 4, 0.69, 0.1) + np.random.default_rng(0).normal(0, 0.01, patch)
    image = torch.from_numpy(probe[None, None].astype(np.float32))
    detector.eval()
    detector.set_box_selector_parameters(score_thresh=floor, topk_candidates_per_level=10**6, nms_thresh=1.0,
                                         detections_per_img=10**6)
    with torch.no_grad():
        theirs = detector(image)[0]
        mine = head(image)[0].numpy()
    mine = mine[(mine[:, 6:].max(axis=1) > floor) & ((mine[:, 3:6] - mine[:, :3]) >= 1).all(axis=1)]
    ours = np.concatenate([mine[:, :6], mine[:, 6:].max(axis=1, keepdims=True)], axis=1)
    reference = np.concatenate([theirs["boxes"].numpy(), theirs["labels_scores"].numpy()[:, None]], axis=1)
    ours, reference = (a[np.lexsort(np.round(a, 2).T[::-1])] for a in (ours, reference))
    if ours.shape != reference.shape or (len(ours) and float(np.abs(ours - reference).max()) > tolerance):
        raise RuntimeError(f"the exported head disagrees with MONAI's detector: {len(ours)} boxes vs {len(reference)}")


# -- evaluation ---------------------------------------------------------------------------------


def evaluate_detector(onnx_file: Path, data: Path, spec: ModelSpec) -> dict:
    """FROC and mAP of the exported model on held-out volumes, through the node's detection code."""
    backend = LocalBackend(onnx_file, spec)
    volumes = load_volumes(data, spec)
    tp_scores: list[float] = []
    fp_scores: list[float] = []
    predicted, truths = [], []
    for volume in volumes:
        found = model_boxes(volume.image[0], spec, backend, EVALUATION_THRESHOLD)
        boxes = np.array([np.concatenate([b.lo, b.hi]) for b in found], dtype=np.float32).reshape(-1, 6)
        scores = np.array([b.score for b in found], dtype=np.float32)
        classes = np.array([spec.labels.index(b.label) for b in found], dtype=np.int64)
        predicted.append((boxes, classes, scores))
        truths.append((volume.boxes, volume.labels))
        hit = np.zeros(len(volume.boxes), dtype=bool)
        best = np.zeros(len(volume.boxes), dtype=np.float32)
        centres = (boxes[:, :3] + boxes[:, 3:]) / 2
        for i, score in enumerate(scores):
            inside = ((centres[i] >= volume.boxes[:, :3]) & (centres[i] <= volume.boxes[:, 3:])).all(axis=1)
            if inside.any():  # a second detection of a found finding is neither hit nor false positive
                j = int(np.argmax(inside))
                best[j] = max(best[j], score)
                hit[j] = True
            else:
                fp_scores.append(float(score))
        tp_scores += [float(s) for s in best[hit]]
    targets = sum(len(v.boxes) for v in volumes)
    fps, sensitivity = compute_froc_curve_data(np.array(fp_scores), np.array(tp_scores), targets, len(volumes))
    at_rates = [float(np.interp(rate, fps[::-1], sensitivity[::-1])) for rate in FROC_RATES]
    froc = float(compute_froc_score(fps, sensitivity, FROC_RATES))
    coco_metric = COCOMetric(classes=[label.name for label in spec.labels], iou_list=[0.1],
                             iou_range=(0.1, 0.5, 0.05), max_detection=[100], verbose=False)
    matches = matching_batch(box_iou, coco_metric.iou_thresholds, [p[0] for p in predicted],
                             [p[1] for p in predicted], [p[2] for p in predicted], [t[0] for t in truths],
                             [t[1] for t in truths], max_detections=100)
    coco, _ = coco_metric(matches)
    operating = spec.postprocessing.threshold
    ranked = sorted(fp_scores, reverse=True)
    # per rate: the score a detection must exceed for at most that many false positives per scan
    cut = {f"{rate:g}": round(ranked[int(rate * len(volumes))], 4) if int(rate * len(volumes)) < len(ranked) else 0.0
           for rate in FROC_RATES}
    return {
        "volumes": len(volumes), "findings": targets,
        "froc": {f"{rate:g}": round(value, 4) for rate, value in zip(FROC_RATES, at_rates)},
        "froc_score": round(froc, 4),
        "score_above_for_rate": cut,
        "ap_iou_0.1": round(float(coco["AP_IoU_0.10_MaxDet_100"]), 4),
        "map_iou_0.1_to_0.5": round(float(coco["mAP_IoU_0.10_0.50_0.05_MaxDet_100"]), 4),
        "coco": {k: round(float(v), 4) for k, v in coco.items()},
        "operating_point": {
            "threshold": operating,
            "sensitivity": round(sum(s >= operating for s in tp_scores) / max(targets, 1), 4),
            "false_positives_per_scan": round(sum(s >= operating for s in fp_scores) / max(len(volumes), 1), 4),
        },
    }
