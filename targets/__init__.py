"""Deployment targets, one per module: each lowers a model, builds what runs on the device, and measures it."""
