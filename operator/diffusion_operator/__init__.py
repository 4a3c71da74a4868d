"""Kubernetes operator for ImageDiffusionService: renders and applies a worker Deployment, Service,
PodDisruptionBudget and model-cache PVC."""
