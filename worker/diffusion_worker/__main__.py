"""`python -m diffusion_worker`."""

from diffusion_worker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
