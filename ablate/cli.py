"""The ``ablate`` command: one entry point for every tool, ``ablate <command> [arguments]``.

Each command is a module's own entry point, handed the rest of the command line as it is, so
``ablate run ...`` is ``python -m ablate.run ...`` (Hydra's command line, its ``--help`` the
project's help template) and ``ablate report ...`` is ``python -m ablate.report ...``.

Tab completion is Hydra's: ``eval "$(ablate run -sc install=bash)"`` installs it for ``ablate``, and
the shell then asks ``ablate -sc query=bash`` with the line typed so far (``COMP_LINE``). ``complete``
answers for the command names itself and hands the overrides of ``ablate run`` and ``ablate plan``
(the same overrides) to Hydra's completion, with the command name taken out of the line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

# command -> (module whose main() runs it, what it does)
COMMANDS = {
    "run": ("ablate.run", "train one recipe, or sweep many with -m (Hydra overrides; ablate run --help)"),
    "plan": ("ablate.plan", "list a sweep's jobs, their status and an estimate, without training"),
    "report": ("ablate.report.document", "tables, verdicts, charts, REPORT.md and report.html from run records"),
    "models": ("ablate.models", "the registered networks: parameters, MACs, description"),
    "eval": ("ablate.evaluation", "evaluate a run's final weights again, with or without TTA"),
    "bench": ("ablate.bench.__main__", "throughput: augmentation, training steps, the engine, the 2019 loop"),
    "demo": ("ablate.demo", "the final recipe on this machine, reported beside the committed journey"),
}
HYDRA_COMMANDS = ("run", "plan")  # commands whose arguments are Hydra overrides (completed by Hydra)
COMPLETION_FLAGS = ("-sc", "--shell-completion")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ablate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay, measure and ablate every step of 'How to train your ResNet' (CIFAR-10 to 94%).",
        epilog="Each command has its own --help. Examples:\n"
               "  ablate run +step=step8 scale=cpu\n"
               "  ablate plan -m +experiment=arch15\n"
               "  ablate report runs/experiments/arch15\n\n"
               "Tab completion (bash): eval \"$(ablate run -sc install=bash)\"")
    commands = p.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in COMPLETION_FLAGS and "COMP_LINE" in os.environ:
        complete(os.environ["COMP_LINE"])
        return
    if not argv or argv[0] not in COMMANDS:
        parser().parse_args(argv)  # --help, or a usage error naming the commands (exit 2)
        return
    dispatch(argv[0], argv[1:])


def dispatch(command: str, args: list[str]) -> None:
    """Run ``command``'s entry point as ``python -m <module> <args>`` would."""
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = ["ablate", *args]  # Hydra names the completion it installs after sys.argv[0]
    code = module.main(args)
    if isinstance(code, int):
        sys.exit(code)


def complete(line: str) -> None:
    """Answer the shell's completion query for ``line`` (what was typed after the prompt)."""
    words = line.split()
    typing_command = len(words) <= 1 or (len(words) == 2 and not line.endswith(" "))
    if typing_command:
        prefix = words[1] if len(words) == 2 else ""
        print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
    elif words[1] in HYDRA_COMMANDS:
        from ablate import run

        parts = line.split(None, 2)  # the program, the command, the overrides as typed (a trailing space kept)
        os.environ["COMP_LINE"] = f"{parts[0]} {parts[2] if len(parts) > 2 else ''}"
        run.main(["-sc", "query=bash"])
    # other commands take paths and flags: the shell's own file completion (complete -o default)


if __name__ == "__main__":
    main()
