"""Says hello with the arguments it was given."""

import os
import sys


def main() -> None:
    print(f"Hello from work unit {os.environ.get('LXM_WORK_UNIT_ID')}, "
          f"task {os.environ.get('LXM_TASK_ID')}; arguments: {sys.argv[1:]}")


if __name__ == "__main__":
    main()
