"""Container health checks without curl: `python healthcheck.py http URL` or
`python healthcheck.py tcp HOST PORT`. Exit 0 when healthy, 1 otherwise."""

import socket
import sys
import urllib.request


def main(argv: list[str]) -> int:
    try:
        if argv[0] == "http":
            with urllib.request.urlopen(argv[1], timeout=5) as resp:
                return 0 if resp.status == 200 else 1
        if argv[0] == "tcp":
            socket.create_connection((argv[1], int(argv[2])), timeout=5).close()
            return 0
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
