import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python still loads the command: one line, nothing changed
    print("kd-mlflow: interrupted (SIGINT); no run was changed", file=sys.stderr)
    sys.exit(130)

main()
