"""Kubernetes operator for ImageDiffusionService: renders and applies a worker Deployment, Service and PVC."""
