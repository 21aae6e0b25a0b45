"""`python -m pinkybrain.v5 <cmd>`: the seed's spelling of the `pinkybrain` command."""

from pinkybrain.cli import main

if __name__ == "__main__":
    main()
