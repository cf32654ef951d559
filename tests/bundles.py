"""MONAI bundles for the import tests, made with MONAI's own bundle tooling (`init_bundle`).

The network is the demo lesion model: a MONAI UNet whose trained weights are read back from the
shipped ONNX file (its parameters keep their PyTorch names; the PReLU slopes are the PRelu nodes'
inputs, in order) and checked against ONNX Runtime, so the bundle finds the phantom's lesions
without training in the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tests.peers import REPO_ROOT

SHIPPED_ONNX = REPO_ROOT / "models" / "lesion-seg" / "1" / "model.onnx"
NETWORK_DEF = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
               "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 2}
LESION_CODES = {"lesion": {"category": {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"},
                           "type": {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}}}


def demo_network() -> Any:
    """The demo UNet with the shipped model's weights (checked: same output as the ONNX file)."""
    import onnx
    import onnxruntime as ort
    import torch
    from monai.networks.nets import UNet
    from onnx import numpy_helper

    graph = onnx.load(str(SHIPPED_ONNX)).graph
    weights = {i.name: numpy_helper.to_array(i).copy() for i in graph.initializer}
    network = UNet(**{k: v for k, v in NETWORK_DEF.items() if k != "_target_"})
    own = network.state_dict()
    state = {k: torch.from_numpy(v) for k, v in weights.items() if k in own}
    slopes = [n.input[1] for n in graph.node if n.op_type == "PRelu"]
    for key, slope in zip([k for k in own if k.endswith("adn.A.weight")], slopes, strict=True):
        state[key] = torch.from_numpy(weights[slope]).reshape(own[key].shape)
    network.load_state_dict(state, strict=True)
    network.eval()
    probe = np.random.default_rng(0).random((1, 1, 32, 32, 32), dtype=np.float32)
    expected = ort.InferenceSession(str(SHIPPED_ONNX), providers=["CPUExecutionProvider"]).run(None, {"image": probe})[0]
    with torch.no_grad():
        got = network(torch.from_numpy(probe)).numpy()
    assert float(np.abs(got - expected).max()) < 1e-3, "weights read back from the ONNX file do not reproduce it"
    return network


def inference_config(extra_preprocessing: list[dict[str, Any]] | None = None, out_channels: int = 2) -> dict[str, Any]:
    """An inference.json as the Model Zoo writes them (the spleen bundle's shape, the demo's settings)."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cpu')",
        "network_def": {**NETWORK_DEF, "out_channels": out_channels},
        "network": "$@network_def.to(@device)",
        "pixdim": [2.0, 2.0, 2.0],
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim", "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000, "a_max": 500, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            *(extra_preprocessing or []),
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 64], "sw_batch_size": 2,
                    "overlap": 0.25, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg"},
        ]},
    }


def metadata(version: str = "0.1.0", channel_def: dict[str, str] | None = None,
             num_channels: int | None = None) -> dict[str, Any]:
    channel_def = channel_def or {"0": "background", "1": "lesion"}
    return {
        "version": version, "monai_version": "1.6.1", "pytorch_version": "2.13.0", "numpy_version": "2",
        "name": "Phantom lesion segmentation", "task": "Lesion segmentation on synthetic CT phantoms",
        "description": "A 3-D UNet that finds spherical lesions in synthetic CT phantoms",
        "authors": "dicom-node tests", "copyright": "Copyright (c) the dicom-node authors",
        "intended_use": "Testing only, not for clinical use",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": [64, 64, 64], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": num_channels or len(channel_def),
                                 "spatial_shape": [64, 64, 64], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": channel_def}},
        },
    }


def make_bundle(folder: Path, network: Any, version: str = "0.1.0",
                extra_preprocessing: list[dict[str, Any]] | None = None,
                channel_def: dict[str, str] | None = None, num_channels: int | None = None) -> Path:
    """A bundle folder (configs/metadata.json, configs/inference.json, models/model.pt); a network
    with other classes than the demo's (background, lesion) comes with its `channel_def`, and its
    `num_channels` where that names fewer."""
    from monai.bundle import init_bundle

    described = metadata(version, channel_def, num_channels)
    channels = described["network_data_format"]["outputs"]["pred"]["num_channels"]
    init_bundle(folder, network=network, metadata_str=json.dumps(described),
                inference_str=json.dumps(inference_config(extra_preprocessing, channels)))
    return folder
