"""Deterministic synthetic road scenes ("demo roads") in Cityscapes layout.

The built-in demo must train and evaluate on a fresh machine with no download, so the project
renders its own small data set instead of shipping or fetching one. Every image is a simple 3D
street drawn through a pinhole camera (road with lane marks, sidewalks, facades with windows,
trees, poles with signs and traffic lights, people, riders, cars, trucks, buses, trams,
motorcycles, bicycles), painted with class-specific colours and textures plus noise, blur and
lighting changes, so that the 19 Cityscapes classes are learnable but not trivially separable
by colour.

Layout written under ``out_dir`` (readable as-is by mmseg's ``CityscapesDataset``)::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png       RGB
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  uint8, 0..18, 255
    anomaly/images/demo_anomaly_<i>.png                                       RGB
    anomaly/labels_masks/demo_anomaly_<i>.png     uint8: 0 inlier, 1 anomaly, 255 void
    manifest.json                                 version, parameters, sha256 of every file

The anomaly split is held out (its own random streams) and contains, on the road, objects of
classes outside the 19 (animals, cardboard boxes, cones, tyres, rocks, planks, blobs with
unnatural colours and textures). Void (255) marks the ego-vehicle bonnet that some frames show;
the same bonnet is 255 (ignore) in the semantic labels, as in Cityscapes.

Generation is deterministic (the same parameters give the same bytes), idempotent (an up-to-date
manifest means nothing is written) and atomic (files go to a hidden sibling folder that is
renamed into place only when complete; a leftover from an interrupted run is removed first).
Only numpy and OpenCV are used: this folder is a tool (``tools/make_demo_data.py``), not part of
the installed ``eomt_mm`` package, so that ``import eomt_mm`` does not load a renderer.

Modules: :mod:`.labels` (class and anomaly names), :mod:`.drawing` (rasterisation, canvas,
camera, colours), :mod:`.objects` (street objects), :mod:`.anomalies` (objects of no class),
:mod:`.scene` (one frame), :mod:`.writer` (the data set on disk).
"""
from .labels import ANOMALY_TYPES, CLASSES, IGNORE_INDEX
from .scene import render_demo_scene
from .writer import DEMO_VERSION, DemoDatasetInfo, demo_dataset_is_current, generate_demo_dataset

__all__ = [
    'DEMO_VERSION', 'CLASSES', 'IGNORE_INDEX', 'ANOMALY_TYPES', 'DemoDatasetInfo',
    'generate_demo_dataset', 'demo_dataset_is_current', 'render_demo_scene'
]
