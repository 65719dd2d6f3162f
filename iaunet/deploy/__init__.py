"""A trained model for other tools: the network and its post-processing exported as one ONNX /
TorchScript graph (:mod:`.export`) and bioimage.io model packages (:mod:`.bioimageio`;
docs/deploy.md).
The exported files are read back by :mod:`iaunet.inference.backends`."""
