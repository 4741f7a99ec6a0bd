"""``hexgen redis-acl --out FILE [--json] [--redis-url BASE]``: a Redis ACL file with one least-privilege user
per HexGen role (head, worker, client) and fresh random passwords; prints the Redis URL of each role.

Start Redis with it (``redis-server --aclfile FILE``, or ``aclfile FILE`` in redis.conf then ``ACL LOAD``)
and give each process its role's URL (``--redis-url``, ``HEXGEN_REDIS_URL`` or ``[redis] url``). The file
holds password hashes only; the printed URLs hold the passwords, so keep the output secret. What each role
may do and why: :mod:`hexgen.wire.acl` and docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hexgen.wire.acl import ROLES, acl_text, new_passwords, role_urls

DEFAULT_BASE = "redis://localhost:6379/0"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hexgen redis-acl",
        description="Write a Redis ACL file with the "
        "hexgen-head, hexgen-worker and hexgen-client users; print their URLs",
    )
    p.add_argument("--out", required=True, help="ACL file to write (mode 0600; an existing file is replaced)")
    p.add_argument(
        "--redis-url",
        default=DEFAULT_BASE,
        help="address the URLs point at, with any TLS or "
        f"sentinel options (credentials in it are replaced; default {DEFAULT_BASE})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by role")
    return p


def write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (created 0600, replaced atomically)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    passwords = new_passwords()
    try:
        urls = role_urls(args.redis_url, passwords)
        write_private(args.out, acl_text(passwords))
    except ValueError as e:
        print(f"hexgen redis-acl: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"hexgen redis-acl: cannot write {args.out!r}: {e.strerror}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(urls, indent=2))
    else:
        for role, url in urls.items():
            print(f"{role:<7} {ROLES[role].user:<14} {url}")
        print(f"# wrote {args.out}: start redis-server --aclfile {args.out}; keep these URLs secret", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
