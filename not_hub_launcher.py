"""The `not-hub` command's entry point, outside the `not_hub` package: the CLI's imports (torch, transformers) take
seconds, and a Ctrl-C while they run would print a traceback from deep inside them. Here it prints one line and
exits with 130, as Ctrl-C during a command does."""

import sys


def main() -> int:
    try:
        from not_hub.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
