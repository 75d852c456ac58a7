"""`python -m moeopt ...` (what `torchrun -m moeopt ...` runs): the same CLI as the `moeopt` command."""

from moeopt.cli import main

if __name__ == "__main__":
    main()
