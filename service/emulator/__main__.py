"""`python -m service.emulator`: the emulator without the bridge's main CLI."""

from service.emulator.cli import emulator_command

if __name__ == "__main__":
    emulator_command(prog_name="python -m service.emulator")
