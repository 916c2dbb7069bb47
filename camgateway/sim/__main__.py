"""``python -m camgateway.sim``: the same as ``camgateway-sim``."""

from camgateway.sim.cli import main

if __name__ == "__main__":
    main()
