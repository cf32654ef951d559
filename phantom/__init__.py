"""Synthetic studies with known truth: CT phantoms (lesions), chest radiographs (nodules).

Below the node and training: training makes its data sets from them, the node's demo sends a
phantom study (`dicom-node demo`), and the tests use them. Imports none of node, inference or
training.
"""
