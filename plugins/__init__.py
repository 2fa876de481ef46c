"""Sources of the TensorRT plugins d2mc builds on the device (CMake projects), shipped as package data."""
