"""The offline workflow: trace formats and importers, recording, labeling,
training and ONNX export, and replay through simulated replicas (device
model and simulated policies)."""
