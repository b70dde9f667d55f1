"""Label sets of the demo data: the 19 Cityscapes train ids and the anomaly kinds."""

__all__ = ['CLASSES', 'IGNORE_INDEX', 'ANOMALY_TYPES']

# Cityscapes' 19 evaluation classes, in train-id order.
CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light',
           'traffic sign', 'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck',
           'bus', 'train', 'motorcycle', 'bicycle')
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)
IGNORE_INDEX = 255  # void: the ego-vehicle bonnet, and anomaly pixels in the semantic labels

# Kinds of out-of-distribution objects placed on the road in the anomaly split.
ANOMALY_TYPES = ('animal', 'box', 'cone', 'tyre', 'rock', 'plank', 'odd_blob')
