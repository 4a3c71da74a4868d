"""`python -m diffusion_operator`: run the kopf operator configured from DIFFUSION_OPERATOR_* env vars.

One active instance is assured by the deployment (a single replica with the Recreate strategy), so
kopf runs standalone, without peering objects or the RBAC they need.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

import kopf

from diffusion_operator.config import ConfigError, OperatorConfig, config_from_env


def configure_logging(config: OperatorConfig) -> None:
    """JSON lines (one object per record) by default, plain text when asked."""
    log_format = kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=False, log_format=log_format)


def run_operator(
    config: OperatorConfig,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
    liveness: bool = True,
) -> None:
    """Run kopf with our handlers until stopped (by a signal, or by stop_flag when given)."""
    from diffusion_operator.handlers import build_registry

    kopf.run(
        registry=build_registry(),
        standalone=True,
        clusterwide=config.clusterwide,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint if liveness else None,
        memo=kopf.Memo(config=config),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m diffusion_operator` and the `diffusion-operator` script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print(
            "Environment: DIFFUSION_OPERATOR_NAMESPACES (comma-separated; empty: all), "
            "DIFFUSION_OPERATOR_LIVENESS_PORT (8080), DIFFUSION_OPERATOR_WORKER_IMAGE, "
            "DIFFUSION_OPERATOR_LOG_FORMAT (json|plain), DIFFUSION_OPERATOR_RESYNC_SECONDS (60), "
            "DIFFUSION_OPERATOR_POD_IP (the liveness endpoint listens on its address family)."
        )
        return 0
    try:
        config = config_from_env()
    except ConfigError as exc:
        print(f"diffusion-operator: {exc}", file=sys.stderr)
        return 2
    configure_logging(config)
    run_operator(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
