"""Start Flower against our broker, with authentication, or refuse to start.

    python -m worker.flower [--port 5555] [--address 0.0.0.0] [extra flower options]

FLOWER_BASIC_AUTH="user:password[,user2:password2]" is required. Flower reads that variable
itself, so the password never appears on a command line (`ps`, shell history). Without it
the launcher exits with status 2, unless FLOWER_INSECURE_DEV=1 is set, a development-only
escape hatch that starts Flower open to anyone who can reach the port, and says so loudly.

What Flower shows: task names, states, runtimes, retries, worker pools and queues. Task
arguments carry ids only: the enqueue API publishes {"job_id": N}; a sender that calls
writeback.* by name with the intent (markdown included) should pass `kwargsrepr=` (e.g.
kwargsrepr=repr({"session_id": 5})); the worker also rewrites the "received" event's
arguments to ids only (worker.signals), which is what Flower keeps for each task. Flower's
/healthcheck and /metrics answer without authentication; neither carries task arguments.
"""
from __future__ import annotations

import os
import sys

AUTH_VAR = "FLOWER_BASIC_AUTH"
DEV_FLAG = "FLOWER_INSECURE_DEV"


class FlowerConfigError(SystemExit):
    pass


def check_auth(env: dict[str, str]) -> str | None:
    """Returns a warning for the insecure mode, None when auth is set; raises when neither."""
    raw = env.get(AUTH_VAR, "").strip()
    if raw:
        for pair in raw.split(","):
            user, sep, password = pair.partition(":")
            if not sep or not user.strip() or not password:
                raise FlowerConfigError(f"{AUTH_VAR} must be user:password pairs separated by commas "
                                        "(a password cannot contain a comma)")
            if len(password) < 12:
                raise FlowerConfigError(f"{AUTH_VAR}: the password for {user!r} is shorter than 12 characters")
        return None
    if env.get(DEV_FLAG, "").strip() == "1":
        return (f"WARNING: {DEV_FLAG}=1: Flower is starting WITHOUT authentication. Anyone who can reach "
                "the port can see every task and revoke or send tasks. Never use this outside a laptop.")
    raise FlowerConfigError(f"refusing to start Flower without authentication: set {AUTH_VAR}=user:password "
                            f"(or, on a development machine only, {DEV_FLAG}=1)")


def command(argv: list[str]) -> list[str]:
    args = list(argv)
    if not any(a.startswith("--port") for a in args):
        args.append(f"--port={os.environ.get('PORT', os.environ.get('FLOWER_PORT', '5555'))}")
    return [sys.executable, "-m", "celery", "-A", "worker", "flower", *args]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ)
    try:
        warning = check_auth(env)
    except FlowerConfigError as err:
        print(f"psa-writeback flower: {err}", file=sys.stderr)
        return 2
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if any(a.startswith("--basic-auth") or a.startswith("--basic_auth") for a in argv):
        print("psa-writeback flower: pass credentials in FLOWER_BASIC_AUTH, not on the command line",
              file=sys.stderr)
        return 2
    # Flower maps every FLOWER_* variable to an option and fails on unknown ones.
    env.pop(DEV_FLAG, None)
    cmd = command(argv)
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main())
