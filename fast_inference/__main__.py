"""`python -m fast_inference serve ...`: the same CLI as the `fast-inference` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
